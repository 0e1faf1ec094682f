"""The relay in embedded mode: memory store to memory bus, same promises."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

import anyio

from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import Binding, BusPlan, Outgoing, QueueSpec
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


async def test_the_relay_publishes_every_event_in_store_order() -> None:
    store = MemoryEventStore(poll_interval=0.05)
    metrics = Metrics()
    async with MemoryBus() as bus:
        plan = TOPOLOGY.bus_plan()
        sink = QueueSpec("sink", bindings=(Binding("complaints.events", "ledger.#"),))
        await bus.declare(BusPlan(exchanges=plan.exchanges, queues=(sink,)))
        supervisor = Supervisor(
            TOPOLOGY, store=store, bus=bus, metrics=metrics, rng=random.Random(1)
        )
        received: list[uuid.UUID] = []
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            for _ in range(10):
                await store.append(
                    ledger(), [new(Opened("a")), *[new(Deposited(i)) for i in range(1, 5)]], 0
                )
            async with bus.consume("sink", 100) as deliveries:
                async for delivery in deliveries:
                    received.append(decode_event(delivery.message_id, delivery.body).event_id)
                    await bus.ack(delivery)
                    if len(received) == 50:
                        break
            await wait_until(lambda: store_checkpoint_reached(store))
            supervisor.stop()
        stored = [r.event_id for r in await store.read_all(limit=100)]
        assert received == stored
        assert (await store.load_checkpoint("relay")).position == 50
        text = metrics.render()[0].decode()
        assert 'events_published_total{event_type="Opened",exchange="complaints.events"} 10' in text


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
    """Holds the relay's first batch unconfirmed until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.batches: list[int] = []  # sizes, in the order publish_many was called
        self.confirmed = 0  # batches whose publish_many returned
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish_many(self, messages: Sequence[Outgoing]) -> None:
        first = not self.batches
        self.batches.append(len(messages))
        self.in_flight += len(messages)
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if first:
            await self.release.wait()
        await super().publish_many(messages)
        self.in_flight -= len(messages)
        self.confirmed += 1


async def test_batches_overlap_but_the_checkpoint_waits_for_the_earliest_unconfirmed() -> None:
    topology = parse_topology(
        """
domains: {ledger: complaints.events}
actors:
  relay: {kind: relay, options: {batch_size: 7, max_in_flight: 14, checkpoint_interval: 0}}
"""
    )
    store = MemoryEventStore(poll_interval=0.05)
    for _ in range(5):
        await store.append(ledger(), [new(Opened("a")), *[new(Deposited(i)) for i in range(4)]], 0)
    async with HeldBus() as bus:
        plan = topology.bus_plan()
        sink = QueueSpec("sink", bindings=(Binding("complaints.events", "ledger.#"),))
        await bus.declare(BusPlan(exchanges=plan.exchanges, queues=(sink,)))
        supervisor = Supervisor(
            topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            # The second batch is published and confirmed while the first is held; the
            # third waits for room (14 events in flight at most).
            await wait_until(lambda: bus.confirmed == 1)
            await anyio.sleep(0.1)
            assert bus.batches == [7, 7]
            assert "relay" not in store._checkpoints  # nothing saved past the held batch
            bus.release.set()
            await wait_until(lambda: store_checkpoint_reached(store, 25))
            supervisor.stop()
        assert bus.batches == [7, 7, 7, 4]
        assert bus.most_in_flight == 14
        async with bus.consume("sink", 100) as deliveries:
            received = []
            for _ in range(25):
                delivery = await anext(deliveries)
                received.append(decode_event(delivery.message_id, delivery.body).event_id)
        # The held batch arrives after the one published while it waited: consumers
        # order by version per aggregate (gap healing), not by arrival.
        stored = [r.event_id for r in await store.read_all(limit=100)]
        assert received == stored[7:14] + stored[:7] + stored[14:]
