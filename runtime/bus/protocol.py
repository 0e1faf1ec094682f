"""The bus protocol both buses implement (tests/contracts/bus.py is its definition).

Verbs: declare, publish, consume, ack, nack, retry, dead_letter; request and reply (RPC);
streams: write_stream, stream_tail, read_stream, consume_stream (tests/contracts/streams.py);
plus the dead-letter administration the CLI uses. Nothing above an adapter imports aio-pika.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

HeaderValue = str | int | float | bool | None
Headers = Mapping[str, HeaderValue]

# Headers the runtime writes when a message fails (PITFALLS: the broker's own x-death is
# only there for the TTL hop and the delivery-limit backstop).
X_ATTEMPTS = "x-attempts"  # how many times handling was attempted (1 after the first failure)
X_FIRST_FAILED_AT = "x-first-failed-at"  # ISO-8601 UTC of the first failure
X_ERROR = "x-error"  # the last error's message
X_ERROR_TYPE = "x-error-type"  # the last error's class name
X_ACTOR = "x-actor"  # the actor that failed it
X_ORIGINAL_EXCHANGE = "x-original-exchange"  # where the message was first published
X_ORIGINAL_ROUTING_KEY = "x-original-routing-key"
X_VERSION = "x-version"  # an event's version in its aggregate (orders dead-letter replays)
X_ORDERING_KEY = "x-ordering-key"  # mailbox routing (aggregate id); falls back to message id


class ExchangeSpec(msgspec.Struct, frozen=True):
    name: str
    type: Literal["topic", "direct", "fanout"] = "topic"


class Binding(msgspec.Struct, frozen=True):
    exchange: str
    routing_key: str


class QueueSpec(msgspec.Struct, frozen=True):
    """A work queue with its retry ladder (one TTL queue per delay) and its DLQ."""

    name: str
    bindings: tuple[Binding, ...] = ()
    retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0)  # seconds, one retry queue each
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = 20  # broker backstop for messages that kill the consumer


class StreamSpec(msgspec.Struct, frozen=True):
    """An append-only log (a RabbitMQ stream) and its retention: what is older than
    ``max_age`` seconds or beyond ``max_length_bytes`` goes, a segment at a time."""

    name: str
    max_age: float | None = 7 * 24 * 3600.0
    max_length_bytes: int | None = 20 * 1024**3
    max_segment_size_bytes: int = 100 * 1024**2


class BusPlan(msgspec.Struct, frozen=True):
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    streams: tuple[StreamSpec, ...] = ()


class Delivery(msgspec.Struct, frozen=True):
    """One message handed to a consumer; settle it exactly once via the bus."""

    queue: str
    message_id: str
    body: bytes
    headers: dict[str, HeaderValue]
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_tag: int  # opaque to the runtime; meaningful only to the bus that made it
    consumer: int = 0  # which consume() context the delivery belongs to (opaque)
    reply_to: str | None = None  # where the requester waits for the answer (None: not a request)
    correlation_id: str | None = None  # the request's AMQP correlation id (= its message_id)

    @property
    def attempts(self) -> int:
        """Failed attempts so far, from ``x-attempts`` (0 on a first delivery)."""
        value = self.headers.get(X_ATTEMPTS, 0)
        return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else 0

    @property
    def original_exchange(self) -> str:
        """The exchange the message was first published to (a retried copy arrives from the
        default exchange, with the original kept in ``x-original-exchange``)."""
        value = self.headers.get(X_ORIGINAL_EXCHANGE)
        return str(value) if value else self.exchange

    @property
    def original_routing_key(self) -> str:
        """The routing key the message was first published with (see ``original_exchange``)."""
        value = self.headers.get(X_ORIGINAL_ROUTING_KEY)
        return str(value) if value else self.routing_key

    @property
    def ordering_key(self) -> str:
        key = self.headers.get(X_ORDERING_KEY)
        return str(key) if key else self.message_id


class Reply(msgspec.Struct, frozen=True):
    """The answer to a request (``Bus.request``), as the responder sent it (``Bus.reply``)."""

    body: bytes
    headers: dict[str, HeaderValue]


class Outgoing(msgspec.Struct, frozen=True):
    """One message of a ``publish_many``: persistent, confirmed, like ``publish``."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: Headers = msgspec.field(default_factory=dict)
    mandatory: bool = True


class StreamWrite(msgspec.Struct, frozen=True):
    """One entry of a ``write_stream`` batch. ``publishing_id`` must grow strictly per
    producer: the stream drops an id at or below the last one it stored for that producer
    (deduplication), so a producer that writes the same entries again writes nothing."""

    publishing_id: int
    routing_key: str
    message_id: str
    body: bytes  # JSON: the entry is a JSON object that embeds it as is
    headers: Headers = msgspec.field(default_factory=dict)


class StreamEntry(msgspec.Struct, frozen=True):
    """One entry read back from a stream, at its ``offset`` (0 for the first ever written)."""

    offset: int
    publishing_id: int
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, HeaderValue]


class DeadLetter(msgspec.Struct, frozen=True):
    """A message parked in ``<queue>.dlq``, as the CLI lists it."""

    message_id: str
    headers: dict[str, HeaderValue]
    body: bytes
    error: str
    error_type: str
    attempts: int


