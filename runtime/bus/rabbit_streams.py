"""The stream side of the RabbitMQ bus: RabbitMQ streams through the stream protocol
(rstream 1.1.1, RabbitMQ 3.10; PITFALLS.md). The only module that imports rstream: its
errors become ``runtime.errors`` here.

Connections, by job:

- one *admin* client (created at connect, reopened when it died): creating streams, asking
  whether one exists, and the publisher sequence (deduplication) of a producer;
- one rstream ``Producer`` per producer name: rstream keeps one publisher per stream in a
  ``Producer``, whatever the name it is asked for, so two names need two objects. A write
  waits for every confirm; when the connection drops (``on_close_handler``), the writes in
  flight fail with ``PublishNotConfirmedError`` and the next write opens a new ``Producer``
  (rstream's own recovery only asks for the stream's leader; it is off);
- one rstream ``Consumer`` per ``read`` (one subscription of a stream per ``Consumer``). When
  its connection drops, the reader subscribes again with a new ``Consumer``, from the offset
  after the last entry it received, with a backoff, for up to ``reconnect_timeout``.

What RabbitMQ 3.10.8 does, as found with rstream 1.1.1 (the integration tests pin it):

- creating a stream that exists with the same arguments answers "already exists" (5); with
  other arguments, or over a queue that is not a stream, "precondition failed" (17);
- deduplicated publishing ids are confirmed like the others (nothing is written);
- a subscription at an offset below the first retained entry starts at the first retained
  entry; at an offset past the end it waits for that offset (it does not start at the end);
- offsets are not contiguous once segments roll over: each new segment starts with a
  tracking chunk that takes an offset and is never delivered;
- ``OffsetType.LAST`` delivers the last chunk (of entries), then what comes after;
- ``query_publisher_sequence`` is the last publishing id the stream stored for a producer
  name (0 if none), across connections: what deduplication compares with;
- ``rabbitmqctl close_all_connections`` closes stream connections too; rstream calls
  ``on_close_handler`` for the connections that carried a stream, leaves the socket of a
  dropped connection open (closed here, else a ``ResourceWarning``), and its
  ``send_publish_frame`` on a dead connection silently sends nothing.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
from loguru import logger
from rstream import (
    ConsumerOffsetSpecification,
    MessageContext,
    OffsetType,
    RawMessage,
)
from rstream.client import Client
from rstream.connection import ConnectionClosed
from rstream.consumer import Consumer
from rstream.exceptions import (
    ClientError,
    PreconditionFailed,
    ServerError,
    StreamAlreadyExists,
    StreamDoesNotExist,
)
from rstream.producer import ConfirmationStatus, Producer
from rstream.recovery import BackOffRecoveryStrategy
from rstream.utils import OnClosedErrorInfo
from yarl import URL

from runtime.bus.protocol import StreamEntry, StreamSpec, StreamWrite
from runtime.bus.streams import (
    amqp_data_section,
    data_section_body,
    decode_written_entry,
    encode_entry,
)
from runtime.errors import (
    BusError,
    BusUnavailableError,
    MessageDecodeError,
    PublishNotConfirmedError,
    UnknownQueueError,
)

T = TypeVar("T")

PLUGIN_HINT = (
    "is the stream plugin enabled? Run `rabbitmq-plugins enable rabbitmq_stream` (it listens "
    "on port 5552), or set MAGASIN_STREAM_URL to where the stream protocol listens"
)
FRAME_MAX = 1024 * 1024  # rstream's and the broker's default
_FRAME_OVERHEAD = 13  # a publish frame: size, key, version, publisher id, message count
_MESSAGE_OVERHEAD = 12  # each message in it: publishing id, size
_ENTRIES_PER_CREDIT = 256  # what a reader buffers for each chunk of credit
_TAIL_WINDOW = 512  # how far back ``tail`` looks first when the last chunk is not it
_NO_LIMIT = 2**62
# What the network and rstream raise when a connection is gone or cannot be made.
_LINK_ERRORS = (OSError, ConnectionClosed, ServerError, ClientError, TimeoutError)
_CONNECTION_LOST = -1  # rstream's code for a confirm that cannot come any more


@dataclass(frozen=True)
class StreamAddress:
    host: str
    port: int
    vhost: str
    username: str
    password: str

    @property
    def where(self) -> str:
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{self.host}:{self.port}/{vhost} (stream protocol)"

    @classmethod
    def parse(cls, url: str) -> StreamAddress:
        """``rabbitmq-stream://user:password@host:port/vhost`` (vhost ``/`` when empty)."""
        parsed = URL(url)
        if parsed.scheme != "rabbitmq-stream":
            raise BusError(f"a stream URL starts with rabbitmq-stream://, not {parsed.scheme}://")
        return cls(
            parsed.host or "localhost",
            parsed.port or 5552,
            parsed.path[1:] or "/",
            parsed.user or "guest",
            parsed.password or "guest",
        )


