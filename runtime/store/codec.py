"""Typed events: the registry of event types, upcasters, and the envelope.

The store keeps payloads as JSON bytes; an ``EventCodec`` turns a ``RecordedEvent`` into an
``Envelope`` whose payload is the aggregate's msgspec Struct. Events evolve by msgspec's
rules (a new field gets a default; a type never changes); anything else bumps the payload
class's ``schema_version`` and registers an upcaster ``(event type, from version) -> dict``
that rewrites the stored JSON one version up, possibly under a new type name.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

import msgspec

from runtime.errors import EventDecodeError, UnknownEventTypeError, UpcastError
from runtime.store.protocol import (
    Checkpoint,
    Metadata,
    RecordedEvent,
    event_type_of,
    schema_version_of,
)

P = TypeVar("P")
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Envelope(msgspec.Struct, Generic[P], frozen=True):
    """A stored event with its typed payload; also what travels on the bus."""

    event_id: UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    version: int
    position: int
    tx_id: int
    payload: P
    metadata: Metadata
    created_at: datetime

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.tx_id, self.position)


class EventCodec:
    """Knows every event type, its current schema version, and how to upcast old shapes."""

    def __init__(self) -> None:
        self._types: dict[str, type[msgspec.Struct]] = {}
        #: event type -> (its decoder, its current schema version)
        self._decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        self._upcasters: dict[tuple[str, int], tuple[Upcaster, str]] = {}

    def register(self, *event_types: Any) -> EventCodec:
        """Register Struct classes, or unions of them (an aggregate's tagged union)."""
        for item in event_types:
            members = typing.get_args(item) if _is_union(item) else (item,)
            for member in members:
                if not (isinstance(member, type) and issubclass(member, msgspec.Struct)):
                    raise TypeError(f"{member!r} is not a msgspec Struct class")
                name = event_type_of(member)
                known = self._types.get(name)
                if known is not None and known is not member:
                    raise ValueError(f"event type {name!r} is registered twice")
                self._types[name] = member
                self._decoders[name] = (msgspec.json.Decoder(member), schema_version_of(member))
        return self

    def upcaster(
        self, event_type: str, from_version: int, *, rename_to: str | None = None
    ) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn(data) -> data`` takes ``event_type`` from ``from_version`` to +1."""

        def register(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._upcasters:
                raise ValueError(f"an upcaster for {event_type} v{from_version} already exists")
            self._upcasters[key] = (fn, rename_to or event_type)
            return fn

        return register

    @property
    def event_types(self) -> list[str]:
        return sorted(self._types)

    def decode_payload(
        self, event_id: UUID | str, event_type: str, schema_version: int, data: bytes
    ) -> msgspec.Struct:
        current = self._decoders.get(event_type)
        if current is not None and schema_version == current[1]:
            try:
                result: msgspec.Struct = current[0].decode(data)
            except msgspec.DecodeError as exc:
                raise EventDecodeError(event_id, event_type, str(exc)) from exc
            return result
        return self._upcast(event_id, event_type, schema_version, data)

    def _upcast(
        self, event_id: UUID | str, event_type: str, version: int, data: bytes
    ) -> msgspec.Struct:
        try:
            doc = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise EventDecodeError(event_id, event_type, f"stored JSON is invalid: {exc}") from exc
        if not isinstance(doc, dict):
            raise EventDecodeError(event_id, event_type, "stored payload is not a JSON object")
        current_type = event_type
        while True:
            cls = self._types.get(current_type)
            if cls is not None and version == schema_version_of(cls):
                break
            if cls is not None and version > schema_version_of(cls):
                raise EventDecodeError(
                    event_id,
                    current_type,
                    f"stored schema version {version} is newer than this code's "
                    f"{schema_version_of(cls)}; upgrade magasin before reading it",
                )
            step = self._upcasters.get((current_type, version))
            if step is None:
                if cls is None and not any(t == current_type for t, _ in self._upcasters):
                    raise UnknownEventTypeError(event_id, current_type, self.event_types)
                raise UpcastError(
                    event_id,
                    current_type,
                    f"no upcaster from schema version {version}; register one with "
                    f"codec.upcaster({current_type!r}, {version})",
                )
            fn, next_type = step
            try:
                doc = fn(dict(doc))
            except Exception as exc:
                raise UpcastError(
                    event_id, current_type, f"upcaster v{version} raised {exc!r}"
                ) from exc
            if not isinstance(doc, dict):
                raise UpcastError(
                    event_id, current_type, f"upcaster v{version} did not return a dict"
                )
            current_type, version = next_type, version + 1
        config = cls.__struct_config__
        if isinstance(config.tag, str):
            doc[config.tag_field or "type"] = config.tag
        try:
            return msgspec.convert(doc, cls)
        except msgspec.ValidationError as exc:
            raise EventDecodeError(event_id, current_type, f"after upcasting: {exc}") from exc

    def decode(self, record: RecordedEvent) -> Envelope[Any]:
        """The record with its payload typed (and upcast) and its type name made current."""
        event_type, metadata = record.event_type, record.metadata
        current = self._decoders.get(event_type)
        if current is not None and metadata.schema_version == current[1]:
            # Stored in the current shape (the common case): nothing to rename or upcast.
            try:
                payload = current[0].decode(record.data)
            except msgspec.DecodeError as exc:
                raise EventDecodeError(record.event_id, event_type, str(exc)) from exc
        else:
            payload = self._upcast(
                record.event_id, event_type, metadata.schema_version, record.data
            )
            event_type = event_type_of(type(payload))
            metadata = msgspec.structs.replace(
                metadata, schema_version=schema_version_of(type(payload))
            )
        return Envelope(
            event_id=record.event_id,
            event_type=event_type,
            aggregate_type=record.aggregate_type,
            aggregate_id=record.aggregate_id,
            version=record.version,
            position=record.position,
            tx_id=record.tx_id,
            payload=payload,
            metadata=metadata,
            created_at=record.created_at,
        )


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is typing.Union or origin is types.UnionType
