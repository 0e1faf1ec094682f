"""The event store: records, checkpoints and the one protocol both backends implement.

Vocabulary: a *stream* is the history of one aggregate (``aggregate_type`` + ``aggregate_id``),
its *version* counts its events from 1; the *position* is global and unique, and a
*checkpoint* ``(tx_id, position)`` is the order in which readers see events: transaction id
first, so a reader never skips an event whose transaction committed after a later one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import ClassVar, Protocol, runtime_checkable
from uuid import UUID, uuid4

import msgspec

from runtime.errors import (
    EventEncodeError,
    InvalidAppendError,
    InvalidRequestError,
    StreamIdTooLongError,
)

#: Column widths of the design document's table; both backends enforce them identically.
MAX_ID_LENGTH = 255


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time (the store's ``created_at`` is naive UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class StreamId(msgspec.Struct, frozen=True):
    """Identifies one aggregate's history. ``aggregate_id`` is unique across types."""

    aggregate_type: str
    aggregate_id: str

    def __str__(self) -> str:
        return f"{self.aggregate_type}-{self.aggregate_id}"


class Metadata(msgspec.Struct, frozen=True, omit_defaults=True):
    """What is known about why and by whom an event was written."""

    correlation_id: str | None = None
    causation_id: str | None = None
    command_id: UUID | None = None
    user: str | None = None
    occurred_at: datetime | None = None
    schema_version: int = 1
    extra: dict[str, str] = {}


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append. ``payload`` is a msgspec Struct of the aggregate's event union.

    The stored ``event_type`` is the payload's msgspec tag (or class name) and the
    stored schema version the payload class's ``schema_version`` class variable (default 1).
    """

    payload: msgspec.Struct
    event_id: UUID = msgspec.field(default_factory=uuid4)
    metadata: Metadata = Metadata()


def event_type_of(payload_type: type[msgspec.Struct]) -> str:
    tag = payload_type.__struct_config__.tag
    return tag if isinstance(tag, str) else payload_type.__name__


def schema_version_of(payload_type: type[msgspec.Struct]) -> int:
    version = getattr(payload_type, "schema_version", 1)
    return version if isinstance(version, int) else 1


class Checkpoint(msgspec.Struct, frozen=True, order=True):
    """A reader's place in the global order: everything at or before it has been seen."""

    tx_id: int = 0
    position: int = 0

    START: ClassVar[Checkpoint]


Checkpoint.START = Checkpoint(0, 0)


class RecordedEvent(msgspec.Struct, frozen=True):
    """A stored event as read back, payload still as JSON bytes (see ``EventCodec``)."""

    event_id: UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    version: int
    position: int
    tx_id: int
    data: bytes
    metadata: Metadata
    created_at: datetime

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.position)

    @property
    def stream(self) -> StreamId:
        return StreamId(self.aggregate_type, self.aggregate_id)


class AppendResult(msgspec.Struct, frozen=True):
    """Where an append landed. ``replayed`` is true when an earlier identical append
    (same command id or same event ids) was found and nothing new was written."""

    stream: StreamId
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    replayed: bool = False


class Snapshot(msgspec.Struct, frozen=True):
    """An aggregate state saved at ``version``; trusted only if ``state_schema`` matches."""

    stream: StreamId
    version: int
    state_schema: int
    state: bytes
    created_at: datetime = msgspec.field(default_factory=utcnow)


class StoreStatistics(msgspec.Struct, frozen=True):
    """Cheap figures for the ``event_store_*`` gauges."""

    event_count: int
    size_bytes: int
    head_position: int
    oldest_transaction_age_seconds: float = 0.0


class ParkedKey(msgspec.Struct, frozen=True):
    """An aggregate whose events an actor holds back behind one that failed (its
    ``blocker``): on the retry ladder (``dead`` false) or in the dead-letter queue."""

    actor: str
    key: str  # the ordering key: the aggregate id
    blocker: str  # the failed event's message id
    dead: bool
    reason: str
    since: datetime


class Lease(Protocol):
    async def check(self) -> None:
        """Raise ``LeaseLostError`` if the lease was lost (e.g. its connection died)."""
        ...


