"""Projections on the real PostgreSQL (events and read models): the delivery property,
rollbacks, killed connections, and competing consumers."""

from __future__ import annotations

import random
import uuid
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.store import NewEvent, RecordedEvent, StreamId
from runtime.store.codec import Envelope
from runtime.store.postgres import PostgresEventStore
from runtime.store.readmodel import ReadModelTx
from tests.support.ledger import Deposited, Opened, Withdrawn
from tests.support.postgres import terminate_backends
from tests.unit.test_projection import (
    BalanceProjection,
    Boom,
    FailsOnce,
    Script,
    append_script,
    assert_projected_exactly_once,
    delivery,
    projection_context,
    schedule_for,
    scripts,
)

pytestmark = pytest.mark.integration


def handler_for(
    store: PostgresEventStore,
    dsn: str,
    schema: str,
    cls: type[BalanceProjection] = BalanceProjection,
) -> BalanceProjection:
    return cls(projection_context(store, dsn, schema=schema))


async def ledger_events(store: PostgresEventStore, *payloads: Any) -> list[RecordedEvent]:
    stream = StreamId("ledger", f"acc-{uuid.uuid4().hex[:10]}")
    await store.append(stream, [NewEvent(p) for p in payloads], 0)
    return await store.read_stream(stream)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(script=scripts, data=st.data())
def test_any_delivery_schedule_projects_the_fold_of_the_store_once(
    pg_dsn: str, pg_schema: str, script: Script, data: st.DataObject
) -> None:
    async def scenario() -> None:
        store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema, max_size=4)
        try:
            records = await append_script(store, script)
            schedule = schedule_for(data, len(records))
            async with handler_for(store, pg_dsn, pg_schema) as handler:
                for tag, index in enumerate(schedule, start=1):
                    await handler.handle(delivery(records[index], tag))
                await assert_projected_exactly_once(handler.read_models, records)
        finally:
            await store.close()

    anyio.run(scenario)


async def test_a_failing_apply_rolls_back_effect_and_version(
    pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
) -> None:
    v1, v2, v3 = await ledger_events(pg_store, Opened("ana"), Deposited(10), Withdrawn(3))
    FailsOnce.failures = {v2.event_id}
    async with handler_for(pg_store, pg_dsn, pg_schema, FailsOnce) as handler:
        await handler.handle(delivery(v1))
        with pytest.raises(Boom):
            await handler.handle(delivery(v2))
        account = await handler.read_models.get("balances", "accounts", v1.aggregate_id)
        assert account == {"owner": "ana", "balance": 0, "version": 1}
        assert await handler.read_models.get("balances", "applied", str(v2.event_id)) is None
        await handler.handle(delivery(v2, tag=2))
        await handler.handle(delivery(v2, tag=3))
        await handler.handle(delivery(v3))
        await assert_projected_exactly_once(handler.read_models, [v1, v2, v3])


async def test_killed_connections_between_deliveries_still_apply_exactly_once(
    pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
) -> None:
    records = await ledger_events(
        pg_store, Opened("ana"), Deposited(10), Deposited(5), Withdrawn(2), Deposited(1)
    )
    v1, v2, v3, v4, v5 = records
    async with handler_for(pg_store, pg_dsn, pg_schema) as handler:
        for record in (v1, v2, v4, v3, v5, v2):  # v4 heals v3 from the (also killed) store
            assert terminate_backends(pg_dsn) >= 1
            await handler.handle(delivery(record))
        await assert_projected_exactly_once(handler.read_models, records)


class KillsItsConnection(BalanceProjection):
    """Terminates every runtime connection, its own included, in the middle of its first
    transaction: the write after it fails, and the whole transaction is run again."""

    dsn = ""
    killed = 0

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        await super().apply(tx, event)
        if not type(self).killed:
            type(self).killed = await anyio.to_thread.run_sync(terminate_backends, self.dsn)
            await tx.put("after", "kill", {"written": True})


async def test_a_connection_killed_inside_the_transaction_is_retried_once_whole(
    pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
) -> None:
    (v1,) = await ledger_events(pg_store, Opened("ana"))
    KillsItsConnection.dsn = pg_dsn
    KillsItsConnection.killed = 0
    async with handler_for(pg_store, pg_dsn, pg_schema, KillsItsConnection) as handler:
        await handler.handle(delivery(v1))
        assert KillsItsConnection.killed >= 1
        await assert_projected_exactly_once(handler.read_models, [v1])
        assert await handler.read_models.get("balances", "after", "kill") is None


async def test_competing_consumers_apply_every_effect_once(
    pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
) -> None:
    """Two handler instances (two pools), three workers each, fed the same events shuffled
    with duplicates: they race on the same aggregates and heal gaps under each other."""
    script: Script = [(n % 4, [Opened(f"o{n}"), Deposited(n + 1), Withdrawn(1)]) for n in range(16)]
    records = await append_script(pg_store, script)
    rng = random.Random(11)
    async with (
        handler_for(pg_store, pg_dsn, pg_schema) as first,
        handler_for(pg_store, pg_dsn, pg_schema) as second,
    ):

        async def worker(handler: BalanceProjection, queue: list[RecordedEvent]) -> None:
            while queue:
                await handler.handle(delivery(queue.pop()))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for handler in (first, second):
                    queue = records * 2
                    rng.shuffle(queue)
                    for _ in range(3):
                        tg.start_soon(worker, handler, queue)
        await assert_projected_exactly_once(first.read_models, records)
