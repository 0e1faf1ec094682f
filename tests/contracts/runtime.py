"""The message path through a real supervisor: the same tests on the memory bus and on
RabbitMQ. A backend's module subclasses ``RuntimeContract`` and provides ``bus``."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest

from runtime.bus.protocol import X_ORDERING_KEY, X_VERSION, Bus, StreamWrite
from runtime.errors import EscalationError
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.stream_source import stream_offset_name
from runtime.supervisor import Supervisor
from runtime.topology import Topology, parse_topology
from tests.support.workers import ATTEMPTS, BATCHES, FIXED, HANDLED, REDELIVERED, job

EXCHANGE = "saga.events"  # a queue-bound exchange (domain exchanges are streams)


def worker_topology(
    registry: str,
    queue: str,
    *,
    consumers: int = 1,
    prefetch: int = 16,
    max_attempts: int = 3,
    handler_timeout: str = "5s",
    max_restarts: int = 10,
    handler: str = "Recorder",
    batch_size: int = 64,
) -> Topology:
    return parse_topology(
        f"""
grace_period: 5s
defaults:
  restart: {{min_backoff: 50ms, max_backoff: 200ms, max_restarts: {max_restarts}}}
  retry: {{delays: [100ms, 300ms], max_attempts: {max_attempts},
           handler_timeout: {handler_timeout}}}
actors:
  worker:
    kind: subscriber
    handler: tests.support.workers:{handler}
    queue: {queue}
    batch_size: {batch_size}
    bind: {{{EXCHANGE}: ["{registry}.#"]}}
    consumers: {consumers}
    prefetch: {prefetch}
    options: {{registry: {registry}}}
