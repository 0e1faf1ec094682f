"""The audit trail: an append-only, hash-chained log of every business event and command
outcome, each recorded once.

An ``AuditEntry`` is what the audit actor saw (event id, type, aggregate, correlation and
causation ids, user, when it happened, a digest of its payload). The log gives it the next
sequence number and the time it was recorded, and links it to the previous record: ``hash``
is the SHA-256 of the previous hash and of the record's canonical JSON. Editing, inserting or
deleting a record breaks every link from there on; the log's head (last sequence number and
hash, kept beside the records) anchors the end, so dropping the last records shows too.

Both backends (``MemoryAuditLog`` here, ``PostgresAuditLog`` in ``audit_postgres``) append a
batch in one transaction and skip the event ids already recorded, so a redelivered message is
recorded once (guarantee 2). ``verify`` recomputes the chain and compares the log with the
event store (coverage); it is what ``magasin audit verify`` prints.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Container, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, runtime_checkable
from uuid import UUID

import anyio
import msgspec

from runtime.errors import ConfigurationError, InvalidRequestError
from runtime.store.factory import is_memory_url
from runtime.store.protocol import Checkpoint, EventStore, utcnow

#: The previous hash of the first record.
GENESIS = "0" * 64
#: Records per page when the chain is walked.
PAGE = 1000

Kind = Literal["event", "command", "message"]


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One thing to audit, as the audit actor read it off the bus."""

    event_id: UUID
    kind: Kind
    event_type: str
    occurred_at: datetime
    payload_digest: str
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    user: str | None = None


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An entry as the log keeps it: numbered, timed and linked to the previous record."""

    seq: int
    event_id: UUID
    kind: Kind
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    correlation_id: str | None
    causation_id: str | None
    user: str | None
    occurred_at: datetime
    recorded_at: datetime
    payload_digest: str
    prev_hash: str
    hash: str


class AuditQuery(msgspec.Struct, frozen=True, kw_only=True):
    """A filter of the trail; every given field must match. ``since``/``until`` bound
    ``occurred_at`` (inclusive, exclusive); ``after_seq`` pages (keyset)."""

    correlation_id: str | None = None
    aggregate_id: str | None = None
    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int = 100


class Coverage(msgspec.Struct, frozen=True):
    """How much of the event store the trail holds."""

    stored: int  # events in the event store
    audited: int  # of those, how many the trail records
    missing: tuple[UUID, ...]  # a sample of the ones it does not

    @property
    def percent(self) -> float:
        return 100.0 if self.stored == 0 else 100.0 * self.audited / self.stored


class ChainBreak(msgspec.Struct, frozen=True):
    seq: int
    reason: str


class Verification(msgspec.Struct, frozen=True):
    coverage: Coverage
    records: int
    breaks: tuple[ChainBreak, ...]

    @property
    def ok(self) -> bool:
        return not self.breaks and self.coverage.audited == self.coverage.stored


@runtime_checkable
class AuditLog(Protocol):
    async def append(self, entries: Sequence[AuditEntry]) -> int:
        """Record the entries not recorded yet (by event id), in order, in one transaction;
        return how many were new."""
        ...

    async def query(self, query: AuditQuery) -> list[AuditRecord]:
        """The matching records in the order they were recorded (``seq``)."""
        ...

    async def head(self) -> tuple[int, str]:
        """The anchor: the last sequence number and hash the log says it holds."""
        ...

    async def coverage(self, store: EventStore, sample: int = 20) -> Coverage:
        """Events of ``store`` against the trail (PostgreSQL: the ``event_store`` of the same
        database and schema, compared in SQL)."""
        ...

    async def close(self) -> None: ...


# --- the chain ----------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def canonical_time(value: datetime) -> str:
    """A timestamp as the chain hashes it: UTC, microseconds (what PostgreSQL keeps)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def link_hash(prev_hash: str, seq: int, entry: AuditEntry, recorded_at: datetime) -> str:
    """The hash of one link: SHA-256 over the previous hash and the record's fields."""
    fields = [
        seq,
        str(entry.event_id),
        entry.kind,
        entry.event_type,
        entry.aggregate_type,
        entry.aggregate_id,
        entry.correlation_id,
        entry.causation_id,
        entry.user,
        canonical_time(entry.occurred_at),
        canonical_time(recorded_at),
        entry.payload_digest,
    ]
    return hashlib.sha256(prev_hash.encode() + b"\n" + _encoder.encode(fields)).hexdigest()


def unrecorded(entries: Sequence[AuditEntry], recorded: Container[UUID]) -> list[AuditEntry]:
    """The entries whose id is neither in ``recorded`` nor earlier in ``entries``: what an
    append writes (the same on both backends)."""
    seen: set[UUID] = set()
    fresh = []
    for entry in entries:
        if entry.event_id not in recorded and entry.event_id not in seen:
            fresh.append(entry)
            seen.add(entry.event_id)
    return fresh


def chain(
    entries: Sequence[AuditEntry], after: tuple[int, str], recorded_at: datetime
) -> list[AuditRecord]:
    """``entries`` as the records that follow the link ``after`` = (seq, hash)."""
    seq, prev = after
    records = []
    for entry in entries:
        seq += 1
        digest = link_hash(prev, seq, entry, recorded_at)
        records.append(_record(entry, seq, recorded_at, prev, digest))
        prev = digest
    return records


def entry_of(record: AuditRecord) -> AuditEntry:
    """The entry a record was made of (what its hash covers, with its place and time)."""
    return AuditEntry(**{name: getattr(record, name) for name in AuditEntry.__struct_fields__})


