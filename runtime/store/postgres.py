"""The PostgreSQL event store (psycopg 3 async + psycopg_pool).

This is the only module of the store that imports psycopg: driver errors are translated
into ``runtime.errors`` here. The SQL it relies on lives in ``sql/`` and is applied by
``migrate.py``.

Connection failures: the pool does not ping connections on checkout (a round trip per
operation); instead an operation that fails because its connection died makes the pool
check its idle connections, and is retried once. Every operation is safe to retry: reads
trivially, appends because a retried append is answered from the first result.
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID

import anyio
import psycopg
from loguru import logger
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.errors import (
    ConcurrencyError,
    ConfigurationError,
    InvalidAppendError,
    LeaseLostError,
    StoreError,
    StoreUnavailableError,
)
from runtime.observability.metrics import Metrics
from runtime.store.migrate import migrate
from runtime.store.protocol import (
    AppendResult,
    Checkpoint,
    EncodedEvent,
    Lease,
    NewEvent,
    ParkedKey,
    RecordedEvent,
    Snapshot,
    StoreStatistics,
    StreamId,
    check_read_args,
    decode_metadata,
    prepare_append,
)

T = TypeVar("T")
#: Longest pause between reads while a notified commit is not yet readable (seconds).
NOTIFIED_RETRY_MAX = 0.02
AsyncConn = psycopg.AsyncConnection[Any]

# Read in binary (``_read``): UUIDs, integers and times arrive without text parsing, and the
# JSON documents as bytes. The aliases must not be column names: ORDER BY would bind to them.
_COLUMNS = """event_id, event_type, aggregate_type, aggregate_id, version, position,
              tx_id::text::bigint AS tx_number,
              convert_to(event_data::text, 'UTF8') AS data_bytes,
              convert_to(metadata::text, 'UTF8') AS metadata_bytes, created_at"""

# Rows are returned in (tx_id, position) order, and only those of transactions older than
# every transaction still running: a transaction that is open now may still commit rows
# with positions below ones already visible; reading below xmin waits for it instead of
# skipping its rows. Nothing is ever skipped on a timer.
_READ_ALL = f"""
SELECT {_COLUMNS} FROM event_store
 WHERE (tx_id, position) > (%s::text::xid8, %s::bigint)
   AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY tx_id, position
 LIMIT %s::integer"""

_READ_STREAM = f"""
SELECT {_COLUMNS} FROM event_store
 WHERE aggregate_id = %s AND aggregate_type = %s AND version >= %s::integer
 ORDER BY version"""

# Arrays go in binary, encoded here: psycopg's text-array quoting costs ~20 us per JSON
# document, and its list dumpers (element type lookup per call) were a third of an append's
# CPU in this process (bench.flow profile).
_APPEND = "SELECT * FROM event_store_append(%s, %s, %s, %s, %b, %b, %b, %b, %s)"
_REPLAYED = "SELECT * FROM event_store_replayed(%s, %b)"

_UUID_OID, _TEXT_OID, _JSONB_OID = 2950, 25, 3802
_JSONB_V1 = b"\x01"  # jsonb's binary form: a version byte, then the JSON text
_ARRAY_HEAD = struct.Struct("!iiIii")  # dimensions, has nulls, element oid, length, lower bound
_LENGTH = struct.Struct("!i")


def _binary_array(element_oid: int, items: Sequence[bytes]) -> bytes:
    """A one-dimensional array without NULLs in PostgreSQL's binary format."""
    parts = [_ARRAY_HEAD.pack(1, 0, element_oid, len(items), 1)]
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


class _UuidArray(bytes):
    """A ``uuid[]`` already in binary (see ``_binary_array``)."""


class _TextArray(bytes):
    """A ``text[]`` already in binary."""


class _JsonbArray(bytes):
    """A ``jsonb[]`` already in binary."""


def _encoded_array_dumper(cls: type[bytes], array_oid: int) -> type[Dumper]:
    class EncodedArrayDumper(Dumper):
        format = pq.Format.BINARY
        oid = array_oid

        def dump(self, obj: Buffer) -> Buffer:
            return obj

    EncodedArrayDumper.__name__ = f"{cls.__name__}Dumper"
    return EncodedArrayDumper


for _cls, _array_oid in ((_UuidArray, 2951), (_TextArray, 1009), (_JsonbArray, 3807)):
    psycopg.adapters.register_dumper(_cls, _encoded_array_dumper(_cls, _array_oid))

