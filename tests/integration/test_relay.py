"""The relay on real PostgreSQL and RabbitMQ: nothing committed is ever lost on the way to
the bus, whatever fails."""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from runtime.bus.rabbitmq import RabbitMQBus
from runtime.messages import decode_event
from runtime.observability.metrics import Metrics
from runtime.relay import Relay
from runtime.store.postgres import PostgresEventStore
from runtime.supervisor import Supervisor
from runtime.topology import Topology, parse_topology
from tests.contracts.runtime import wait_until
from tests.contracts.store import ledger, new
from tests.integration.test_postgres_faults import append_in_open_transaction, raw_connection
from tests.support.ledger import Deposited, Opened
from tests.support.postgres import terminate_backends
from tests.support.rabbitmq import close_connections

pytestmark = pytest.mark.integration
LONG = bool(os.environ.get("MAGASIN_CHAOS_LONG"))


def relay_topology(checkpoint: str = "relay", stream: str | None = None) -> Topology:
    """The relay alone, writing the ledger's events to a stream of the test's own (the
    vhost, and so its streams, outlive one test; the stores do not)."""
    stream = stream or f"ledger.{uuid.uuid4().hex[:8]}"
    return parse_topology(
        f"""
exchanges: [{stream}]
domains: {{ledger: {stream}}}
defaults:
  restart: {{min_backoff: 50ms, max_backoff: 300ms, max_restarts: 50}}
actors:
  relay:
    kind: relay
    options: {{checkpoint: {checkpoint}, batch_size: 200}}
""",
        source="test",
    )


class Sink:
    """Reads the relay's stream from its start; records what arrives."""

    def __init__(self, bus: RabbitMQBus) -> None:
        self.bus = bus
        self.stream = ""
        self.received: list[uuid.UUID] = []
        self.headers: list[dict[str, Any]] = []
        self.next = 0

    async def declare(self, topology: Topology) -> None:
        (self.stream,) = topology.stream_names
        await self.bus.declare(topology.bus_plan())

    async def run(self) -> None:
        while True:
            try:
                async with self.bus.read_stream(self.stream, self.next) as chunks:
                    async for chunk in chunks:
                        for entry in chunk:
                            record = decode_event(entry.message_id, entry.body)
                            self.received.append(record.event_id)
                            self.headers.append(dict(entry.headers))
                            self.next = entry.offset + 1
            except Exception:
                await anyio.sleep(0.2)


@asynccontextmanager
async def relaying(
    store: PostgresEventStore, bus: RabbitMQBus, topology: Topology
) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(3))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            yield supervisor
        finally:
            supervisor.stop()


@pytest.fixture
async def bus(amqp_url: str) -> AsyncIterator[RabbitMQBus]:
    bus = await RabbitMQBus.connect(
        amqp_url, name=f"magasin-relay-{uuid.uuid4().hex[:8]}", reconnect_interval=0.2
    )
    yield bus
    await bus.close()


async def committed_ids(store: PostgresEventStore, count: int = 0) -> set[uuid.UUID]:
    from tests.contracts.store import drain  # noqa: PLC0415

    return {r.event_id for r in await drain(store, at_least=count)}


def relay_of(supervisor: Supervisor) -> Relay:
    instance = supervisor.runners["relay"]._instance
    service = getattr(instance, "service", None)
    assert isinstance(service, Relay)
    return service


async def test_every_event_is_published_once_beside_a_late_commit_and_a_rollback(
    pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str, bus: RabbitMQBus
) -> None:
    topology = relay_topology()
    sink = Sink(bus)
    await sink.declare(topology)
    slow = await raw_connection(pg_dsn, pg_schema, "test-slow")
    doomed = await raw_connection(pg_dsn, pg_schema, "test-doomed")
    slow_tx = await append_in_open_transaction(slow, ledger(), uuid.uuid4())
    await append_in_open_transaction(doomed, ledger(), uuid.uuid4())
    try:
        async with anyio.create_task_group() as tg, relaying(pg_store, bus, topology) as sup:
            tg.start_soon(sink.run)

            async def writer() -> None:
                for _ in range(6):
                    stream = ledger()
                    await pg_store.append(stream, [new(Opened("w"))], 0)
                    for version in range(1, 5):
                        await pg_store.append(stream, [new(Deposited(version))], version)

            async with anyio.create_task_group() as writers:
                for _ in range(16):
                    writers.start_soon(writer)
            await anyio.sleep(1)
            # The slow transaction is still open: the relay must not have passed it.
            assert relay_of(sup).checkpoint.tx_id < slow_tx
            await doomed.rollback()
            await slow.commit()
            expected = await committed_ids(pg_store, 16 * 6 * 5 + 1)
            assert len(expected) == 16 * 6 * 5 + 1
            await wait_until(lambda: set(sink.received) == expected, within=60)
            await anyio.sleep(0.5)
            tg.cancel_scope.cancel()
    finally:
        await slow.close()
        await doomed.close()
    counts = Counter(sink.received)
    assert max(counts.values()) == 1, "an event was written twice without any failure"
    first = sink.headers[0]
    for header in ("x-aggregate-id", "x-version", "x-event-type", "x-schema-version"):
        assert header in first


