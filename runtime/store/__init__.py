"""The event store: one protocol, a PostgreSQL and an in-memory implementation."""

from runtime.store.aggregate import AggregateRepository, Decider, Decision, Loaded
from runtime.store.codec import Envelope, EventCodec
from runtime.store.protocol import (
    MAX_ID_LENGTH,
    AppendResult,
    Checkpoint,
    EventStore,
    Metadata,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StoreStatistics,
    StreamId,
)

__all__ = [
    "MAX_ID_LENGTH",
    "AggregateRepository",
    "AppendResult",
    "Checkpoint",
    "Decider",
    "Decision",
    "Envelope",
    "EventCodec",
    "EventStore",
    "Loaded",
    "Metadata",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "StoreStatistics",
    "StreamId",
]
