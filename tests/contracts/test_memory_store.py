"""The store contract on the in-memory backend (the embedded default)."""

from __future__ import annotations

import pytest

from runtime.store.memory import MemoryEventStore
from tests.contracts.store import EventStoreContract, ledger, new
from tests.support.ledger import Deposited, Opened


class TestMemoryEventStore(EventStoreContract):
    @pytest.fixture
    def store(self) -> MemoryEventStore:
        return MemoryEventStore(poll_interval=0.05)

    async def test_event_count_is_exact(self, store: MemoryEventStore) -> None:
        await store.append(ledger(), [new(Opened("a")), new(Deposited(1))], 0)
        assert (await store.statistics()).event_count == 2
