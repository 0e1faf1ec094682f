"""The audit actor: deliveries in, audit entries recorded once each."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from runtime.actor import ActorContext
from runtime.bus.protocol import Delivery, HeaderValue
from runtime.errors import ActorError
from runtime.messages import (
    X_AGGREGATE_ID,
    X_AGGREGATE_TYPE,
    X_CAUSATION_ID,
    X_CORRELATION_ID,
    X_EVENT_TYPE,
    X_OCCURRED_AT,
    X_USER,
    decode_event,
)
from runtime.store.audit import AuditEntry, AuditLog, Kind, open_audit_log, payload_digest
from runtime.store.protocol import as_utc

#: Command outcomes come from this exchange (published by the gateway).
COMMAND_OUTCOMES = "audit.events"
#: Ids derived from a message id that is not a UUID.
MESSAGE_ID_NAMESPACE = uuid.UUID("3d1c0f7e-5a8b-4a3c-9d2e-7f6b5c4a3e21")


def entry_of_delivery(delivery: Delivery, domains: frozenset[str]) -> AuditEntry:
    """What to record of ``delivery``: a relayed event (from a domain exchange) is read from
    its body, anything else from its headers. An undecodable event raises
    ``MessageDecodeError`` (the runtime dead-letters it)."""
    if delivery.original_exchange in domains:
        record = decode_event(delivery.message_id, delivery.body)
        meta = record.metadata
        return AuditEntry(
            event_id=record.event_id,
            kind="event",
            event_type=record.event_type,
            occurred_at=as_utc(meta.occurred_at or record.created_at),
            payload_digest=payload_digest(record.data),
            aggregate_type=record.aggregate_type,
            aggregate_id=record.aggregate_id,
            correlation_id=meta.correlation_id,
            causation_id=meta.causation_id,
            user=meta.user,
        )
    headers = delivery.headers
    kind: Kind = "command" if delivery.original_exchange == COMMAND_OUTCOMES else "message"
    return AuditEntry(
        event_id=_uuid(delivery.message_id),
        kind=kind,
        event_type=_text(headers.get(X_EVENT_TYPE)) or delivery.original_routing_key,
        occurred_at=_time(headers.get(X_OCCURRED_AT)),
        payload_digest=payload_digest(delivery.body),
        aggregate_type=_text(headers.get(X_AGGREGATE_TYPE)),
        aggregate_id=_text(headers.get(X_AGGREGATE_ID)),
        correlation_id=_text(headers.get(X_CORRELATION_ID)),
        causation_id=_text(headers.get(X_CAUSATION_ID)),
        user=_text(headers.get(X_USER)),
    )


class AuditTrail:
    """``kind: subscriber`` handler recording every delivery in the audit trail."""

    def __init__(self, context: ActorContext) -> None:
        self.context = context
        self._domains = frozenset(context.topology.domains.values())
        self._log: AuditLog | None = None

    async def __aenter__(self) -> Self:
        self._stack = AsyncExitStack()
        self._log = await self._stack.enter_async_context(
            open_audit_log(
                self.context.topology.database_url,
                schema=str(self.context.options.get("schema", "public")),
            )
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._log = None
        await self._stack.aclose()

    @property
    def log(self) -> AuditLog:
        if self._log is None:
            raise ActorError("the audit trail is not open: use `async with handler:`")
        return self._log

    async def handle(self, delivery: Delivery) -> None:
        await self.handle_batch([delivery])

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        entries = [entry_of_delivery(d, self._domains) for d in deliveries]
        recorded = await self.log.append(entries)
        counter = self.context.metrics.audit_entries_total
        if recorded:
            counter.add({"outcome": "recorded"}, recorded)
        if len(entries) > recorded:
            counter.add({"outcome": "duplicate"}, len(entries) - recorded)


def _text(value: HeaderValue | None) -> str | None:
    return None if value is None or value == "" else str(value)


def _uuid(message_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return uuid.uuid5(MESSAGE_ID_NAMESPACE, message_id)


def _time(value: HeaderValue | None) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC)
