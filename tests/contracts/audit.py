"""The audit-log contract, run against both backends.

A backend's test module subclasses ``AuditLogContract`` and provides:
- ``audit_log``: a fresh, empty trail;
- ``event_store``: the event store its coverage is measured against (same database);
- ``tamper``: ``async (seq, column, value)`` editing a stored record behind the log's back;
- ``cut``: ``async (seq)`` deleting a stored record behind the log's back.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidRequestError
from runtime.store.audit import (
    GENESIS,
    AuditEntry,
    AuditLog,
    AuditQuery,
    entry_of,
    link_hash,
    records,
    verify,
)
from runtime.store.protocol import EventStore
from tests.contracts.store import ledger, new
from tests.support.ledger import Deposited, Opened

Tamper = Callable[[int, str, object], Awaitable[None]]
Cut = Callable[[int], Awaitable[None]]
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def entry(
    event_id: uuid.UUID | None = None,
    *,
    correlation: str = "corr",
    minutes: int = 0,
    user: str | None = "ana",
    aggregate: str = "agg-1",
) -> AuditEntry:
    return AuditEntry(
        event_id=event_id or uuid.uuid4(),
        kind="event",
        event_type="Deposited",
        occurred_at=T0 + timedelta(minutes=minutes),
        payload_digest="ab" * 32,
        aggregate_type="ledger",
        aggregate_id=aggregate,
        correlation_id=correlation,
        causation_id=None,
        user=user,
    )


class AuditLogContract:
    async def test_entries_are_numbered_and_linked_in_order(self, audit_log: AuditLog) -> None:
        first, second = entry(), entry()
        assert await audit_log.append([first, second]) == 2
        found = await audit_log.query(AuditQuery())
        assert [r.event_id for r in found] == [first.event_id, second.event_id]
        assert [r.seq for r in found] == [1, 2]
        assert found[0].prev_hash == GENESIS
        assert found[1].prev_hash == found[0].hash
        for record in found:
            assert record.hash == link_hash(
                record.prev_hash, record.seq, entry_of(record), record.recorded_at
            )
        assert await audit_log.head() == (2, found[1].hash)

    async def test_an_event_id_is_recorded_once(self, audit_log: AuditLog) -> None:
        same = entry()
        assert await audit_log.append([same, same]) == 1
        assert await audit_log.append([same, entry()]) == 1
        assert await audit_log.append([same]) == 0
        assert len(await audit_log.query(AuditQuery())) == 2

    async def test_concurrent_appends_keep_one_chain(
        self, audit_log: AuditLog, event_store: EventStore
    ) -> None:
        shared = [entry() for _ in range(5)]

        async def writer(index: int) -> None:
            for _ in range(5):
                await audit_log.append([*shared, entry(), entry(user=str(index))])

        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(writer, index)
        result = await verify(audit_log, event_store)
        assert result.breaks == ()
        assert result.records == 5 + 4 * 5 * 2

    async def test_filters_and_pages(self, audit_log: AuditLog) -> None:
        await audit_log.append(
            [
                entry(correlation="a", minutes=0, aggregate="x"),
                entry(correlation="b", minutes=1, user="bob"),
                entry(correlation="a", minutes=2, aggregate="y"),
                entry(correlation="a", minutes=3, aggregate="x"),
            ]
        )

        async def seqs(**filters: object) -> list[int]:
            return [r.seq for r in await audit_log.query(AuditQuery(**filters))]  # type: ignore[arg-type]

        assert await seqs(correlation_id="a") == [1, 3, 4]
        assert await seqs(aggregate_id="x") == [1, 4]
        assert await seqs(user="bob") == [2]
        assert await seqs(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [
            2,
            3,
        ]
        assert await seqs(correlation_id="a", limit=2) == [1, 3]
        assert await seqs(correlation_id="a", after_seq=3) == [4]
        assert [r.seq async for r in records(audit_log, AuditQuery(correlation_id="a"))] == [
            1,
            3,
            4,
        ]
        with pytest.raises(InvalidRequestError, match="limit"):
            await audit_log.query(AuditQuery(limit=0))

    async def test_an_untouched_trail_verifies(
        self, audit_log: AuditLog, event_store: EventStore
    ) -> None:
        await event_store.append(ledger(), [new(Opened("a")), new(Deposited(1))], 0)
        stored = await event_store.read_all()
        await audit_log.append([entry(r.event_id) for r in stored])
        await audit_log.append([entry()])  # a command outcome: not a stored event
        result = await verify(audit_log, event_store)
        assert result.ok, result
        assert result.coverage.stored == 2
        assert result.coverage.percent == 100.0
        assert result.records == 3

    async def test_an_unaudited_event_is_missing_coverage(
        self, audit_log: AuditLog, event_store: EventStore
    ) -> None:
        await event_store.append(ledger(), [new(Opened("a")), new(Deposited(1))], 0)
        stored = await event_store.read_all()
        await audit_log.append([entry(stored[0].event_id)])
        result = await verify(audit_log, event_store)
        assert not result.ok
        assert result.coverage.audited == 1
        assert result.coverage.missing == (stored[1].event_id,)
        assert result.coverage.percent == 50.0
        assert result.breaks == ()

    @pytest.mark.parametrize(
        ("column", "value"),
        [("user", "mallory"), ("payload_digest", "00" * 32), ("event_type", "Withdrawn")],
    )
    async def test_an_edited_record_breaks_the_chain(
        self,
        audit_log: AuditLog,
        event_store: EventStore,
        tamper: Tamper,
        column: str,
        value: object,
    ) -> None:
        await audit_log.append([entry() for _ in range(4)])
        await tamper(2, column, value)
        result = await verify(audit_log, event_store)
        assert not result.ok
        assert [b.seq for b in result.breaks] == [2]
        assert "does not match its hash" in result.breaks[0].reason

    async def test_a_deleted_record_breaks_the_chain(
        self, audit_log: AuditLog, event_store: EventStore, cut: Cut
    ) -> None:
        await audit_log.append([entry() for _ in range(4)])
        await cut(2)
        result = await verify(audit_log, event_store)
        assert [b.seq for b in result.breaks] == [3, 3]
        assert "missing" in result.breaks[0].reason

    async def test_records_removed_from_the_end_are_found_by_the_head(
        self, audit_log: AuditLog, event_store: EventStore, cut: Cut
    ) -> None:
        await audit_log.append([entry() for _ in range(3)])
        await cut(3)
        result = await verify(audit_log, event_store)
        assert not result.ok
        assert "head says 3" in result.breaks[0].reason

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(batches=st.lists(st.lists(st.integers(0, 15), max_size=8), max_size=8))
    async def test_any_appends_with_duplicates_record_each_id_once(
        self, audit_log: AuditLog, event_store: EventStore, batches: list[list[int]]
    ) -> None:
        base = len(await audit_log.query(AuditQuery(limit=10_000)))
        ids = [uuid.uuid4() for _ in range(16)]
        for batch in batches:
            await audit_log.append([entry(ids[i]) for i in batch])
        recorded = [r.event_id for r in await audit_log.query(AuditQuery(after_seq=base))]
        expected = list(dict.fromkeys(ids[i] for batch in batches for i in batch))
        assert recorded == expected
        assert (await verify(audit_log, event_store)).breaks == ()
