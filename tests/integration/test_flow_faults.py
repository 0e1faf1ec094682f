"""Store → relay → RabbitMQ → projection on the real services, with the broker's and the
database's connections dropped mid-stream: the read model ends equal to a fold of the
store, nothing missing, nothing applied twice."""

from __future__ import annotations

import os
import random
import uuid
from collections import defaultdict
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

from runtime.bus.rabbitmq import RabbitMQBus
from runtime.observability.metrics import Metrics
from runtime.store.postgres import PostgresEventStore
from runtime.supervisor import Supervisor
from runtime.topology import parse_topology
from tests.contracts.store import CODEC, drain, ledger, new
from tests.support.ledger import Deposited, Opened, Withdrawn
from tests.support.postgres import terminate_backends
from tests.support.rabbitmq import close_connections

pytestmark = [pytest.mark.integration, pytest.mark.chaos]  # 20,000 events under make chaos
TOTAL = 20_000 if os.environ.get("MAGASIN_CHAOS_LONG") else 3_000


def fold(records: list[Any]) -> dict[str, dict[str, Any]]:
    accounts: dict[str, dict[str, Any]] = defaultdict(lambda: {"balance": 0, "version": 0})
    for record in records:
        account = accounts[record.aggregate_id]
        match CODEC.decode(record).payload:
            case Opened(owner=owner):
                account["owner"] = owner
            case Deposited(amount=amount):
                account["balance"] += amount
            case Withdrawn(amount=amount):
                account["balance"] -= amount
        account["version"] = record.version
    return dict(accounts)


async def read_models(dsn: str, schema: str, collection: str) -> dict[str, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT key, doc FROM {}.read_models WHERE collection = %s").format(
                sql.Identifier(schema)
            ),
            (collection,),
        )
        return {key: doc for key, doc in await cur.fetchall()}


async def test_a_projection_equals_the_fold_of_the_store_after_connection_faults(
    pg_store: PostgresEventStore,
    pg_dsn: str,
    pg_schema: str,
    amqp_url: str,
    rabbitmq_vhost: str,
) -> None:
    queue = f"balances.{uuid.uuid4().hex[:8]}"
    stream = f"ledger.{uuid.uuid4().hex[:8]}"  # the vhost outlives the test's database
    topology = parse_topology(
        f"""
database_url: "{pg_dsn}"
exchanges: [{stream}]
domains: {{ledger: {stream}}}
defaults:
  restart: {{min_backoff: 50ms, max_backoff: 500ms, max_restarts: 50}}
  retry: {{delays: [100ms, 300ms], max_attempts: 10}}
actors:
  relay: {{kind: relay, options: {{batch_size: 200}}}}
  balances:
    kind: projection
    handler: tests.support.projections:LedgerBalances
    queue: {queue}
    bind: {{{stream}: ["ledger.#"]}}
    consumers: 4
    prefetch: 64
    options: {{schema: {pg_schema}}}
""",
        source="test",
    )
    bus = await RabbitMQBus.connect(amqp_url, name="flow-faults", reconnect_interval=0.2)
    await bus.declare(topology.bus_plan())
    supervisor = Supervisor(
        topology, store=pg_store, bus=bus, metrics=Metrics(), rng=random.Random(5)
    )
    rng = random.Random(9)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)

            async def writer(streams: int) -> None:
                for _ in range(streams):
                    stream = ledger()
                    events = [new(Opened("o"))]
                    events += [new(Deposited(rng.randint(1, 9))) for _ in range(8)]
                    events.append(new(Withdrawn(1)))
                    for version, event in enumerate(events):  # one append per event
                        await pg_store.append(stream, [event], version)

            async def faults() -> None:
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(close_connections, rabbitmq_vhost)
                await anyio.sleep(1.0)
                terminate_backends(pg_dsn)  # relay pool, LISTEN, lease, read-model pools

            async with anyio.create_task_group() as work:
                work.start_soon(faults)
                for _ in range(4):
                    work.start_soon(writer, TOTAL // 40)
            records = await drain(pg_store, at_least=TOTAL)
            assert len(records) == TOTAL
            expected = fold(records)

            async def caught_up() -> bool:
                docs = await read_models(pg_dsn, pg_schema, "accounts")
                return all(
                    docs.get(k, {}).get("version") == v["version"] for k, v in expected.items()
                )

            with anyio.fail_after(180):
                while not await caught_up():  # noqa: ASYNC110 - polling the database
                    await anyio.sleep(0.5)
            supervisor.stop()
    finally:
        await bus.close()
    docs = await read_models(pg_dsn, pg_schema, "accounts")
    assert docs == expected, "the read model is not the fold of the store"
    applied = await read_models(pg_dsn, pg_schema, "applied")
    assert len(applied) == TOTAL, "an event's effect is missing"
    assert {doc["count"] for doc in applied.values()} == {1}, "an effect was applied twice"