async def test_crashing_the_relay_mid_stream_loses_nothing(
    pg_store: PostgresEventStore, bus: RabbitMQBus
) -> None:
    """The crash hook (as a chaos drill would) kills the relay between publishes and
    checkpoints, again and again: every event still arrives; only duplicates may."""
    topology = relay_topology()
    sink = Sink(bus)
    await sink.declare(topology)
    rng = random.Random(11)
    async with anyio.create_task_group() as tg, relaying(pg_store, bus, topology) as supervisor:
        tg.start_soon(sink.run)

        async def crasher() -> None:
            for _ in range(8):
                await anyio.sleep(rng.uniform(0.05, 0.3))
                if supervisor.runners["relay"].state == "running":
                    supervisor.crash("relay")

        tg.start_soon(crasher)
        for _ in range(60):
            stream = ledger()
            await pg_store.append(
                stream, [new(Opened("c")), *[new(Deposited(i)) for i in range(1, 10)]], 0
            )
        expected = await committed_ids(pg_store, 600)
        await wait_until(lambda: set(sink.received) >= expected, within=60)
        restarts = supervisor.runners["relay"].restarts
        tg.cancel_scope.cancel()
    assert restarts >= 1
    checkpoint = await pg_store.load_checkpoint("relay")
    assert checkpoint.position > 0
    # A restarted relay resumes after what the stream holds: nothing is written twice.
    assert len(sink.received) == len(set(sink.received)) == 600


async def test_a_standby_relay_takes_over_when_the_leader_dies(
    pg_store: PostgresEventStore, pg_dsn_schema_store: PostgresEventStore, amqp_url: str
) -> None:
    """Two runtimes (two stores, two bus connections): one relay publishes; kill it (its
    session closes, releasing the lease) and the standby publishes what follows."""
    topology = relay_topology()
    bus_a = await RabbitMQBus.connect(amqp_url, name="relay-a", reconnect_interval=0.2)
    bus_b = await RabbitMQBus.connect(amqp_url, name="relay-b", reconnect_interval=0.2)
    sink = Sink(bus_a)
    await sink.declare(topology)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            leader_scope = anyio.CancelScope()

            async def leader() -> None:
                with leader_scope:
                    async with relaying(pg_store, bus_a, topology) as sup:
                        await wait_until(lambda: relay_of(sup).leading)
                        await anyio.sleep_forever()

            tg.start_soon(leader)
            await anyio.sleep(0.5)
            async with relaying(pg_dsn_schema_store, bus_b, topology) as standby:
                await anyio.sleep(0.5)
                assert not relay_of(standby).leading, "two relays lead at once"
                for _ in range(20):
                    await pg_store.append(ledger(), [new(Opened("before"))], 0)
                await wait_until(lambda: len(sink.received) >= 20)
                leader_scope.cancel()  # the leading runtime dies
                for _ in range(20):
                    await pg_dsn_schema_store.append(ledger(), [new(Opened("during"))], 0)
                await wait_until(lambda: relay_of(standby).leading, within=15)
                for _ in range(20):
                    await pg_dsn_schema_store.append(ledger(), [new(Opened("after"))], 0)
                expected = await committed_ids(pg_store, 60)
                await wait_until(lambda: set(sink.received) >= expected, within=30)
            tg.cancel_scope.cancel()
    finally:
        await bus_a.close()
        await bus_b.close()


@pytest.mark.chaos  # 20,000 events under make chaos
async def test_dropped_broker_and_database_connections_lose_nothing(
    pg_store: PostgresEventStore,
    pg_dsn: str,
    bus: RabbitMQBus,
    rabbitmq_vhost: str,
) -> None:
    """`rabbitmqctl close_all_connections` and `pg_terminate_backend` (the relay's pool,
    its LISTEN and its lease connections) in the middle of a stream of events."""
    topology = relay_topology()
    sink = Sink(bus)
    await sink.declare(topology)
    total = 20_000 if LONG else 3_000
    async with anyio.create_task_group() as tg, relaying(pg_store, bus, topology):
        tg.start_soon(sink.run)

        async def writer(count: int) -> None:
            for _ in range(count // 10):
                stream = ledger()
                await pg_store.append(
                    stream, [new(Opened("x")), *[new(Deposited(i)) for i in range(1, 10)]], 0
                )

        async def faults() -> None:
            await wait_until(lambda: len(sink.received) > total // 5, within=60)
            await anyio.to_thread.run_sync(close_connections, rabbitmq_vhost)
            await wait_until(lambda: len(sink.received) > total // 2, within=60)
            terminate_backends(pg_dsn)

        async with anyio.create_task_group() as work:
            work.start_soon(faults)
            for _ in range(4):
                work.start_soon(writer, total // 4)
        expected = await committed_ids(pg_store, total)
        assert len(expected) == total
        await wait_until(lambda: set(sink.received) >= expected, within=120)
        tg.cancel_scope.cancel()
    duplicates = len(sink.received) - len(set(sink.received))
    print(f"relay under faults: {total} events, {duplicates} duplicates")
    assert duplicates == 0, "the stream's deduplication let an entry be written twice"
