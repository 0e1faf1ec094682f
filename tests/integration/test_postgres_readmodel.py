"""The read-model contract on PostgreSQL, plus what only a real database can show."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
