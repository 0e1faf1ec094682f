"""The PostgreSQL read-model store (psycopg 3 async + a psycopg_pool of its own).

One read-model transaction is one PostgreSQL transaction on one pooled connection. The
tables are created by ``sql/0007_read_models.sql``. Driver errors are translated here into
``runtime.errors``: a lost connection is ``StoreUnavailableError``, and ``run()`` retries the
whole transaction once on a fresh connection (safe: a projection's effect and its dedup
record are in that one transaction, so a retry after a commit that did land is a duplicate).

Locks, in READ COMMITTED: ``last_version`` takes the aggregate's version row FOR UPDATE
(creating it at 0 with an upsert if missing, which also waits for a concurrent creator);
``get(..., for_update=True)`` takes a transaction-scoped advisory lock on the document's
address before reading it, in a statement of its own so the read sees what the previous
holder committed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, TypeVar

import psycopg
from loguru import logger
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.errors import InvalidRequestError, StoreError, StoreUnavailableError
from runtime.store.postgres import connection_string, describe_dsn, open_pool
from runtime.store.readmodel import (
    Document,
    Entry,
    ReadModelTx,
    check_name,
    check_page,
    check_version,
    decode_document,
    encode_document,
)

T = TypeVar("T")
AsyncConn = psycopg.AsyncConnection[Any]

_GET = "SELECT doc::text FROM read_models WHERE projection = %s AND collection = %s AND key = %s"
_LOCK_DOC = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_PUT = """
INSERT INTO read_models (projection, collection, key, doc) VALUES (%s, %s, %s, %s::jsonb)
ON CONFLICT (projection, collection, key) DO UPDATE SET doc = excluded.doc, updated_at = now()"""
_DELETE = "DELETE FROM read_models WHERE projection = %s AND collection = %s AND key = %s"
_LIST = """
SELECT key, doc::text FROM read_models
 WHERE projection = %s AND collection = %s AND key > %s
 ORDER BY key
 LIMIT %s"""
_LOCK_VERSION = """
SELECT version FROM projection_versions WHERE projection = %s AND aggregate_id = %s FOR UPDATE"""
# No row yet: create it at 0. A concurrent creator makes this wait for its commit, then the
# no-op update locks the row and returns the version it committed.
_CREATE_VERSION = """
INSERT INTO projection_versions (projection, aggregate_id, version) VALUES (%s, %s, 0)
ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = projection_versions.version
RETURNING version"""
_SET_VERSION = """
INSERT INTO projection_versions (projection, aggregate_id, version) VALUES (%s, %s, %s)
ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = excluded.version
 WHERE projection_versions.version < excluded.version"""


class PostgresReadModelStore:
    """A ``ReadModelStore`` on PostgreSQL. Create with :meth:`connect`; close when done."""

    def __init__(self, *, pool: AsyncConnectionPool[AsyncConn], dsn: str, schema: str) -> None:
        self._pool = pool
        self._where = describe_dsn(dsn)
        self._schema = schema

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float = 10.0,
        run_migrations: bool = True,
    ) -> PostgresReadModelStore:
        """Open a pool on ``dsn`` (the event store's session settings: search path, statement
        and idle-in-transaction timeouts), migrate ``schema`` unless told not to."""
        conninfo = connection_string(dsn, schema=schema)
        pool = await open_pool(
            dsn,
            conninfo,
            name=f"magasin-read-models-{schema}",
            schema=schema,
            min_size=min_size,
            max_size=max_size,
            connect_timeout=connect_timeout,
            run_migrations=run_migrations,
        )
        logger.info(
            "read-model store ready on {where}, schema {schema}",
            where=describe_dsn(dsn),
            schema=schema,
        )
        return cls(pool=pool, dsn=dsn, schema=schema)

    async def close(self) -> None:
        await self._pool.close()

    # --- transactions ----------------------------------------------------------------------

    def transaction(self, projection: str) -> AbstractAsyncContextManager[ReadModelTx]:
        return self._session(projection, transactional=True)

    @asynccontextmanager
    async def _session(self, projection: str, *, transactional: bool) -> AsyncIterator[ReadModelTx]:
        """A pooled connection in one transaction, or in autocommit for a single read."""
        check_name("projection", projection)
        try:
            async with (
                self._pool.connection() as conn,
                conn.transaction() if transactional else nullcontext(),
            ):
                tx = PostgresReadModelTx(conn, projection, self._where, self._schema)
                try:
                    yield tx
                finally:
                    tx.closed = True
        except (psycopg.Error, PoolTimeout) as exc:
            doing = f"a read-model transaction of {projection!r}"
            raise _translate(exc, doing, self._where, self._schema) from exc

    async def run(self, projection: str, work: Callable[[ReadModelTx], Awaitable[T]]) -> T:
        return await self._retrying(projection, work, transactional=True)

    async def _retrying(
        self,
        projection: str,
        work: Callable[[ReadModelTx], Awaitable[T]],
        *,
        transactional: bool,
    ) -> T:
        for attempt in (1, 2):
            try:
                async with self._session(projection, transactional=transactional) as tx:
                    return await work(tx)
            except StoreUnavailableError as exc:
                if attempt == 2:
                    raise
                logger.warning(
                    "read-model connection lost in {projection} ({exc}); checking the pool "
                    "and retrying once",
                    projection=projection,
                    exc=exc.cause,
                )
                # Backends usually die together (restart, failover, admin): drop every dead
                # idle connection before the retry picks one.
                await self._pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- queries: one autocommit statement each, no BEGIN/COMMIT round trips -------------------

    async def get(self, projection: str, collection: str, key: str) -> Document | None:
        async def read(tx: ReadModelTx) -> Document | None:
            return await tx.get(collection, key)

        return await self._retrying(projection, read, transactional=False)

    async def list(
        self,
        projection: str,
        collection: str,
        *,
        limit: int = 100,
        after_key: str | None = None,
    ) -> list[Entry]:
        async def read(tx: ReadModelTx) -> list[Entry]:
            return await tx.list(collection, limit=limit, after_key=after_key)

        return await self._retrying(projection, read, transactional=False)

    def __repr__(self) -> str:
        return f"PostgresReadModelStore({self._where}, schema={self._schema!r})"


class PostgresReadModelTx:
    """One projection's statements inside one open PostgreSQL transaction."""

    def __init__(self, conn: AsyncConn, projection: str, where: str, schema: str) -> None:
        self._conn = conn
        self._projection = projection
        self._where = where
        self._schema = schema
        self.closed = False

    async def _fetch(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self.closed:
            raise InvalidRequestError(
                f"this read-model transaction of {self._projection!r} has ended; "
                "open a new one with transaction()"
            )
        try:
            cur = await self._conn.execute(query, params)
            return await cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            doing = f"a read-model statement of {self._projection!r}"
            raise _translate(exc, doing, self._where, self._schema) from exc

    async def get(self, collection: str, key: str, *, for_update: bool = False) -> Document | None:
        check_name("collection", collection)
        check_name("key", key)
        if for_update:
            address = "\x1f".join(("magasin.read_models", self._projection, collection, key))
            await self._fetch(_LOCK_DOC, (address,))
        rows = await self._fetch(_GET, (self._projection, collection, key))
        return decode_document(rows[0][0]) if rows else None

    async def put(self, collection: str, key: str, doc: Document) -> None:
        encoded = encode_document(collection, key, doc)
        await self._fetch(_PUT, (self._projection, collection, key, encoded.decode()))

    async def delete(self, collection: str, key: str) -> None:
        check_name("collection", collection)
        check_name("key", key)
        await self._fetch(_DELETE, (self._projection, collection, key))

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        check_name("collection", collection)
        check_page(limit, after_key)
        # Keys are never empty, so '' is below every key.
        rows = await self._fetch(_LIST, (self._projection, collection, after_key or "", limit))
        return [(key, decode_document(doc)) for key, doc in rows]

    async def last_version(self, aggregate_id: str) -> int:
        check_name("aggregate_id", aggregate_id)
        params = (self._projection, aggregate_id)
        rows = await self._fetch(_LOCK_VERSION, params) or await self._fetch(
            _CREATE_VERSION, params
        )
        return int(rows[0][0])

    async def set_last_version(self, aggregate_id: str, version: int) -> None:
        check_name("aggregate_id", aggregate_id)
        check_version(version)
        await self._fetch(_SET_VERSION, (self._projection, aggregate_id, version))


def _translate(exc: BaseException, doing: str, where: str, schema: str) -> StoreError:
    """A driver error as one of ``runtime.errors``."""
    if isinstance(exc, pg_errors.QueryCanceled):
        return StoreError(f"{doing} took longer than statement_timeout: {exc}")
    if isinstance(exc, pg_errors.TransactionRollback):
        return StoreError(f"{doing} was rolled back by PostgreSQL ({exc}); try again")
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return StoreUnavailableError(where, exc)
    if isinstance(exc, pg_errors.UndefinedTable):
        return StoreError(
            f"the read-model tables are missing in schema {schema!r} "
            f"({exc.diag.message_primary}); run `magasin db migrate`"
        )
    if isinstance(exc, psycopg.DataError):
        return InvalidRequestError(f"{doing} was refused by PostgreSQL: {exc}")
    return StoreError(f"{doing} failed: {exc}")
