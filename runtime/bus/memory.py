"""The in-process bus: the embedded default and the fast twin for unit tests.

It keeps the RabbitMQ bus's contract (``tests/contracts/bus.py``): topic, direct and fanout
exchanges with AMQP matching, the default exchange, per-consumer prefetch, competing
consumers served round robin, requeue when a consume context is left, broker-style
dead-lettering into ``<queue>.dlq`` and TTL retry queues that hand messages back to their
work queue. There is no delivery-limit backstop: nothing here can kill the consumer
without killing the bus.

There is no background task. A retry queue expires its messages lazily, head first like a
broker TTL queue, on every bus operation and in every consumer waiting for a delivery
(it sleeps until the next expiry, on anyio's clock, and is woken when a message is parked).
A parked message is late only while nobody uses the bus and nobody waits, when nobody could
receive it anyway. So the bus owns no task group (one entered in a pytest-asyncio fixture
would be exited from another task) and obeys structured concurrency by construction;
``async with MemoryBus()`` only closes it at the end.

Retries and dead letters are parked the same way as on RabbitMQ (``runtime/bus/headers.py``):
both buses write the same headers.

Requests work like RabbitMQ's direct reply-to: a request is a message in the queue whose
``reply_to`` is this bus's private reply address and whose ``correlation_id`` is its message
id; ``reply`` to that address resolves the waiting request (a reply to any other address is
published to the queue of that name, if there is one, like the broker's default exchange).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType

import anyio
import anyio.lowlevel
import msgspec
from loguru import logger

from runtime.bus.headers import (
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
)
from runtime.bus.streams import StreamSettlement, topic_matches
from runtime.errors import (
    BusError,
    BusUnavailableError,
    UnknownExchangeError,
    UnknownQueueError,
    UnroutableError,
)
from runtime.naming import DEAD_LETTER_EXCHANGE, dead_letter_queue, retry_queue

# --- routing -------------------------------------------------------------------------------


# --- state -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Message:
    message_id: str
    body: bytes
    headers: dict[str, HeaderValue]
    exchange: str
    routing_key: str
    redelivered: bool = False
    expires_at: float = math.inf
    death_reason: str = ""  # why the "broker" dead-lettered it last
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(eq=False)
class _Queue:
    name: str
    spec: QueueSpec | None = None  # set on work queues, to check redeclarations
    ttl: float | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str = ""
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    turn: int = 0  # round robin position among the consumers


@dataclass(eq=False)
class _Consumer:
    id: int
    queue: _Queue
    prefetch: int
    unsettled: dict[int, _Message] = field(default_factory=dict)  # delivery tag -> message
    pending: deque[Delivery] = field(default_factory=deque)  # dispatched, not yet yielded
    wake: anyio.Event = field(default_factory=anyio.Event)
    open: bool = True


class _Deliveries:
    """What ``consume`` yields: waits for the consumer's next delivery."""

    def __init__(self, bus: MemoryBus, consumer: _Consumer) -> None:
        self._bus = bus
        self._consumer = consumer

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        consumer = self._consumer
        while True:
            # One checkpoint per call: a busy consumer never starves the other tasks.
            await anyio.lowlevel.checkpoint()
            if not consumer.open:
                raise StopAsyncIteration
            self._bus._expire_due()
            if consumer.pending:
                return consumer.pending.popleft()
            consumer.wake = anyio.Event()
            with anyio.move_on_after(self._bus._until_next_expiry()):
                await consumer.wake.wait()


