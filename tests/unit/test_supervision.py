"""Supervision semantics with a fake clock: backoff, reset, restart types, escalation."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import anyio
import pytest
from anyio.abc import TaskStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.actor import InstanceFigures
from runtime.backoff import Backoff, RestartIntensity
from runtime.errors import EscalationError, UnknownActorError
from runtime.hooks import Hooks
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.supervisor import ActorRunner, Supervisor
from runtime.topology import ActorSpec, Topology, parse_topology

Behaviour = Literal["crash", "exit", "forever", "crash-after-start"]


class FakeClock:
    """Virtual time: sleeping advances the clock instantly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class Scripted:
    """An actor instance that does what its script says, once per start."""

    def __init__(self, behaviour: Behaviour, clock: FakeClock, runs: float = 0.0) -> None:
        self.behaviour = behaviour
        self.clock = clock
        self.runs = runs  # virtual seconds it runs before crashing or exiting
        self.drained = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        if self.behaviour == "crash":
            raise RuntimeError("boom")
        task_status.started()
        self.clock.now += self.runs
        if self.behaviour == "crash-after-start":
            await anyio.lowlevel.checkpoint()
            raise RuntimeError("boom after start")
        if self.behaviour == "forever":
            await self.drained.wait()

    def drain(self) -> None:
        self.drained.set()

    def figures(self) -> InstanceFigures:
        return InstanceFigures()


def topology(actors_yaml: str, restart: str = "") -> Topology:
    text = f"""
defaults:
  restart: {{min_backoff: 1s, max_backoff: 8s, jitter: 0, max_restarts: 5, window: 60s,
             reset_after: 30s {restart}}}
actors:
{actors_yaml}
"""
    return parse_topology(text, check_handlers=False)


def service(name: str, extra: str = "") -> str:
    return f"  {name}: {{kind: service, handler: tests.support.nothing:Nothing {extra}}}\n"


def runner(spec: ActorSpec, script: Callable[[], Scripted], clock: FakeClock) -> ActorRunner:
    return ActorRunner(
        spec.name,
        spec,
        script,
        hooks=Hooks(),
        metrics=Metrics(),
        rng=random.Random(7),
        clock=clock,
        sleep=clock.sleep,
    )


