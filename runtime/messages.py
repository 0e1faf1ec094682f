"""How a stored event travels on the bus: the envelope as JSON, the payload untouched.

The relay publishes ``WireEvent`` bytes built straight from a ``RecordedEvent`` (the payload
is never decoded on the way); a consumer turns them back into a ``RecordedEvent`` and, with
its ``EventCodec``, into a typed ``Envelope``. The body has exactly the shape of an encoded
``Envelope``, so ``msgspec.json.decode(body, type=Envelope[MyUnion])`` also works.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from runtime.bus.protocol import X_ORDERING_KEY, X_VERSION, HeaderValue, StreamWrite
from runtime.errors import MessageDecodeError
from runtime.store.protocol import Metadata, RecordedEvent

X_CORRELATION_ID = "x-correlation-id"
X_CAUSATION_ID = "x-causation-id"
X_AGGREGATE_ID = "x-aggregate-id"
X_AGGREGATE_TYPE = "x-aggregate-type"
X_EVENT_TYPE = "x-event-type"
X_SCHEMA_VERSION = "x-schema-version"
X_POSITION = "x-position"
#: Headers of the messages actors publish besides relayed events (the audit trail reads them).
X_USER = "x-user"
X_OCCURRED_AT = "x-occurred-at"


class WireEvent(msgspec.Struct, frozen=True):
    event_id: UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    version: int
    position: int
    tx_id: int
    payload: msgspec.Raw
    metadata: Metadata
    created_at: datetime


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WireEvent)


def routing_key(record: RecordedEvent) -> str:
    """``<aggregate_type>.<event_type>``, e.g. ``complaint.ComplaintCreated``."""
    return f"{record.aggregate_type}.{record.event_type}"


def encode_event(record: RecordedEvent) -> bytes:
    return _encoder.encode(
        WireEvent(
            event_id=record.event_id,
            event_type=record.event_type,
            aggregate_type=record.aggregate_type,
            aggregate_id=record.aggregate_id,
            version=record.version,
            position=record.position,
            tx_id=record.tx_id,
            payload=msgspec.Raw(record.data),
            metadata=record.metadata,
            created_at=record.created_at,
        )
    )


def event_headers(record: RecordedEvent) -> dict[str, HeaderValue]:
    meta = record.metadata
    return {
        X_CORRELATION_ID: meta.correlation_id,
        X_CAUSATION_ID: meta.causation_id,
        X_AGGREGATE_ID: record.aggregate_id,
        X_AGGREGATE_TYPE: record.aggregate_type,
        X_VERSION: record.version,
        X_EVENT_TYPE: record.event_type,
        X_SCHEMA_VERSION: meta.schema_version,
        X_POSITION: record.position,
        X_ORDERING_KEY: record.aggregate_id,
    }


def stream_entry(record: RecordedEvent, publishing_id: int) -> StreamWrite:
    """``record`` as the relay writes it to its domain's stream."""
    return StreamWrite(
        publishing_id,
        routing_key(record),
        str(record.event_id),
        encode_event(record),
        event_headers(record),
    )


def decode_event(message_id: str, body: bytes) -> RecordedEvent:
    """A relayed event back as a ``RecordedEvent``; ``MessageDecodeError`` (→ DLQ) if not."""
    try:
        wire = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise MessageDecodeError(message_id, body, exc) from exc
    return RecordedEvent(
        event_id=wire.event_id,
        event_type=wire.event_type,
        aggregate_type=wire.aggregate_type,
        aggregate_id=wire.aggregate_id,
        version=wire.version,
        position=wire.position,
        tx_id=wire.tx_id,
        data=bytes(wire.payload),
        metadata=wire.metadata,
        created_at=wire.created_at,
    )