@runtime_checkable
class EventStore(Protocol):
    """The store's whole surface. Both backends pass ``tests/contracts/store.py``."""

    async def append(
        self, stream: StreamId, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        """Append ``events`` after ``expected_version`` (0 = the stream must be empty).

        All or nothing. Raises ``ConcurrencyError`` if the stream is elsewhere. Retrying with
        the same ``metadata.command_id`` or the same event ids returns the first result.
        """
        ...

    async def command_result(self, command_id: UUID) -> AppendResult | None:
        """The append a command id produced (flagged ``replayed``), or None if unknown:
        lets a retried command be answered before it is decided again."""
        ...

    async def read_stream(self, stream: StreamId, from_version: int = 1) -> list[RecordedEvent]:
        """The stream's events with ``version >= from_version``, in version order."""
        ...

    async def stream_version(self, stream: StreamId) -> int:
        """The stream's current version, 0 if it has no event."""
        ...

    async def read_all(
        self, after: Checkpoint = Checkpoint.START, limit: int = 500
    ) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after`` in checkpoint order.

        Never returns an event a concurrent, still-open transaction could precede: reading
        from the last returned checkpoint never skips nor repeats an event.
        """
        ...

    def subscribe(
        self, after: Checkpoint = Checkpoint.START, batch_size: int = 500
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        """Batches from ``after`` on, forever: woken by appends, polling as the fallback."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` unless a newer one for the stream is already stored."""
        ...

    async def load_checkpoint(self, name: str) -> Checkpoint:
        """Where reader ``name`` got to (``Checkpoint.START`` if it never saved one)."""
        ...

    async def save_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        """Record ``checkpoint`` for ``name``; a checkpoint never moves backwards."""
        ...

    def leader_lease(self, name: str) -> AbstractAsyncContextManager[Lease]:
        """Wait until this process holds the lease ``name`` (one holder across every
        process on the store), and hold it for the ``async with`` block."""
        ...

    async def park(self, parked: ParkedKey) -> None:
        """Record that ``parked.actor`` holds ``parked.key``'s events behind
        ``parked.blocker`` (replacing what it recorded for that key)."""
        ...

    async def unpark(self, actor: str, key: str, blocker: str | None = None) -> bool:
        """Lift the block on ``key`` (only if it is ``blocker``'s, when given); False if
        there was none."""
        ...

    async def parked_keys(self, actor: str | None = None) -> list[ParkedKey]:
        """The blocked aggregates of ``actor`` (of every actor if None), oldest first."""
        ...

    async def load_snapshot(self, stream: StreamId) -> Snapshot | None: ...

    async def statistics(self) -> StoreStatistics: ...

    async def close(self) -> None: ...


# --- validation shared by both backends, so they fail identically ---------------------------


class EncodedEvent(msgspec.Struct, frozen=True):
    """A ``NewEvent`` validated and turned into what a backend stores."""

    event_id: UUID
    event_type: str
    data: bytes
    metadata: Metadata
    metadata_json: bytes


_encoder = msgspec.json.Encoder()


def check_identifier(field: str, value: str) -> None:
    if not value:
        raise InvalidAppendError(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise StreamIdTooLongError(field, value, MAX_ID_LENGTH)


def prepare_append(
    stream: StreamId, events: Sequence[NewEvent], expected_version: int
) -> list[EncodedEvent]:
    """Validate an append request and encode its events; raises before anything is written."""
    check_identifier("aggregate_type", stream.aggregate_type)
    check_identifier("aggregate_id", stream.aggregate_id)
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise InvalidAppendError(f"expected_version must be an int, got {expected_version!r}")
    if expected_version < 0:
        raise InvalidAppendError(
            f"expected_version must be 0 (new stream) or the version last read, "
            f"got {expected_version}"
        )
    if not events:
        raise InvalidAppendError(f"append to {stream} needs at least one event, got none")
    command_ids = {e.metadata.command_id for e in events}
    if len(command_ids) > 1:
        raise InvalidAppendError(f"events of one append carry different command ids: {command_ids}")
    if len({e.event_id for e in events}) != len(events):
        raise InvalidAppendError(f"events of one append to {stream} share an event id")
    encoded = []
    now = utcnow()
    for event in events:
        if not isinstance(event.payload, msgspec.Struct):
            raise EventEncodeError(
                type(event.payload).__name__, TypeError("payload is not a msgspec Struct")
            )
        payload_type = type(event.payload)
        event_type = event_type_of(payload_type)
        check_identifier("event_type", event_type)
        metadata = msgspec.structs.replace(
            event.metadata,
            schema_version=schema_version_of(payload_type),
            occurred_at=event.metadata.occurred_at or now,
        )
        try:
            data = _encoder.encode(event.payload)
            metadata_json = _encoder.encode(metadata)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EventEncodeError(event_type, exc) from exc
        if _contains_nul(data) or _contains_nul(metadata_json):
            # PostgreSQL's jsonb cannot hold U+0000; refuse it the same way on every backend.
            raise EventEncodeError(event_type, ValueError("text contains a NUL (U+0000) character"))
        encoded.append(EncodedEvent(event.event_id, event_type, data, metadata, metadata_json))
    return encoded


def check_read_args(limit: int, from_version: int = 1) -> None:
    if limit < 1:
        raise InvalidRequestError(f"limit must be at least 1, got {limit}")
    if from_version < 1:
        raise InvalidRequestError(f"from_version counts from 1, got {from_version}")


_metadata = msgspec.json.Decoder(Metadata)


def decode_metadata(raw: bytes | str) -> Metadata:
    return _metadata.decode(raw)


def _contains_nul(encoded: bytes) -> bool:
    """True if the JSON holds U+0000 (a cheap byte scan first, a precise walk if it hits)."""
    if b"\\u0000" not in encoded:
        return False
    stack: list[object] = [msgspec.json.decode(encoded)]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