def _record(entry: AuditEntry, seq: int, at: datetime, prev: str, digest: str) -> AuditRecord:
    return AuditRecord(
        **msgspec.structs.asdict(entry), seq=seq, recorded_at=at, prev_hash=prev, hash=digest
    )


def payload_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def records(log: AuditLog, query: AuditQuery | None = None) -> AsyncIterator[AuditRecord]:
    """Every record matching ``query`` (all of them by default), page by page."""
    query = query or AuditQuery()
    after = query.after_seq
    while True:
        page = await log.query(msgspec.structs.replace(query, after_seq=after, limit=PAGE))
        for record in page:
            yield record
        if len(page) < PAGE:
            return
        after = page[-1].seq


async def verify(log: AuditLog, store: EventStore, *, sample: int = 20) -> Verification:
    """Walk the chain from the first record to the head and compare the trail with the event
    store. The head is read first: records appended meanwhile lie beyond it and are left for
    the next verification."""
    breaks: list[ChainBreak] = []
    prev_seq, prev_hash = 0, GENESIS
    head_seq, head_hash = await log.head()
    async for record in records(log):
        if record.seq > head_seq:
            break
        if record.seq != prev_seq + 1:
            breaks.append(
                ChainBreak(record.seq, f"records {prev_seq + 1}..{record.seq - 1} are missing")
            )
        if record.prev_hash != prev_hash:
            breaks.append(ChainBreak(record.seq, "its link to the previous record is broken"))
        if link_hash(record.prev_hash, record.seq, entry_of(record), record.recorded_at) != (
            record.hash
        ):
            breaks.append(ChainBreak(record.seq, "its content does not match its hash"))
        prev_seq, prev_hash = record.seq, record.hash
    if (head_seq, head_hash) != (prev_seq, prev_hash):
        breaks.append(
            ChainBreak(
                prev_seq,
                f"the chain ends at record {prev_seq} but its head says {head_seq}: records "
                "were removed from the end (or added without the head)",
            )
        )
    coverage = await log.coverage(store, sample)
    return Verification(coverage=coverage, records=prev_seq, breaks=tuple(breaks))


def check_query(query: AuditQuery) -> None:
    if not 1 <= query.limit <= 10_000:
        raise InvalidRequestError(f"limit must be within 1..10000, got {query.limit}")
    if query.after_seq < 0:
        raise InvalidRequestError(f"after_seq must be >= 0, got {query.after_seq}")


def matches(record: AuditRecord, query: AuditQuery) -> bool:
    return (
        record.seq > query.after_seq
        and (query.correlation_id is None or record.correlation_id == query.correlation_id)
        and (query.aggregate_id is None or record.aggregate_id == query.aggregate_id)
        and (query.user is None or record.user == query.user)
        and (query.since is None or record.occurred_at >= query.since)
        and (query.until is None or record.occurred_at < query.until)
    )


# --- the embedded backend -----------------------------------------------------------------------


@dataclass
class MemoryAuditLog:
    """The trail in memory, for the embedded mode and unit tests."""

    _records: list[AuditRecord] = field(default_factory=list)
    _ids: set[UUID] = field(default_factory=set)
    _head: tuple[int, str] = (0, GENESIS)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def append(self, entries: Sequence[AuditEntry]) -> int:
        async with self._lock:
            fresh = unrecorded(entries, self._ids)
            linked = chain(fresh, self._head, utcnow())
            self._records += linked
            self._ids.update(entry.event_id for entry in fresh)
            if linked:
                self._head = (linked[-1].seq, linked[-1].hash)
            return len(linked)

    async def query(self, query: AuditQuery) -> list[AuditRecord]:
        check_query(query)
        found = []
        for record in self._records:
            if matches(record, query):
                found.append(record)
                if len(found) == query.limit:
                    break
        return found

    async def head(self) -> tuple[int, str]:
        return self._head

    async def coverage(self, store: EventStore, sample: int = 20) -> Coverage:
        stored = audited = 0
        missing: list[UUID] = []
        after = Checkpoint.START
        while True:
            page = await store.read_all(after, limit=PAGE)
            for event in page:
                stored += 1
                if event.event_id in self._ids:
                    audited += 1
                elif len(missing) < sample:
                    missing.append(event.event_id)
            if len(page) < PAGE:
                return Coverage(stored, audited, tuple(missing))
            after = page[-1].checkpoint

    async def close(self) -> None:
        return None

    def tamper(self, seq: int, **changes: object) -> None:
        """Test helper: edit a record in place, as an attacker with access would."""
        index = seq - 1
        self._records[index] = msgspec.structs.replace(self._records[index], **changes)


_embedded: dict[str, MemoryAuditLog] = {}


def audit_log_for(url: str) -> MemoryAuditLog:
    """The process-wide embedded trail of a ``memory://`` URL (the audit actor and the
    gateway of one process share it)."""
    if not is_memory_url(url):
        raise ConfigurationError("audit_log_for() only names embedded (memory://) trails")
    return _embedded.setdefault(url or "memory://", MemoryAuditLog())


@asynccontextmanager
async def open_audit_log(url: str, *, schema: str = "public") -> AsyncIterator[AuditLog]:
    """The trail ``url`` names for the life of the block."""
    if is_memory_url(url):
        yield audit_log_for(url)
        return
    from runtime.store.audit_postgres import PostgresAuditLog  # noqa: PLC0415

    log = await PostgresAuditLog.connect(url, schema=schema)
    try:
        yield log
    finally:
        await log.close()
