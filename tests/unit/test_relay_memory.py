"""The relay in embedded mode: memory store to memory bus, same promises."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

import anyio

from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import StreamWrite
from runtime.errors import EscalationError
from runtime.messages import decode_event
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.supervisor import Supervisor
from runtime.topology import parse_topology
from tests.contracts.runtime import wait_until
from tests.contracts.store import ledger, new
from tests.support.ledger import Deposited, Opened

TOPOLOGY = parse_topology(
    """
domains: {ledger: complaints.events}
defaults:
  restart: {min_backoff: 10ms, max_backoff: 50ms, max_restarts: 2}
actors:
  relay: {kind: relay, options: {batch_size: 7}}
"""
)


async def read_stream_ids(bus: MemoryBus, count: int) -> list[uuid.UUID]:
    received: list[uuid.UUID] = []
    async with bus.read_stream("complaints.events", 0) as chunks:
        async for chunk in chunks:
            received.extend(decode_event(e.message_id, e.body).event_id for e in chunk)
            if len(received) >= count:
                return received
    return received


async def run_relay_until(
    store: MemoryEventStore, bus: MemoryBus, position: int, metrics: Metrics | None = None
) -> None:
    supervisor = Supervisor(
        TOPOLOGY, store=store, bus=bus, metrics=metrics or Metrics(), rng=random.Random(1)
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await wait_until(lambda: store_checkpoint_reached(store, position))
        supervisor.stop()


async def append_accounts(store: MemoryEventStore, count: int) -> None:
    for _ in range(count):
        await store.append(
            ledger(), [new(Opened("a")), *[new(Deposited(i)) for i in range(1, 5)]], 0
        )


async def test_the_relay_writes_every_event_to_the_domain_stream_in_store_order() -> None:
    store = MemoryEventStore(poll_interval=0.05)
    metrics = Metrics()
    async with MemoryBus() as bus:
        await bus.declare(TOPOLOGY.bus_plan())
        await append_accounts(store, 10)
        await run_relay_until(store, bus, 50, metrics)
        received = await read_stream_ids(bus, 50)
        stored = [r.event_id for r in await store.read_all(limit=100)]
        assert received == stored
        tail = await bus.stream_tail("complaints.events", "relay")
        assert tail is not None
        assert (tail.offset, tail.publishing_id) == (49, 50)
        assert (await store.load_checkpoint("relay")).position == 50
        text = metrics.render()[0].decode()
        assert 'events_published_total{event_type="Opened",exchange="complaints.events"} 10' in text


async def test_a_restarted_relay_resumes_after_what_the_stream_holds_not_its_checkpoint() -> None:
    """The relay died after the broker confirmed, before its checkpoint was saved: the new
    one writes nothing twice."""
    store = MemoryEventStore(poll_interval=0.05)
    async with MemoryBus() as bus:
        await bus.declare(TOPOLOGY.bus_plan())
        await append_accounts(store, 4)
        await run_relay_until(store, bus, 20)
        store._checkpoints.pop("relay")  # as if never saved
        await append_accounts(store, 2)
        await run_relay_until(store, bus, 30)
        received = await read_stream_ids(bus, 30)
        assert received == [r.event_id for r in await store.read_all(limit=100)]
        assert (await bus.stream_tail("complaints.events", "relay")).offset == 29  # type: ignore[union-attr]


async def test_entries_a_broker_crash_lost_are_written_again_from_the_store() -> None:
    """Streams do not fsync each write: the relay trusts what the stream holds, not the
    checkpoint it saved after the confirms."""
    store = MemoryEventStore(poll_interval=0.05)
    async with MemoryBus() as bus:
        await bus.declare(TOPOLOGY.bus_plan())
        await append_accounts(store, 6)
        await run_relay_until(store, bus, 30)
        bus.lose_stream_tail("complaints.events", 12)
        assert (await store.load_checkpoint("relay")).position == 30
        store._checkpoints["relay"] = store._checkpoints["relay"]  # the checkpoint stays ahead
        await append_accounts(store, 1)
        await run_relay_until(store, bus, 35)
        received = await read_stream_ids(bus, 35)
        assert received == [r.event_id for r in await store.read_all(limit=100)]


def store_checkpoint_reached(store: MemoryEventStore, position: int = 50) -> bool:
    """Saved while the relay runs: the last batches before a pause are checkpointed within
    the relay's ``checkpoint_interval`` without waiting for more events or a stop."""
    saved = store._checkpoints.get("relay")
    return saved is not None and saved.position == position


async def test_an_event_of_an_unmapped_domain_stops_the_relay_with_a_plain_reason() -> None:
    store = MemoryEventStore(poll_interval=0.05)
    async with MemoryBus() as bus:
        await bus.declare(TOPOLOGY.bus_plan())
        supervisor = Supervisor(
            TOPOLOGY, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        await store.append(ledger().__class__("basket", "b-1"), [new(Opened("x"))], 0)
        escalated: list[EscalationError] = []

        async def run() -> None:
            try:
                await supervisor.run()
            except EscalationError as exc:
                escalated.append(exc)

        with anyio.fail_after(10):
            await run()
        assert "no exchange for aggregate type 'basket'" in str(escalated[0])
        assert "domains:" in str(escalated[0])


class HeldBus(MemoryBus):
    """Holds the relay's first write unconfirmed until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.batches: list[int] = []  # sizes, in the order write_stream was called

    async def write_stream(
        self, stream: str, producer: str, entries: Sequence[StreamWrite]
    ) -> None:
        first = not self.batches
        self.batches.append(len(entries))
        if first:
            await self.release.wait()
        await super().write_stream(stream, producer, entries)


async def test_batches_go_one_after_the_other_and_the_checkpoint_waits_for_the_confirm() -> None:
    """A batch sent while an earlier one is unconfirmed could be stored first, and the
    broker would then drop the earlier one as duplicates of lower ids: batches never
    overlap."""
    topology = parse_topology(
        """
domains: {ledger: complaints.events}
actors:
  relay: {kind: relay, options: {batch_size: 7, checkpoint_interval: 0}}
"""
    )
    store = MemoryEventStore(poll_interval=0.05)
    await append_accounts(store, 5)
    async with HeldBus() as bus:
        await bus.declare(topology.bus_plan())
        supervisor = Supervisor(
            topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            await wait_until(lambda: bus.batches == [7])
            await anyio.sleep(0.1)
            assert bus.batches == [7]
            assert "relay" not in store._checkpoints  # nothing saved past the held batch
            bus.release.set()
            await wait_until(lambda: store_checkpoint_reached(store, 25))
            supervisor.stop()
        assert bus.batches == [7, 7, 7, 4]
        received = await read_stream_ids(bus, 25)
        assert received == [r.event_id for r in await store.read_all(limit=100)]