_CONCURRENCY = "MG001"
_WRONG_TYPE = "MG002"


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` for messages, never the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


def _row_to_event(row: tuple[Any, ...]) -> RecordedEvent:
    event_id, event_type, aggregate_type, aggregate_id, version, position = row[:6]
    tx_id, data, metadata, created_at = row[6:]
    return RecordedEvent(
        event_id=event_id,
        event_type=event_type,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        version=version,
        position=position,
        tx_id=tx_id,
        data=data,
        metadata=decode_metadata(metadata),
        created_at=created_at,
    )


async def _read(conn: AsyncConn, query: str, params: tuple[Any, ...]) -> list[RecordedEvent]:
    """Events of ``query`` (selecting ``_COLUMNS``), read with binary results."""
    cur = conn.cursor(binary=True)
    await cur.execute(query, params)
    return [_row_to_event(row) for row in await cur.fetchall()]


class PostgresEventStore:
    """An ``EventStore`` on PostgreSQL. Create with :meth:`connect`; close when done."""

    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[AsyncConn],
        dsn: str,
        conninfo: str,
        schema: str,
        metrics: Metrics | None,
        poll_interval: float,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._conninfo = conninfo
        self._schema = schema
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._lease_retry = 1.0
        self.channel = f"event_store_{schema}"

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 2,
        max_size: int = 16,
        connect_timeout: float = 10.0,
        statement_timeout_ms: int = 30_000,
        idle_in_transaction_timeout_ms: int = 10_000,
        poll_interval: float = 1.0,
        metrics: Metrics | None = None,
        run_migrations: bool = True,
    ) -> PostgresEventStore:
        """Open a pool on ``dsn``, migrate ``schema`` (unless told not to) and return a store.

        The session settings bound every statement and every idle transaction: an open
        transaction holds back every tailing reader, so none may linger.
        """
        conninfo = connection_string(
            dsn,
            schema=schema,
            statement_timeout_ms=statement_timeout_ms,
            idle_in_transaction_timeout_ms=idle_in_transaction_timeout_ms,
        )
        pool = await open_pool(
            dsn,
            conninfo,
            name=f"magasin-store-{schema}",
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            run_migrations=run_migrations,
        )
        store = cls(
            pool=pool,
            dsn=dsn,
            conninfo=conninfo,
            schema=schema,
            metrics=metrics,
            poll_interval=poll_interval,
        )
        where = describe_dsn(dsn)
        logger.info("event store ready on {where}, schema {schema}", where=where, schema=schema)
        return store

    async def close(self) -> None:
        await self._pool.close()

    # --- helpers -----------------------------------------------------------------------

    async def _run(self, operation: str, work: Callable[[AsyncConn], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection; retry once if the connection was dead."""
        started = time.perf_counter()
        outcome = "error"
        try:
            for attempt in (1, 2):
                try:
                    async with self._pool.connection() as conn:
                        result = await work(conn)
                except pg_errors.QueryCanceled as exc:
                    # statement_timeout: this request is too slow, the database is fine
                    raise StoreError(
                        f"{operation} took longer than statement_timeout: {exc}"
                    ) from exc
                except (psycopg.OperationalError, PoolTimeout) as exc:
                    if attempt == 2:
                        raise StoreUnavailableError(describe_dsn(self._dsn), exc) from exc
                    logger.warning(
                        "event store connection lost during {op} ({exc}); checking the pool "
                        "and retrying once",
                        op=operation,
                        exc=exc,
                    )
                    # Backends are usually terminated together (restart, failover, admin):
                    # drop every dead idle connection before the retry picks one.
                    await self._pool.check()
                    continue
                outcome = "replayed" if getattr(result, "replayed", False) else "ok"
                return result
            raise AssertionError("unreachable")  # pragma: no cover
        except ConcurrencyError:
            outcome = "conflict"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.count_store_operation(
                    operation, outcome, time.perf_counter() - started
                )

    # --- writing -------------------------------------------------------------------------

    async def append(
        self, stream: StreamId, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        encoded = prepare_append(stream, events, expected_version)

        async def work(conn: AsyncConn) -> AppendResult:
            return await self._append(conn, stream, encoded, expected_version)

        return await self._run("append", work)

    async def _append(
        self, conn: AsyncConn, stream: StreamId, encoded: list[EncodedEvent], expected: int
    ) -> AppendResult:
        params = (
            stream.aggregate_type,
            stream.aggregate_id,
            expected,
            encoded[0].metadata.command_id,
            _UuidArray(_binary_array(_UUID_OID, [e.event_id.bytes for e in encoded])),
            _TextArray(_binary_array(_TEXT_OID, [e.event_type.encode() for e in encoded])),
            _JsonbArray(_binary_array(_JSONB_OID, [_JSONB_V1 + e.data for e in encoded])),
            _JsonbArray(_binary_array(_JSONB_OID, [_JSONB_V1 + e.metadata_json for e in encoded])),
            self.channel,
        )
        try:
            cur = await conn.execute(_APPEND, params)
            rows = await cur.fetchall()
        except psycopg.OperationalError:
            raise  # a dead connection: _run retries on a fresh one
        except psycopg.DatabaseError as exc:
            conflict = isinstance(exc, pg_errors.UniqueViolation)
            if not conflict and exc.sqlstate not in {_CONCURRENCY, _WRONG_TYPE}:
                raise _translate_append_error(exc, stream, expected) from exc
            # A conflict: this may be a retry of an append that already landed.
            replayed = await self._replayed(conn, encoded)
            if replayed:
                return _append_result(stream, encoded, replayed)
            if conflict:
                # A concurrent writer won the race for this version.
                actual = await self._stream_version(conn, stream)
                raise ConcurrencyError(str(stream), expected, actual) from exc
            raise _translate_append_error(exc, stream, expected) from exc
        return _append_result(stream, encoded, rows)

    async def _replayed(
        self, conn: AsyncConn, encoded: list[EncodedEvent]
    ) -> list[tuple[Any, ...]]:
        cur = await conn.execute(
            _REPLAYED, (encoded[0].metadata.command_id, [e.event_id for e in encoded])
        )
        return await cur.fetchall()

    async def command_result(self, command_id: UUID) -> AppendResult | None:
        async def work(conn: AsyncConn) -> AppendResult | None:
            cur = await conn.execute(
                """SELECT e.position, e.version, e.aggregate_type, e.aggregate_id
                     FROM event_store c
                     JOIN event_store e ON e.aggregate_id = c.aggregate_id AND e.tx_id = c.tx_id
                    WHERE c.command_id = %s
                    ORDER BY e.version""",
                (command_id,),
            )
            rows = await cur.fetchall()
            if not rows:
                return None
            return AppendResult(
                stream=StreamId(rows[0][2], rows[0][3]),
                first_version=rows[0][1],
                last_version=rows[-1][1],
                first_position=min(r[0] for r in rows),
                last_position=max(r[0] for r in rows),
                replayed=True,
            )

        return await self._run("command_result", work)

    # --- reading -------------------------------------------------------------------------

    async def read_stream(self, stream: StreamId, from_version: int = 1) -> list[RecordedEvent]:
        check_read_args(1, from_version)

        async def work(conn: AsyncConn) -> list[RecordedEvent]:
            return await _read(
                conn, _READ_STREAM, (stream.aggregate_id, stream.aggregate_type, from_version)
            )

        return await self._run("read_stream", work)

    async def stream_version(self, stream: StreamId) -> int:
        async def work(conn: AsyncConn) -> int:
            return await self._stream_version(conn, stream)

        return await self._run("stream_version", work)

    @staticmethod
    async def _stream_version(conn: AsyncConn, stream: StreamId) -> int:
        cur = await conn.execute(
            "SELECT coalesce(max(version), 0) FROM event_store"
            " WHERE aggregate_id = %s AND aggregate_type = %s",
            (stream.aggregate_id, stream.aggregate_type),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def read_all(
        self, after: Checkpoint = Checkpoint.START, limit: int = 500
    ) -> list[RecordedEvent]:
        check_read_args(limit)

        async def work(conn: AsyncConn) -> list[RecordedEvent]:
            return await _read(conn, _READ_ALL, (str(after.tx_id), after.position, limit))

        return await self._run("read_all", work)

    async def subscribe(
        self, after: Checkpoint = Checkpoint.START, batch_size: int = 500
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        checkpoint = after
        unseen = 0.0  # since when a notified commit has not been readable (0: none)
        async with self._listener() as wait_for_append:
            while True:
                batch = await self.read_all(checkpoint, batch_size)
                if batch:
                    unseen = 0.0
                    checkpoint = batch[-1].checkpoint
                    yield batch
                    if len(batch) == batch_size:
                        continue
                elif unseen:
                    # A commit was announced but read_all cannot pass a transaction still
                    # open elsewhere (any writer in the cluster, for a few milliseconds):
                    # look again soon rather than at the next notification or poll.
                    waited = anyio.current_time() - unseen
                    if waited < self._poll_interval:
                        await anyio.sleep(min(NOTIFIED_RETRY_MAX, max(0.002, waited)))
                        continue
                    unseen = 0.0
                if await wait_for_append(self._poll_interval):
                    unseen = anyio.current_time()

    @asynccontextmanager
    async def _listener(self) -> AsyncIterator[Callable[[float], Awaitable[bool]]]:
        """A dedicated autocommit connection LISTENing on the append channel.

        ``wait(timeout)`` returns on a notification (True), on the timeout (the polling
        fallback), or at once after a reconnection, so the caller catches up on what it missed.
        """
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        conn: AsyncConn | None = None

        async def connect() -> AsyncConn | None:
            try:
                new = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                await new.execute(listen)
            except psycopg.OperationalError as exc:
                logger.warning("LISTEN connection unavailable ({exc}); polling", exc=exc)
                return None
            return new

        async def wait(poll_interval: float) -> bool:
            nonlocal conn
            if conn is None or conn.closed:
                conn = await connect()
                if conn is not None:
                    return False  # reconnected: the caller catches up before waiting again
                await anyio.sleep(poll_interval)
                return False
            notified = False
            try:
                async for _ in conn.notifies(timeout=poll_interval, stop_after=1):
                    notified = True
            except psycopg.OperationalError as exc:
                logger.warning("LISTEN connection lost ({exc}); reconnecting", exc=exc)
                await conn.close()
                conn = None
            return notified

        conn = await connect()
        try:
            yield wait
        finally:
            if conn is not None:
                await conn.close()

    # --- snapshots -----------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        async def work(conn: AsyncConn) -> None:
            await conn.execute(
                """INSERT INTO event_store_snapshots
                       (aggregate_id, aggregate_type, version, state_schema, state, created_at)
                   VALUES (%s, %s, %s, %s, %s::jsonb, %s)
                   ON CONFLICT (aggregate_id) DO UPDATE
                      SET aggregate_type = excluded.aggregate_type, version = excluded.version,
                          state_schema = excluded.state_schema, state = excluded.state,
                          created_at = excluded.created_at
                    WHERE event_store_snapshots.version < excluded.version""",
                (
                    snapshot.stream.aggregate_id,
                    snapshot.stream.aggregate_type,
                    snapshot.version,
                    snapshot.state_schema,
                    snapshot.state.decode(),
                    snapshot.created_at,
                ),
            )

        await self._run("save_snapshot", work)

    async def load_snapshot(self, stream: StreamId) -> Snapshot | None:
        async def work(conn: AsyncConn) -> Snapshot | None:
            cur = await conn.execute(
                """SELECT version, state_schema, state::text, created_at
                     FROM event_store_snapshots
                    WHERE aggregate_id = %s AND aggregate_type = %s""",
                (stream.aggregate_id, stream.aggregate_type),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            return Snapshot(stream, row[0], row[1], row[2].encode(), row[3])

        return await self._run("load_snapshot", work)

    # --- checkpoints and leadership -----------------------------------------------------

    async def load_checkpoint(self, name: str) -> Checkpoint:
        async def work(conn: AsyncConn) -> Checkpoint:
            cur = await conn.execute(
                "SELECT tx_id::text AS tx_text, position FROM magasin_checkpoints WHERE name = %s",
                (name,),
            )
            row = await cur.fetchone()
            return Checkpoint(int(row[0]), int(row[1])) if row else Checkpoint.START

        return await self._run("load_checkpoint", work)

    async def save_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        async def work(conn: AsyncConn) -> None:
            await conn.execute(
                """INSERT INTO magasin_checkpoints (name, tx_id, position)
                   VALUES (%s, %s::text::xid8, %s)
                   ON CONFLICT (name) DO UPDATE
                      SET tx_id = excluded.tx_id, position = excluded.position,
                          updated_at = now()
                    WHERE (magasin_checkpoints.tx_id, magasin_checkpoints.position)
                        < (excluded.tx_id, excluded.position)""",
                (name, str(checkpoint.tx_id), checkpoint.position),
            )

        await self._run("save_checkpoint", work)

    # --- parked aggregates -----------------------------------------------------------------

    async def park(self, parked: ParkedKey) -> None:
        async def work(conn: AsyncConn) -> None:
            await conn.execute(
                """INSERT INTO magasin_parked_keys (actor, key, blocker, dead, reason, since)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (actor, key) DO UPDATE
                      SET blocker = excluded.blocker, dead = excluded.dead,
                          reason = excluded.reason, since = excluded.since""",
                (
                    parked.actor,
                    parked.key,
                    parked.blocker,
                    parked.dead,
                    parked.reason,
                    parked.since,
                ),
            )

        await self._run("park", work)

    async def unpark(self, actor: str, key: str, blocker: str | None = None) -> bool:
        async def work(conn: AsyncConn) -> bool:
            cur = await conn.execute(
                """DELETE FROM magasin_parked_keys
                    WHERE actor = %s AND key = %s AND (%s::text IS NULL OR blocker = %s)""",
                (actor, key, blocker, blocker),
            )
            return cur.rowcount > 0

        return await self._run("unpark", work)

    async def parked_keys(self, actor: str | None = None) -> list[ParkedKey]:
        async def work(conn: AsyncConn) -> list[ParkedKey]:
            cur = await conn.execute(
                """SELECT actor, key, blocker, dead, reason, since FROM magasin_parked_keys
                    WHERE %s::text IS NULL OR actor = %s ORDER BY since, actor, key""",
                (actor, actor),
            )
            return [ParkedKey(*row) for row in await cur.fetchall()]

        return await self._run("parked_keys", work)

    @asynccontextmanager
    async def leader_lease(self, name: str) -> AsyncIterator[Lease]:
        """A session advisory lock on a connection of its own: released by PostgreSQL the
        moment the holder dies or its connection is cut, so a standby takes over within
        ``lease_retry`` seconds. The holder finds out at its next ``check()``."""
        key = f"magasin.lease.{self._schema}.{name}"
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.OperationalError as exc:
                logger.warning("lease {name}: cannot connect ({exc}); retrying", name=name, exc=exc)
                await anyio.sleep(self._lease_retry)
                continue
            try:
                while True:
                    cur = await conn.execute(
                        "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
                    )
                    row = await cur.fetchone()
                    if row and row[0]:
                        break
                    await anyio.sleep(self._lease_retry)
            except psycopg.OperationalError as exc:
                logger.warning(
                    "lease {name}: connection lost ({exc}); retrying", name=name, exc=exc
                )
                await conn.close()
                continue
            break
        logger.info("lease {name} acquired", name=name)
        try:
            yield _PostgresLease(name, conn)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()  # closing the session releases the lock

    # --- figures ---------------------------------------------------------------------------

    async def statistics(self) -> StoreStatistics:
        """Cheap figures: PostgreSQL's live-row count (lags commits by up to a few seconds),
        the table's size with indexes, the position sequence and the oldest writer's age."""

        async def work(conn: AsyncConn) -> StoreStatistics:
            cur = await conn.execute(
                """SELECT
                     coalesce((SELECT n_live_tup FROM pg_stat_user_tables
                                WHERE relid = 'event_store'::regclass), 0),
                     pg_total_relation_size('event_store'::regclass),
                     coalesce((SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                                 FROM event_store_position_seq), 0),
                     greatest(0, coalesce((
                         SELECT extract(epoch FROM clock_timestamp() - min(xact_start))::float8
                           FROM pg_stat_activity WHERE backend_xid IS NOT NULL), 0))"""
            )
            row = await cur.fetchone()
            assert row is not None
            return StoreStatistics(int(row[0]), int(row[1]), int(row[2]), float(row[3]))

        stats = await self._run("statistics", work)
        if self._metrics is not None:
            self._metrics.event_store_event_count.set({}, stats.event_count)
            self._metrics.event_store_size_bytes.set({}, stats.size_bytes)
            self._metrics.event_store_head_position.set({}, stats.head_position)
            self._metrics.event_store_oldest_transaction_age_seconds.set(
                {}, stats.oldest_transaction_age_seconds
            )
        return stats

    def __repr__(self) -> str:
        return f"PostgresEventStore({describe_dsn(self._dsn)}, schema={self._schema!r})"


class _PostgresLease:
    def __init__(self, name: str, conn: AsyncConn) -> None:
        self.name = name
        self._conn = conn

    async def check(self) -> None:
        try:
            await self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise LeaseLostError(self.name, exc) from exc


def connection_string(
    dsn: str,
    *,
    schema: str = "public",
    statement_timeout_ms: int = 30_000,
    idle_in_transaction_timeout_ms: int = 10_000,
) -> str:
    """``dsn`` with the session settings magasin needs; raises on a DSN that does not parse."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"the database URL does not parse ({exc}); expected e.g. "
            "postgresql://user@127.0.0.1:5432/dbname"
        ) from exc
    options = " ".join(
        part
        for part in (
            str(parts.get("options") or ""),
            f"-c search_path={_option_value(schema)}",
            f"-c statement_timeout={statement_timeout_ms}",
            f"-c idle_in_transaction_session_timeout={idle_in_transaction_timeout_ms}",
        )
        if part
    )
    parts["options"] = options
    parts.setdefault("application_name", "magasin")
    parts["client_encoding"] = "UTF8"  # the append sends its arrays already encoded in UTF-8
    return make_conninfo(**{k: str(v) for k, v in parts.items()})


def _option_value(value: str) -> str:
    """A value inside libpq's ``options``: spaces and backslashes escaped, so a schema name
    cannot smuggle in another ``-c`` setting."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


async def open_pool(
    dsn: str,
    conninfo: str,
    *,
    name: str,
    schema: str,
    min_size: int,
    max_size: int,
    connect_timeout: float,
    run_migrations: bool,
) -> AsyncConnectionPool[AsyncConn]:
    """An open autocommit pool on ``conninfo`` with ``schema`` migrated (unless told not
    to); ``StoreUnavailableError`` naming the address and the reason if it cannot connect."""
    pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        open=False,
        timeout=connect_timeout,
        name=name,
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
        if run_migrations:
            async with pool.connection() as conn:
                await conn.set_autocommit(False)
                try:
                    await migrate(conn, schema)
                finally:
                    await conn.set_autocommit(True)
    except PoolTimeout as exc:
        await pool.close()
        raise StoreUnavailableError(describe_dsn(dsn), await _connect_error(conninfo, exc)) from exc
    except BaseException:
        await pool.close()
        raise
    return pool


async def _connect_error(conninfo: str, exc: BaseException) -> str:
    """The pool only says it timed out; say why by connecting once directly."""
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=3)
    except psycopg.OperationalError as direct:
        return str(direct).strip().splitlines()[0]
    await conn.close()
    return str(exc)


def _append_result(
    stream: StreamId, encoded: list[EncodedEvent], rows: list[tuple[Any, ...]]
) -> AppendResult:
    replayed = bool(rows[0][3])
    if replayed:
        owner = rows[0][2]
        if owner != stream.aggregate_id or (
            len(rows) != len(encoded) and encoded[0].metadata.command_id is None
        ):
            raise InvalidAppendError(
                f"these events (or this command id) were already appended to stream "
                f"{owner!r}, not {stream}; a retried append must resend the same events"
            )
    return AppendResult(
        stream=stream,
        first_version=rows[0][1],
        last_version=rows[-1][1],
        first_position=min(r[0] for r in rows),
        last_position=max(r[0] for r in rows),
        replayed=replayed,
    )


def _translate_append_error(
    exc: psycopg.DatabaseError, stream: StreamId, expected: int
) -> StoreError:
    state = exc.sqlstate
    detail = exc.diag.message_detail or ""
    if state == _CONCURRENCY:
        return ConcurrencyError(str(stream), expected, int(detail))
    if state == _WRONG_TYPE:
        return InvalidAppendError(
            f"aggregate id {stream.aggregate_id!r} already belongs to a {detail!r} stream, "
            f"not {stream.aggregate_type!r}"
        )
    if isinstance(exc, pg_errors.UndefinedFunction | pg_errors.UndefinedTable):
        return StoreError(
            f"the event store schema is missing ({exc.diag.message_primary}); "
            "run `magasin db migrate`"
        )
    return StoreError(f"append to {stream} failed: {exc}")
