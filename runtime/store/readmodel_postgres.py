"""The PostgreSQL read-model store (psycopg 3 async + a psycopg_pool of its own).

One read-model transaction is one PostgreSQL transaction on one pooled connection. The
tables are created by ``sql/0007_read_models.sql``. Driver errors are translated here into
``runtime.errors``: a lost connection is ``StoreUnavailableError``, and ``run()`` retries the
whole transaction once on a fresh connection (safe: a projection's effect and its dedup
record are in that one transaction, so a retry after a commit that did land is a duplicate).

Locks, in READ COMMITTED: ``last_version`` takes the aggregate's version row FOR UPDATE
(creating it at 0 with an upsert if missing, which also waits for a concurrent creator);
``last_versions`` takes several in one upsert, in key order so that two batches never wait
on each other in a cycle; ``get(..., for_update=True)`` takes a transaction-scoped advisory
lock on the document's address before reading it, in a statement of its own so the read sees
what the previous holder committed.

Round trips: writes (``put``, ``delete``, ``set_last_version``) are staged in the transaction
object, which reads them back, and sent at commit in one statement per kind; ``get_many``
reads several documents in one. A batch of events therefore costs a few round trips plus
one per document read, not several per event.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, TypeVar

import msgspec
import psycopg
from loguru import logger
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.errors import (
    InvalidRequestError,
    RebuildInProgressError,
    RebuildLockLostError,
    StoreError,
    StoreUnavailableError,
)
from runtime.store.postgres import connection_string, describe_dsn, open_pool
from runtime.store.readmodel import (
    Document,
    Entry,
    ReadModelTx,
    Rebuild,
    check_name,
    check_page,
    check_rebuild_write,
    check_version,
    decode_document,
    encode_document,
)

T = TypeVar("T")
AsyncConn = psycopg.AsyncConnection[Any]
_Rows = list[tuple[Any, ...]]

_GET = "SELECT doc::text FROM {docs} WHERE projection = %s AND collection = %s AND key = %s"
_LOCK_DOC = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_LIST = """
SELECT key, doc::text FROM {docs}
 WHERE projection = %s AND collection = %s AND key > %s
 ORDER BY key
 LIMIT %s"""
_LOCK_VERSION = """
SELECT version FROM {versions} WHERE projection = %s AND aggregate_id = %s FOR UPDATE"""
# No row yet: create it at 0. A concurrent creator makes this wait for its commit, then the
# no-op update locks the row and returns the version it committed.
_CREATE_VERSION = """
INSERT INTO {versions} AS v (projection, aggregate_id, version) VALUES (%s, %s, 0)
ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = v.version
RETURNING version"""
# Lists travel as one JSON document (``jsonb_to_recordset``): psycopg escapes a text array
# element by element in Python, which costs more than the statement on a replay's batches.
# Lock (creating at 0 where missing) several version rows in one statement, in key order.
# Locks the versions that exist without writing them (a FOR UPDATE marks the row; an upsert
# would write a new row version and its index entries for every aggregate of every batch).
_LOCK_EXISTING_VERSIONS = """
SELECT v.aggregate_id, v.version FROM jsonb_array_elements_text(%s::jsonb) AS a (id)
 CROSS JOIN LATERAL (
   SELECT aggregate_id, version FROM {versions}
    WHERE projection = %s AND aggregate_id = a.id LIMIT 1 FOR UPDATE) AS v"""
# The aggregates seen for the first time: created at 0 (or locked, if a competitor just did).
_LOCK_VERSIONS = """
INSERT INTO {versions} AS v (projection, aggregate_id, version)
SELECT %s, a, 0 FROM jsonb_array_elements_text(%s::jsonb) AS a ORDER BY a
ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = v.version
RETURNING aggregate_id, version"""
# One primary-key lookup per key, whatever the statistics say: a replay fills the table faster
# than autovacuum analyses it, and with a stale estimate the planner flattens a plain join into
# a hash join over the whole projection. The LIMIT keeps the lookup a nested index probe.
_GET_MANY = """
SELECT k.key, r.doc::text FROM jsonb_array_elements_text(%s::jsonb) AS k (key)
 CROSS JOIN LATERAL (
   SELECT doc FROM {docs}
    WHERE projection = %s AND collection = %s AND key = k.key
    LIMIT 1) AS r"""
_DELETE_MANY = """
DELETE FROM {docs} AS r USING jsonb_to_recordset(%s::jsonb) AS t (c text, k text)
 WHERE r.projection = %s AND r.collection = t.c AND r.key = t.k"""
# A transaction's staged writes in one statement (one round trip instead of up to three; the
# data-modifying CTEs all run, on distinct rows: a key is either put or deleted).
_FLUSH = """
WITH put AS (
  INSERT INTO {docs} (projection, collection, key, doc)
  SELECT %(projection)s, t.c, t.k, t.d
    FROM jsonb_to_recordset(%(puts)s::jsonb) AS t (c text, k text, d jsonb)
  ON CONFLICT (projection, collection, key) DO UPDATE SET doc = excluded.doc, updated_at = now()
), removed AS (
  DELETE FROM {docs} AS r USING jsonb_to_recordset(%(deletes)s::jsonb) AS t (c text, k text)
   WHERE r.projection = %(projection)s AND r.collection = t.c AND r.key = t.k
), versions AS (
  INSERT INTO {versions} AS v (projection, aggregate_id, version)
  SELECT %(projection)s, t.a, t.v
    FROM jsonb_to_recordset(%(versions)s::jsonb) AS t (a text, v integer)
  ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = excluded.version
   WHERE v.version < excluded.version
)
SELECT 1"""
_json = msgspec.json.Encoder()
# Whether backend %s (a rebuild's guard connection) still holds the advisory lock %s.
_GUARD_HOLDS = """
SELECT EXISTS (
  SELECT 1 FROM pg_locks
   WHERE locktype = 'advisory' AND granted AND pid = %s
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0))"""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Statements:
    """The statements above on one pair of tables: the parents, or a rebuild's own."""

    def __init__(self, docs: str, versions: str) -> None:
        tables = {"docs": _quote(docs), "versions": _quote(versions)}
        self.docs, self.versions = docs, versions
        self.get = _GET.format(**tables)
        self.list = _LIST.format(**tables)
        self.lock_version = _LOCK_VERSION.format(**tables)
        self.create_version = _CREATE_VERSION.format(**tables)
        self.lock_versions = _LOCK_VERSIONS.format(**tables)
        self.lock_existing_versions = _LOCK_EXISTING_VERSIONS.format(**tables)
        self.get_many = _GET_MANY.format(**tables)
        self.delete_many = _DELETE_MANY.format(**tables)
        self.flush = _FLUSH.format(**tables)