class StreamDeliveries(Protocol):
    """What ``consume_stream`` yields: an iterator of deliveries and where to resume."""

    requested: int  # the offset asked for
    first_offset: int | None  # the first offset the stream gave (> requested: retention)

    @property
    def settled(self) -> int:
        """Every entry before this offset was settled (or not for this actor)."""
        ...

    def pin(self, tag: int) -> None:
        """A delivery with ``delivery_tag`` ``tag`` (negative) handed out from elsewhere
        before the stream's entries (a catch-up from the event store): ``settled`` stays at
        ``requested`` until it is settled."""
        ...

    def __aiter__(self) -> AsyncIterator[Delivery]: ...


@runtime_checkable
class Bus(Protocol):
    @property
    def connected(self) -> bool:
        """True while the bus has a live connection (readiness)."""
        ...

    async def declare(self, plan: BusPlan) -> None:
        """Idempotently declare exchanges, work/retry/dead-letter queues and bindings."""
        ...

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish persistently and return once the broker confirmed it. An unroutable
        ``mandatory`` message raises ``UnroutableError``."""
        ...

    async def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """Publish every message as ``publish`` would, pipelined (all in flight at once, sent
        in the order given; two calls running at once may interleave), and return once the
        broker confirmed them all. A failure raises as ``publish`` would; the other messages
        may or may not have been confirmed."""
        ...

    async def request(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        timeout: float,  # noqa: ASYNC109 - how long to wait for the answer, not a cancel scope
    ) -> Reply:
        """Publish ``body`` to ``queue`` (default exchange, routing key = queue, persistent,
        mandatory, publisher-confirmed) with a reply address, and wait up to ``timeout`` seconds
        for the answer. Raises UnroutableError/UnknownQueueError if no such queue,
        BusUnavailableError if the broker is down, RequestTimeoutError if nobody answered in time
        (a late answer is then dropped with a debug log)."""
        ...

    async def reply(
        self, delivery: Delivery, body: bytes, *, headers: Headers | None = None
    ) -> None:
        """Answer a request delivery (``delivery.reply_to``/``correlation_id``); does nothing
        (debug log) when the delivery is not a request. The requester may be gone: never raises
        for that (not mandatory)."""
        ...

    def consume(
        self, queue: str, prefetch: int
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Deliveries of ``queue``, at most ``prefetch`` unsettled at once. Leaving the
        context cancels the consumer; its unsettled deliveries go back to the queue."""
        ...

    async def ack(self, delivery: Delivery) -> None: ...

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """``ack`` each of ``deliveries`` (a handled batch): where they are all a queue
        consumer's oldest unsettled ones, with one multiple ack."""
        ...

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Give the delivery back (``requeue``) or drop it to the queue's dead-letter exchange."""
        ...

    async def retry(
        self, delivery: Delivery, *, rung: int, error: BaseException, actor: str
    ) -> None:
        """Park the message in retry queue ``rung`` (its TTL sends it back to the work
        queue), with ``x-attempts`` + 1 and the error headers; then ack the delivery."""
        ...

    async def dead_letter(self, delivery: Delivery, *, error: BaseException, actor: str) -> None:
        """Publish the message to ``<queue>.dlq`` with the error headers; then ack it."""
        ...

    async def write_stream(
        self, stream: str, producer: str, entries: Sequence[StreamWrite]
    ) -> None:
        """Append ``entries`` to ``stream`` in this order, as few chunks as the client can,
        and return once the broker confirmed them all (deduplicated by ``producer`` and
        publishing id). Raises ``UnknownQueueError`` if the stream is not declared,
        ``BusUnavailableError``/``PublishNotConfirmedError`` as ``publish`` does."""
        ...

    async def stream_tail(self, stream: str, producer: str) -> StreamEntry | None:
        """The last entry ``producer`` wrote to ``stream`` that the stream really holds
        (after a crash of the broker too), or None if it holds none of its entries."""
        ...

    def read_stream(
        self, stream: str, offset: int, *, credit: int = 8
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[StreamEntry]]]:
        """The entries of ``stream`` from ``offset`` on, a chunk at a time, in order, then
        waiting for new ones; ``credit`` chunks are read ahead at most. An ``offset`` that
        retention removed starts at the first entry the stream still holds (the caller can
        tell by the first offset it gets). A dropped connection is recovered within the
        iteration, from the entry after the last one handed out."""
        ...

    def consume_stream(
        self,
        stream: str,
        *,
        queue: str,
        offset: int,
        routing_keys: Sequence[str],
        prefetch: int,
    ) -> AbstractAsyncContextManager[StreamDeliveries]:
        """``stream`` from ``offset`` as deliveries for the actor whose work queue is
        ``queue`` (its retries and dead letters go there), only the entries whose routing
        key matches one of ``routing_keys`` (topic patterns). ``ack``, ``retry`` and
        ``dead_letter`` settle them; ``settled`` says where to resume."""
        ...

    async def list_dead_letters(self, queue: str, limit: int = 100) -> Sequence[DeadLetter]: ...

    async def replay_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        """Move one (by id) or all dead letters of ``queue`` back to it, each aggregate's
        events in version order; returns how many."""
        ...

    async def purge_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        """Delete the dead letters of ``queue`` (only those with ``message_id``, if given)
        for good; returns how many."""
        ...

    async def close(self) -> None: ...


def header_dict(headers: Mapping[str, Any] | None) -> dict[str, HeaderValue]:
    """Headers as plain JSON-able values (bytes decoded, nested tables stringified)."""
    result: dict[str, HeaderValue] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, bytes):
            result[key] = value.decode("utf-8", "replace")
        elif value is None or isinstance(value, str | int | float | bool):
            result[key] = value
        else:
            result[key] = str(value)
    return result
