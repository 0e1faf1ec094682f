"""What both buses share about streams: the entry format, topic filtering, and settlement.

An entry is one AMQP 1.0 message whose single data section is a JSON object::

    {"publishing_id": 42, "routing_key": "complaint.ComplaintCreated",
     "message_id": "…", "headers": {…}, "body": <the message body, embedded as JSON>,
     "producer": "relay"}

``producer`` names the writer whose ``publishing_id`` it is (two producers may both write
id 42): how a bus that reads the stream back finds a producer's last entry.

Any reader of the stream can read it: AMQP 0.9.1 with ``x-stream-offset`` gets that JSON as
the message body, the stream protocol gets the AMQP 1.0 message (PITFALLS: raw bytes would
make RabbitMQ 3.10 close AMQP 0.9.1 readers' connections). Our own readers slice the data
section out without an AMQP 1.0 decoder.

A stream has no acks: ``consume_stream`` turns its entries into ``Delivery`` objects for an
actor, keeps those whose routing key matches one of the actor's patterns, and tracks which
were settled (acked, retried or dead-lettered: the bus's ``ack``). ``settled`` is the offset
to resume from: every entry before it was settled or filtered out. What was handed out and
not settled when the process dies is read again from there: effects deduplicate.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from runtime.bus.protocol import X_ORDERING_KEY, Delivery, HeaderValue, StreamEntry, StreamWrite
from runtime.errors import MessageDecodeError


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on '.', ``*`` is one word, ``#`` zero or more."""
    words = routing_key.split(".") if routing_key else []
    reachable = {0}  # how many words of the key the pattern so far can have consumed
    for part in pattern.split(".") if pattern else []:
        if part == "#":
            reachable = set(range(min(reachable), len(words) + 1))
        else:
            reachable = {i + 1 for i in reachable if i < len(words) and part in ("*", words[i])}
        if not reachable:
            return False
    return len(words) in reachable


class TopicFilter:
    """Routing keys against a set of topic patterns, each key's answer remembered (a domain
    has a few dozen routing keys; the matcher runs once for each)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._everything = "#" in self.patterns
        self._seen: dict[str, bool] = {}

    def __call__(self, routing_key: str) -> bool:
        if self._everything:
            return True
        known = self._seen.get(routing_key)
        if known is None:
            known = any(topic_matches(p, routing_key) for p in self.patterns)
            if len(self._seen) < 10_000:
                self._seen[routing_key] = known
        return known


# --- the entry format ------------------------------------------------------------------------


class _Entry(msgspec.Struct):
    publishing_id: int
    routing_key: str
    message_id: str
    headers: dict[str, HeaderValue]
    body: msgspec.Raw
    producer: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Entry)


def encode_entry(entry: StreamWrite, producer: str = "") -> bytes:
    """The JSON object of one entry (``body`` must itself be JSON) written by ``producer``."""
    return _encoder.encode(
        _Entry(
            entry.publishing_id,
            entry.routing_key,
            entry.message_id,
            dict(entry.headers),
            msgspec.Raw(entry.body),
            producer,
        )
    )


def decode_entry(offset: int, data: bytes) -> StreamEntry:
    """An entry's JSON object back; ``MessageDecodeError`` if it is not one of ours."""
    return decode_written_entry(offset, data)[1]


def decode_written_entry(offset: int, data: bytes) -> tuple[str, StreamEntry]:
    """The producer that wrote an entry ("" if unknown), and the entry (``decode_entry``)."""
    try:
        entry = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise MessageDecodeError(f"stream offset {offset}", data, exc) from exc
    return entry.producer, StreamEntry(
        offset,
        entry.publishing_id,
        entry.routing_key,
        entry.message_id,
        bytes(entry.body),
        entry.headers,
    )


def amqp_data_section(body: bytes) -> bytes:
    """``body`` as a bare AMQP 1.0 message: one data section (descriptor 0x75), binary of
    8-bit (``a0``) or 32-bit (``b0``) length. What rstream's ``AMQPMessage(body=...)``
    writes, without its encoder (~8.5 µs an entry)."""
    size = len(body)
    if size < 256:
        return b"\x00\x53\x75\xa0" + bytes((size,)) + body
    return b"\x00\x53\x75\xb0" + size.to_bytes(4, "big") + body


def data_section_body(message: bytes) -> bytes:
    """The body of a message written by ``amqp_data_section`` (or any AMQP 1.0 message
    whose first section is its one data section)."""
    if message[:3] != b"\x00\x53\x75":
        problem = ValueError("not an AMQP 1.0 data section")
        raise MessageDecodeError("stream entry", message, problem)
    if message[3] == 0xA0:
        return message[5 : 5 + message[4]]
    if message[3] == 0xB0:
        return message[8 : 8 + int.from_bytes(message[4:8], "big")]
    raise MessageDecodeError("stream entry", message, ValueError("unknown binary constructor"))


# --- consuming -------------------------------------------------------------------------------