@dataclass(eq=False)
class _Log:
    """A stream: entries from ``first`` on (retention dropped those before)."""

    spec: StreamSpec
    # (written at, producer, entry)
    entries: deque[tuple[float, str, StreamEntry]] = field(default_factory=deque)
    next_offset: int = 0
    size: int = 0  # bytes of the bodies held
    last_ids: dict[str, int] = field(default_factory=dict)  # producer -> last publishing id
    tails: dict[str, int] = field(default_factory=dict)  # producer -> offset of its last entry
    grown: anyio.Event = field(default_factory=anyio.Event)

    def append(self, producer: str, batch: Sequence[StreamWrite], now: float) -> None:
        last = self.last_ids.get(producer, 0)
        for item in batch:
            if item.publishing_id <= last:
                continue  # deduplicated, as the broker does
            last = item.publishing_id
            entry = StreamEntry(
                self.next_offset,
                item.publishing_id,
                item.routing_key,
                item.message_id,
                item.body,
                dict(item.headers),
            )
            self.entries.append((now, producer, entry))
            self.size += len(item.body)
            self.tails[producer] = self.next_offset
            self.next_offset += 1
        self.last_ids[producer] = last
        self._retain(now)
        self.grown.set()
        self.grown = anyio.Event()

    def _retain(self, now: float) -> None:
        """Drop from the head what is past ``max_age`` or beyond ``max_length_bytes`` (per
        entry here; the broker drops whole segments), always keeping the last entry."""
        spec = self.spec
        while len(self.entries) > 1:
            written, _, entry = self.entries[0]
            too_old = spec.max_age is not None and now - written > spec.max_age
            too_big = spec.max_length_bytes is not None and self.size > spec.max_length_bytes
            if not (too_old or too_big):
                return
            self.entries.popleft()
            self.size -= len(entry.body)

    @property
    def first(self) -> int:
        return self.entries[0][2].offset if self.entries else self.next_offset

    def entry(self, offset: int) -> StreamEntry | None:
        index = offset - self.first
        return self.entries[index][2] if 0 <= index < len(self.entries) else None

    def chunk(self, offset: int, limit: int) -> list[StreamEntry]:
        start = max(0, offset - self.first)
        return [e for _, _, e in itertools.islice(self.entries, start, start + limit)]