def stream_url_for(amqp_url: str) -> str:
    """The stream protocol's URL of a broker: ``amqp_url``'s user, password, host and vhost,
    scheme ``rabbitmq-stream``, port 5552 (query parameters dropped)."""
    parsed = URL(amqp_url).with_query(None).with_fragment(None)
    return str(parsed.with_scheme("rabbitmq-stream").with_port(5552))


def retention_arguments(spec: StreamSpec) -> dict[str, str]:
    """The stream's arguments as the stream protocol takes them (strings)."""
    arguments = {"stream-max-segment-size-bytes": str(spec.max_segment_size_bytes)}
    if spec.max_age is not None:
        arguments["max-age"] = f"{max(1, math.ceil(spec.max_age))}s"
    if spec.max_length_bytes is not None:
        arguments["max-length-bytes"] = str(spec.max_length_bytes)
    return arguments


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clients_of(entity: Producer | Consumer) -> list[Client]:
    """Every client (connection) an rstream object holds."""
    clients = [client for group in entity._pool._clients.values() for client in group]
    clients.extend(entity._clients.values())
    if entity._default_client is not None:
        clients.append(entity._default_client)
    return clients


def _close_sockets(clients: Sequence[Client]) -> None:
    """rstream leaves the socket of a dropped connection open: close it."""
    for client in clients:
        connection = client._conn
        writer = connection._writer if connection is not None else None
        if writer is not None and not writer.transport.is_closing():
            writer.close()


async def _close_entity(entity: Producer | Consumer) -> None:
    """Close an rstream object, even when cancelled, never hanging on a broker gone."""
    clients = _clients_of(entity)
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            await entity.close()
        except Exception as exc:  # noqa: BLE001 - closing what may already be broken
            logger.debug("closing an rstream {kind}: {exc}", kind=type(entity).__name__, exc=exc)
    _close_sockets(clients)


# --- writing ---------------------------------------------------------------------------------


class _Confirms:
    """The confirms one ``write`` waits for."""

    def __init__(self, ids: set[int]) -> None:
        self.pending = ids
        self.failure: str | None = None
        self.done = anyio.Event()

    def on_confirm(self, status: ConfirmationStatus) -> None:
        if not status.is_confirmed:
            code = status.response_code
            self.failure = (
                "the connection was lost"
                if code == _CONNECTION_LOST
                else f"the broker refused publishing id {status.message_id} (code {code})"
            )
            self.done.set()
        self.pending.discard(status.message_id)
        if not self.pending:
            self.done.set()

    def lost(self, why: str) -> None:
        self.failure = self.failure or why
        self.done.set()


@dataclass(eq=False)
class _Writer:
    """One producer name's rstream ``Producer``, usable until its connection drops."""

    producer: Producer | None = None
    broken: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    waiting: set[_Confirms] = field(default_factory=set)

    def on_close(self, info: OnClosedErrorInfo) -> None:
        self.broken = True
        for confirms in self.waiting:
            confirms.lost(f"the connection was lost ({info.reason})")


def _frames(messages: Sequence[RawMessage], frame_max: int) -> list[list[RawMessage]]:
    """``messages`` cut into publish frames of at most ``frame_max`` bytes (one chunk each)."""
    frames: list[list[RawMessage]] = [[]]
    size = _FRAME_OVERHEAD
    for message in messages:
        needed = _MESSAGE_OVERHEAD + len(message.data)
        if _FRAME_OVERHEAD + needed > frame_max:
            raise BusError(
                f"a stream entry of {len(message.data)} bytes does not fit a frame of "
                f"{frame_max} bytes (publishing id {message.publishing_id})"
            )
        if frames[-1] and size + needed > frame_max:
            frames.append([])
            size = _FRAME_OVERHEAD
        frames[-1].append(message)
        size += needed
    return frames