_LIVE = _Statements("read_models", "projection_versions")


class PostgresReadModelStore:
    """A ``ReadModelStore`` on PostgreSQL. Create with :meth:`connect`; close when done."""

    def __init__(self, *, pool: AsyncConnectionPool[AsyncConn], dsn: str, schema: str) -> None:
        self._pool = pool
        self._conninfo = connection_string(dsn, schema=schema)
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
    async def _session(
        self, projection: str, *, transactional: bool, statements: _Statements = _LIVE
    ) -> AsyncIterator[PostgresReadModelTx]:
        """A pooled connection in one transaction, or in autocommit for a single read."""
        check_name("projection", projection)
        try:
            async with (
                self._pool.connection() as conn,
                conn.transaction() if transactional else nullcontext(),
            ):
                tx = PostgresReadModelTx(conn, projection, self._where, self._schema, statements)
                try:
                    yield tx
                    await tx.flush()  # the staged writes, just before the commit
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

    async def find(
        self,
        projection: str,
        collection: str,
        *,
        equals: dict[str, str | int | bool] | None = None,
        ranges: dict[str, tuple[str | None, str | None]] | None = None,
        limit: int = 100,
        after_key: str | None = None,
    ) -> builtins.list[Entry]:
        check_name("collection", collection)
        check_page(limit, after_key)
        clauses = ["projection = %s", "collection = %s", "key > %s"]
        params: list[Any] = [projection, collection, after_key or ""]
        if equals:
            clauses.append("doc @> %s::jsonb")
            params.append(encode_document(collection, "find", dict(equals)).decode())
        for field, (low, high) in (ranges or {}).items():
            check_name("field", field)
            if low is not None:
                clauses.append('(doc->>%s) COLLATE "C" >= %s')
                params += [field, low]
            if high is not None:
                clauses.append('(doc->>%s) COLLATE "C" < %s')
                params += [field, high]
            clauses.append("jsonb_typeof(doc->%s) = 'string'")
            params.append(field)
        query = (
            "SELECT key, doc::text FROM read_models WHERE "
            + " AND ".join(clauses)
            + " ORDER BY key LIMIT %s"
        )
        params.append(limit)

        async def read(tx: ReadModelTx) -> list[Entry]:
            assert isinstance(tx, PostgresReadModelTx)
            rows = await tx._fetch(query, tuple(params))
            return [(key, decode_document(doc)) for key, doc in rows]

        return await self._retrying(projection, read, transactional=False)

    async def drop(self, projection: str) -> None:
        async def delete(tx: ReadModelTx) -> None:
            assert isinstance(tx, PostgresReadModelTx)
            await tx._fetch("DELETE FROM read_models WHERE projection = %s", (projection,))
            await tx._fetch("DELETE FROM projection_versions WHERE projection = %s", (projection,))

        await self._retrying(projection, delete, transactional=True)

    @asynccontextmanager
    async def rebuild(self, projection: str) -> AsyncIterator[Rebuild]:
        check_name("projection", projection)
        lock = hashlib.sha256(
            f"magasin.rebuild\x1f{self._schema}\x1f{projection}".encode()
        ).hexdigest()
        try:
            # A session lock, held by a connection of its own for the whole rebuild; every
            # write and the swap check that it still holds it.
            guard = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise _translate(exc, "opening a rebuild", self._where, self._schema) from exc
        async with guard:
            cur = await guard.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (lock,)
            )
            row = await cur.fetchone()
            if not row or not row[0]:
                raise RebuildInProgressError(projection)
            rebuild = PostgresRebuild(self, projection, lock, guard.pgconn.backend_pid)
            await rebuild.create()
            try:
                yield rebuild
            finally:
                try:
                    await rebuild.discard()
                except StoreError as exc:  # not to hide why the rebuild ended
                    logger.warning(
                        "could not drop the tables of the rebuild of {projection} ({exc}); "
                        "the next rebuild of it drops them",
                        projection=projection,
                        exc=exc,
                    )

    def __repr__(self) -> str:
        return f"PostgresReadModelStore({self._where}, schema={self._schema!r})"


