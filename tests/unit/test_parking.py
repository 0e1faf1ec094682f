"""Parking on its own: what a block holds, and what the actor learns from the store when a
block changes elsewhere (another process handled the blocker, the CLI skipped it, or its
retry never came back)."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from runtime.bus.protocol import X_ORDERING_KEY, Delivery
from runtime.errors import ParkedError
from runtime.observability.metrics import Metrics
from runtime.parking import Parking
from runtime.store.memory import MemoryEventStore
from runtime.store.protocol import ParkedKey, utcnow

STREAM = "complaints.events"


def event(key: str, seq: int, exchange: str = STREAM) -> Delivery:
    return Delivery(
        queue="worker",
        message_id=f"{key}-{seq}-{uuid.uuid4().hex[:4]}",
        body=b"{}",
        headers={X_ORDERING_KEY: key},
        exchange=exchange,
        routing_key=f"reg.{key}",
        redelivered=False,
        delivery_tag=seq,
        consumer=-1,
    )


class Dead:
    def __init__(self) -> None:
        self.letters: list[tuple[Delivery, BaseException]] = []

    async def __call__(self, delivery: Delivery, error: BaseException) -> None:
        self.letters.append((delivery, error))


@pytest.fixture
def dead() -> Dead:
    return Dead()


@pytest.fixture
def store() -> MemoryEventStore:
    return MemoryEventStore()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def parking(store: MemoryEventStore, dead: Dead, metrics: Metrics) -> Parking:
    return Parking("worker", store, frozenset({STREAM}), dead, metrics)


def gauge(metrics: Metrics, name: str) -> float:
    collector = getattr(metrics, name)
    return float(collector.get({"actor": "worker"}))


async def test_a_blocked_aggregate_holds_its_later_events_and_releases_them_in_order(
    parking: Parking, store: MemoryEventStore, metrics: Metrics
) -> None:
    blocker, later, other = event("a", 0), [event("a", 1), event("a", 2)], event("b", 0)
    assert not await parking.intercept(blocker)
    await parking.failed(blocker, dead=False, reason="RuntimeError: boom")
    assert [await parking.intercept(d) for d in later] == [True, True]
    assert not await parking.intercept(other)  # other aggregates flow
    assert not await parking.intercept(blocker)  # its retried copy is handled
    assert (gauge(metrics, "parked_aggregates"), gauge(metrics, "parked_events")) == (1, 2)
    assert [row.key for row in await store.parked_keys("worker")] == ["a"]

    assert await parking.succeeded(blocker) == later
    assert await store.parked_keys() == []
    assert (gauge(metrics, "parked_aggregates"), gauge(metrics, "parked_events")) == (0, 0)
    assert not await parking.intercept(event("a", 3))


async def test_messages_of_other_exchanges_are_never_parked(parking: Parking) -> None:
    message = event("a", 0, exchange="saga.events")
    await parking.failed(message, dead=False, reason="boom")
    assert parking.blocks == {}
    assert not await parking.intercept(event("a", 1, exchange="saga.events"))


async def test_a_dead_blocker_takes_what_waits_behind_it_to_the_dlq(
    parking: Parking, dead: Dead
) -> None:
    blocker, held = event("a", 0), event("a", 1)
    await parking.failed(blocker, dead=False, reason="boom")
    assert await parking.intercept(held)
    await parking.failed(blocker, dead=True, reason="boom")
    await parking.dead_lettered(blocker)
    later = event("a", 2)
    assert await parking.intercept(later)  # straight to the DLQ behind it
    assert [d for d, _ in dead.letters] == [held, later]
    error = dead.letters[0][1]
    assert isinstance(error, ParkedError)
    assert error.blocker == blocker.message_id


async def test_a_block_lifted_elsewhere_releases_the_held_events_at_the_workers_turn(
    parking: Parking, store: MemoryEventStore
) -> None:
    blocker, held = event("a", 0), event("a", 1)
    await parking.failed(blocker, dead=False, reason="boom")
    assert await parking.intercept(held)
    assert await store.unpark("worker", "a", blocker.message_id)  # another process, the CLI
    assert await parking.poll() == {"a"}
    late = event("a", 2)
    assert await parking.intercept(late)  # still behind the held one until the worker's turn
    assert await parking.take_changes({"a"}) == [held, late]
    assert parking.blocks == {}


async def test_a_blocker_dead_lettered_elsewhere_sends_the_held_events_after_it(
    parking: Parking, store: MemoryEventStore, dead: Dead
) -> None:
    blocker, held = event("a", 0), event("a", 1)
    await parking.failed(blocker, dead=False, reason="boom")
    assert await parking.intercept(held)
    await store.park(ParkedKey("worker", "a", blocker.message_id, True, "boom", utcnow()))
    assert await parking.poll() == {"a"}
    assert await parking.take_changes({"a"}) == []
    assert [d for d, _ in dead.letters] == [held]


async def test_a_retry_that_never_comes_back_turns_the_block_dead(
    store: MemoryEventStore, dead: Dead
) -> None:
    parking = Parking("worker", store, frozenset({STREAM}), dead, stale_after=0.0)
    blocker, held = event("a", 0), event("a", 1)
    await parking.failed(blocker, dead=False, reason="boom")
    assert await parking.intercept(held)
    assert await parking.poll() == {"a"}
    await parking.take_changes({"a"})
    assert [d for d, _ in dead.letters] == [held]
    (row,) = await store.parked_keys("worker")
    assert row.dead
    assert "did not come back" in row.reason


async def test_blocks_recorded_before_a_restart_are_loaded(
    store: MemoryEventStore, dead: Dead
) -> None:
    await store.park(ParkedKey("worker", "a", "a-0", False, "boom", utcnow()))
    await store.park(ParkedKey("other", "b", "b-0", False, "boom", utcnow()))
    parking = Parking("worker", store, frozenset({STREAM}), dead)
    await parking.load()
    assert set(parking.blocks) == {"a"}
    assert await parking.intercept(event("a", 1))
    assert not await parking.intercept(event("b", 1))


def copy(delivery: Delivery, attempts: int = 1) -> Delivery:
    """``delivery`` as it comes back from the work queue (a retry copy, or a replay)."""
    return msgspec.structs.replace(
        delivery, consumer=7, headers={**delivery.headers, "x-attempts": attempts}
    )


async def test_a_block_recorded_elsewhere_is_learnt_and_holds_this_processs_events(
    parking: Parking, store: MemoryEventStore
) -> None:
    await store.park(ParkedKey("worker", "a", "a-0", False, "boom", utcnow()))
    assert await parking.poll() == set()
    assert await parking.intercept(event("a", 1))


async def test_a_copy_that_succeeds_lifts_its_block_in_the_store_even_when_it_is_elsewhere(
    parking: Parking, store: MemoryEventStore
) -> None:
    blocker = event("a", 0)
    await store.park(ParkedKey("worker", "a", blocker.message_id, False, "boom", utcnow()))
    assert await parking.succeeded(copy(blocker)) == []
    assert await store.parked_keys() == []


async def test_a_dead_block_takes_a_returning_retry_copy_along_but_handles_a_replay(
    parking: Parking, dead: Dead
) -> None:
    blocker = event("a", 0)
    await parking.failed(blocker, dead=True, reason="lost")
    assert await parking.intercept(copy(blocker, attempts=2))  # to the DLQ with the others
    assert not await parking.intercept(copy(blocker, attempts=0))  # a replay: handled
    assert [d.headers["x-attempts"] for d, _ in dead.letters] == [2]


async def test_too_many_held_copies_send_the_aggregate_to_the_dlq_in_order(
    store: MemoryEventStore, dead: Dead
) -> None:
    parking = Parking("worker", store, frozenset({STREAM}), dead, max_held_copies=2)
    blocker = event("a", 0)
    await parking.failed(blocker, dead=False, reason="boom")
    copies = [copy(event("a", seq), 0) for seq in (2, 3, 4)]  # replayed, say
    waiting = [event("a", 1), *copies, event("a", 5)]
    for delivery in waiting:
        assert await parking.intercept(delivery)
    assert [d for d, _ in dead.letters] == waiting  # the third copy turned the block dead
    (row,) = await store.parked_keys("worker")
    assert row.dead


async def test_a_block_turned_dead_elsewhere_sends_what_it_held_before_what_comes_next(
    parking: Parking, store: MemoryEventStore, dead: Dead
) -> None:
    blocker, held, later = event("a", 0), event("a", 1), event("a", 2)
    await parking.failed(blocker, dead=False, reason="boom")
    assert await parking.intercept(held)
    await store.park(ParkedKey("worker", "a", blocker.message_id, True, "boom", utcnow()))
    assert await parking.poll() == {"a"}
    assert await parking.intercept(later)  # before the worker's turn came
    assert [d for d, _ in dead.letters] == [held, later]


async def test_too_many_held_events_send_the_aggregate_to_the_dlq(
    store: MemoryEventStore, dead: Dead
) -> None:
    parking = Parking("worker", store, frozenset({STREAM}), dead, max_held=3)
    await parking.failed(event("a", 0), dead=False, reason="boom")
    waiting = [event("a", seq) for seq in range(1, 6)]
    for delivery in waiting:
        assert await parking.intercept(delivery)
    assert [d for d, _ in dead.letters] == waiting  # the fourth turned the block dead
    assert parking.blocks["a"].held == []