class Settlements:
    """The offsets an actor was handed and has not settled yet, in order."""

    def __init__(self, offset: int) -> None:
        self.start = offset  # the offset the reading started from
        self.next = offset  # the next offset to read
        self._open: dict[int, None] = {}  # insertion-ordered: offsets grow
        self._pins = 0  # deliveries from elsewhere (the store) not settled yet

    def take(self, offset: int) -> None:
        self._open[offset] = None
        self.next = offset + 1

    def skip(self, offset: int) -> None:
        self.next = offset + 1

    def pin(self, tag: int) -> None:
        """A delivery handed out from elsewhere (``tag`` < 0: read from the event store
        before the stream's first entry): until it is settled, ``settled`` stays at
        ``start``, so a reading that starts again reads it again."""
        if tag >= 0:
            raise ValueError(f"a pinned delivery has a negative tag, got {tag}")
        self._open[tag] = None
        self._pins += 1

    def settle(self, offset: int) -> None:
        if offset in self._open:
            del self._open[offset]
            if offset < 0:
                self._pins -= 1

    @property
    def unsettled(self) -> int:
        return len(self._open)

    @property
    def settled(self) -> int:
        """Where to resume: the oldest unsettled offset, else the next one to read (the
        start while a pinned delivery is unsettled)."""
        if self._pins:
            return self.start
        return next(iter(self._open), self.next)


class StreamConsumer:
    """Deliveries of one stream for one actor (``Bus.consume_stream``)."""

    def __init__(
        self,
        stream: str,
        *,
        queue: str,
        consumer: int,
        entries: AsyncIterator[Sequence[StreamEntry]],
        offset: int,
        routing_keys: Sequence[str],
    ) -> None:
        self.stream = stream
        self.queue = queue
        self.consumer = consumer
        self.requested = offset
        self.first_offset: int | None = None  # the first offset the stream gave
        self.settlements = Settlements(offset)
        self._entries = entries
        self._matches = TopicFilter(routing_keys)
        self._chunk: Sequence[StreamEntry] = ()
        self._index = 0

    @property
    def settled(self) -> int:
        return self.settlements.settled

    def pin(self, tag: int) -> None:
        self.settlements.pin(tag)

    def __aiter__(self) -> StreamConsumer:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            while self._index < len(self._chunk):
                entry = self._chunk[self._index]
                self._index += 1
                if entry.offset < self.settlements.next:
                    continue  # read again after a reconnection
                if self.first_offset is None:
                    self.first_offset = entry.offset
                if not self._matches(entry.routing_key):
                    self.settlements.skip(entry.offset)
                    continue
                self.settlements.take(entry.offset)
                return self._delivery(entry)
            self._chunk = await anext(self._entries)
            self._index = 0

    def _delivery(self, entry: StreamEntry) -> Delivery:
        headers = entry.headers
        if X_ORDERING_KEY not in headers:
            headers = {**headers, X_ORDERING_KEY: entry.message_id}
        return Delivery(
            queue=self.queue,
            message_id=entry.message_id,
            body=entry.body,
            headers=headers,
            exchange=self.stream,
            routing_key=entry.routing_key,
            redelivered=False,
            delivery_tag=entry.offset,
            consumer=self.consumer,
        )


class StreamSettlement:
    """``consume_stream`` for a bus that has ``read_stream``; its ``ack`` and ``nack`` ask
    ``settle_stream`` first."""

    _stream_ids = itertools.count(-1, -1)  # stream consumers have negative ids
    _stream_consumers: dict[int, StreamConsumer]

    def read_stream(
        self, stream: str, offset: int, *, credit: int = 8
    ) -> Any:  # the bus's own, typed in the protocol
        raise NotImplementedError

    @asynccontextmanager
    async def consume_stream(
        self,
        stream: str,
        *,
        queue: str,
        offset: int,
        routing_keys: Sequence[str],
        prefetch: int,
    ) -> AsyncIterator[StreamConsumer]:
        if not hasattr(self, "_stream_consumers"):
            self._stream_consumers = {}
        # Chunks the broker may send ahead. A chunk is a relay batch (tens of entries at full
        # speed); with 4 in flight the readers fell seconds behind the relay (bench.flow:
        # end-to-end p50 3.3 s, against 48 ms with 32). The reader's buffer bounds memory.
        credit = max(4, min(64, prefetch // 8))
        async with self.read_stream(stream, offset, credit=credit) as entries:
            consumer = StreamConsumer(
                stream,
                queue=queue,
                consumer=next(self._stream_ids),
                entries=entries,
                offset=offset,
                routing_keys=routing_keys,
            )
            self._stream_consumers[consumer.consumer] = consumer
            try:
                yield consumer
            finally:
                del self._stream_consumers[consumer.consumer]

    def settle_stream(self, delivery: Delivery) -> bool:
        """True if ``delivery`` came from a stream (then it is settled, or was already)."""
        if delivery.consumer >= 0:
            return False
        consumer = getattr(self, "_stream_consumers", {}).get(delivery.consumer)
        if consumer is not None:
            consumer.settlements.settle(delivery.delivery_tag)
        return True
