"""The audit trail on PostgreSQL: tables ``audit_log`` and ``audit_chain_head``
(``sql/0009_audit_log.sql``).

An append is one transaction: it locks the chain head (``SELECT ... FOR UPDATE``; the row is
created on first use), drops the event ids already recorded, links the rest after the head in
Python, inserts them in one statement and moves the head. Appenders in several processes
therefore serialise on the head row and the chain stays a single line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from loguru import logger
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.errors import StoreError, StoreUnavailableError
from runtime.store.audit import (
    GENESIS,
    AuditEntry,
    AuditQuery,
    AuditRecord,
    Coverage,
    chain,
    check_query,
    unrecorded,
)
from runtime.store.postgres import connection_string, describe_dsn, open_pool
from runtime.store.protocol import EventStore

AsyncConn = psycopg.AsyncConnection[Any]

_COLUMNS = (
    "seq, event_id, kind, event_type, aggregate_type, aggregate_id, correlation_id, "
    "causation_id, user_id AS user, occurred_at, recorded_at, payload_digest, prev_hash, hash"
)
_LOCK_HEAD = """
INSERT INTO audit_chain_head (id, seq, hash) VALUES (true, 0, %s)
ON CONFLICT (id) DO UPDATE SET seq = audit_chain_head.seq
RETURNING seq, hash, clock_timestamp()"""
_KNOWN = "SELECT event_id FROM audit_log WHERE event_id = ANY(%s)"
_INSERT = """
INSERT INTO audit_log (seq, event_id, kind, event_type, aggregate_type, aggregate_id,
                       correlation_id, causation_id, user_id, occurred_at, recorded_at,
                       payload_digest, prev_hash, hash)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
_MOVE_HEAD = "UPDATE audit_chain_head SET seq = %s, hash = %s WHERE id"
_HEAD = "SELECT seq, hash FROM audit_chain_head"
_COVERAGE = """
SELECT count(*), count(a.event_id) FROM event_store e LEFT JOIN audit_log a USING (event_id)"""
_MISSING = """
SELECT e.event_id FROM event_store e
 WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.event_id = e.event_id)
 ORDER BY e.position LIMIT %s"""


class PostgresAuditLog:
    """An ``AuditLog`` on PostgreSQL. Create with :meth:`connect`; close when done."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn], dsn: str) -> None:
        self._pool = pool
        self._where = describe_dsn(dsn)

    @classmethod
    async def connect(
        cls, dsn: str, *, schema: str = "public", max_size: int = 2
    ) -> PostgresAuditLog:
        pool = await open_pool(
            dsn,
            connection_string(dsn, schema=schema),
            name=f"magasin-audit-{schema}",
            schema=schema,
            min_size=1,
            max_size=max_size,
            connect_timeout=10.0,
            run_migrations=True,
        )
        logger.info("audit trail ready on {where}", where=describe_dsn(dsn))
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    async def append(self, entries: Sequence[AuditEntry]) -> int:
        if not entries:
            return 0
        try:
            async with self._pool.connection() as conn, conn.transaction():
                head = await (await conn.execute(_LOCK_HEAD, (GENESIS,))).fetchone()
                assert head is not None
                ids = [entry.event_id for entry in entries]
                known = {row[0] for row in await (await conn.execute(_KNOWN, (ids,))).fetchall()}
                fresh = unrecorded(entries, known)
                if not fresh:
                    return 0
                # The database's clock, read once the head is locked: in seq order everywhere.
                linked = chain(fresh, (int(head[0]), str(head[1])), head[2])
                async with conn.cursor() as cur:
                    await cur.executemany(_INSERT, [_row(record) for record in linked])
                await conn.execute(_MOVE_HEAD, (linked[-1].seq, linked[-1].hash))
                return len(linked)
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._translate(exc, "recording audit entries") from exc

    async def query(self, query: AuditQuery) -> list[AuditRecord]:
        check_query(query)
        where = ["seq > %s"]
        params: list[object] = [query.after_seq]
        for column, value in (
            ("correlation_id", query.correlation_id),
            ("aggregate_id", query.aggregate_id),
            ("user_id", query.user),
        ):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if query.since is not None:
            where.append("occurred_at >= %s")
            params.append(query.since)
        if query.until is not None:
            where.append("occurred_at < %s")
            params.append(query.until)
        params.append(query.limit)
        statement = (
            f"SELECT {_COLUMNS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY seq LIMIT %s"
        )
        try:
            async with self._pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                rows = await (await cur.execute(statement, params)).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._translate(exc, "reading the audit trail") from exc
        return [AuditRecord(**row) for row in rows]

    async def head(self) -> tuple[int, str]:
        try:
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_HEAD)).fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._translate(exc, "reading the audit chain head") from exc
        return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))

    async def coverage(self, store: EventStore, sample: int = 20) -> Coverage:
        del store  # the event_store table of this database is compared in SQL
        try:
            async with self._pool.connection() as conn:
                counts = await (await conn.execute(_COVERAGE)).fetchone()
                assert counts is not None
                missing = await (await conn.execute(_MISSING, (sample,))).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._translate(exc, "comparing the audit trail with the event store") from exc
        return Coverage(int(counts[0]), int(counts[1]), tuple(row[0] for row in missing))

    def _translate(self, exc: BaseException, doing: str) -> StoreError:
        if isinstance(exc, psycopg.OperationalError | PoolTimeout):
            return StoreUnavailableError(self._where, exc)
        if isinstance(exc, pg_errors.UndefinedTable):
            return StoreError(f"{doing}: the audit tables are missing; run `magasin db migrate`")
        return StoreError(f"{doing} failed: {exc}")


#: ``audit_log``'s columns in the order ``_INSERT`` lists them, as ``AuditRecord`` names them.
_INSERT_FIELDS = (
    "seq", "event_id", "kind", "event_type", "aggregate_type", "aggregate_id", "correlation_id",
    "causation_id", "user", "occurred_at", "recorded_at", "payload_digest", "prev_hash", "hash",
)  # fmt: skip


def _row(record: AuditRecord) -> tuple[object, ...]:
    return tuple(getattr(record, name) for name in _INSERT_FIELDS)
