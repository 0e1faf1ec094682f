"""The read-model contract on PostgreSQL, plus what only a real database can show."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

import runtime.store.migrate as migrate_module
from runtime.errors import RebuildLockLostError, StoreUnavailableError
from runtime.store.readmodel import encode_document, open_read_model_store
from runtime.store.readmodel_postgres import PostgresReadModelStore
from tests.contracts.readmodel import ReadModelStoreContract, put
from tests.support.postgres import terminate_backends

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_read_models(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresReadModelStore]:
    store = await PostgresReadModelStore.connect(pg_dsn, schema=pg_schema, max_size=16)
    yield store
    await store.close()


class TestPostgresReadModelStore(ReadModelStoreContract):
    @pytest.fixture
    def read_models(self, pg_read_models: PostgresReadModelStore) -> PostgresReadModelStore:
        return pg_read_models


class TestConnections:
    async def test_terminated_backends_are_replaced_transparently(
        self, pg_read_models: PostgresReadModelStore, pg_dsn: str
    ) -> None:
        await put(pg_read_models, "p", "c", "k", v=1)
        assert terminate_backends(pg_dsn) >= 1
        await pg_read_models.run("p", lambda tx: tx.put("c", "k", {"v": 2}))
        assert terminate_backends(pg_dsn) >= 1
        assert await pg_read_models.get("p", "c", "k") == {"v": 2}

    async def test_nothing_listening_is_store_unavailable(self) -> None:
        with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:1\b"):
            await PostgresReadModelStore.connect(
                "postgresql://postgres@127.0.0.1:1/test", connect_timeout=2
            )

    async def test_a_database_url_opens_a_pool_of_its_own(
        self, pg_dsn: str, pg_schema: str
    ) -> None:
        async with open_read_model_store(pg_dsn, schema=pg_schema) as store:
            assert isinstance(store, PostgresReadModelStore)
            await put(store, "p", "c", "k", v=1)
            assert await store.get("p", "c", "k") == {"v": 1}


class TestPartitionedMigration:
    async def test_read_models_written_before_0010_are_kept_in_the_partitioned_tables(
        self, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        schema = f"t_upgrade_{uuid.uuid4().hex[:8]}"
        everything = migrate_module.migrations()
        upgrade = next(m for m in everything if m.name == "0010_read_models_partitioned.sql")
        monkeypatch.setattr(
            migrate_module,
            "migrations",
            lambda: [m for m in everything if m.version < upgrade.version],
        )
        try:
            old = await PostgresReadModelStore.connect(pg_dsn, schema=schema)
            try:
                await put(old, "p", "c", "k", v=1)
                await old.run("p", lambda tx: tx.set_last_version("agg", 3))
            finally:
                await old.close()
            monkeypatch.undo()
            new = await PostgresReadModelStore.connect(pg_dsn, schema=schema)
            try:
                assert await new.get("p", "c", "k") == {"v": 1}
                async with new.transaction("p") as tx:
                    assert await tx.last_version("agg") == 3
                assert await new.find("p", "c", equals={"v": 1}) == [("k", {"v": 1})]
            finally:
                await new.close()
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                cur = await conn.execute(
                    """SELECT c.relname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = %s AND c.relkind = 'p' ORDER BY 1""",
                    (schema,),
                )
                assert [r[0] for r in await cur.fetchall()] == [
                    "projection_versions",
                    "read_models",
                ]
        finally:
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def _kill_rebuild_guards(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE query LIKE '%%pg_try_advisory_lock%%' AND pid <> pg_backend_pid()
                  AND datname = current_database()"""
        ).fetchone()
    return int(row[0]) if row else 0


class TestRebuildLocks:
    async def test_a_rebuild_that_lost_its_lock_writes_and_swaps_nothing(
        self, pg_read_models: PostgresReadModelStore, pg_dsn: str
    ) -> None:
        await put(pg_read_models, "p", "c", "live", v=1)
        async with pg_read_models.rebuild("p") as first:
            await first.write({("c", "a"): encode_document("c", "a", {"v": 2})}, {}, new=True)
            assert _kill_rebuild_guards(pg_dsn) == 1
            with pytest.raises(RebuildLockLostError, match="'p'"):
                await first.write({("c", "b"): encode_document("c", "b", {"v": 3})}, {})
            async with pg_read_models.rebuild("p") as second:  # the lock is free again
                assert await second.load("c", ["a"]) == {}
                await second.write({("c", "s"): encode_document("c", "s", {"v": 4})}, {})
                with pytest.raises(RebuildLockLostError):
                    await first.swap(_nothing)
                await second.swap(_nothing)
        assert await pg_read_models.list("p", "c") == [("s", {"v": 4})]

    async def test_the_same_projection_rebuilds_in_two_schemas_at_once(
        self, pg_read_models: PostgresReadModelStore, pg_dsn: str, pg_schema: str
    ) -> None:
        other = await PostgresReadModelStore.connect(pg_dsn, schema=pg_schema + "_b")
        try:
            async with pg_read_models.rebuild("p"), other.rebuild("p"):
                pass
        finally:
            await other.close()
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                await conn.execute(
                    sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(pg_schema + "_b"))
                )


async def _nothing(tx: object) -> None:
    return None