class MemoryBus(StreamSettlement, RepublishingSettlement):
    """A ``Bus`` held in deques and dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._exchanges: dict[str, str] = {DEAD_LETTER_EXCHANGE: "direct"}  # name -> type
        self._bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> (key, queue)
        self._queues: dict[str, _Queue] = {}
        self._streams: dict[str, _Log] = {}
        self._consumers: dict[int, _Consumer] = {}
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)
        self._requests = PendingRequests()
        self._reply_address = f"memory.reply-to.{uuid.uuid4().hex}"  # this bus's requests
        self._closed = False

    async def __aenter__(self) -> MemoryBus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return not self._closed

    # --- topology ----------------------------------------------------------------------

    async def declare(self, plan: BusPlan) -> None:
        self._check_open()
        for exchange in plan.exchanges:
            self._declare_exchange(exchange.name, exchange.type)
        for spec in plan.queues:
            for binding in spec.bindings:
                if binding.exchange not in self._exchanges:
                    raise UnknownExchangeError(binding.exchange)
            self._declare_queue(spec)
        for stream in plan.streams:
            self._declare_stream(stream)
        await anyio.lowlevel.checkpoint()

    def _declare_exchange(self, name: str, kind: str) -> None:
        current = self._exchanges.setdefault(name, kind)
        if current != kind:
            raise BusError(
                f"exchange {name!r} already exists as a {current} exchange, not {kind}; "
                "delete it or give the new one another name"
            )

    def _declare_stream(self, spec: StreamSpec) -> None:
        if spec.name in self._queues:
            raise BusError(f"{spec.name!r} already exists as a queue, not a stream")
        log = self._streams.get(spec.name)
        if log is None:
            self._streams[spec.name] = _Log(spec)
        elif log.spec != spec:
            # The broker keeps a stream's arguments; so does this twin (PITFALLS).
            raise BusError(
                f"stream {spec.name!r} already exists with other retention settings; delete it "
                "or keep its settings"
            )

    def _declare_queue(self, spec: QueueSpec) -> None:
        if spec.name in self._streams:
            raise BusError(f"{spec.name!r} already exists as a stream, not a queue")
        existing = self._queues.get(spec.name)
        if existing is not None:
            if existing.spec is None or _settings(existing.spec) != _settings(spec):
                raise BusError(
                    f"queue {spec.name!r} already exists with other settings; delete it or "
                    "give the new one another name"
                )
        else:
            dlq = dead_letter_queue(spec.name)
            self._queues[spec.name] = _Queue(spec.name, spec, None, DEAD_LETTER_EXCHANGE, dlq)
            for rung, delay in enumerate(spec.retry_delays, start=1):
                name = retry_queue(spec.name, rung)
                self._queues[name] = _Queue(name, None, delay, "", spec.name)
            self._queues[dlq] = _Queue(dlq)
            self._bind(DEAD_LETTER_EXCHANGE, dlq, dlq)
        for binding in spec.bindings:
            self._bind(binding.exchange, binding.routing_key, spec.name)

    def _bind(self, exchange: str, routing_key: str, queue: str) -> None:
        bindings = self._bindings.setdefault(exchange, [])
        if (routing_key, queue) not in bindings:
            bindings.append((routing_key, queue))

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self._queues.get(routing_key)
            return [queue] if queue is not None else []
        kind = self._exchanges.get(exchange)
        if kind is None:
            raise UnknownExchangeError(exchange)
        names: dict[str, None] = {}  # ordered set: a queue gets one copy however bound
        for key, queue_name in self._bindings.get(exchange, []):
            if (
                kind == "fanout"
                or (kind == "direct" and key == routing_key)
                or (kind == "topic" and topic_matches(key, routing_key))
            ):
                names[queue_name] = None
        return [self._queues[name] for name in names]

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise UnknownQueueError(f"queue {name!r} does not exist; declare the bus plan first")
        return queue

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
        await anyio.lowlevel.checkpoint()  # before any effect: a cancelled publish did nothing
        message = _Message(message_id, body, dict(headers or {}), exchange, routing_key)
        self._send(message, mandatory=mandatory)

    async def publish_many(self, messages: Sequence[Outgoing]) -> None:
        await anyio.lowlevel.checkpoint()
        for m in messages:
            message = _Message(m.message_id, m.body, dict(m.headers), m.exchange, m.routing_key)
            self._send(message, mandatory=m.mandatory)

    def _send(self, message: _Message, *, mandatory: bool) -> None:
        """Route ``message`` by its exchange and routing key, a copy to each queue."""
        self._check_open()
        self._expire_due()
        queues = self._route(message.exchange, message.routing_key)
        if not queues:
            if mandatory:
                raise UnroutableError(message.exchange, message.routing_key)
            return
        for queue in queues:
            self._put(queue, replace(message, headers=dict(message.headers)))

    async def _publish_copy(
        self, delivery: Delivery, queue: str, headers: dict[str, HeaderValue]
    ) -> None:
        await anyio.lowlevel.checkpoint()
        self._send(
            _Message(
                delivery.message_id,
                delivery.body,
                headers,
                "",
                queue,
                reply_to=delivery.reply_to,
                correlation_id=delivery.correlation_id,
            ),
            mandatory=True,
        )

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
        await anyio.lowlevel.checkpoint()
        message = _Message(
            message_id,
            body,
            dict(headers or {}),
            "",
            queue,
            reply_to=self._reply_address,
            correlation_id=message_id,
        )
        with self._requests.waiting(queue, message_id) as pending:
            self._send(message, mandatory=True)
            with anyio.move_on_after(timeout):
                await pending.answered.wait()
            return pending.result(timeout)

    async def reply(
        self, delivery: Delivery, body: bytes, *, headers: Headers | None = None
    ) -> None:
        await anyio.lowlevel.checkpoint()
        if not delivery.reply_to:
            logger.debug(
                "message {id} of {queue} is not a request: there is nobody to answer",
                id=delivery.message_id,
                queue=delivery.queue,
            )
            return
        self._check_open()
        if delivery.reply_to == self._reply_address:
            self._requests.answer(delivery.correlation_id, Reply(body, dict(headers or {})))
            return
        # Another address: like the broker, the default exchange routes it by name, if it can.
        answer = _Message(
            "",
            body,
            dict(headers or {}),
            "",
            delivery.reply_to,
            correlation_id=delivery.correlation_id,
        )
        self._send(answer, mandatory=False)

    def _put(self, queue: _Queue, message: _Message) -> None:
        queue.ready.append(message)
        if queue.ttl is not None:
            message.expires_at = anyio.current_time() + queue.ttl
            # Waiting consumers sleep until the expiry they knew of: let them look again.
            for consumer in self._consumers.values():
                consumer.wake.set()
        self._dispatch(queue)

    def _dead_letter(self, message: _Message, source: _Queue, reason: str) -> None:
        """What the broker does on reject or expiry: re-route via the queue's DLX."""
        if source.dead_letter_exchange is None:
            logger.warning(
                "message {id} dropped from {queue} ({reason}): the queue has no dead-letter "
                "exchange",
                id=message.message_id,
                queue=source.name,
                reason=reason,
            )
            return
        headers = dict(message.headers)
        headers.setdefault("x-first-death-queue", source.name)
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-exchange", message.exchange)
        exchange, routing_key = source.dead_letter_exchange, source.dead_letter_routing_key
        for queue in self._route(exchange, routing_key):
            self._put(
                queue,
                replace(
                    message,
                    headers=dict(headers),
                    exchange=exchange,
                    routing_key=routing_key,
                    redelivered=False,
                    expires_at=math.inf,
                    death_reason=reason,
                ),
            )

    # --- retry queues: lazy, head-first expiry ------------------------------------------------

    def _expire_due(self) -> None:
        now = anyio.current_time()
        for queue in list(self._queues.values()):
            while queue.ttl is not None and queue.ready and queue.ready[0].expires_at <= now:
                self._dead_letter(queue.ready.popleft(), queue, "expired")

    def _until_next_expiry(self) -> float:
        heads = [
            q.ready[0].expires_at for q in self._queues.values() if q.ttl is not None and q.ready
        ]
        return max(0.0, min(heads) - anyio.current_time()) if heads else math.inf

    # --- consuming -----------------------------------------------------------------------

    @asynccontextmanager
    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[AsyncIterator[Delivery]]:
        self._check_open()
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        consumer = _Consumer(next(self._ids), self._queue(queue), prefetch)
        self._consumers[consumer.id] = consumer
        consumer.queue.consumers.append(consumer)
        self._dispatch(consumer.queue)
        try:
            yield _Deliveries(self, consumer)
        finally:
            self._cancel(consumer)

    def _dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with room, round robin (the broker's push)."""
        while queue.ready:
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            message = queue.ready.popleft()
            tag = next(self._tags)
            consumer.unsettled[tag] = message
            consumer.pending.append(
                Delivery(
                    queue=queue.name,
                    message_id=message.message_id,
                    body=message.body,
                    headers=dict(message.headers),
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    redelivered=message.redelivered,
                    delivery_tag=tag,
                    consumer=consumer.id,
                    reply_to=message.reply_to,
                    correlation_id=message.correlation_id,
                )
            )
            consumer.wake.set()

    @staticmethod
    def _next_consumer(queue: _Queue) -> _Consumer | None:
        count = len(queue.consumers)
        for step in range(count):
            consumer = queue.consumers[(queue.turn + step) % count]
            if len(consumer.unsettled) < consumer.prefetch:
                queue.turn = (queue.turn + step + 1) % count
                return consumer
        return None

    def _cancel(self, consumer: _Consumer) -> None:
        """Leave a consume context: its unsettled deliveries go back to the queue's head."""
        consumer.open = False
        consumer.wake.set()
        self._consumers.pop(consumer.id, None)
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        for tag in sorted(consumer.unsettled, reverse=True):
            consumer.unsettled[tag].redelivered = True
            queue.ready.appendleft(consumer.unsettled[tag])
        consumer.unsettled.clear()
        consumer.pending.clear()
        if not self._closed:
            self._dispatch(queue)

    # --- streams ---------------------------------------------------------------------------

    def _log(self, stream: str) -> _Log:
        log = self._streams.get(stream)
        if log is None:
            raise UnknownQueueError(f"stream {stream!r} does not exist; declare the bus plan first")
        return log

    async def write_stream(
        self, stream: str, producer: str, entries: Sequence[StreamWrite]
    ) -> None:
        await anyio.lowlevel.checkpoint()  # before any effect: a cancelled write did nothing
        self._check_open()
        self._log(stream).append(producer, entries, anyio.current_time())

    async def stream_tail(self, stream: str, producer: str) -> StreamEntry | None:
        await anyio.lowlevel.checkpoint()
        self._check_open()
        log = self._log(stream)
        offset = log.tails.get(producer)
        return None if offset is None else log.entry(offset)

    @asynccontextmanager
    async def read_stream(
        self, stream: str, offset: int, *, credit: int = 8
    ) -> AsyncIterator[AsyncIterator[Sequence[StreamEntry]]]:
        self._check_open()
        log = self._log(stream)
        if offset < 0:
            raise ValueError(f"a stream offset is at least 0, got {offset}")

        async def chunks() -> AsyncIterator[Sequence[StreamEntry]]:
            nonlocal offset
            while True:
                if self._closed:
                    return
                chunk = log.chunk(offset, 500)
                if chunk:
                    offset = chunk[-1].offset + 1
                    yield chunk
                    continue
                with anyio.move_on_after(1):  # also notices a closed bus
                    await log.grown.wait()

        yield chunks()

    def lose_stream_tail(self, stream: str, count: int) -> None:
        """Forget the last ``count`` entries, as a broker that did not fsync them would
        after a crash (tests). What a producer wrote last is then what remains of it."""
        log = self._log(stream)
        for _ in range(min(count, len(log.entries))):
            _, _, entry = log.entries.pop()
            log.size -= len(entry.body)
            log.next_offset = entry.offset
        log.tails, log.last_ids = {}, {}
        for _, producer, entry in log.entries:
            log.tails[producer] = entry.offset
            log.last_ids[producer] = entry.publishing_id

    # --- settling ------------------------------------------------------------------------

    def _take(self, delivery: Delivery, verb: str) -> tuple[_Queue, _Message] | None:
        """The unsettled message behind ``delivery``, or None if its consume context is
        gone (stale): then it was already requeued and is delivered again."""
        consumer = self._consumers.get(delivery.consumer)
        message = consumer.unsettled.pop(delivery.delivery_tag, None) if consumer else None
        if consumer is None or message is None:
            logger.warning(
                "cannot {verb} message {id} of {queue}: its consume context is closed or it "
                "was already settled; unless it was settled before, it is delivered again",
                verb=verb,
                id=delivery.message_id,
                queue=delivery.queue,
            )
            return None
        return consumer.queue, message

    async def ack(self, delivery: Delivery) -> None:
        await anyio.lowlevel.checkpoint()
        if self.settle_stream(delivery):
            return
        self._expire_due()
        taken = self._take(delivery, "ack")
        if taken is not None:
            self._dispatch(taken[0])

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        await anyio.lowlevel.checkpoint()
        if delivery.consumer < 0:
            return  # a stream has no requeue: left unsettled, it is read again on restart
        self._expire_due()
        taken = self._take(delivery, "nack")
        if taken is None:
            return
        queue, message = taken
        if requeue:
            message.redelivered = True
            queue.ready.appendleft(message)
            self._dispatch(queue)
        else:
            self._dead_letter(message, queue, "rejected")
            self._dispatch(queue)

    # --- dead-letter administration --------------------------------------------------------

    async def list_dead_letters(self, queue: str, limit: int = 100) -> Sequence[DeadLetter]:
        await anyio.lowlevel.checkpoint()
        self._expire_due()
        dlq = self._queue(dead_letter_queue(queue))
        return [
            dead_letter_record(m.message_id, dict(m.headers), m.body, m.death_reason or "unknown")
            for m in itertools.islice(dlq.ready, max(limit, 0))
        ]

    async def replay_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._expire_due()
        dlq, work = self._queue(dead_letter_queue(queue)), self._queue(queue)
        chosen = [m for m in dlq.ready if message_id is None or m.message_id == message_id]
        dlq.ready = deque(m for m in dlq.ready if m not in chosen)
        for message in sorted(chosen, key=lambda m: replay_order(m.headers)):
            self._put(
                work,
                _Message(
                    message.message_id, message.body, replay_headers(message.headers), "", queue
                ),
            )
        return len(chosen)

    async def purge_dead_letters(self, queue: str, message_id: str | None = None) -> int:
        await anyio.lowlevel.checkpoint()
        self._expire_due()
        dlq = self._queue(dead_letter_queue(queue))
        kept = deque(m for m in dlq.ready if message_id is not None and m.message_id != message_id)
        count = len(dlq.ready) - len(kept)
        dlq.ready = kept
        return count

    async def close(self) -> None:
        self._closed = True
        for consumer in list(self._consumers.values()):
            self._cancel(consumer)
        self._requests.fail(
            lambda pending: BusUnavailableError(
                "memory",
                f"the bus was closed before request {pending.message_id} to "
                f"{pending.queue!r} was answered",
            )
        )

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailableError("memory", "the bus is closed")

    def __repr__(self) -> str:
        return f"MemoryBus(queues={len(self._queues)}, consumers={len(self._consumers)})"


def _settings(spec: QueueSpec) -> QueueSpec:
    """What must match when a queue is declared again (bindings are additive)."""
    return msgspec.structs.replace(spec, bindings=())
