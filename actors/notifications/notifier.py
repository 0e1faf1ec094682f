"""The notification actor: business events in, one message per recipient and channel out.

It reacts to the complaint events that concern someone (opened → the store, assigned → the
assignee, escalated → the manager, resolved → the customer) and to the requests other actors
publish to ``notifications.events`` (``notification.requested``: the saga's acknowledgement to
the customer, a failed refund). Each is rendered from a template and sent through every
channel of the topology:

- ``log`` (the default): a log line, and a JSON line appended to ``path`` if set;
- ``webhook``: an HTTP POST of JSON to ``url`` with an ``Idempotency-Key`` header (stable for
  the event, channel and recipient), a ``timeout``, and ``retries`` with exponential
  ``backoff`` on network errors, 408, 429 and 5xx answers.

Exactly once: the ``notifications`` namespace records each (event id, channel, recipient)
with its delivery status; one already sent is skipped. A send that fails is recorded as
failed and raised, so the message takes the runtime's retry ladder and ends in the DLQ. A
crash between a send and its record sends it again with the same idempotency key, which the
receiver uses to drop the copy.

Options: ``channels`` (list of ``{type: log|webhook, name, url, timeout, retries, backoff,
path}``), ``templates`` (name → ``{subject, body}`` with ``{placeholders}``), ``manager``
(recipient of escalations without a named manager, default ``managers``), ``schema``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import httpx
import msgspec
from loguru import logger

from actors.complaints.domain import CODEC as COMPLAINT_CODEC
from actors.complaints.domain import (
    ComplaintAssigned,
    ComplaintCreated,
    ComplaintEscalated,
    ComplaintResolved,
)
from actors.complaints.projections import timestamp
from actors.notifications.messages import NOTIFICATION_REQUESTED, NotificationRequested
from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import Delivery
from runtime.errors import ActorError, ConfigurationError, Reject
from runtime.messages import decode_event
from runtime.projection import ReadModelOwner
from runtime.store.protocol import RecordedEvent
from runtime.store.readmodel import ReadModelTx
from runtime.topology import parse_duration

NAMESPACE: Final = "notifications"
SENT: Final = "sent"
NOTIFICATION_NAMESPACE = uuid.UUID("c5e1a7d2-3b4f-4e8a-9c6d-1f2e3a4b5c6d")

DEFAULT_TEMPLATES: Final[dict[str, dict[str, str]]] = {
    "complaint-received": {
        "subject": "We received your complaint",
        "body": "Hello {customer_name}, your complaint {complaint_id} to {store_id} is "
        "registered. We will come back to you shortly.",
    },
    "complaint-opened": {
        "subject": "New complaint in {store_id}",
        "body": "Complaint {complaint_id} ({category}, {priority} priority) was opened: "
        "{description}",
    },
    "complaint-assigned": {
        "subject": "Complaint {complaint_id} is yours",
        "body": "Complaint {complaint_id} was assigned to you. {note}",
    },
    "complaint-escalated": {
        "subject": "Complaint {complaint_id} escalated to {priority}",
        "body": "Complaint {complaint_id} was escalated: {reason}",
    },
    "complaint-resolved": {
        "subject": "Your complaint is resolved",
        "body": "Hello {customer_name}, complaint {complaint_id} was resolved ({resolution}). "
        "{note}",
    },
    "payment-failed": {
        "subject": "About your complaint {complaint_id}",
        "body": "Hello {customer_name}, we could not complete the payment for complaint "
        "{complaint_id} ({reason}). It is reopened and a manager will contact you.",
    },
}


class NotificationFailedError(ActorError):
    """A channel could not deliver a notification (after its own retries)."""

    def __init__(self, channel: str, recipient: str, reason: str) -> None:
        super().__init__(f"the {channel} channel could not notify {recipient}: {reason}")
        self.channel = channel
        self.recipient = recipient


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """A rendered message, as channels send it."""

    notification_id: str
    event_id: str
    event_type: str
    template: str
    recipient: str
    subject: str
    body: str
    complaint_id: str | None = None


class Channel(Protocol):
    name: str

    async def send(self, notification: Notification) -> None: ...


@dataclass
class LogChannel:
    name: str = "log"
    path: Path | None = None

    async def send(self, notification: Notification) -> None:
        logger.info(
            "notification to {recipient}: {subject}",
            recipient=notification.recipient,
            subject=notification.subject,
        )
        if self.path is not None:
            line = msgspec.json.encode(notification) + b"\n"
            async with await anyio.open_file(self.path, "ab") as sink:
                await sink.write(line)


RETRYABLE: Final = frozenset({408, 425, 429})


@dataclass
class WebhookChannel:
    name: str
    url: str
    timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.5
    #: All tries of one send together, kept below the actor's handler timeout (30 s by
    #: default), so that a slow receiver fails the message instead of crashing the actor.
    budget: float = 20.0

    async def send(self, notification: Notification) -> None:
        try:
            with anyio.fail_after(self.budget):
                await self._send(notification)
        except TimeoutError as exc:
            raise NotificationFailedError(
                self.name, notification.recipient, f"no success within {self.budget:g}s"
            ) from exc

    async def _send(self, notification: Notification) -> None:
        reason = ""
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for attempt in range(self.retries + 1):
                if attempt:
                    await anyio.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    response = await client.post(
                        self.url,
                        content=msgspec.json.encode(notification),
                        headers={
                            "Content-Type": "application/json",
                            "Idempotency-Key": notification.notification_id,
                        },
                    )
                except httpx.HTTPError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    continue
                if response.is_success:
                    return
                reason = f"HTTP {response.status_code} from {self.url}"
                if response.status_code < 500 and response.status_code not in RETRYABLE:
                    break  # the receiver refuses it: retrying now will not help
        raise NotificationFailedError(self.name, notification.recipient, reason)


def make_channels(specs: object, actor: str) -> list[Channel]:
    if specs is None:
        return [LogChannel()]
    if not isinstance(specs, list) or not specs:
        raise ConfigurationError(f"actor {actor!r}: options.channels must be a non-empty list")
    channels: list[Channel] = []
    for index, spec in enumerate(specs):
        where = f"actors.{actor}.options.channels[{index}]"
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{where}: expected a mapping with a type")
        kind = spec.get("type", "log")
        if kind == "log":
            path = spec.get("path")
            channels.append(
                LogChannel(name=str(spec.get("name", "log")), path=Path(path) if path else None)
            )
        elif kind == "webhook":
            if not spec.get("url"):
                raise ConfigurationError(f"{where}: a webhook channel needs a url")
            channels.append(
                WebhookChannel(
                    name=str(spec.get("name", "webhook")),
                    url=str(spec["url"]),
                    timeout=parse_duration(spec.get("timeout", 5)),
                    retries=int(spec.get("retries", 3)),
                    backoff=parse_duration(spec.get("backoff", 0.5)),
                    budget=parse_duration(spec.get("budget", 20)),
                )
            )
        else:
            raise ConfigurationError(f"{where}.type: {kind!r} is not a channel (log, webhook)")
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"actor {actor!r}: channel names repeat ({names}); name them")
    return channels


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


class Wanted(msgspec.Struct, frozen=True):
    """A notification to send: who, which template, with what."""

    recipient: str
    template: str
    data: dict[str, str]


def _flat(payload: object) -> dict[str, str]:
    data: dict[str, str] = {}
    for key, value in dict(msgspec.to_builtins(payload)).items():
        if isinstance(value, dict):
            data |= {f"{key}_{k}": str(v) for k, v in value.items() if v is not None}
        elif value is not None:
            data[key] = str(value)
    return data


class Notifier(ReadModelOwner):
    def __init__(self, context: ActorContext) -> None:
        self.context = context
        options = context.options
        self.channels = make_channels(options.get("channels"), context.name)
        self.templates = {**DEFAULT_TEMPLATES, **dict(options.get("templates") or {})}
        self.manager = str(options.get("manager", "managers"))
        self._domains = frozenset(context.topology.domains.values())

    async def handle(self, delivery: Delivery) -> None:
        if delivery.original_exchange in self._domains:
            record = decode_event(delivery.message_id, delivery.body)
            event_id, event_type = str(record.event_id), record.event_type
            wanted = await self._wanted(record)
        elif delivery.original_routing_key == NOTIFICATION_REQUESTED:
            request = decode_body(delivery, NotificationRequested)
            event_id, event_type = request.notification_id, "NotificationRequested"
            wanted = [Wanted(request.recipient, request.template, dict(request.data))]
        else:
            raise Reject(f"the notifier does not handle {delivery.original_routing_key!r} messages")
        for want in wanted:
            for channel in self.channels:
                await self._deliver(channel, event_id, event_type, want)

    async def _wanted(self, record: RecordedEvent) -> list[Wanted]:
        if record.aggregate_type != "complaint":
            return []
        event = COMPLAINT_CODEC.decode(record).payload
        data = {"complaint_id": record.aggregate_id, **_flat(event)}
        match event:
            case ComplaintCreated():
                wanted = Wanted(f"store:{event.store_id}", "complaint-opened", data)
            case ComplaintAssigned():
                wanted = Wanted(event.assignee, "complaint-assigned", data)
            case ComplaintEscalated():
                wanted = Wanted(event.manager or self.manager, "complaint-escalated", data)
            case ComplaintResolved():
                first = await self.context.store.read_stream(record.stream, 1)
                created = COMPLAINT_CODEC.decode(first[0]).payload if first else None
                if not isinstance(created, ComplaintCreated):
                    return []
                data |= {"customer_name": created.customer.name, "store_id": created.store_id}
                wanted = Wanted(created.customer.email, "complaint-resolved", data)
            case _:
                return []
        return [wanted]

    def render(self, want: Wanted, event_id: str, event_type: str, channel: str) -> Notification:
        template = self.templates.get(want.template)
        if template is None:
            raise Reject(f"no notification template {want.template!r} (options.templates)")
        values = _Blank(want.data)
        key = f"{event_id}:{channel}:{want.recipient}"
        return Notification(
            notification_id=str(uuid.uuid5(NOTIFICATION_NAMESPACE, key)),
            event_id=event_id,
            event_type=event_type,
            template=want.template,
            recipient=want.recipient,
            subject=str(template.get("subject", "")).format_map(values),
            body=str(template.get("body", "")).format_map(values).strip(),
            complaint_id=want.data.get("complaint_id"),
        )

    async def _deliver(
        self, channel: Channel, event_id: str, event_type: str, want: Wanted
    ) -> None:
        key = f"{event_id}:{channel.name}:{want.recipient}"
        counter = self.context.metrics.notifications_total
        labels = {"channel": channel.name}
        recorded = await self.read_models.get(NAMESPACE, SENT, key)
        if recorded is not None and recorded.get("status") == "sent":
            counter.inc({**labels, "outcome": "duplicate"})
            return
        attempts = int(recorded["attempts"]) + 1 if recorded else 1
        notification = self.render(want, event_id, event_type, channel.name)
        document: dict[str, Any] = {
            "notification_id": notification.notification_id,
            "event_id": event_id,
            "event_type": event_type,
            "channel": channel.name,
            "recipient": want.recipient,
            "template": want.template,
            "subject": notification.subject,
            "complaint_id": notification.complaint_id,
            "attempts": attempts,
            "at": timestamp(datetime.now(UTC)),
        }
        try:
            await channel.send(notification)
        except NotificationFailedError as exc:
            counter.inc({**labels, "outcome": "failed"})
            await self._record(key, {**document, "status": "failed", "error": str(exc)})
            raise
        counter.inc({**labels, "outcome": "sent"})
        await self._record(key, {**document, "status": "sent"})

    async def _record(self, key: str, document: dict[str, Any]) -> None:
        async def write(tx: ReadModelTx) -> None:
            await tx.put(SENT, key, document)

        await self.read_models.run(NAMESPACE, write)
