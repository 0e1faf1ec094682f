"""The read-model contract on PostgreSQL, plus what only a real database can show."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

import runtime.store.migrate as migrate_module
from runtime.errors import StoreUnavailableError
from runtime.store.readmodel import open_read_model_store
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