class PostgresRebuild:
    """A rebuild in two tables of its own, ``read_models_rebuild_<digest>_<random>`` and
    ``projection_versions_rebuild_<digest>_<random>``: rows under the live projection's name
    (a CHECK says so), written with COPY, and attached by ``swap`` as that projection's
    partitions of ``read_models`` and ``projection_versions`` (``sql/0010``), named
    ``..._p_<digest>``, which takes no rewrite. ``lock`` names the advisory lock its guard
    connection (backend ``guard``) holds (``PostgresReadModelStore.rebuild``)."""

    def __init__(
        self, store: PostgresReadModelStore, projection: str, lock: str, guard: int
    ) -> None:
        self._store = store
        self.projection = projection
        self._lock = lock
        self._guard = guard
        digest = self._digest = hashlib.sha256(projection.encode()).hexdigest()[:20]
        self._leftovers = (
            f"read_models_rebuild_{digest}_%",
            f"projection_versions_rebuild_{digest}_%",
        )
        suffix = secrets.token_hex(4)  # never the tables of another rebuild, even a lost one
        self._sql = _Statements(
            f"read_models_rebuild_{digest}_{suffix}",
            f"projection_versions_rebuild_{digest}_{suffix}",
        )
        # (parent, this rebuild's table, the name of the projection's partition once attached)
        self._tables = (
            ("read_models", self._sql.docs, f"read_models_p_{digest}"),
            ("projection_versions", self._sql.versions, f"projection_versions_p_{digest}"),
        )

    async def _run(
        self, work: Callable[[PostgresReadModelTx], Awaitable[T]], *, guarded: bool = False
    ) -> T:
        async with self._store._session(
            self.projection, transactional=True, statements=self._sql
        ) as tx:
            if guarded and not (await tx._fetch(_GUARD_HOLDS, (self._guard, self._lock)))[0][0]:
                raise RebuildLockLostError(self.projection)
            return await work(tx)

    async def create(self) -> None:
        """Drop what an interrupted rebuild of the projection left (it holds the lock, so no
        other rebuild of it runs), create the tables, empty."""

        async def drop_leftovers(tx: PostgresReadModelTx) -> None:
            rows = await tx._fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND (tablename LIKE %s OR tablename LIKE %s)",
                self._leftovers,
            )
            for (table,) in rows:
                await tx._fetch(f"DROP TABLE IF EXISTS {_quote(table)}", ())

        await self._run(drop_leftovers)
        live = _literal(self.projection)
        docs, versions = _quote(self._sql.docs), _quote(self._sql.versions)

        async def create(tx: PostgresReadModelTx) -> None:
            await tx._fetch(
                f"CREATE TABLE {docs} (LIKE read_models INCLUDING DEFAULTS,"
                f" CHECK (projection = {live}), PRIMARY KEY (projection, collection, key))",
                (),
            )
            await tx._fetch(
                f"CREATE TABLE {versions} (LIKE projection_versions INCLUDING DEFAULTS"
                f" INCLUDING CONSTRAINTS, CHECK (projection = {live}),"
                " PRIMARY KEY (projection, aggregate_id))",
                (),
            )
            # The index the partition must have (sql/0008's; ATTACH would build a missing
            # one, under the swap's locks). Kept up by each write: PostgreSQL does that while
            # the replay folds the next chunk, instead of building it at the end.
            await tx._fetch(f"CREATE INDEX ON {docs} USING gin (doc jsonb_path_ops)", ())

        await self._run(create)

    async def discard(self) -> None:
        tables = ", ".join(_quote(build) for _, build, _ in self._tables)
        await self._statement(f"DROP TABLE IF EXISTS {tables}")

    async def load(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        return await self._run(lambda tx: tx.get_many(collection, keys))

    async def load_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        async def read(tx: PostgresReadModelTx) -> dict[str, int]:
            rows = await tx._fetch(
                f"SELECT aggregate_id, version FROM {_quote(self._sql.versions)}"
                " WHERE projection = %s AND aggregate_id = ANY(%s)",
                (self.projection, list(aggregate_ids)),
            )
            found = dict.fromkeys(aggregate_ids, 0)
            found.update((a, int(v)) for a, v in rows)
            return found

        return await self._run(read)

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> builtins.list[Entry]:
        return await self._run(lambda tx: tx.list(collection, limit=limit, after_key=after_key))

    async def write(
        self,
        documents: Mapping[tuple[str, str], bytes | None],
        versions: Mapping[str, int],
        *,
        new: bool = False,
    ) -> None:
        check_rebuild_write(documents, versions)
        puts = [(c, k, raw) for (c, k), raw in documents.items() if raw is not None]
        deletes = [{"c": c, "k": k} for (c, k), raw in documents.items() if raw is None]
        docs, vers = _quote(self._sql.docs), _quote(self._sql.versions)
        projection = _copy_field(self.projection)

        async def write(tx: PostgresReadModelTx) -> None:
            await tx._fetch("SET LOCAL statement_timeout = 0", ())
            into_docs, into_versions = docs, vers
            if not new:  # through a staging table, to replace what is there
                into_docs, into_versions = "magasin_rebuild_docs", "magasin_rebuild_versions"
                for staging, like in ((into_docs, docs), (into_versions, vers)):
                    await tx._fetch(
                        f"CREATE TEMP TABLE {staging} (LIKE {like} INCLUDING DEFAULTS)"
                        " ON COMMIT DROP",
                        (),
                    )
            await tx.copy(
                f"COPY {into_docs} (projection, collection, key, doc) FROM STDIN",
                (
                    b"%b\t%b\t%b\t%b\n"
                    % (projection, _copy_field(c), _copy_field(k), raw.replace(b"\\", b"\\\\"))
                    for c, k, raw in puts
                ),
            )
            await tx.copy(
                f"COPY {into_versions} (projection, aggregate_id, version) FROM STDIN",
                (b"%b\t%b\t%d\n" % (projection, _copy_field(a), v) for a, v in versions.items()),
            )
            if new:
                return
            await tx._fetch(
                f"INSERT INTO {docs} AS d SELECT * FROM {into_docs} ON CONFLICT"
                " (projection, collection, key) DO UPDATE SET doc = excluded.doc",
                (),
            )
            await tx._fetch(
                f"INSERT INTO {vers} AS v SELECT * FROM {into_versions} ON CONFLICT"
                " (projection, aggregate_id) DO UPDATE SET version = excluded.version",
                (),
            )
            if deletes:
                await tx._fetch(
                    tx._sql.delete_many, (_json.encode(deletes).decode(), self.projection)
                )

        await self._run(write, guarded=True)

    async def swap(self, finish: Callable[[ReadModelTx], Awaitable[object]]) -> None:
        async def prepare(tx: PostgresReadModelTx) -> None:
            # Fresh statistics for the planner, before the swap's locks.
            await tx._fetch("SET LOCAL statement_timeout = 0", ())
            for _, build, _ in self._tables:
                await tx._fetch(f"ANALYZE {_quote(build)}", ())

        await self._run(prepare, guarded=True)
        # Whether it was rebuilt before: only rebuilds of it (which hold its lock) change that.
        found = await self._statement("SELECT to_regclass(%s) IS NOT NULL", (self._tables[0][2],))
        partitioned = bool(found[0][0])
        if partitioned:
            await self._keep_out_of_default()

        async def attach(tx: PostgresReadModelTx) -> None:
            await tx._fetch("SET LOCAL statement_timeout = 0", ())
            await tx._fetch("SET LOCAL idle_in_transaction_session_timeout = 0", ())
            # Live projections' transactions hold ROW EXCLUSIVE on it until they commit:
            # this waits for them, then holds back new ones until the swap commits.
            await tx._fetch("LOCK TABLE projection_versions IN EXCLUSIVE MODE", ())
            await finish(tx)
            await tx.flush()
            # Queries wait from here to the commit: one planned with the partitions of
            # before the ATTACH but run with a snapshot of after it would miss both copies.
            await tx._fetch(
                "LOCK TABLE read_models, projection_versions IN ACCESS EXCLUSIVE MODE", ()
            )
            live = _literal(self.projection)
            for parent, build, partition in self._tables:
                if partitioned:  # rebuilt before: the old partition goes
                    await tx._fetch(f"DROP TABLE {_quote(partition)}", ())
                else:  # first rebuild: its rows are in the default partition
                    await tx._fetch(
                        f"DELETE FROM {parent} WHERE projection = %s", (self.projection,)
                    )
                await tx._fetch(
                    f"ALTER TABLE {parent} ATTACH PARTITION {_quote(build)} FOR VALUES IN ({live})",
                    (),
                )
                await tx._fetch(f"ALTER TABLE {_quote(build)} RENAME TO {_quote(partition)}", ())

        await self._run(attach, guarded=True)
        if not partitioned:
            await self._keep_out_of_default()  # for the next rebuild of this projection

    async def _keep_out_of_default(self) -> None:
        """A validated ``CHECK (projection <> <this one>)`` on each default partition: with
        it, ATTACH need not scan the default partition (under the swap's locks) to prove it
        holds no row of the projection. Added NOT VALID (a catalog change), then validated
        in a transaction of its own, which scans without blocking reads or writes."""
        live = _literal(self.projection)
        for parent, _, _ in self._tables:
            default, name = f"{parent}_default", f"{parent}_default_not_{self._digest}"
            found = await self._statement(
                "SELECT convalidated FROM pg_constraint WHERE conname = %s"
                " AND conrelid = to_regclass(%s)",
                (name, default),
            )
            if not found:
                await self._statement(
                    f"ALTER TABLE {_quote(default)} ADD CONSTRAINT {_quote(name)}"
                    f" CHECK (projection <> {live}) NOT VALID"
                )
            if not found or not found[0][0]:
                await self._statement(
                    f"ALTER TABLE {_quote(default)} VALIDATE CONSTRAINT {_quote(name)}"
                )

    async def _statement(self, statement: str, params: tuple[Any, ...] = ()) -> _Rows:
        """One statement in a transaction of its own."""

        async def run(tx: PostgresReadModelTx) -> _Rows:
            return await tx._fetch(statement, params)

        return await self._run(run)


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (for DDL, which takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _copy_field(text: str) -> bytes:
    """``text`` as a field of COPY's text format."""
    return (
        text.encode()
        .replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


class PostgresReadModelTx:
    """One projection's statements inside one open PostgreSQL transaction; writes are staged
    here (and read back) until :meth:`flush`, which the store calls before committing."""

    def __init__(
        self,
        conn: AsyncConn,
        projection: str,
        where: str,
        schema: str,
        statements: _Statements = _LIVE,
    ) -> None:
        self._conn = conn
        self._sql = statements
        self._projection = projection
        self._where = where
        self._schema = schema
        self._writes: dict[tuple[str, str], bytes | None] = {}  # None: deleted
        self._versions: dict[str, int] = {}  # locked: last applied, staged included
        self._staged: set[str] = set()  # aggregates whose version is to be written
        self._read: dict[tuple[str, str], str | None] = {}  # what get_many read (None: absent)
        self.closed = False

    async def _fetch(
        self, query: str, params: tuple[Any, ...] | dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        self._check_open()
        try:
            cur = await self._conn.execute(query, params)
            return await cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            doing = f"a read-model statement of {self._projection!r}"
            raise _translate(exc, doing, self._where, self._schema) from exc

    def _check_open(self) -> None:
        if self.closed:
            raise InvalidRequestError(
                f"this read-model transaction of {self._projection!r} has ended; "
                "open a new one with transaction()"
            )

    async def get(self, collection: str, key: str, *, for_update: bool = False) -> Document | None:
        self._check_open()
        check_name("collection", collection)
        check_name("key", key)
        if for_update:
            address = "\x1f".join(("magasin.read_models", self._projection, collection, key))
            await self._fetch(_LOCK_DOC, (address,))
        if (collection, key) in self._writes:
            staged = self._writes[(collection, key)]
            return None if staged is None else decode_document(staged)
        if not for_update and (collection, key) in self._read:
            read = self._read[(collection, key)]
            return None if read is None else decode_document(read)
        rows = await self._fetch(self._sql.get, (self._projection, collection, key))
        return decode_document(rows[0][0]) if rows else None

    async def get_many(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        await self.prefetch(collection, keys)
        found: dict[str, Document] = {}
        for key in dict.fromkeys(keys):
            address = (collection, key)
            raw = self._writes[address] if address in self._writes else self._read[address]
            if raw is not None:
                found[key] = decode_document(raw)
        return found

    async def prefetch(self, collection: str, keys: Sequence[str]) -> None:
        self._check_open()
        check_name("collection", collection)
        for key in keys:
            check_name("key", key)
        wanted = [
            key
            for key in dict.fromkeys(keys)
            if (collection, key) not in self._writes and (collection, key) not in self._read
        ]
        if wanted:
            rows = await self._fetch(
                self._sql.get_many, (_json.encode(wanted).decode(), self._projection, collection)
            )
            raw: dict[str, str | None] = dict.fromkeys(wanted)
            raw.update(rows)
            for key, doc in raw.items():
                self._read[(collection, key)] = doc

    async def put(self, collection: str, key: str, doc: Document) -> None:
        self._check_open()
        self._writes[(collection, key)] = encode_document(collection, key, doc)

    async def delete(self, collection: str, key: str) -> None:
        self._check_open()
        check_name("collection", collection)
        check_name("key", key)
        self._writes[(collection, key)] = None

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        check_name("collection", collection)
        check_page(limit, after_key)
        await self.flush()  # the staged writes take part in the page
        # Keys are never empty, so '' is below every key.
        rows = await self._fetch(
            self._sql.list, (self._projection, collection, after_key or "", limit)
        )
        return [(key, decode_document(doc)) for key, doc in rows]

    async def last_version(self, aggregate_id: str) -> int:
        check_name("aggregate_id", aggregate_id)
        if aggregate_id in self._versions:
            return self._versions[aggregate_id]
        params = (self._projection, aggregate_id)
        rows = await self._fetch(self._sql.lock_version, params) or await self._fetch(
            self._sql.create_version, params
        )
        version = self._versions[aggregate_id] = int(rows[0][0])
        return version

    async def last_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        for aggregate_id in aggregate_ids:
            check_name("aggregate_id", aggregate_id)
        missing = sorted({a for a in aggregate_ids if a not in self._versions})
        if missing:
            rows = await self._fetch(
                self._sql.lock_existing_versions,
                (_json.encode(missing).decode(), self._projection),
            )
            self._versions.update((aggregate_id, int(v)) for aggregate_id, v in rows)
        new = [a for a in missing if a not in self._versions]
        if new:
            rows = await self._fetch(
                self._sql.lock_versions, (self._projection, _json.encode(new).decode())
            )
            self._versions.update((aggregate_id, int(v)) for aggregate_id, v in rows)
        return {a: self._versions[a] for a in aggregate_ids}

    async def set_last_version(self, aggregate_id: str, version: int) -> None:
        check_name("aggregate_id", aggregate_id)
        check_version(version)
        current = await self.last_version(aggregate_id)  # locks it, as the memory store does
        if version > current:
            self._versions[aggregate_id] = version
            self._staged.add(aggregate_id)

    async def copy(self, statement: str, lines: Iterable[bytes]) -> None:
        """``COPY ... FROM STDIN`` (text format) of ``lines``, in chunks of about 1 MiB."""
        self._check_open()
        try:
            async with self._conn.cursor().copy(statement) as copy:
                chunk: list[bytes] = []
                size = 0
                for line in lines:
                    chunk.append(line)
                    size += len(line)
                    if size >= 1 << 20:
                        await copy.write(b"".join(chunk))
                        chunk, size = [], 0
                if chunk:
                    await copy.write(b"".join(chunk))
        except psycopg.Error as exc:
            doing = f"a bulk write of {self._projection!r}"
            raise _translate(exc, doing, self._where, self._schema) from exc

    async def flush(self) -> None:
        """Send the staged writes (one statement); called before the commit."""
        self._check_open()
        writes, self._writes = self._writes, {}
        staged, self._staged = sorted(self._staged), set()
        if not writes and not staged:
            return
        puts = [
            {"c": c, "k": k, "d": msgspec.Raw(d)} for (c, k), d in writes.items() if d is not None
        ]
        deletes = [{"c": c, "k": k} for (c, k), d in writes.items() if d is None]
        versions = [{"a": a, "v": self._versions[a]} for a in staged]
        await self._fetch(
            self._sql.flush,
            {
                "projection": self._projection,
                "puts": _json.encode(puts).decode(),
                "deletes": _json.encode(deletes).decode(),
                "versions": _json.encode(versions).decode(),
            },
        )


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
