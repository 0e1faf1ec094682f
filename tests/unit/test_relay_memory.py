"""The relay in embedded mode: memory store to memory bus, same promises."""

from __future__ import annotations

import random
import uuid

import anyio

from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import Binding, BusPlan, QueueSpec
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
