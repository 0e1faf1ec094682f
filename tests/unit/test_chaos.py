"""The chaos drill's schedule: a pure function of seed, duration, mean interval and actors,
so `magasin chaos --seed S` replays a drill exactly; and the command's dry run."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.cli import chaos_schedule, main

seeds = st.integers(min_value=0, max_value=2**64)
durations = st.floats(min_value=0.0, max_value=600.0)
intervals = st.floats(min_value=0.05, max_value=60.0)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
actor_lists = st.lists(names, min_size=1, max_size=6, unique=True)


@settings(max_examples=100, deadline=None)
@given(seeds, durations, intervals, actor_lists)
def test_a_seed_replays_the_same_schedule(
    seed: int, duration: float, interval: float, actors: list[str]
) -> None:
    assert chaos_schedule(seed, duration, interval, actors) == chaos_schedule(
        seed, duration, interval, actors
    )


@settings(max_examples=100, deadline=None)
@given(seeds, durations, intervals, actor_lists, st.randoms(use_true_random=False))
def test_the_order_the_actors_are_given_in_does_not_matter(
    seed: int, duration: float, interval: float, actors: list[str], rng: random.Random
) -> None:
    shuffled = list(actors)
    rng.shuffle(shuffled)

    assert chaos_schedule(seed, duration, interval, shuffled) == chaos_schedule(
        seed, duration, interval, actors
    )


@settings(max_examples=100, deadline=None)
@given(seeds, durations, intervals, actor_lists)
def test_crashes_fall_within_the_duration_in_order_and_hit_only_the_given_actors(
    seed: int, duration: float, interval: float, actors: list[str]
) -> None:
    schedule = chaos_schedule(seed, duration, interval, actors)

    offsets = [offset for offset, _ in schedule]
    assert all(0 < offset < duration for offset in offsets)
    assert offsets == sorted(offsets)
    assert {actor for _, actor in schedule} <= set(actors)


def test_different_seeds_give_different_schedules() -> None:
    actors = ["audit", "complaints", "notifications"]
    schedules = {tuple(chaos_schedule(seed, 60, 2, actors)) for seed in range(20)}

    assert len(schedules) == 20


def test_crashes_arrive_at_about_the_mean_interval_and_spread_over_the_actors() -> None:
    schedule = chaos_schedule(7, 10_000, 2, ["a", "b", "c"])

    assert 4_500 < len(schedule) < 5_500  # 10 000 s / 2 s, give or take
    for actor in "abc":
        assert 1_400 < sum(1 for _, name in schedule if name == actor) < 1_900


def test_no_actors_means_no_crashes() -> None:
    assert chaos_schedule(1, 60, 2, []) == []


def test_the_mean_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        chaos_schedule(1, 60, 0, ["a"])


def test_a_dry_run_prints_the_seed_then_the_schedule_and_calls_nothing() -> None:
    args = ["chaos", "--seed", "42", "--duration", "30s", "--actors", "b,a", "--dry-run"]
    args += ["--url", "http://127.0.0.1:1"]  # nothing listens there; a call would fail

    result = CliRunner().invoke(main, args)

    lines = result.output.splitlines()
    expected = chaos_schedule(42, 30, 2, ["a", "b"])
    assert result.exit_code == 0, result.output
    assert lines[0] == "chaos seed 42"
    assert [line.split()[-1] for line in lines[2:]] == [actor for _, actor in expected]
    assert lines[2].startswith(f"+{expected[0][0]:8.3f}s")
