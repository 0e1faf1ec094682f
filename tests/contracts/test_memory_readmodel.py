"""The read-model contract on the in-memory backend (the embedded default)."""

from __future__ import annotations

import uuid

import pytest

from runtime.errors import ConfigurationError
from runtime.store.readmodel import open_read_model_store, read_model_store_for
from runtime.store.readmodel_memory import MemoryReadModelStore
from tests.contracts.readmodel import ReadModelStoreContract, put


class TestMemoryReadModelStore(ReadModelStoreContract):
    @pytest.fixture
    def read_models(self) -> MemoryReadModelStore:
        return MemoryReadModelStore()

    async def test_no_lock_outlives_its_transaction(
        self, read_models: MemoryReadModelStore
    ) -> None:
        async with read_models.transaction("p") as tx:
            await tx.last_version("agg")
            await tx.get("c", "k", for_update=True)
            assert len(read_models._locks) == 2
        assert len(read_models._locks) == 0


class TestTheEmbeddedRegistry:
    async def test_one_url_names_one_store_for_the_whole_process(self) -> None:
        url = f"memory://{uuid.uuid4().hex}"
        async with open_read_model_store(url) as opened:
            await put(opened, "p", "c", "k", v=1)
        assert read_model_store_for(url) is opened
        assert await read_model_store_for(url).get("p", "c", "k") == {"v": 1}
        assert read_model_store_for(f"memory://{uuid.uuid4().hex}") is not opened

    def test_a_database_url_is_not_an_embedded_store(self) -> None:
        with pytest.raises(ConfigurationError, match="open_read_model_store"):
            read_model_store_for("postgresql://user:secret@db:5432/app")
