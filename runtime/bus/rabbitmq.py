"""The RabbitMQ bus, on aio-pika's robust connection (RabbitMQ 3.10, see PITFALLS.md).

This is the only module that imports aio-pika: driver errors become ``runtime.errors``
here. Channels, by job:

- one long-lived *publisher* channel (robust, publisher confirms, ``on_return_raises``):
  publishes are pipelined, each awaiting its own confirm, never serialised by us;
- one plain *requests* channel (publisher confirms, ``on_return_raises``), opened on the
  first request: direct reply-to wants a request published on the channel that consumes
  ``amq.rabbitmq.reply-to`` (no-ack), so it does both, for every request in flight. It is
  not robust: when it dies with its connection, the requests waiting on it fail with
  ``BusUnavailableError`` (their answer can no longer arrive) and the next request opens a
  new one, waiting out the reconnection within its timeout. Answers go out on the
  publisher channel (a direct reply-to answer may be published on any channel);
- one robust channel per ``consume`` context, with its own prefetch, so leaving the
  context (closing the channel) makes the broker requeue exactly that context's unsettled
  deliveries, and aio-pika restores its consumer after a reconnection;
- a short-lived plain channel per administrative call (declare, passive checks, dead-letter
  listing/replay/purge): an error there closes only that channel.

Stale deliveries: a delivery remembers the channel it came on. Once that channel is gone
(context left, connection lost) the broker has requeued the message, so settling it is
logged and ignored: the actor survives and the message is delivered again. Acking on the
old channel object can never ack an unrelated message on the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import aiormq
import anyio
from aio_pika import Channel, DeliveryMode, Exchange, ExchangeType, Message, RobustConnection
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
)
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    AMQPChannelError,
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from pamqp.commands import Basic
from yarl import URL

from runtime.bus.headers import (
    PendingRequest,
    PendingRequests,
    RepublishingSettlement,
    dead_letter_record,
    replay_headers,
    replay_order,
)
from runtime.bus.protocol import (
    BusPlan,
    DeadLetter,
    Delivery,
    Headers,
    HeaderValue,
    Outgoing,
    QueueSpec,
    Reply,
    StreamEntry,
    StreamSpec,
    StreamWrite,
    header_dict,
)
from runtime.bus.rabbitmq_streams import RabbitStreams, stream_url_for
from runtime.bus.streams import StreamSettlement
from runtime.errors import (
    BusError,
    BusUnavailableError,
    PublishNotConfirmedError,
    UnknownExchangeError,
    UnknownQueueError,
    UnroutableError,
)
from runtime.naming import DEAD_LETTER_EXCHANGE, dead_letter_queue, retry_queue

# Errors of a broker round trip that did not complete (channel or connection gone).
_LINK_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)
_REQUEUE_WAIT = 2.0  # seconds a dead-letter listing waits for its requeues to land
REPLY_TO = "amq.rabbitmq.reply-to"  # direct reply-to: answers come straight to our consumer
# Opening a channel while the robust connection notices it is gone can also raise
# RuntimeError ("connection closed"): the requests channel is then opened again.
_REOPEN_ERRORS = (*_LINK_ERRORS, RuntimeError)
_REOPEN_INTERVAL = 0.1  # seconds between attempts to open the requests channel


def describe_url(url: str) -> str:
    """``host:port/vhost`` for messages, never the password."""
    parsed = URL(url)
    return f"{parsed.host or 'localhost'}:{parsed.port or 5672}{parsed.path or '/'}"


def _redact(text: str, url: str) -> str:
    password = URL(url).password
    return text.replace(password, "******") if password else text


def work_queue_arguments(spec: QueueSpec) -> dict[str, Any]:
    """A work queue dead-letters into the DLX, routed to its DLQ. A quorum queue also gets
    the delivery-limit backstop (3.10 has no default) and at-least-once dead-lettering
    (which needs ``reject-publish`` overflow); classic queues support neither."""
    arguments: dict[str, Any] = {
        "x-queue-type": spec.queue_type,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": dead_letter_queue(spec.name),
    }
    if spec.queue_type == "quorum":
        arguments["x-delivery-limit"] = spec.delivery_limit
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def stream_arguments(spec: StreamSpec) -> dict[str, Any]:
    """A stream is a queue of type ``stream``; its retention goes a segment at a time."""
    arguments: dict[str, Any] = {
        "x-queue-type": "stream",
        "x-stream-max-segment-size-bytes": spec.max_segment_size_bytes,
    }
    if spec.max_age is not None:
        arguments["x-max-age"] = f"{max(1, round(spec.max_age))}s"
    if spec.max_length_bytes is not None:
        arguments["x-max-length-bytes"] = spec.max_length_bytes
    return arguments


def retry_queue_arguments(spec: QueueSpec, delay: float) -> dict[str, Any]:
    """One classic queue per delay (per-message TTL only expires at the head): on expiry
    the broker dead-letters the message through the default exchange to the work queue.

    Classic, not quorum: a quorum queue is a Raft group, and one per rung tripled the
    broker's groups; on a 2-core broker that made vhost and queue operations stall. The
    price: the TTL hop is at-most-once, so a message expiring while its quorum work queue
    has no leader (the seconds after a broker restart) can be dropped.
    """
    return {
        "x-queue-type": "classic",
        "x-message-ttl": max(1, round(delay * 1000)),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": spec.name,
    }


def _broker_reason(headers: dict[str, Any] | None) -> str:
    """The reason of the latest broker dead-lettering (``x-death`` lists the newest first)."""
    deaths = (headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return "unknown"


@dataclass(eq=False)
class _ConsumeContext:
    id: int
    queue: str
    messages: MemoryObjectSendStream[AbstractIncomingMessage]  # closed by bus.close()
    unsettled: dict[int, AbstractIncomingMessage] = field(default_factory=dict)


class _Deliveries:
    """What ``consume`` yields: the context's messages as ``Delivery`` structs."""

    def __init__(
        self,
        bus: RabbitMQBus,
        context: _ConsumeContext,
        messages: MemoryObjectReceiveStream[AbstractIncomingMessage],
    ) -> None:
        self._bus = bus
        self._context = context
        self._messages = messages

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            try:
                message = await self._messages.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            if _channel_gone(message):
                continue  # arrived before a reconnection: the broker has requeued it
            return self._bus._delivery(self._context, message)


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:
        return True


