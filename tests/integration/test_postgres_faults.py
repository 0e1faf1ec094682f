"""What only a real PostgreSQL can show: late commits, killed backends, bad DSNs, schema."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

import anyio
import msgspec
import psycopg
import pytest
from psycopg import sql

from runtime.errors import ConfigurationError, MigrationError, StoreUnavailableError
from runtime.observability.metrics import Metrics
from runtime.store import Checkpoint, EventCodec, Metadata, NewEvent, RecordedEvent, StreamId
from runtime.store.migrate import migrate, migrations
from runtime.store.postgres import PostgresEventStore, connection_string
from tests.contracts.store import CODEC, drain, ledger, new
from tests.support.ledger import Deposited, LedgerEvent, Opened, Renamed
from tests.support.postgres import terminate_backends

pytestmark = pytest.mark.integration


async def raw_connection(dsn: str, schema: str, name: str) -> psycopg.AsyncConnection[Any]:
    conninfo = connection_string(dsn, schema=schema)
    return await psycopg.AsyncConnection.connect(conninfo, application_name=name)


async def append_in_open_transaction(
    conn: psycopg.AsyncConnection[Any], stream: StreamId, event_id: uuid.UUID
) -> int:
    """Append through the store's SQL function inside ``conn``'s open transaction."""
    await conn.execute(
        "SELECT * FROM event_store_append(%s, %s, 0, NULL, %s, %s, %s::jsonb[], %s::jsonb[], %s)",
        (
            stream.aggregate_type,
            stream.aggregate_id,
            [event_id],
            ["Opened"],
            ['{"type": "Opened", "owner": "slow"}'],
            ["{}"],
            "unused",
        ),
    )
    cur = await conn.execute("SELECT pg_current_xact_id()::text")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


class TestTailingUnderConcurrency:
    async def test_a_late_commit_and_a_rollback_are_neither_skipped_nor_repeated(
        self, pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
    ) -> None:
        """16 writers, one transaction that takes its position then commits 3 s later, one
        that rolls back: the tailing reader never passes the open transaction and ends up
        with every committed event exactly once."""
        store = pg_store
        slow = await raw_connection(pg_dsn, pg_schema, "test-slow")
        doomed = await raw_connection(pg_dsn, pg_schema, "test-doomed")
        slow_id, doomed_id = uuid.uuid4(), uuid.uuid4()
        slow_tx = await append_in_open_transaction(slow, ledger(), slow_id)
        await append_in_open_transaction(doomed, ledger(), doomed_id)
        seen: list[RecordedEvent] = []
        passed_open_transaction: list[RecordedEvent] = []
        slow_committed = anyio.Event()
        writers_done = anyio.Event()

        async def writer() -> None:
            for _ in range(12):
                stream = ledger()
                await store.append(stream, [new(Opened("w"))], 0)
                for version in range(1, 6):
                    await store.append(stream, [new(Deposited(version))], version)

        async def late_committer() -> None:
            await anyio.sleep(3)
            await doomed.rollback()
            await slow.commit()
            slow_committed.set()

        async def tailer() -> None:
            checkpoint = Checkpoint.START
            while True:
                finished = writers_done.is_set() and slow_committed.is_set()
                batch = await store.read_all(checkpoint, limit=64)
                if not slow_committed.is_set():
                    passed_open_transaction.extend(r for r in batch if r.tx_id > slow_tx)
                seen.extend(batch)
                if batch:
                    checkpoint = batch[-1].checkpoint
                elif finished:
                    return
                else:
                    await anyio.sleep(0.01)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tailer)
                tg.start_soon(late_committer)
                async with anyio.create_task_group() as writers:
                    for _ in range(16):
                        writers.start_soon(writer)
                writers_done.set()
        finally:
            await slow.close()
            await doomed.close()

        assert passed_open_transaction == [], "the reader passed a still-open transaction"
        ids = [r.event_id for r in seen]
        assert len(ids) == len(set(ids)), "an event was read twice"
        async with await raw_connection(pg_dsn, pg_schema, "test-check") as check:
            cur = await check.execute("SELECT event_id FROM event_store")
            committed = {row[0] for row in await cur.fetchall()}
        assert len(committed) == 16 * 12 * 6 + 1
        assert set(ids) == committed
        assert slow_id in committed
        assert doomed_id not in committed


class TestHistoryIsImmutable:
    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE event_store SET event_type = 'Tampered'",
            "DELETE FROM event_store",
            "TRUNCATE event_store",
        ],
    )
    async def test_the_table_refuses_changes(
        self, pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str, statement: str
    ) -> None:
        await pg_store.append(ledger(), [new(Opened("a"))], 0)
        async with await raw_connection(pg_dsn, pg_schema, "test-tamper") as conn:
            with pytest.raises(psycopg.DatabaseError, match="append-only") as caught:
                await conn.execute(statement.encode())
            assert caught.value.sqlstate == "MG003"
        assert len(await drain(pg_store, at_least=1)) == 1


class TestMigrations:
    async def test_two_processes_migrating_at_once_both_succeed(
        self, pg_dsn: str, pg_schema: str
    ) -> None:
        results: list[list[str]] = []

        async def run() -> None:
            async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
                results.append(await migrate(conn, pg_schema))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(run)
        everything = [m.name for m in migrations()]
        assert sorted(results, key=len) == [[], [], [], everything]

    async def test_an_edited_migration_is_refused(
        self, pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
    ) -> None:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {}.magasin_migrations SET checksum = 'edited' WHERE version = 1"
                ).format(sql.Identifier(pg_schema))
            )
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            with pytest.raises(MigrationError, match="changed after it was applied"):
                await migrate(conn, pg_schema)


class TestBadConnections:
    async def test_nothing_listening_gives_an_actionable_error(self) -> None:
        with pytest.raises(StoreUnavailableError) as caught:
            await PostgresEventStore.connect(
                "postgresql://postgres@127.0.0.1:1/test", connect_timeout=2
            )
        message = str(caught.value)
        assert "127.0.0.1:1" in message
        assert "MAGASIN_DATABASE_URL" in message

    async def test_a_missing_database_is_named(self) -> None:
        with pytest.raises(StoreUnavailableError, match="does not exist"):
            await PostgresEventStore.connect(
                "postgresql://postgres@127.0.0.1:5432/no_such_db_magasin", connect_timeout=3
            )

    async def test_a_malformed_dsn_is_a_configuration_error(self) -> None:
        with pytest.raises(ConfigurationError, match="does not parse"):
            await PostgresEventStore.connect("host=127.0.0.1 bogus")

    async def test_terminated_backends_are_replaced_transparently(
        self, pg_store: PostgresEventStore, pg_dsn: str
    ) -> None:
        stream = ledger()
        await pg_store.append(stream, [new(Opened("a"))], 0)
        assert terminate_backends(pg_dsn) >= 1
        await pg_store.append(stream, [new(Deposited(1))], 1)
        assert terminate_backends(pg_dsn) >= 1
        assert len(await pg_store.read_stream(stream)) == 2

    async def test_a_terminated_listen_connection_is_reopened_and_caught_up(
        self, pg_dsn: str, pg_schema: str
    ) -> None:
        """With polling every 60 s, only a re-established LISTEN delivers within the bound."""
        store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema, poll_interval=60)
        stream = ledger()
        received: list[RecordedEvent] = []
        try:
            with anyio.fail_after(30):
                subscription = store.subscribe()
                try:
                    await store.append(stream, [new(Opened("a"))], 0)
                    async for batch in subscription:
                        received.extend(batch)
                        if len(received) == 1:
                            await anyio.sleep(0.2)  # let the subscriber sit in LISTEN
                            assert terminate_backends(pg_dsn) >= 1
                            await store.append(stream, [new(Deposited(1))], 1)
                        if len(received) == 2:
                            await anyio.sleep(0.2)
                            await store.append(stream, [new(Deposited(2))], 2)
                        if len(received) >= 3:
                            break
                finally:
                    await subscription.aclose()  # type: ignore[attr-defined]
        finally:
            await store.close()
        assert [r.version for r in received] == [1, 2, 3]


class TestFigures:
    async def test_store_operations_are_counted_by_outcome(
        self, pg_store: PostgresEventStore, metrics: Metrics
    ) -> None:
        stream = ledger()
        events = [new(Opened("a"))]
        await pg_store.append(stream, events, 0)
        await pg_store.append(stream, events, 0)
        with pytest.raises(Exception, match="version"):
            await pg_store.append(stream, [new(Deposited(1))], 0)
        await pg_store.read_all()
        stats = await pg_store.statistics()
        text = metrics.render()[0].decode()
        for outcome in ("ok", "replayed", "conflict"):
            assert f'event_store_operations_total{{operation="append",outcome="{outcome}"}}' in (
                text
            )
        assert 'operation="read_all",outcome="ok"' in text
        assert f"event_store_size_bytes {stats.size_bytes}" in text
        assert "event_store_event_count" in text


class NameChanged(msgspec.Struct, frozen=True, tag=True):
    """The shape ``Renamed`` had in schema version 1, under its old name."""

    name: str
    schema_version: ClassVar[int] = 1


class TestOldShapes:
    async def test_rows_stored_in_an_old_shape_load_as_todays_types(
        self, pg_store: PostgresEventStore, pg_dsn: str, pg_schema: str
    ) -> None:
        stream = ledger()
        await pg_store.append(stream, [new(Opened("a"))], 0)
        # A v1 row, written as the code of that time wrote it.
        await pg_store.append(stream, [NewEvent(NameChanged("bea"), metadata=Metadata())], 1)
        # A v2 row, inserted with plain SQL.
        async with await raw_connection(pg_dsn, pg_schema, "test-old") as conn:
            await conn.execute(
                """INSERT INTO event_store (event_id, event_type, aggregate_id, aggregate_type,
                                            event_data, metadata, version)
                   VALUES (%s, 'Renamed', %s, 'ledger', '{"type":"Renamed","holder":"cleo"}',
                           '{"schema_version": 2}', 3)""",
                (uuid.uuid4(), stream.aggregate_id),
            )
            await conn.commit()
        codec = EventCodec().register(LedgerEvent)

        @codec.upcaster("NameChanged", 1, rename_to="Renamed")
        def holder(data: dict[str, Any]) -> dict[str, Any]:
            return {"holder": data["name"]}

        @codec.upcaster("Renamed", 2)
        def owner(data: dict[str, Any]) -> dict[str, Any]:
            return {"owner": data["holder"]}

        envelopes = [codec.decode(r) for r in await pg_store.read_stream(stream)]
        assert [e.payload for e in envelopes] == [Opened("a"), Renamed("bea"), Renamed("cleo")]
        assert [e.event_type for e in envelopes] == ["Opened", "Renamed", "Renamed"]
        assert {e.metadata.schema_version for e in envelopes[1:]} == {3}
        assert CODEC.event_types == ["Deposited", "Opened", "Renamed", "Withdrawn"]


class TestLeases:
    async def test_a_lease_whose_connection_dies_is_lost_and_taken_over(
        self, pg_store: PostgresEventStore, pg_dsn: str, pg_dsn_schema_store: PostgresEventStore
    ) -> None:
        """Another process's store takes the lease once the holder's session is cut; the
        old holder learns it at its next check."""
        from runtime.errors import LeaseLostError  # noqa: PLC0415

        standby_acquired = anyio.Event()

        async def standby() -> None:
            async with pg_dsn_schema_store.leader_lease("relay"):
                standby_acquired.set()
                await anyio.sleep_forever()

        with anyio.fail_after(20):
            async with (
                pg_store.leader_lease("relay") as lease,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(standby)
                await anyio.sleep(1.2)
                assert not standby_acquired.is_set()
                assert terminate_backends(pg_dsn) >= 1
                await standby_acquired.wait()
                with pytest.raises(LeaseLostError, match="relay"):
                    await lease.check()
                tg.cancel_scope.cancel()


async def test_a_notified_commit_held_behind_an_open_transaction_is_read_once_it_ends(
    pg_dsn: str, pg_schema: str
) -> None:
    """read_all cannot pass a transaction still open anywhere in the cluster. A subscriber
    woken by a commit it cannot read yet looks again within milliseconds, not at its next
    poll (here 30 s): any writer's transaction, a projection's included, is such a blocker."""
    store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema, poll_interval=30.0)
    received: list[RecordedEvent] = []
    try:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            await blocker.execute("SELECT pg_current_xact_id()")  # holds an xid: the horizon

            async def tail() -> None:
                async for batch in store.subscribe(Checkpoint.START, 100):
                    received.extend(batch)

            async with anyio.create_task_group() as tg:
                tg.start_soon(tail)
                await anyio.sleep(0.3)  # the subscriber is waiting for a notification
                await store.append(ledger(), [new(Opened("late"))], 0)
                await anyio.sleep(0.3)
                assert received == [], "read_all passed a transaction still open"
                await blocker.rollback()
                with anyio.fail_after(10):  # far below the 30 s poll
                    while not received:  # noqa: ASYNC110 - the subscriber fills it
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert [e.version for e in received] == [1]
    finally:
        await store.close()
