"""The audit-log contract on the in-memory backend (the embedded default)."""

from __future__ import annotations

import uuid

import pytest

from runtime.errors import ConfigurationError
from runtime.store.audit import MemoryAuditLog, audit_log_for, open_audit_log
from runtime.store.memory import MemoryEventStore
from tests.contracts.audit import AuditLogContract, Cut, Tamper, entry


class TestMemoryAuditLog(AuditLogContract):
    @pytest.fixture
    def audit_log(self) -> MemoryAuditLog:
        return MemoryAuditLog()

    @pytest.fixture
    def event_store(self) -> MemoryEventStore:
        return MemoryEventStore()

    @pytest.fixture
    def tamper(self, audit_log: MemoryAuditLog) -> Tamper:
        async def edit(seq: int, column: str, value: object) -> None:
            audit_log.tamper(seq, **{column: value})

        return edit

    @pytest.fixture
    def cut(self, audit_log: MemoryAuditLog) -> Cut:
        async def delete(seq: int) -> None:
            del audit_log._records[seq - 1]

        return delete


class TestTheEmbeddedRegistry:
    async def test_one_url_names_one_trail_for_the_whole_process(self) -> None:
        url = f"memory://{uuid.uuid4().hex}"
        async with open_audit_log(url) as opened:
            await opened.append([entry()])
        assert audit_log_for(url) is opened
        assert audit_log_for(f"memory://{uuid.uuid4().hex}") is not opened

    def test_a_database_url_is_not_an_embedded_trail(self) -> None:
        with pytest.raises(ConfigurationError, match="embedded"):
            audit_log_for("postgresql://db/app")