# --- reading ---------------------------------------------------------------------------------


class _Reader(Generic[T]):
    """One subscription of a stream, a ``Consumer`` at a time: after a drop, a new one
    subscribes from the offset after the last entry received. Entries wait in a bounded
    buffer: rstream grants a chunk of credit when it starts handing a chunk to the callback,
    and the callback waits while the buffer is full."""

    def __init__(
        self,
        streams: RabbitStreams,
        stream: str,
        *,
        offset: int | None,  # None: the last chunk
        credit: int,
        decode: Callable[[int, bytes], T],
        limit: int,
    ) -> None:
        self.stream = stream
        self.next = offset  # the offset of the next entry to receive
        self.recoveries = 0  # subscriptions made again after a drop
        self._streams = streams
        self._credit = credit
        self._decode = decode
        self._limit = limit
        self._buffer: list[tuple[int, T]] = []
        self._readable = anyio.Event()
        self._room = anyio.Event()
        self._consumer: Consumer | None = None
        self._generation = 0
        self._lost: str | None = None
        self._closed = False

    def __aiter__(self) -> _Reader[T]:
        return self

    async def __anext__(self) -> list[T]:
        return [item for _, item in await self.next_chunk()]

    async def next_chunk(self) -> list[tuple[int, T]]:
        """What arrived since the last call (offsets with items), waiting for something."""
        await anyio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._buffer:
                chunk, self._buffer = self._buffer, []
                self._room.set()
                return chunk
            if self._lost is not None:
                await self._recover()
                continue
            self._readable = anyio.Event()
            await self._readable.wait()

    async def subscribe(self) -> None:
        self._generation += 1
        generation = self._generation
        self._lost = None
        address = self._streams.address

        def on_close(info: OnClosedErrorInfo) -> None:
            if generation == self._generation:
                self._lost = info.reason
                self._readable.set()

        def on_message(message: Any, context: MessageContext) -> Awaitable[None] | None:
            if generation != self._generation or self._closed:
                return None
            offset = context.offset
            if self.next is not None and offset < self.next:
                return None  # read again: subscriptions start at a chunk
            item = self._decode(offset, bytes(message))
            if len(self._buffer) >= self._limit:
                return self._put_when_room(generation, offset, item)
            self._put(offset, item)
            return None

        consumer = Consumer(
            address.host,
            address.port,
            vhost=address.vhost,
            username=address.username,
            password=address.password,
            connection_name=f"{self._streams.name}-reader",
            on_close_handler=on_close,
            recovery_strategy=BackOffRecoveryStrategy(False),
        )
        self._consumer = consumer
        where = (
            ConsumerOffsetSpecification(OffsetType.LAST)
            if self.next is None
            else ConsumerOffsetSpecification(OffsetType.OFFSET, self.next)
        )
        try:
            with anyio.fail_after(self._streams.request_timeout):
                await consumer.subscribe(
                    self.stream,
                    on_message,
                    offset_specification=where,
                    initial_credit=self._credit,
                )
        except StreamDoesNotExist:
            await self._close_consumer()
            raise UnknownQueueError(self._streams.unknown(self.stream)) from None
        except _LINK_ERRORS as exc:
            await self._close_consumer()
            raise BusUnavailableError(
                self._streams.address.where,
                f"cannot read stream {self.stream!r} ({_describe(exc)})",
            ) from exc

    def _put(self, offset: int, item: T) -> None:
        self._buffer.append((offset, item))
        self.next = offset + 1
        self._readable.set()

    async def _put_when_room(self, generation: int, offset: int, item: T) -> None:
        while len(self._buffer) >= self._limit:
            self._room = anyio.Event()
            await self._room.wait()
        if generation == self._generation and not self._closed:
            self._put(offset, item)

    async def _recover(self) -> None:
        """Subscribe again from ``next``, with a backoff, for up to ``reconnect_timeout``."""
        timeout = self._streams.reconnect_timeout
        deadline = anyio.current_time() + timeout
        delay = 0.1
        logger.warning(
            "stream {stream}: the connection was lost ({why}); reading again from offset {offset}",
            stream=self.stream,
            why=self._lost,
            offset=self.next,
        )
        while True:
            await self._close_consumer()
            try:
                await self.subscribe()
            except BusUnavailableError as exc:
                if anyio.current_time() + delay > deadline:
                    raise BusUnavailableError(
                        self._streams.address.where,
                        f"stream {self.stream!r} could not be read again for {timeout:g}s after "
                        f"the connection was lost ({exc.cause})",
                    ) from exc
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.recoveries += 1
            return

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _close_entity(consumer)

    async def close(self) -> None:
        self._closed = True
        self._readable.set()
        self._room.set()
        await self._close_consumer()