class RabbitMQBus(StreamSettlement, RepublishingSettlement):
    """A ``Bus`` on RabbitMQ. Create with :meth:`connect`; close when done. Streams go
    through the stream protocol (``runtime/bus/rabbitmq_streams.py``)."""

    def __init__(
        self,
        connection: RobustConnection,
        publisher: AbstractRobustChannel,
        *,
        where: str,
        publish_timeout: float,
        streams: RabbitStreams | None = None,
    ) -> None:
        # None only for buses built by hand in tests, which then have no streams.
        self._streams = streams or RabbitStreams.unavailable()
        self._connection = connection
        self._publisher = publisher
        self._where = where
        self._publish_timeout = publish_timeout
        self._exchanges: dict[str, AbstractExchange] = {"": publisher.default_exchange}
        self._contexts: dict[int, _ConsumeContext] = {}
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)  # our delivery tags: unique across channels
        self._requests = PendingRequests()
        self._requester: AbstractChannel | None = None  # opened by the first request
        self._requester_lock = anyio.Lock()
        self._answerer: AbstractChannel | None = None  # answers: no confirms, opened lazily
        self._answerer_lock = anyio.Lock()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str = "magasin",
        connect_timeout: float = 10.0,
        reconnect_interval: float = 2.0,
        publish_timeout: float = 30.0,
        stream_url: str | None = None,
    ) -> RabbitMQBus:
        """Connect to ``url`` (``amqp://user:password@host:port/vhost``); ``name`` is the
        connection name the management UI and ``rabbitmqctl list_connections`` show.
        ``stream_url``: the stream protocol's address (default: ``stream_url_for(url)``)."""
        where = describe_url(url)
        connection = RobustConnection(
            URL(url),
            client_properties={"connection_name": name},
            reconnect_interval=reconnect_interval,
        )
        try:
            with anyio.fail_after(connect_timeout):
                await connection.connect(timeout=connect_timeout)
                publisher = connection.channel(publisher_confirms=True, on_return_raises=True)
                await publisher.initialize()
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            await connection.close()
            cause = _redact(str(exc) or type(exc).__name__, url)
            raise BusUnavailableError(where, cause) from None
        try:
            streams = await RabbitStreams.connect(
                stream_url or stream_url_for(url),
                name=name,
                connect_timeout=connect_timeout,
                confirm_timeout=publish_timeout,
            )
        except BaseException:
            await connection.close()
            raise
        logger.info("message bus connected to {where} as {name}", where=where, name=name)
        return cls(
            connection, publisher, where=where, publish_timeout=publish_timeout, streams=streams
        )

    @property
    def connected(self) -> bool:
        """False once closed and while the robust connection is reconnecting."""
        connection = self._connection
        return not self._closed and not connection.is_closed and connection.connected.is_set()

    async def close(self) -> None:
        """Close the connection; open consume contexts stop iterating, waiting requests fail
        with ``BusUnavailableError``."""
        self._closed = True
        for context in self._contexts.values():
            context.messages.close()
        self._requests.fail(
            lambda pending: BusUnavailableError(
                self._where,
                f"the bus was closed before request {pending.message_id} to {pending.queue!r} "
                "was answered",
            )
        )
        await self._streams.close()
        await self._connection.close()

    # --- topology ----------------------------------------------------------------------

    async def declare(self, plan: BusPlan) -> None:
        async with self._channel() as channel:
            await self._declare_exchange(channel, DEAD_LETTER_EXCHANGE, ExchangeType.DIRECT)
            for exchange in plan.exchanges:
                await self._declare_exchange(channel, exchange.name, ExchangeType(exchange.type))
            for spec in plan.queues:
                await self._declare_queues(channel, spec)
            for stream in plan.streams:
                await _declare_queue(channel, stream.name, stream_arguments(stream))

    # --- streams -------------------------------------------------------------------------

    async def write_stream(
        self, stream: str, producer: str, entries: Sequence[StreamWrite]
    ) -> None:
        await self._streams.write(stream, producer, entries)

    async def stream_tail(self, stream: str, producer: str) -> StreamEntry | None:
        return await self._streams.tail(stream, producer)

    def read_stream(
        self, stream: str, offset: int, *, credit: int = 8
    ) -> AbstractAsyncContextManager[AsyncIterator[Sequence[StreamEntry]]]:
        if offset < 0:
            raise ValueError(f"a stream offset is at least 0, got {offset}")
        return self._streams.read(stream, offset, credit)

    async def _declare_exchange(
        self, channel: AbstractChannel, name: str, kind: ExchangeType
    ) -> None:
        try:
            await channel.declare_exchange(name, kind, durable=True)
        except ChannelPreconditionFailed as exc:
            raise BusError(
                f"exchange {name!r} already exists with other settings ({exc}); delete it or "
                "give the new one another name"
            ) from exc
        self._exchanges.setdefault(name, self._publisher_exchange(name))

    async def _declare_queues(self, channel: AbstractChannel, spec: QueueSpec) -> None:
        dlq = dead_letter_queue(spec.name)
        work = await _declare_queue(channel, spec.name, work_queue_arguments(spec))
        for rung, delay in enumerate(spec.retry_delays, start=1):
            await _declare_queue(
                channel, retry_queue(spec.name, rung), retry_queue_arguments(spec, delay)
            )
        dead = await _declare_queue(channel, dlq, {"x-queue-type": spec.queue_type})
        await dead.bind(DEAD_LETTER_EXCHANGE, dlq)
        for binding in spec.bindings:
            try:
                await work.bind(binding.exchange, binding.routing_key)
            except ChannelNotFoundEntity:
                raise UnknownExchangeError(binding.exchange) from None

    # --- publishing ----------------------------------------------------------------------

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
        """Publish on the shared confirming channel. A publish that loses its connection
        before the confirm raises ``PublishNotConfirmedError``: it may or may not have
        arrived, so the caller retries and consumers deduplicate by message id."""
        await self.publish_many(
            [Outgoing(exchange, routing_key, body, message_id, headers or {}, mandatory)]
        )

    async def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """All in flight at once on the shared confirming channel, each awaiting its own
        confirm (the relay's batches: one task per message, no lock, no drain wait)."""
        await self._publish_all(
            [
                _Publish(
                    m.exchange,
                    m.routing_key,
                    m.body,
                    _properties(m.message_id, m.headers),
                    m.mandatory,
                )
                for m in messages
            ]
        )

    async def _publish_copy(
        self, delivery: Delivery, queue: str, headers: dict[str, HeaderValue]
    ) -> None:
        properties = _properties(
            delivery.message_id,
            headers,
            reply_to=delivery.reply_to,  # a retried request is still answered
            correlation_id=delivery.correlation_id,
        )
        await self._publish_all([_Publish("", queue, delivery.body, properties, True)])

    async def _publish_all(self, items: Sequence[_Publish]) -> None:
        """Publish ``items`` straight on aiormq's channel (aio-pika's ``Message`` and
        ``Exchange.publish`` cost twice as much CPU per message, measured) and wait for
        every confirm. The first failure found (in order) is raised; the others are
        abandoned. A publish aiormq ends as cancelled (it rejects pending confirms with
        ``CancelledError`` when it drops a connection) was not confirmed either."""
        self._check_open()
        if not items:
            return
        for name in {item.exchange for item in items}:
            await self._exchange(name)
        tasks: list[asyncio.Future[Any]] = []
        abandoned: set[asyncio.Future[Any]] = set()
        try:
            with anyio.fail_after(self._publish_timeout):
                await self._publisher.ready()  # waits out a reconnection
                # aiormq's own channel: its ``basic_publish`` takes ``wait``.
                channel = cast(aiormq.Channel, await self._publisher.get_underlay_channel())
                for item in items:
                    task: asyncio.Future[Any] = asyncio.ensure_future(
                        channel.basic_publish(
                            item.body,
                            exchange=item.exchange,
                            routing_key=item.routing_key,
                            properties=item.properties,
                            mandatory=item.mandatory,
                            wait=False,  # the confirm is what we wait for
                        )
                    )
                    task.add_done_callback(_discard_outcome)  # failures are read below
                    tasks.append(task)
                try:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                finally:
                    for unsettled in tasks:
                        if not unsettled.done():
                            unsettled.cancel()
                            abandoned.add(unsettled)
        except TimeoutError:
            pending = [i for i, t in zip(items, tasks, strict=False) if not t.done()]
            unconfirmed = pending[0] if pending else items[0]
            raise PublishNotConfirmedError(
                f"{unconfirmed.describe()} was not confirmed within {self._publish_timeout}s "
                f"by {self._where}; publish it again"
            ) from None
        except _LINK_ERRORS as exc:
            raise self._not_confirmed(items[0], exc) from exc
        self._raise_first_failure(items, tasks, abandoned)

    def _raise_first_failure(
        self,
        items: Sequence[_Publish],
        tasks: Sequence[asyncio.Future[Any]],
        abandoned: set[asyncio.Future[Any]],
    ) -> None:
        for item, task in zip(items, tasks, strict=True):
            if task in abandoned:
                continue
            if task.cancelled():
                raise self._not_confirmed(item, asyncio.CancelledError())
            error = task.exception()
            if error is None:
                continue
            if isinstance(error, PublishError):
                raise UnroutableError(item.exchange, item.routing_key) from None
            # A nack (DeliveryError), a lost link, or the bare Exception aiormq rejects
            # pending confirms with when the channel closes: none of them is a confirm.
            raise self._not_confirmed(item, error) from error

    def _not_confirmed(self, item: _Publish, exc: BaseException) -> PublishNotConfirmedError:
        if isinstance(exc, DeliveryError):
            return PublishNotConfirmedError(
                f"the broker refused {item.describe()} ({exc}); publish it again"
            )
        return PublishNotConfirmedError(
            f"the connection to {self._where} was lost before {item.describe()} was "
            f"confirmed ({type(exc).__name__}: {exc}); publish it again"
        )

    async def _exchange(self, name: str) -> AbstractExchange:
        """The publisher's handle on exchange ``name``, checked once on a throw-away
        channel: publishing to a missing exchange would close the shared publisher channel
        and fail every publish in flight on it."""
        exchange = self._exchanges.get(name)
        if exchange is None:
            async with self._channel() as channel:
                try:
                    await channel.declare_exchange(name, passive=True)
                except ChannelNotFoundEntity:
                    raise UnknownExchangeError(name) from None
            exchange = self._exchanges.setdefault(name, self._publisher_exchange(name))
        return exchange

    def _publisher_exchange(self, name: str) -> AbstractExchange:
        # Only a handle naming the exchange: publishing needs no declaration.
        return Exchange(self._publisher, name, passive=True)

    # --- requests ------------------------------------------------------------------------

    async def request(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        timeout: float,  # noqa: ASYNC109 - how long to wait for the answer, not a cancel scope
    ) -> Reply:
        """Publish on the requests channel and wait there for the answer. ``timeout`` bounds
        it all: waiting out a reconnection (``BusUnavailableError``), the confirm and the
        answer (``RequestTimeoutError``: the request may have been handled)."""
        self._check_open()
        deadline = anyio.current_time() + timeout
        what = f"request {message_id} within its {timeout:g}s timeout"
        channel = await self._requests_channel(deadline, what)
        properties = _properties(
            message_id, headers or {}, reply_to=REPLY_TO, correlation_id=message_id
        )
        with self._requests.waiting(queue, message_id, route=channel) as pending:
            with anyio.CancelScope(deadline=deadline):
                try:
                    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
                    await raw.basic_publish(
                        body,
                        routing_key=queue,
                        properties=properties,
                        mandatory=True,
                        wait=False,  # the confirm is what we wait for
                    )
                except PublishError:
                    raise UnroutableError("", queue) from None
                except DeliveryError as exc:
                    raise PublishNotConfirmedError(
                        f"the broker refused request {message_id} to {queue!r} ({exc}); send "
                        "it again"
                    ) from exc
                except _LINK_ERRORS as exc:
                    raise BusUnavailableError(
                        self._where,
                        f"the connection was lost before request {message_id} to {queue!r} was "
                        f"confirmed ({type(exc).__name__}); it may have arrived: send it again "
                        "with the same id",
                    ) from exc
                await pending.answered.wait()
            return pending.result(timeout)

    async def reply(
        self, delivery: Delivery, body: bytes, *, headers: Headers | None = None
    ) -> None:
        """Answer on a channel of its own without publisher confirms (a direct reply-to
        answer may use any channel). Not mandatory, not persistent, not confirmed: if the
        requester is gone, the broker drops it; if the answer is lost, the requester's
        timeout asks its client to retry with the same id. On the confirming publisher
        channel an answer would wait for the confirms of every persistent publish before
        it (the relay's), some milliseconds per command."""
        if not delivery.reply_to:
            logger.debug(
                "message {id} of {queue} is not a request: there is nobody to answer",
                id=delivery.message_id,
                queue=delivery.queue,
            )
            return
        self._check_open()
        # Transient: no delivery mode, as aio-pika's ``Message`` would send it.
        properties = Basic.Properties(
            headers=dict(headers or {}), correlation_id=delivery.correlation_id
        )
        try:
            with anyio.fail_after(self._publish_timeout):
                channel = await self._answers_channel()
                raw = cast(aiormq.Channel, await channel.get_underlay_channel())
                await raw.basic_publish(body, routing_key=delivery.reply_to, properties=properties)
        except (*_LINK_ERRORS, TimeoutError) as exc:
            raise PublishNotConfirmedError(
                f"the answer to request {delivery.message_id} could not be sent to "
                f"{self._where} ({type(exc).__name__}); handle the request again"
            ) from exc

    async def _answers_channel(self) -> AbstractChannel:
        async with self._answerer_lock:
            channel = self._answerer
            if channel is None or channel.is_closed:
                await self._connection.ready()  # waits out a reconnection
                channel = self._connection.channel(publisher_confirms=False)
                await channel.initialize()
                self._answerer = channel
            return channel

    async def _requests_channel(self, deadline: float, what: str) -> AbstractChannel:
        """The requests channel, opened again if it died with its connection: waits out a
        reconnection until ``deadline``, then raises ``BusUnavailableError``."""
        failure = "the connection is not back"
        with anyio.CancelScope(deadline=deadline):
            async with self._requester_lock:
                while True:
                    self._check_open()
                    channel = self._requester
                    if channel is not None and not channel.is_closed:
                        return channel
                    try:
                        self._requester = await self._open_requests_channel()
                    except _REOPEN_ERRORS as exc:  # the connection went away (again) meanwhile
                        failure = f"{type(exc).__name__}: {exc}"
                        await anyio.sleep(_REOPEN_INTERVAL)
        raise BusUnavailableError(self._where, f"no connection to send {what} ({failure})")

    async def _open_requests_channel(self) -> AbstractChannel:
        channel = Channel(self._connection, publisher_confirms=True, on_return_raises=True)
        opened = False
        try:
            await self._connection.ready()  # waits out a reconnection
            await channel.initialize()
            channel.close_callbacks.add(self._on_requests_channel_closed)
            replies = await channel.declare_queue(REPLY_TO, passive=True)
            await replies.consume(self._on_answer, no_ack=True)
            opened = True
        finally:
            if not opened and channel.is_initialized and not channel.is_closed:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(5),
                    contextlib.suppress(*CONNECTION_EXCEPTIONS),
                ):
                    await channel.close()
        logger.debug("requests channel open on {where}", where=self._where)
        return channel

    async def _on_answer(self, message: AbstractIncomingMessage) -> None:
        self._requests.answer(
            message.correlation_id, Reply(message.body, header_dict(message.headers))
        )

    def _on_requests_channel_closed(
        self, channel: AbstractChannel | None, exc: BaseException | None
    ) -> None:
        """The answers to the requests sent on ``channel`` can no longer arrive."""
        if channel is None:
            return
        cause = f"{type(exc).__name__}: {exc}" if exc else "channel closed"

        def lost(pending: PendingRequest) -> BusError:
            return BusUnavailableError(
                self._where,
                f"the requests channel was lost ({cause}) before request {pending.message_id} "
                f"to {pending.queue!r} was answered; it may have been handled: send it again "
                "with the same id",
            )

        self._requests.fail(lost, route=channel)

    # --- consuming -----------------------------------------------------------------------

    @asynccontextmanager
    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[AsyncIterator[Delivery]]:
        self._check_open()
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        async with self._channel() as probe:
            await self._passive_queue(probe, queue)
        send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](math.inf)
        context = _ConsumeContext(next(self._ids), queue, send)
        channel = self._connection.channel(publisher_confirms=False)
        amqp_queue: AbstractQueue | None = None
        consumer_tag: str | None = None
        with send, receive:
            try:
                await channel.initialize()
                await channel.set_qos(prefetch_count=prefetch)
                amqp_queue = await channel.declare_queue(queue, passive=True)
                consumer_tag = await amqp_queue.consume(_forward(send), no_ack=False)
                self._contexts[context.id] = context
                yield _Deliveries(self, context, receive)
            finally:
                self._contexts.pop(context.id, None)
                # Closing the channel is what requeues the unsettled deliveries; do it even
                # when cancelled, but never hang on a broker that is gone.
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await _close_consumer(channel, amqp_queue, consumer_tag)

    def _delivery(self, context: _ConsumeContext, message: AbstractIncomingMessage) -> Delivery:
        tag = next(self._tags)
        context.unsettled[tag] = message
        return Delivery(
            queue=context.queue,
            message_id=message.message_id or "",
            body=message.body,
            headers=header_dict(message.headers),
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            redelivered=bool(message.redelivered),
            delivery_tag=tag,
            consumer=context.id,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
        )

    # --- settling ------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> AbstractIncomingMessage | None:
        context = self._contexts.get(delivery.consumer)
        message = context.unsettled.pop(delivery.delivery_tag, None) if context else None
        if message is None:
            _log_stale(delivery, "its consume context is closed or it was already settled")
        return message

    async def ack(self, delivery: Delivery) -> None:
        if self.settle_stream(delivery):
            return
        message = self._take(delivery)
        if message is not None:
            try:
                await message.ack()
            except _LINK_ERRORS as exc:
                _log_stale(delivery, f"its channel is gone ({type(exc).__name__})")

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """One ``multiple`` ack per consumer when the batch holds all of that consumer's
        unsettled deliveries up to its last one on the channel (a batch of one worker in
        delivery order); one ack each otherwise (workers interleave, a reconnection)."""
        by_consumer: dict[int, list[AbstractIncomingMessage]] = {}
        for delivery in deliveries:
            if self.settle_stream(delivery):
                continue
            message = self._take(delivery)
            if message is not None:
                by_consumer.setdefault(delivery.consumer, []).append(message)
        for consumer, messages in by_consumer.items():
            context = self._contexts.get(consumer)
            last = max(messages, key=lambda m: m.delivery_tag or 0)
            channel = last.channel
            contiguous = (
                len(messages) > 1
                and context is not None
                and all(m.channel is channel for m in messages)
                and not any(
                    u.channel is channel and (u.delivery_tag or 0) < (last.delivery_tag or 0)
                    for u in context.unsettled.values()
                )
            )
            try:
                if contiguous:
                    await last.ack(multiple=True)
                else:
                    for message in messages:
                        await message.ack()
            except _LINK_ERRORS as exc:
                logger.warning(
                    "cannot settle {count} message(s) of consumer {consumer}: its channel is "
                    "gone ({error}); unless they were settled before, the broker delivers "
                    "them again",
                    count=len(messages),
                    consumer=consumer,
                    error=type(exc).__name__,
                )

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        if delivery.consumer < 0:
            return  # a stream has no requeue: left unsettled, it is read again on restart
        message = self._take(delivery)
        if message is not None:
            try:
                await message.nack(requeue=requeue)
            except _LINK_ERRORS as exc:
                _log_stale(delivery, f"its channel is gone ({type(exc).__name__})")

    # --- dead-letter administration --------------------------------------------------------

    async def list_dead_letters(self, queue: str, limit: int = 100) -> Sequence[DeadLetter]:
        """Read without removing: get each message unacknowledged, then requeue them all.
        The broker requeues them near the head, so the DLQ's order may change, and a quorum
        DLQ counts the redelivery (it has no delivery limit, so nothing is dropped)."""
        name = dead_letter_queue(queue)
        async with self._channel() as channel:
            dlq = await self._passive_queue(channel, name)
            ready = dlq.declaration_result.message_count or 0
            messages: list[AbstractIncomingMessage] = []
            try:
                while len(messages) < limit:
                    message = await dlq.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    messages.append(message)
            finally:
                await _requeue(messages)
            await _wait_until_ready(channel, name, ready)
        return [
            dead_letter_record(
                m.message_id or "", header_dict(m.headers), m.body, _broker_reason(m.headers)
            )
            for m in messages
        ]

    async def replay_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        """Move dead letters back to ``queue`` (all, or those with ``message_id``), each
        aggregate's events in version order (``replay_order``): each is acknowledged in the
        DLQ only after its copy in the work queue is confirmed."""
        name = dead_letter_queue(queue)
        async with self._channel(confirms=True) as channel:
            dlq = await self._passive_queue(channel, name)
            await self._passive_queue(channel, queue)
            present = dlq.declaration_result.message_count or 0  # bound: new arrivals wait
            chosen, skipped = await _get_dead_letters(dlq, present, message_id)
            moved = 0
            try:
                chosen.sort(key=lambda m: replay_order(header_dict(m.headers)))
                for message in chosen:
                    await _publish_replay(channel, queue, message)
                    await message.ack()
                    moved += 1
            finally:
                await _requeue(skipped + chosen[moved:])
            await _wait_until_ready(channel, name, present - moved)
        return moved

    async def purge_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        """Delete every dead letter of ``queue``, or those with ``message_id``."""
        async with self._channel() as channel:
            dlq = await self._passive_queue(channel, dead_letter_queue(queue))
            if message_id is None:
                result = await dlq.purge()
                return int(result.message_count or 0)
            present = dlq.declaration_result.message_count or 0
            chosen, skipped = await _get_dead_letters(dlq, present, message_id)
            dropped = 0
            try:
                for message in chosen:
                    await message.ack()
                    dropped += 1
            finally:
                await _requeue(skipped + chosen[dropped:])
            await _wait_until_ready(channel, dead_letter_queue(queue), present - dropped)
        return dropped

    # --- helpers -----------------------------------------------------------------------

    @asynccontextmanager
    async def _channel(self, *, confirms: bool = False) -> AsyncIterator[AbstractChannel]:
        """A plain (not robust) channel for one administrative call: a broker error closes
        it, and nothing tries to restore it."""
        self._check_open()
        channel = Channel(self._connection, publisher_confirms=confirms, on_return_raises=confirms)
        try:
            await self._connection.ready()
            await channel.initialize()
        except _LINK_ERRORS as exc:
            raise BusUnavailableError(self._where, type(exc).__name__) from exc
        try:
            yield channel
        except AMQPChannelError as exc:  # refusals not translated by the call itself
            raise BusError(f"the broker at {self._where} refused: {exc}") from exc
        except _LINK_ERRORS as exc:
            raise BusUnavailableError(self._where, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not channel.is_closed:
                with anyio.CancelScope(shield=True), contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await channel.close()

    @staticmethod
    async def _passive_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
        try:
            return await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:
            raise UnknownQueueError(
                f"queue {name!r} does not exist; declare the bus plan first"
            ) from None

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailableError(self._where, "the bus is closed")

    def __repr__(self) -> str:
        return f"RabbitMQBus({self._where}, connected={self.connected})"


async def _declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        raise BusError(
            f"queue {name!r} already exists with other arguments ({exc}); delete it (after "
            "draining it) or give the new one another name"
        ) from exc


class _Publish(NamedTuple):
    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    mandatory: bool

    def describe(self) -> str:
        if self.properties.message_id:
            return f"message {self.properties.message_id} to {self.exchange!r}/{self.routing_key!r}"
        return f"the answer to request {self.properties.correlation_id}"


def _properties(
    message_id: str,
    headers: Headers,
    *,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> Basic.Properties:
    """What aio-pika's ``Message(..., delivery_mode=PERSISTENT)`` would send."""
    return Basic.Properties(
        message_id=message_id,
        headers=dict(headers),
        reply_to=reply_to,
        correlation_id=correlation_id,
        delivery_mode=DeliveryMode.PERSISTENT.value,
    )


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    """Read a publish task's outcome, so asyncio never logs it as unhandled (``_publish_all``
    raises the failure that matters; the others are abandoned)."""
    if not task.cancelled():
        task.exception()


def _forward(
    send: MemoryObjectSendStream[AbstractIncomingMessage],
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    async def on_message(message: AbstractIncomingMessage) -> None:
        # If the context is being left, closing its channel requeues the message.
        with contextlib.suppress(anyio.ClosedResourceError):
            send.send_nowait(message)

    return on_message


async def _close_consumer(
    channel: AbstractRobustChannel, queue: AbstractQueue | None, consumer_tag: str | None
) -> None:
    try:
        if queue is not None and consumer_tag is not None and not channel.is_closed:
            await queue.cancel(consumer_tag)
        if channel.is_initialized:
            await channel.close()
    except CONNECTION_EXCEPTIONS as exc:  # the broker requeues when the channel dies anyway
        logger.warning("consumer channel already gone on close: {exc!r}", exc=exc)


async def _publish_replay(
    channel: AbstractChannel, queue: str, message: AbstractIncomingMessage
) -> None:
    copy = Message(
        message.body,
        headers=dict(replay_headers(header_dict(message.headers))),
        message_id=message.message_id,
        delivery_mode=DeliveryMode.PERSISTENT,
    )
    try:
        await channel.default_exchange.publish(copy, queue, mandatory=True)
    except PublishError:
        raise UnroutableError("", queue) from None
    except DeliveryError as exc:
        raise PublishNotConfirmedError(f"the broker refused replaying to {queue!r}: {exc}") from exc


async def _get_dead_letters(
    dlq: AbstractQueue, present: int, message_id: str | None
) -> tuple[list[AbstractIncomingMessage], list[AbstractIncomingMessage]]:
    """Get up to ``present`` messages of ``dlq`` unacknowledged: those with ``message_id``
    (all if None), and the others, to requeue. Requeued here if getting them fails."""
    chosen: list[AbstractIncomingMessage] = []
    skipped: list[AbstractIncomingMessage] = []
    try:
        for _ in range(present):
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            wanted = message_id is None or message.message_id == message_id
            (chosen if wanted else skipped).append(message)
    except BaseException:
        await _requeue(chosen + skipped)
        raise
    return chosen, skipped


async def _requeue(messages: list[AbstractIncomingMessage]) -> None:
    """Give messages got without auto-ack back; if the channel is gone, the broker has."""
    try:
        for message in messages:
            await message.nack(requeue=True)
    except _LINK_ERRORS as exc:
        logger.warning("could not requeue dead letters ({exc!r}); the broker will", exc=exc)


async def _wait_until_ready(channel: AbstractChannel, queue: str, count: int) -> None:
    """Wait (bounded) until ``queue`` holds ``count`` ready messages again. A quorum queue
    applies requeues asynchronously: without this, a listing right after a listing or a
    replay could miss the messages the first one just gave back."""
    with anyio.move_on_after(_REQUEUE_WAIT):
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if (declared.declaration_result.message_count or 0) >= count:
                return
            await anyio.sleep(0.01)


def _log_stale(delivery: Delivery, why: str) -> None:
    logger.warning(
        "cannot settle message {id} of {queue}: {why}; unless it was settled before, the "
        "broker delivers it again",
        id=delivery.message_id,
        queue=delivery.queue,
        why=why,
    )