""",
        source="test",
    )


@asynccontextmanager
async def running(bus: Bus, topology: Topology) -> AsyncIterator[Supervisor]:
    async with running_on(bus, topology, MemoryEventStore()) as supervisor:
        yield supervisor


async def publish(bus: Bus, registry: str, key: str, seq: int, do: str = "ok", **kw: float) -> None:
    await bus.publish(
        EXCHANGE,
        f"{registry}.{key}",
        job(key, seq, do, **kw),
        message_id=f"{key}-{seq}-{uuid.uuid4().hex[:6]}",
        headers={X_ORDERING_KEY: key},
    )


async def wait_until(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``condition`` (state owned by other tasks) until it holds, or fail."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - polling other tasks' state is the point
            await anyio.sleep(0.02)


class RuntimeContract:
    @pytest.fixture
    def names(self) -> tuple[str, str]:
        token = uuid.uuid4().hex[:8]
        return f"reg{token}", f"q.{token}"

    async def test_each_key_is_handled_in_order_with_four_workers(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        keys = [f"k{i}" for i in range(8)]
        async with running(bus, worker_topology(registry, queue, consumers=4)):
            for seq in range(25):
                for key in keys:
                    await publish(bus, registry, key, seq, "sleep", seconds=random.random() / 500)
            await wait_until(lambda: len(HANDLED[registry]) == 200)
        for key in keys:
            assert [s for k, s, _ in HANDLED[registry] if k == key] == list(range(25))

    async def test_a_failing_message_climbs_the_ladder_to_the_dlq_while_others_flow(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        async with running(bus, worker_topology(registry, queue, max_attempts=3)):
            await publish(bus, registry, "poison", 0, "fail")
            for seq in range(10):
                await publish(bus, registry, "good", seq)
            await wait_until(lambda: len(HANDLED[registry]) == 10)
            await wait_until(lambda: len(ATTEMPTS[registry]) == 13)
            letters = await _wait_dead_letters(bus, queue, 1)
        poison = [a for k, _, a in ATTEMPTS[registry] if k == "poison"]
        assert poison == [0, 1, 2]  # first try, then one per rung
        (letter,) = letters
        assert letter.error_type == "RuntimeError"
        assert "always fails" in letter.error
        assert letter.attempts == 3
        assert letter.headers["x-actor"] == "worker"
        assert letter.headers["x-first-failed-at"]

    async def test_reject_and_undecodable_messages_go_straight_to_the_dlq(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        async with running(bus, worker_topology(registry, queue)):
            await publish(bus, registry, "r", 0, "reject")
            await bus.publish(EXCHANGE, f"{registry}.junk", b"{not json", message_id="junk-1")
            await publish(bus, registry, "after", 0)
            await wait_until(lambda: len(HANDLED[registry]) == 1)
            letters = await _wait_dead_letters(bus, queue, 2)
        by_type = {letter.error_type: letter for letter in letters}
        assert set(by_type) == {"Reject", "MessageDecodeError"}
        assert by_type["Reject"].attempts == 1
        assert "junk-1" in by_type["MessageDecodeError"].error
        assert len([a for a in ATTEMPTS[registry] if a[0] == "r"]) == 1

    async def test_a_crash_mid_message_redelivers_it_and_it_is_handled_once(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        async with running(bus, worker_topology(registry, queue)) as supervisor:
            await publish(bus, registry, "slow", 0, "sleep", seconds=0.5)
            await wait_until(lambda: len(ATTEMPTS[registry]) == 1)
            supervisor.crash("worker")
            await wait_until(lambda: len(HANDLED[registry]) == 1)
            await wait_until(lambda: supervisor.ready)
            stats = supervisor.statistics()[0]
        assert stats.restarts == 1
        assert "InjectedCrash" in (stats.last_error or "")
        assert HANDLED[registry] == [("slow", 0, 0)]
        assert len(ATTEMPTS[registry]) == 2  # interrupted once, then completed once

    async def test_a_handler_timeout_restarts_the_actor_and_retries_the_message(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        topology = worker_topology(registry, queue, handler_timeout="200ms", max_attempts=2)
        async with running(bus, topology) as supervisor:
            await publish(bus, registry, "stuck", 0, "sleep", seconds=30)
            await publish(bus, registry, "fine", 0)
            await wait_until(lambda: ("fine", 0, 0) in HANDLED[registry])
            letters = await _wait_dead_letters(bus, queue, 1)
            await wait_until(lambda: supervisor.ready)
            assert supervisor.statistics()[0].restarts >= 1
        assert letters[0].error_type == "HandlerTimeoutError"

    async def test_an_unavailable_store_holds_the_message_and_handles_it_again(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        """An outage is not the message's fault: no retry rung, no requeue (which would
        burn its delivery limit), no restart; the same delivery is handled again."""
        registry, queue = names
        async with running(bus, worker_topology(registry, queue)) as supervisor:
            await publish(bus, registry, "db", 0, "down")
            await wait_until(lambda: bool(supervisor.statistics()[0].waiting_on))
            assert not supervisor.ready, "an actor waiting out an outage is not ready"
            assert "StoreUnavailableError" in (supervisor.statistics()[0].waiting_on or "")
            await wait_until(lambda: len(HANDLED[registry]) == 1)
            await wait_until(lambda: supervisor.ready)
            assert supervisor.statistics()[0].restarts == 0
        assert [a for _, _, a in ATTEMPTS[registry]] == [0, 0]
        assert REDELIVERED[registry] == set()
        assert await bus.list_dead_letters(queue) == []

    async def test_a_batch_handler_takes_its_mailbox_at_once_in_order_each_message_once(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        topology = worker_topology(
            registry, queue, prefetch=64, handler="BatchRecorder", batch_size=16
        )
        keys = [f"k{i}" for i in range(4)]
        async with running(bus, topology):
            await publish(bus, registry, "first", 0, "sleep", seconds=0.3)  # the mailbox fills
            for seq in range(30):
                for key in keys:
                    await publish(bus, registry, key, seq)
            await wait_until(lambda: len(HANDLED[registry]) == 121)
            await anyio.sleep(0.2)  # nothing more arrives
        expected = [("first", 0, 0), *((k, s, 0) for k in keys for s in range(30))]
        assert sorted(HANDLED[registry]) == sorted(expected)
        for key in keys:
            assert [s for k, s, _ in HANDLED[registry] if k == key] == list(range(30))
        assert max(BATCHES[registry]) > 1, "the mailbox was never handed over as a batch"
        assert max(BATCHES[registry]) <= 16

    async def test_a_failing_batch_is_handled_again_one_message_at_a_time(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        """The batch fails as a whole; then each message gets its own outcome: the good
        ones are handled once, the rejected one is dead-lettered, the outage is waited out."""
        registry, queue = names
        topology = worker_topology(registry, queue, handler="BatchRecorder", batch_size=16)
        async with running(bus, topology):
            await publish(bus, registry, "first", 0, "sleep", seconds=0.3)  # mailbox fills
            await publish(bus, registry, "a", 0)
            await publish(bus, registry, "bad", 0, "reject")
            await publish(bus, registry, "db", 0, "down")
            await publish(bus, registry, "a", 1)
            await wait_until(lambda: len(HANDLED[registry]) == 4)
            letters = await _wait_dead_letters(bus, queue, 1)
        handled = [(k, s) for k, s, _ in HANDLED[registry]]
        assert sorted(handled) == [("a", 0), ("a", 1), ("db", 0), ("first", 0)]
        assert handled.index(("a", 0)) < handled.index(("a", 1))
        assert [letter.error_type for letter in letters] == ["Reject"]

    async def test_an_unroutable_publish_is_the_messages_failure_not_the_actors(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        async with running(bus, worker_topology(registry, queue, max_attempts=2)) as supervisor:
            await publish(bus, registry, "lost", 0, "unroutable")
            await publish(bus, registry, "fine", 0)
            letters = await _wait_dead_letters(bus, queue, 1)
            await wait_until(lambda: ("fine", 0, 0) in HANDLED[registry])
            assert supervisor.statistics()[0].restarts == 0
        assert letters[0].error_type == "UnroutableError"
        assert letters[0].attempts == 2

    async def test_stopping_finishes_in_flight_work_and_loses_nothing(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        topology = worker_topology(registry, queue, consumers=2, prefetch=8)
        async with running(bus, topology) as supervisor:
            for seq in range(40):
                await publish(bus, registry, f"k{seq % 4}", seq, "sleep", seconds=0.02)
            await wait_until(lambda: len(HANDLED[registry]) >= 5)
            supervisor.stop()
            await wait_until(lambda: supervisor.statistics()[0].state == "stopped")
        started = {(k, s) for k, s, _ in ATTEMPTS[registry]}
        done = {(k, s) for k, s, _ in HANDLED[registry]}
        assert started == done, "an in-flight message was abandoned by the drain"
        # What was not handled is still in the queue: a new runtime handles exactly the rest.
        async with running(bus, topology):
            await wait_until(lambda: len(HANDLED[registry]) >= 40)
            await anyio.sleep(0.2)
        handled = sorted(s for _, s, _ in HANDLED[registry])
        assert handled == list(range(40))

    async def test_rescaling_from_one_to_four_consumers_and_back_loses_nothing(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        one = worker_topology(registry, queue, consumers=1)
        four = worker_topology(registry, queue, consumers=4)
        async with running(bus, one) as supervisor:

            async def producer() -> None:
                for seq in range(150):
                    await publish(bus, registry, f"k{seq % 6}", seq, "sleep", seconds=0.002)
                    if seq % 10 == 0:
                        await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(producer)
                await anyio.sleep(0.3)
                assert (await supervisor.reload(four))["changed"] == ["worker"]
                await wait_until(lambda: supervisor.statistics()[0].consumers == 4)
                await anyio.sleep(0.3)
                await supervisor.reload(one)
            await wait_until(lambda: len(HANDLED[registry]) >= 150)
            await anyio.sleep(0.2)
        handled = [s for _, s, _ in HANDLED[registry]]
        assert sorted(handled) == list(range(150)), "lost or duplicated across the rescale"
        # First deliveries keep their key's order. A message the broker hands back when the
        # old instance's channel closes may come back after a newer one: the bus does not
        # promise order on redelivery, and consumers that need it heal from the event store.
        for key in {f"k{i}" for i in range(6)}:
            seqs = [
                s
                for k, s, _ in HANDLED[registry]
                if k == key and (k, s) not in REDELIVERED[registry]
            ]
            assert seqs == sorted(seqs), (key, seqs)

    async def test_too_many_crashes_escalate(self, bus: Bus, names: tuple[str, str]) -> None:
        registry, queue = names
        topology = worker_topology(registry, queue, max_restarts=2)
        await bus.declare(topology.bus_plan())
        supervisor = Supervisor(
            topology, store=MemoryEventStore(), bus=bus, metrics=Metrics(), rng=random.Random(2)
        )
        escalated: list[EscalationError] = []

        async def run() -> None:
            try:
                await supervisor.run()
            except EscalationError as exc:
                escalated.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            for _ in range(3):
                await wait_until(lambda: bool(supervisor.runners))
                await wait_until(lambda: supervisor.statistics()[0].state == "running")
                supervisor.crash("worker")
                await wait_until(
                    lambda: bool(escalated) or supervisor.statistics()[0].state != "running"
                )
            await wait_until(lambda: bool(escalated))
        assert escalated[0].actor == "worker"
        assert not supervisor.live


async def _wait_dead_letters(bus: Bus, queue: str, count: int) -> list:  # type: ignore[type-arg]
    letters: list = []  # type: ignore[type-arg]

    def enough() -> bool:
        return len(letters) >= count

    with anyio.fail_after(20):
        while not enough():
            letters = list(await bus.list_dead_letters(queue))
            if not enough():
                await anyio.sleep(0.05)
    return letters


# --- the stream path: actors bound to a domain exchange read its stream --------------------

STREAM = "complaints.events"  # the default topology's domain: a stream, not a queue binding


def stream_topology(registry: str, queue: str, **kw: object) -> Topology:
    """``worker_topology`` with the worker bound to the domain stream instead."""
    topology = worker_topology(registry, queue, **kw)  # type: ignore[arg-type]
    worker = topology.actors["worker"]
    bound = msgspec.structs.replace(worker, bind={STREAM: (f"{registry}.#",)})
    return msgspec.structs.replace(topology, actors={"worker": bound})


_publishing_ids = itertools.count(1)


async def write(bus: Bus, registry: str, key: str, seq: int, do: str = "ok", **kw: float) -> None:
    await write_jobs(bus, [(registry, key, seq, do, kw)])


async def write_jobs(bus: Bus, jobs: list[tuple[str, str, int, str, dict[str, float]]]) -> None:
    """One chunk of jobs, as the relay writes a batch."""
    await bus.write_stream(
        STREAM,
        "tests",
        [
            StreamWrite(
                next(_publishing_ids),
                f"{registry}.{key}",
                f"{key}-{seq}-{uuid.uuid4().hex[:6]}",
                job(key, seq, do, **kw),
                {X_ORDERING_KEY: key, X_VERSION: seq},
            )
            for registry, key, seq, do, kw in jobs
        ],
    )


@asynccontextmanager
async def running_on(
    bus: Bus, topology: Topology, store: MemoryEventStore
) -> AsyncIterator[Supervisor]:
    """``running`` on a given store (where the stream offsets are saved)."""
    await bus.declare(topology.bus_plan())
    supervisor = Supervisor(topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            yield supervisor
        finally:
            supervisor.stop()


def saved_offset(store: MemoryEventStore) -> int:
    saved = store._checkpoints.get(stream_offset_name("worker", STREAM))
    return -1 if saved is None else saved.position


async def wait_until_offset_passes_the_tail(bus: Bus, store: MemoryEventStore) -> None:
    tail = await bus.stream_tail(STREAM, "tests")
    assert tail is not None
    await wait_until(lambda: saved_offset(store) == tail.offset + 1)


class StreamRuntimeContract:
    @pytest.fixture
    def names(self) -> tuple[str, str]:
        token = uuid.uuid4().hex[:8]
        return f"reg{token}", f"q.{token}"

    async def test_each_key_is_handled_in_order_with_four_workers(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        keys = [f"k{i}" for i in range(8)]
        async with running(bus, stream_topology(registry, queue, consumers=4)):
            for seq in range(25):
                await write_jobs(
                    bus,
                    [
                        (registry, key, seq, "sleep", {"seconds": random.random() / 500})
                        for key in keys
                    ],
                )
            await wait_until(lambda: len(HANDLED[registry]) == 200)
        for key in keys:
            assert [s for k, s, _ in HANDLED[registry] if k == key] == list(range(25))

    async def test_entries_bound_elsewhere_are_not_handed_to_the_actor(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()
        async with running_on(bus, stream_topology(registry, queue), store):
            await write(bus, f"other{registry}", "x", 0)
            await write(bus, registry, "mine", 0)
            await wait_until(lambda: len(HANDLED[registry]) == 1)
            # every entry up to the last is settled or not ours: the offset passes them all
            await wait_until_offset_passes_the_tail(bus, store)
        assert HANDLED[registry] == [("mine", 0, 0)]
        assert ATTEMPTS.get(f"other{registry}") is None

    async def test_a_failing_entry_climbs_the_ladder_to_the_dlq_while_others_flow(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()
        async with running_on(bus, stream_topology(registry, queue, max_attempts=3), store):
            await write(bus, registry, "poison", 0, "fail")
            for seq in range(10):
                await write(bus, registry, "good", seq)
            await wait_until(lambda: len(HANDLED[registry]) == 10)
            await wait_until(lambda: len(ATTEMPTS[registry]) == 13)
            letters = await _wait_dead_letters(bus, queue, 1)
            # the poison entry was settled by its first retry: the offset does not wait for it
            await wait_until_offset_passes_the_tail(bus, store)
        assert [a for k, _, a in ATTEMPTS[registry] if k == "poison"] == [0, 1, 2]
        (letter,) = letters
        assert letter.attempts == 3
        assert letter.headers["x-original-exchange"] == STREAM
        assert letter.headers["x-original-routing-key"] == f"{registry}.poison"

    async def test_a_failing_event_holds_back_its_aggregates_later_events_while_others_flow(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()
        topology = stream_topology(registry, queue, max_attempts=4)

        def handled(key: str) -> list[int]:
            return [seq for k, seq, _ in HANDLED[registry] if k == key]

        async with running_on(bus, topology, store):
            await write_jobs(
                bus,
                [
                    (registry, "a", 0, "flaky", {"fails": 2}),
                    *[(registry, "a", seq, "ok", {}) for seq in range(1, 5)],
                    *[(registry, "b", seq, "ok", {}) for seq in range(5)],
                ],
            )
            await wait_until(lambda: handled("b") == [0, 1, 2, 3, 4])
            # a/0 waits 100 ms, then 300 ms on the ladder: a's later events wait behind it
            assert handled("a") == []
            (block,) = await store.parked_keys("worker")
            assert (block.key, block.dead) == ("a", False)
            assert "fails 2 time(s)" in block.reason
            await wait_until(lambda: len(handled("a")) == 5)
            await wait_until_offset_passes_the_tail(bus, store)
            assert await store.parked_keys() == []
        assert handled("a") == [0, 1, 2, 3, 4]
        assert [a for k, seq, a in ATTEMPTS[registry] if (k, seq) == ("a", 0)] == [0, 1, 2]
        assert len(ATTEMPTS[registry]) == 12  # nothing behind a/0 was tried before it passed

    async def test_a_dead_lettered_event_takes_its_aggregate_to_the_dlq_until_replayed(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()

        def handled(key: str) -> list[int]:
            return [seq for k, seq, _ in HANDLED[registry] if k == key]

        async with running_on(bus, stream_topology(registry, queue, max_attempts=2), store):
            await write_jobs(
                bus,
                [
                    (registry, "a", 0, "broken", {}),
                    (registry, "a", 1, "ok", {}),
                    (registry, "b", 0, "ok", {}),
                    (registry, "a", 2, "ok", {}),
                ],
            )
            await _wait_dead_letters(bus, queue, 3)
            (block,) = await store.parked_keys("worker")
            assert (block.key, block.dead) == ("a", True)
            await write(bus, registry, "a", 3)  # while the blocker is dead: straight behind it
            letters = await _wait_dead_letters(bus, queue, 4)
            await wait_until_offset_passes_the_tail(bus, store)  # parked ones are settled
            assert handled("a") == []
            assert handled("b") == [0]
            by_seq = {msgspec.json.decode(letter.body)["seq"]: letter for letter in letters}
            assert by_seq[0].error_type == "RuntimeError"
            for seq in (1, 2, 3):
                assert by_seq[seq].error_type == "ParkedError"
                assert by_seq[0].message_id in by_seq[seq].error
                assert by_seq[seq].attempts == 0  # parked, never tried
            FIXED.add(f"{registry}/a")  # the code is fixed: replay, the blocker first
            assert await bus.replay_dead_letters(queue) == 4
            await wait_until(lambda: len(handled("a")) == 4)
            await wait_until(lambda: not store._parked)  # lifted in the store too
        assert handled("a") == [0, 1, 2, 3]
        assert [k for k, _, _ in ATTEMPTS[registry]].count("a") == 2 + 4  # a/0 twice, then all

    async def test_a_blocker_handled_by_another_runtime_releases_what_the_reader_holds(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        """The stream's reader holds a's later events; the blocker's retry copy may reach
        the other runtime (both consume the work queue), which lifts the block in the
        store; the reader learns it and releases them, in order."""
        registry, queue = names
        store = MemoryEventStore()
        topology = stream_topology(registry, queue, max_attempts=6)
        async with running_on(bus, topology, store), running_on(bus, topology, store):
            await write_jobs(
                bus,
                [
                    (registry, "a", 0, "flaky", {"fails": 2}),  # the copy that passes: the other
                    (registry, "a", 1, "ok", {}),
                    (registry, "a", 2, "ok", {}),
                ],
            )
            await wait_until(lambda: len(HANDLED[registry]) == 3, within=30)
            assert await store.parked_keys() == []
        assert [seq for _, seq, _ in HANDLED[registry]] == [0, 1, 2]

    async def test_a_replay_into_a_busy_batching_actor_handles_the_blocker_first(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        """The replayed blocker and its parked events arrive in one batch: the blocker is
        handled first and the others follow it, instead of going back to the DLQ."""
        registry, queue = names
        store = MemoryEventStore()
        topology = stream_topology(registry, queue, max_attempts=2, handler="BatchRecorder")
        async with running_on(bus, topology, store):
            await write_jobs(
                bus,
                [
                    (registry, "a", 0, "broken", {}),
                    (registry, "a", 1, "ok", {}),
                    (registry, "b", 0, "ok", {}),
                    (registry, "a", 2, "ok", {}),
                ],
            )
            await _wait_dead_letters(bus, queue, 3)
            FIXED.add(f"{registry}/a")
            await write(bus, registry, "b", 1, "sleep", seconds=0.5)  # the worker is busy
            await anyio.sleep(0.1)
            assert await bus.replay_dead_letters(queue) == 3
            await wait_until(lambda: len([k for k, _, _ in HANDLED[registry] if k == "a"]) == 3)
            await wait_until(lambda: not store._parked)
            assert list(await bus.list_dead_letters(queue)) == []
        assert [seq for k, seq, _ in HANDLED[registry] if k == "a"] == [0, 1, 2]

    async def test_a_restart_resumes_from_the_saved_offset_and_handles_nothing_twice(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()
        topology = stream_topology(registry, queue)
        async with running_on(bus, topology, store):
            for seq in range(20):
                await write(bus, registry, "a", seq)
            await wait_until(lambda: len(HANDLED[registry]) == 20)
        async with running_on(bus, topology, store):
            for seq in range(20, 30):
                await write(bus, registry, "a", seq)
            await wait_until(lambda: len(HANDLED[registry]) == 30)
            await anyio.sleep(0.3)
        assert [s for _, s, _ in HANDLED[registry]] == list(range(30))

    async def test_a_crash_mid_entry_hands_it_again_and_it_is_handled_once(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        registry, queue = names
        store = MemoryEventStore()
        async with running_on(bus, stream_topology(registry, queue), store) as supervisor:
            await write(bus, registry, "slow", 0, "sleep", seconds=0.5)
            await wait_until(lambda: len(ATTEMPTS[registry]) == 1)
            supervisor.crash("worker")
            await wait_until(lambda: len(HANDLED[registry]) == 1)
            await wait_until(lambda: supervisor.ready)
        assert HANDLED[registry] == [("slow", 0, 0)]
        assert len(ATTEMPTS[registry]) == 2  # interrupted once, then completed once

    async def test_two_runtimes_on_one_store_handle_each_entry_once_in_all(
        self, bus: Bus, names: tuple[str, str]
    ) -> None:
        """One reader per actor and stream across processes (a lease on the store): the
        other runtime's reader stands by, and takes over when the first one stops."""
        registry, queue = names
        store = MemoryEventStore()
        topology = stream_topology(registry, queue)
        async with running_on(bus, topology, store):
            async with running_on(bus, topology, store):
                for seq in range(30):
                    await write(bus, registry, "k", seq)
                await wait_until(lambda: len(HANDLED[registry]) == 30)
                await anyio.sleep(0.3)
            for seq in range(30, 40):  # the first runtime's reader has stopped
                await write(bus, registry, "k", seq)
            await wait_until(lambda: len(HANDLED[registry]) == 40)
            await anyio.sleep(0.3)
        assert [s for _, s, _ in HANDLED[registry]] == list(range(40))