def _entry_of(stream: str) -> Callable[[int, bytes], StreamEntry]:
    """Decodes an entry; one that is not ours becomes an entry with an empty routing key
    (matched only by ``#``: an actor then dead-letters it as undecodable)."""

    def decode(offset: int, message: bytes) -> StreamEntry:
        return _written_entry(stream, offset, message)[1]

    return decode


def _written_entry(stream: str, offset: int, message: bytes) -> tuple[str | None, StreamEntry]:
    try:
        return decode_written_entry(offset, data_section_body(message))
    except MessageDecodeError as exc:
        logger.warning(
            "stream {stream}: the entry at offset {offset} is not one of ours ({exc})",
            stream=stream,
            offset=offset,
            exc=exc.cause,
        )
        return None, StreamEntry(offset, 0, "", f"{stream}@{offset}", message, {})


# --- the stream side of the bus --------------------------------------------------------------


class RabbitStreams:
    """Streams on RabbitMQ. Create with :meth:`connect`; close when done."""

    def __init__(
        self,
        address: StreamAddress,
        admin: Client,
        *,
        name: str,
        confirm_timeout: float,
        reconnect_timeout: float,
        request_timeout: float,
    ) -> None:
        self.address = address
        self.name = name
        self.confirm_timeout = confirm_timeout
        self.reconnect_timeout = reconnect_timeout
        self.request_timeout = request_timeout
        self._admin = admin
        self._admin_lock = anyio.Lock()
        self._frame_max = min(FRAME_MAX, admin.frame_max)
        self._writers: dict[str, _Writer] = {}
        self._readers: set[_Reader[Any]] = set()
        self._known: set[str] = set()  # streams known to exist
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str = "magasin",
        connect_timeout: float = 10.0,
        confirm_timeout: float = 30.0,
        reconnect_timeout: float = 60.0,
    ) -> RabbitStreams:
        """Connect to ``url`` (``rabbitmq-stream://user:password@host:5552/vhost``)."""
        address = StreamAddress.parse(url)
        admin = await _open_client(address, f"{name}-streams", connect_timeout)
        logger.info("stream protocol connected to {where}", where=address.where)
        return cls(
            address,
            admin,
            name=name,
            confirm_timeout=confirm_timeout,
            reconnect_timeout=reconnect_timeout,
            request_timeout=connect_timeout,
        )

    async def close(self) -> None:
        """Close every connection; open reads stop iterating."""
        self._closed = True
        for reader in list(self._readers):
            await reader.close()
        for writer in self._writers.values():
            for confirms in writer.waiting:
                confirms.lost("the bus was closed")
            if writer.producer is not None:
                await _close_entity(writer.producer)
                writer.producer = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._admin.close()
        _close_sockets([self._admin])

    def unknown(self, stream: str) -> str:
        return f"stream {stream!r} does not exist; declare the bus plan first"

    # --- admin ---------------------------------------------------------------------------

    async def _call(self, what: str, call: Callable[[Client], Awaitable[T]]) -> T:
        """``call`` on the admin client, opened again if its connection died."""
        self._check_open()
        async with self._admin_lock:
            if not self._admin.is_connection_alive():
                old = self._admin
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await old.close()
                _close_sockets([old])
                self._admin = await _open_client(
                    self.address, f"{self.name}-streams", self.request_timeout
                )
            admin = self._admin
        try:
            with anyio.fail_after(self.request_timeout):
                return await call(admin)
        except (StreamDoesNotExist, StreamAlreadyExists, PreconditionFailed):
            raise
        except _LINK_ERRORS as exc:
            raise BusUnavailableError(self.address.where, f"{what}: {_describe(exc)}") from exc

    async def declare(self, spec: StreamSpec) -> None:
        """Create the stream with its retention; one that exists must have the same."""
        try:
            await self._call(
                f"declaring stream {spec.name!r}",
                lambda admin: admin.create_stream(spec.name, retention_arguments(spec)),
            )
        except StreamAlreadyExists:
            pass
        except PreconditionFailed:
            raise BusError(
                f"{spec.name!r} already exists as a queue that is not a stream, or as a stream "
                f"with other retention settings than {retention_arguments(spec)}; delete it "
                "or keep its settings"
            ) from None
        self._known.add(spec.name)

    async def _check_exists(self, stream: str) -> None:
        if stream in self._known:
            return
        exists = await self._call(
            f"looking up stream {stream!r}", lambda admin: admin.stream_exists(stream)
        )
        if not exists:
            raise UnknownQueueError(self.unknown(stream))
        self._known.add(stream)

    # --- writing -------------------------------------------------------------------------

    async def write(self, stream: str, producer: str, entries: Sequence[StreamWrite]) -> None:
        """Append ``entries`` in one publish frame (more if they do not fit one) and wait
        for every confirm (deduplicated ids are confirmed too)."""
        self._check_open()
        if not entries:
            return
        await self._check_exists(stream)
        frames = _frames(
            [
                RawMessage(amqp_data_section(encode_entry(e, producer)), e.publishing_id)
                for e in entries
            ],
            self._frame_max,
        )
        writer = self._writers.setdefault(producer, _Writer())
        async with writer.lock:
            confirms = _Confirms({e.publishing_id for e in entries})
            rstream_producer = await self._producer(writer)
            writer.waiting.add(confirms)
            done = False
            try:
                with anyio.fail_after(self.confirm_timeout):
                    for frame in frames:
                        await rstream_producer.send_batch(
                            stream,
                            frame,
                            publisher_name=producer,
                            on_publish_confirm=confirms.on_confirm,
                        )
                    if writer.broken:
                        confirms.lost("the connection was lost")
                    await confirms.done.wait()
                done = confirms.failure is None
            except StreamDoesNotExist:
                self._known.discard(stream)
                raise UnknownQueueError(self.unknown(stream)) from None
            except TimeoutError:
                confirms.lost(f"no confirm within {self.confirm_timeout:g}s")
            except _LINK_ERRORS as exc:
                confirms.lost(f"the connection failed ({_describe(exc)})")
            finally:
                writer.waiting.discard(confirms)
                if not done:
                    writer.broken = True  # the next write starts on a new connection
        if confirms.failure is not None:
            first, last = entries[0].publishing_id, entries[-1].publishing_id
            raise PublishNotConfirmedError(
                f"entries {first}..{last} of producer {producer!r} to stream {stream!r} were "
                f"not all confirmed by {self.address.where}: {confirms.failure}; write them "
                "again (the stream drops the ids it already holds)"
            )

    async def _producer(self, writer: _Writer) -> Producer:
        if writer.producer is not None and not writer.broken:
            return writer.producer
        if writer.producer is not None:
            await _close_entity(writer.producer)
            writer.producer = None
        address = self.address
        producer = Producer(
            address.host,
            address.port,
            vhost=address.vhost,
            username=address.username,
            password=address.password,
            frame_max=self._frame_max,
            connection_name=f"{self.name}-writer",
            on_close_handler=writer.on_close,
            recovery_strategy=BackOffRecoveryStrategy(False),
        )
        try:
            with anyio.fail_after(self.request_timeout):
                await producer.start()
        except _LINK_ERRORS as exc:
            await _close_entity(producer)
            raise BusUnavailableError(address.where, _connect_failure(exc)) from exc
        writer.producer, writer.broken = producer, False
        return producer

    # --- reading -------------------------------------------------------------------------

    @asynccontextmanager
    async def read(
        self, stream: str, offset: int, credit: int = 8
    ) -> AsyncIterator[AsyncIterator[Sequence[StreamEntry]]]:
        """Chunks of entries from ``offset`` on (see ``Bus.read_stream``)."""
        if offset < 0:
            raise ValueError(f"a stream offset is at least 0, got {offset}")
        credit = max(1, credit)
        async with self._reader(
            stream, offset, credit, _entry_of(stream), credit * _ENTRIES_PER_CREDIT
        ) as reader:
            yield reader

    @asynccontextmanager
    async def _reader(
        self,
        stream: str,
        offset: int | None,
        credit: int,
        decode: Callable[[int, bytes], T],
        limit: int,
    ) -> AsyncIterator[_Reader[T]]:
        self._check_open()
        reader = _Reader(self, stream, offset=offset, credit=credit, decode=decode, limit=limit)
        self._readers.add(reader)
        try:
            await reader.subscribe()
            yield reader
        finally:
            self._readers.discard(reader)
            await reader.close()

    async def tail(self, stream: str, producer: str) -> StreamEntry | None:
        """The entry carrying the last publishing id the stream stored for ``producer``."""
        await self._check_exists(stream)
        sequence = await self._call(
            f"asking stream {stream!r} for producer {producer!r}",
            lambda admin: admin.query_publisher_sequence(stream, producer),
        )
        if sequence <= 0:
            return None
        timeout = self.reconnect_timeout
        try:
            with anyio.fail_after(timeout):
                return await self._find(stream, producer, sequence)
        except TimeoutError:
            raise BusUnavailableError(
                self.address.where,
                f"the last entry of producer {producer!r} in stream {stream!r} was not found "
                f"within {timeout:g}s",
            ) from None

    async def _find(self, stream: str, producer: str, sequence: int) -> StreamEntry | None:
        """The last chunk first (a producer that wrote last has its last entry there), then
        windows further and further back, until the first entry the stream holds."""

        def decode(offset: int, message: bytes) -> tuple[str | None, StreamEntry]:
            return _written_entry(stream, offset, message)

        def match(
            chunk: Sequence[tuple[int, tuple[str | None, StreamEntry]]],
        ) -> StreamEntry | None:
            for _, (writer, entry) in chunk:
                if writer == producer and entry.publishing_id == sequence:
                    return entry
            return None

        # The whole last chunk is in the first answer: rstream hands a chunk to the callback
        # without a pause, and the limit here is no limit.
        async with self._reader(stream, None, 1, decode, _NO_LIMIT) as reader:
            chunk = await reader.next_chunk()
        found = match(chunk)
        end = chunk[0][0]  # searched from here on
        window = _TAIL_WINDOW
        while found is None and end > 0:
            start = max(0, end - window)
            async with self._reader(stream, start, 2, decode, _NO_LIMIT) as reader:
                chunk = await reader.next_chunk()
                first = chunk[0][0]  # above ``start`` if retention removed it
                while True:
                    before = [c for c in chunk if c[0] < end]
                    found = match(before)
                    if found is not None or len(before) < len(chunk):
                        break  # found, or every entry before ``end`` was looked at
                    chunk = await reader.next_chunk()
            if first > start:
                break  # nothing older to look at
            end, window = start, window * 4
        return found

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailableError(self.address.where, "the bus is closed")


def _connect_failure(exc: BaseException) -> str:
    """A refused (or unanswered) connection is, most often, the stream plugin being off."""
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror):
        return f"{_describe(exc)}; {PLUGIN_HINT}"
    return _describe(exc)


def _noticed(info: OnClosedErrorInfo) -> None:
    """The admin client's drop: noticed when it is next used (``is_connection_alive``)."""


async def _open_client(address: StreamAddress, name: str, timeout: float) -> Client:  # noqa: ASYNC109
    client = Client(
        address.host,
        address.port,
        frame_max=FRAME_MAX,
        heartbeat=60,
        connection_name=name,
        connection_closed_handler=_noticed,  # else rstream logs a traceback when it drops
    )
    try:
        with anyio.fail_after(timeout):
            await client.start()
            await client.authenticate(address.vhost, address.username, address.password)
    except _LINK_ERRORS as exc:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await client.close()
        _close_sockets([client])
        raise BusUnavailableError(address.where, _connect_failure(exc)) from None
    return client
