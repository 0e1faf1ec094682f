"""The store contract on PostgreSQL, plus what only a real database can show."""

from __future__ import annotations

import pytest

from runtime.store.postgres import PostgresEventStore
from tests.contracts.store import EventStoreContract

pytestmark = pytest.mark.integration


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture
    def store(self, pg_store: PostgresEventStore) -> PostgresEventStore:
        return pg_store