# --- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_from_the_minimum_up_to_the_maximum() -> None:
    backoff = Backoff(0.5, 30.0, 0.0, random.Random(1))
    assert [backoff.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


@settings(max_examples=200, deadline=None)
@given(
    min_backoff=st.floats(0.001, 10),
    factor=st.floats(1, 100),
    jitter=st.floats(0, 0.99),
    restart=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_jitter_never_breaks_the_maximum(
    min_backoff: float, factor: float, jitter: float, restart: int, seed: int
) -> None:
    max_backoff = min_backoff * factor
    backoff = Backoff(min_backoff, max_backoff, jitter, random.Random(seed))
    delay = backoff.delay(restart)
    base = min(max_backoff, min_backoff * 2 ** min(restart - 1, 62))
    assert 0 <= delay <= max_backoff
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_the_same_seed_gives_the_same_jittered_delays() -> None:
    def delays(seed: int) -> list[float]:
        b = Backoff(0.5, 30, 0.2, random.Random(seed))
        return [b.delay(n) for n in range(1, 8)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_restart_intensity_counts_only_the_window() -> None:
    intensity = RestartIntensity(max_restarts=2, window=10)
    assert not intensity.record(0)
    assert not intensity.record(5)
    assert intensity.record(9)  # three within 10 s
    assert not intensity.record(18)  # 0 and 5 slid out of (8, 18]; 9 and 18 remain
    assert intensity.recent == 2


# --- the runner ----------------------------------------------------------------------------


async def test_a_crash_looping_actor_backs_off_then_escalates() -> None:
    clock = FakeClock()
    spec = topology(service("looper")).actors["looper"]
    loop = runner(spec, lambda: Scripted("crash", clock), clock)
    with pytest.raises(EscalationError) as caught:
        await loop.run()
    assert loop.delays == [1, 2, 4, 8, 8]  # five restarts are allowed, the sixth escalates
    assert loop.state == "failed"
    assert caught.value.actor == "looper"
    assert "RuntimeError: boom" in str(caught.value)
    assert "max_restarts" in str(caught.value)


async def test_the_backoff_resets_after_a_healthy_run() -> None:
    clock = FakeClock()
    spec = topology(service("flaky")).actors["flaky"]
    scripts = iter(
        [Scripted("crash-after-start", clock, runs=0) for _ in range(3)]
        + [Scripted("crash-after-start", clock, runs=31)]  # healthy for longer than reset_after
        + [Scripted("crash-after-start", clock, runs=0)]
        + [Scripted("forever", clock)]
    )
    flaky = runner(spec, lambda: next(scripts), clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(flaky.run)
        while flaky.restarts < 5 or flaky.state != "running":
            await anyio.lowlevel.checkpoint()
        await flaky.stop()
    assert flaky.delays == [1, 2, 4, 1, 2]
    assert flaky.state == "stopped"


@pytest.mark.parametrize(
    ("restart_type", "behaviour", "restarted", "final_state"),
    [
        ("permanent", "exit", True, "running"),
        ("transient", "exit", False, "stopped"),
        ("transient", "crash-after-start", True, "running"),
        ("temporary", "crash-after-start", False, "failed"),
        ("temporary", "exit", False, "stopped"),
    ],
)
async def test_restart_types_follow_otp(
    restart_type: str, behaviour: Behaviour, restarted: bool, final_state: str
) -> None:
    clock = FakeClock()
    spec = topology(service("a"), restart=f", type: {restart_type}").actors["a"]
    scripts = iter([Scripted(behaviour, clock), Scripted("forever", clock)])
    actor = runner(spec, lambda: next(scripts), clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(actor.run)
        with anyio.fail_after(5):
            while not actor.done.is_set() and actor.restarts == 0:
                await anyio.lowlevel.checkpoint()
            while restarted and actor.state != "running":
                await anyio.lowlevel.checkpoint()
        assert (actor.restarts > 0) == restarted
        assert actor.state == final_state
        await actor.stop()


async def test_an_injected_crash_restarts_the_instance() -> None:
    clock = FakeClock()
    spec = topology(service("victim")).actors["victim"]
    made: list[Scripted] = []

    def make() -> Scripted:
        made.append(Scripted("forever", clock))
        return made[-1]

    victim = runner(spec, make, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(victim.run)
        victim.crash()
        with anyio.fail_after(5):
            while len(made) < 2 or victim.state != "running":
                await anyio.lowlevel.checkpoint()
        assert victim.restarts == 1
        assert victim.last_error is not None
        assert "InjectedCrash" in victim.last_error
        await victim.stop()


# --- the supervisor --------------------------------------------------------------------------


class NoBus:
    """Supervision needs no bus here: the fake instances never consume."""

    connected = True


def supervised(
    topo: Topology,
    clock: FakeClock,
    make: Callable[[str, ActorSpec], Scripted],
    bus: object | None = None,
) -> Supervisor:
    """A supervisor on a virtual clock whose actors are scripted fakes."""
    return Supervisor(
        topo,
        store=MemoryEventStore(),
        bus=bus or NoBus(),  # type: ignore[arg-type]
        metrics=Metrics(),
        hooks=Hooks(),
        clock=clock,
        sleep=clock.sleep,
        make_instance=make,
    )


async def test_a_crashing_actor_leaves_its_siblings_alone() -> None:
    clock = FakeClock()
    topo = topology(service("steady") + service("crashy"))
    starts: dict[str, int] = {"steady": 0, "crashy": 0}

    def make(name: str, spec: ActorSpec) -> Scripted:
        starts[name] += 1
        if name == "crashy" and starts[name] <= 3:
            return Scripted("crash-after-start", clock)
        return Scripted("forever", clock)

    supervisor = supervised(topo, clock, make)
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(5):
            while starts["crashy"] < 4 or not supervisor.ready:
                await anyio.lowlevel.checkpoint()
        stats = {s.name: s for s in supervisor.statistics()}
        assert stats["crashy"].restarts == 3
        assert stats["steady"].restarts == 0
        assert starts["steady"] == 1
        with pytest.raises(UnknownActorError, match="steady, crashy"):
            supervisor.crash("nobody")
        supervisor.stop()
    assert {s.state for s in supervisor.statistics()} == {"stopped"}


async def test_escalation_stops_the_supervisor_with_the_reason() -> None:
    clock = FakeClock()
    topo = topology(service("steady") + service("doomed"))

    def make(name: str, spec: ActorSpec) -> Scripted:
        return Scripted("forever" if name == "steady" else "crash", clock)

    supervisor = supervised(topo, clock, make)
    with pytest.raises(EscalationError, match="doomed"):
        await supervisor.run()
    assert not supervisor.live
    assert not supervisor.ready


async def test_actors_start_in_order_and_stop_in_reverse() -> None:
    clock = FakeClock()
    topo = topology(service("first") + service("second") + service("third"))
    events: list[str] = []

    class Recording(Scripted):
        def __init__(self, name: str) -> None:
            super().__init__("forever", clock)
            self.name = name

        async def run(self, *, task_status: TaskStatus[None]) -> None:
            events.append(f"start {self.name}")
            await super().run(task_status=task_status)
            events.append(f"stop {self.name}")

    supervisor = supervised(topo, clock, lambda name, spec: Recording(name))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        supervisor.stop()
    assert events == [
        "start first",
        "start second",
        "start third",
        "stop third",
        "stop second",
        "stop first",
    ]


class DeclaringBus:
    connected = True

    def __init__(self) -> None:
        self.declared = 0

    async def declare(self, plan: object) -> None:
        self.declared += 1


async def test_reload_restarts_changed_actors_only() -> None:
    clock = FakeClock()
    before = topology(service("kept") + service("changed") + service("removed"))
    after = topology(service("kept") + service("changed", ", consumers: 4") + service("added"))
    starts: list[str] = []

    def make(name: str, spec: ActorSpec) -> Scripted:
        starts.append(f"{name}/{spec.consumers}")
        return Scripted("forever", clock)

    bus = DeclaringBus()
    supervisor = supervised(before, clock, make, bus=bus)
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        changes = await supervisor.reload(after)
        assert changes == {"added": ["added"], "changed": ["changed"], "removed": ["removed"]}
        assert [s.name for s in supervisor.statistics()] == ["kept", "changed", "added"]
        assert all(s.state == "running" for s in supervisor.statistics())
        supervisor.stop()
    assert starts == ["kept/1", "changed/1", "removed/1", "changed/4", "added/1"]
    assert bus.declared == 1


# --- regressions found in review ------------------------------------------------------------


class SlowStart(Scripted):
    """Takes a while (real time) to be ready, like a consumer waiting for the broker."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.move_on_after(0.3):
            await self.drained.wait()
        if self.drained.is_set():
            return  # drained before it was ready: never starts running
        await super().run(task_status=task_status)


async def test_stopping_an_actor_that_is_still_starting_does_not_hang() -> None:
    clock = FakeClock()
    spec = topology(service("slow")).actors["slow"]
    slow = runner(spec, lambda: SlowStart("forever", clock), clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow.run)
        await anyio.sleep(0.05)
        assert slow.state == "starting"
        with anyio.fail_after(5):
            await slow.stop()
    assert slow.state == "stopped"


async def test_restarts_spread_wider_than_the_window_still_escalate() -> None:
    """A backoff longer than the window never puts max_restarts in one window; the
    consecutive count (reset only by a healthy run) escalates instead of spinning."""
    clock = FakeClock()
    spec = parse_topology(
        "defaults:\n"
        "  restart: {min_backoff: 20s, max_backoff: 20s, jitter: 0, window: 5s,"
        " max_restarts: 3}\n"
        "actors:\n" + service("spread"),
        check_handlers=False,
    ).actors["spread"]
    spread = runner(spec, lambda: Scripted("crash", clock), clock)
    with pytest.raises(EscalationError, match="in a row"):
        await spread.run()
    assert spread.delays == [20, 20, 20]


async def test_a_handler_constructor_that_raises_crashes_only_its_actor() -> None:
    clock = FakeClock()
    topo = topology(service("steady") + service("broken"))
    attempts = {"broken": 0}

    def make(name: str, spec: ActorSpec) -> Scripted:
        if name == "broken":
            attempts["broken"] += 1
            if attempts["broken"] <= 2:
                raise ValueError("option 'x' missing")
        return Scripted("forever", clock)

    supervisor = supervised(topo, clock, make)
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(5):
            while not supervisor.ready:
                await anyio.lowlevel.checkpoint()
        stats = {s.name: s for s in supervisor.statistics()}
        assert stats["broken"].restarts == 2
        assert "option 'x' missing" in (stats["broken"].last_error or "")
        assert stats["steady"].restarts == 0
        supervisor.stop()


class RefusingBus(DeclaringBus):
    async def declare(self, plan: object) -> None:
        from runtime.errors import BusError  # noqa: PLC0415

        raise BusError("queue 'q' already exists with other settings")


async def test_a_reload_the_broker_refuses_keeps_the_running_topology(tmp_path: Path) -> None:
    from runtime.app import _reload  # noqa: PLC0415

    clock = FakeClock()
    topo = topology(service("kept"))
    (tmp_path / "t.yaml").write_text("actors:\n  other: {kind: service, handler: x:Y}\n")
    supervisor = supervised(
        topo, clock, lambda name, spec: Scripted("forever", clock), bus=RefusingBus()
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        import runtime.app as app  # noqa: PLC0415
        from runtime.topology import load_topology  # noqa: PLC0415

        original = app.load_topology
        app.load_topology = lambda path: load_topology(path, check_handlers=False)  # type: ignore[assignment]
        try:
            await _reload(supervisor, tmp_path / "t.yaml")
        finally:
            app.load_topology = original
        assert [s.name for s in supervisor.statistics()] == ["kept"]
        assert supervisor.ready
        supervisor.stop()
