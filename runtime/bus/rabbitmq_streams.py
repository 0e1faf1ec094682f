"""RabbitMQ streams through the stream protocol (rstream): batched writes, offset reads.

Nothing above this module imports rstream; its errors become the bus's here.

- Writes: one rstream ``Producer`` per producer name (rstream keeps one publisher per stream
  and producer object, named once), each batch sent as few ``Publish`` frames as the frame
  size allows (one chunk each), with the entries' own publishing ids so the broker
  deduplicates, and waited for the confirms of every id.
- Tails: the broker's last publishing id for the producer name, then the last chunk of the
  stream read until the entry with that id shows up.
- Reads: one rstream ``Consumer`` per read (rstream allows one subscription of a stream per
  consumer object), its entries handed over through a bounded buffer (rstream grants the
  broker a credit per chunk it starts handling, so a full buffer stops the flow). A dropped
  connection (``rabbitmqctl close_all_connections`` closes stream connections too) ends the
  subscription; the read subscribes again, with backoff, from the entry after the last one
  it handed out. rstream's own recovery is off: this is the one that is tested.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from rstream import (
    ConfirmationStatus,
    Consumer,
    ConsumerOffsetSpecification,
    MessageContext,
    OffsetType,
    Producer,
    RawMessage,
)
from rstream import exceptions as rstream_errors
from rstream.recovery import BackOffRecoveryStrategy

from runtime.bus.protocol import StreamEntry, StreamWrite
from runtime.bus.streams import (
    amqp_data_section,
    data_section_body,
    decode_entry,
    decode_written_entry,
    encode_entry,
)
from runtime.errors import (
    BusError,
    BusUnavailableError,
    PublishNotConfirmedError,
    UnknownQueueError,
)

STREAM_PORT = 5552
PLUGIN_HINT = "enable the stream plugin with `rabbitmq-plugins enable rabbitmq_stream`"
#: Bytes of entries per ``Publish`` frame: under rstream's 1 MiB frame_max with room to spare.
FRAME_BUDGET = 900 * 1024
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    rstream_errors.ServerError,
    rstream_errors.ClientError,
    TimeoutError,
)


def stream_url_for(amqp_url: str) -> str:
    """The AMQP URL's user, password, host and vhost, as a stream URL on port 5552."""
    parts = urlsplit(amqp_url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    host = parts.hostname or "localhost"
    return urlunsplit(("rabbitmq-stream", f"{auth}{host}:{STREAM_PORT}", parts.path, "", ""))


@dataclass(frozen=True)
class StreamAddress:
    host: str
    port: int
    vhost: str
    username: str
    password: str

    @classmethod
    def parse(cls, url: str) -> StreamAddress:
        parts = urlsplit(url)
        if parts.scheme != "rabbitmq-stream":
            raise BusError(
                f"a stream URL looks like rabbitmq-stream://user:password@host:5552/vhost, got "
                f"scheme {parts.scheme!r}; set stream_url (MAGASIN_STREAM_URL) or leave it empty"
            )
        path = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or STREAM_PORT,
            vhost=path,
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
        )

    @property
    def where(self) -> str:
        return f"rabbitmq-stream://{self.host}:{self.port}/{self.vhost.lstrip('/')}"

    def client_arguments(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "vhost": self.vhost,
            "username": self.username,
            "password": self.password,
        }


class RabbitStreams:
    """The stream side of a ``RabbitMQBus``. Create with :meth:`connect`."""

    def __init__(
        self, address: StreamAddress, *, confirm_timeout: float, reconnect_timeout: float
    ) -> None:
        self.address = address
        self.confirm_timeout = confirm_timeout
        self.reconnect_timeout = reconnect_timeout
        self._producers: dict[str, Producer] = {}
        self._broken: set[str] = set()  # producers whose connection closed
        self._lock = anyio.Lock()
        self._closed = False

    @classmethod
    def unavailable(cls) -> RabbitStreams:
        """A stream side that refuses every call (a bus built without one)."""
        streams = cls(
            StreamAddress("unavailable", 0, "/", "", ""), confirm_timeout=1, reconnect_timeout=1
        )
        streams._closed = True
        return streams

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
        """Check that the stream protocol answers at ``url``; a clear error if not."""
        streams = cls(
            StreamAddress.parse(url),
            confirm_timeout=confirm_timeout,
            reconnect_timeout=reconnect_timeout,
        )
        producer = streams._new_producer(name)
        try:
            with anyio.fail_after(connect_timeout):
                await producer.start()
        except CONNECTION_ERRORS as exc:
            raise BusUnavailableError(
                streams.address.where,
                f"the stream protocol does not answer ({exc or type(exc).__name__}); "
                f"{PLUGIN_HINT} (port {streams.address.port})",
            ) from None
        finally:
            await _close(producer)  # a check: producers open when first needed
        return streams

    def _new_producer(self, name: str) -> Producer:
        async def on_close(_: object) -> None:
            # rstream's own recovery is off: the next write opens a new producer (and asks
            # the broker for the name's last publishing id).
            self._broken.add(name)

        return Producer(
            **self.address.client_arguments(),
            connection_name=f"{name}-producer",
            on_close_handler=on_close,
            recovery_strategy=BackOffRecoveryStrategy(False),
        )

    async def close(self) -> None:
        self._closed = True
        producers, self._producers = list(self._producers.values()), {}
        for producer in producers:
            await _close(producer)

    # --- writing -------------------------------------------------------------------------

    async def _producer(self, name: str) -> Producer:
        # Not cancellable: a producer cancelled while it connects leaks rstream's sockets.
        with anyio.CancelScope(shield=True), anyio.fail_after(self.confirm_timeout):
            producer = await self._open_producer(name)
        return producer

    async def _open_producer(self, name: str) -> Producer:
        async with self._lock:
            producer = self._producers.get(name)
            if producer is not None and name in self._broken:
                del self._producers[name]
                await _close(producer)
                producer = None
            self._broken.discard(name)
            if producer is None:
                producer = self._new_producer(name)
                try:
                    await producer.start()
                except CONNECTION_ERRORS as exc:
                    await _close(producer)
                    raise BusUnavailableError(self.address.where, str(exc)) from None
                self._producers[name] = producer
            return producer

    async def _drop_producer(self, name: str) -> None:
        async with self._lock:
            producer = self._producers.pop(name, None)
        if producer is not None:
            await _close(producer)

    async def write(self, stream: str, producer_name: str, entries: Sequence[StreamWrite]) -> None:
        if not entries:
            return
        self._check_open()
        producer = await self._producer(producer_name)
        waiting: set[int] = set()
        failed: list[ConfirmationStatus] = []
        done = anyio.Event()

        def on_confirm(status: ConfirmationStatus) -> None:
            waiting.discard(status.message_id)
            if not status.is_confirmed:
                failed.append(status)
            if not waiting or failed:
                done.set()

        try:
            # Sent whole or not at all (the first send also declares the publisher on a
            # connection of its own, which a cancellation would leak); the wait for the
            # confirms can be cancelled.
            with anyio.CancelScope(shield=True), anyio.fail_after(self.confirm_timeout):
                for frame in _frames(entries, producer_name):
                    waiting.update(m.publishing_id for m in frame if m.publishing_id is not None)
                    await producer.send_batch(
                        stream, frame, publisher_name=producer_name, on_publish_confirm=on_confirm
                    )
            with anyio.move_on_after(self.confirm_timeout) as deadline:
                await done.wait()
        except rstream_errors.StreamDoesNotExist:
            raise _no_stream(stream) from None
        except CONNECTION_ERRORS as exc:
            await self._drop_producer(producer_name)
            raise BusUnavailableError(self.address.where, f"writing to {stream!r}: {exc}") from None
        if failed or deadline.cancelled_caught:
            await self._drop_producer(producer_name)  # a fresh one asks the broker its last id
            why = (
                f"the broker refused entry {failed[0].message_id} (code {failed[0].response_code})"
                if failed
                else f"{len(waiting)} entries unconfirmed after {self.confirm_timeout:g}s"
            )
            raise PublishNotConfirmedError(
                f"stream {stream!r}, producer {producer_name!r}: {why}; the relay writes the "
                "batch again (the broker drops what it already holds)"
            )

    # --- the tail ----------------------------------------------------------------------

    async def tail(self, stream: str, producer_name: str) -> StreamEntry | None:
        self._check_open()
        producer = await self._producer(producer_name)
        try:
            client = await producer.default_client
            last = await client.query_publisher_sequence(stream, producer_name)
        except rstream_errors.StreamDoesNotExist:
            raise _no_stream(stream) from None
        except CONNECTION_ERRORS as exc:
            await self._drop_producer(producer_name)
            raise BusUnavailableError(self.address.where, f"asking {stream!r}: {exc}") from None
        if not last:
            # 0 also answers for a stream that does not exist (rstream drops the code)
            if not await self._exists(producer, stream):
                raise _no_stream(stream)
            return None
        with anyio.fail_after(self.confirm_timeout):
            return await self._find(stream, producer_name, last)

    async def _exists(self, producer: Producer, stream: str) -> bool:
        try:
            return bool(await producer.stream_exists(stream))
        except CONNECTION_ERRORS as exc:
            raise BusUnavailableError(self.address.where, f"asking {stream!r}: {exc}") from None

    async def _find(self, stream: str, producer_name: str, last: int) -> StreamEntry:
        """The entry ``producer_name`` wrote with publishing id ``last``: in the last chunk,
        else in windows four times larger each, further back."""
        end: int | None = None  # the first offset of the last chunk
        async with self._subscription(stream, None, 4, producer_name) as reader:
            entries = reader.entries()
            while True:
                # the last chunk, and whatever is written meanwhile, until a quiet moment
                with anyio.move_on_after(1.0 if end is not None else self.confirm_timeout):
                    entry = await anext(entries)
                    end = entry.offset if end is None else end
                    if reader.wrote(entry) == producer_name and entry.publishing_id == last:
                        return entry
                    continue
                break
        window, stop = 500, end or 0
        while stop > 0:
            start = max(0, stop - window)
            async with self._subscription(stream, start, 4, producer_name) as reader:
                async for entry in reader.entries():
                    if entry.offset >= stop:
                        break
                    if reader.wrote(entry) == producer_name and entry.publishing_id == last:
                        return entry
            stop, window = start, window * 4
        raise BusError(
            f"stream {stream!r}: producer {producer_name!r} last wrote publishing id {last}, "
            "and the stream no longer holds that entry (retention?)"
        )

    # --- reading -------------------------------------------------------------------------

    @asynccontextmanager
    async def read(
        self, stream: str, offset: int, credit: int
    ) -> AsyncIterator[AsyncIterator[Sequence[StreamEntry]]]:
        self._check_open()
        reader = _Reader(self, stream, offset, credit)
        try:
            yield reader.chunks()
        finally:
            await reader.close()

    @asynccontextmanager
    async def _subscription(
        self, stream: str, offset: int | None, credit: int, producer: str | None = None
    ) -> AsyncIterator[_Reader]:
        """Entries from ``offset`` (None: the last chunk) until the subscription ends (only
        ``producer``'s, if named)."""
        reader = _Reader(self, stream, offset, credit, reconnect=False, producer=producer)
        try:
            yield reader
        finally:
            await reader.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailableError(self.address.where, "the bus is closed")


_LOST = object()  # put in a reader's buffer when its subscription's connection closed


class _Reader:
    """One read of a stream, subscribed again after a dropped connection."""

    def __init__(
        self,
        streams: RabbitStreams,
        stream: str,
        offset: int | None,
        credit: int,
        *,
        reconnect: bool = True,
        producer: str | None = None,
    ) -> None:
        self.streams = streams
        self.producer = producer
        self._writers: dict[int, str] = {}  # offset -> producer, when ``producer`` is set
        self.stream = stream
        self.next = offset
        self.credit = credit
        self.reconnect = reconnect
        self._consumer: Consumer | None = None
        self._send: MemoryObjectSendStream[object] | None = None
        self._receive: MemoryObjectReceiveStream[object] | None = None

    async def _subscribe(self) -> None:
        address = self.streams.address
        send, receive = anyio.create_memory_object_stream[object](max(64, self.credit * 64))
        self._send, self._receive = send, receive
        producer = self.producer

        async def on_message(message: bytes, context: MessageContext) -> None:
            if producer is None:
                entry = decode_entry(context.offset, data_section_body(message))
            else:
                wrote, entry = decode_written_entry(context.offset, data_section_body(message))
                self._writers[entry.offset] = wrote
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                try:
                    send.send_nowait(entry)  # no checkpoint per entry while there is room
                except anyio.WouldBlock:
                    await send.send(entry)  # full: rstream holds the chunk's credit meanwhile

        async def on_close(_: object) -> None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await send.send(_LOST)

        consumer = Consumer(
            **address.client_arguments(),
            on_close_handler=on_close,
            recovery_strategy=BackOffRecoveryStrategy(False),
            connection_name=f"magasin-reader-{self.stream}",
        )
        self._consumer = consumer
        spec = (
            ConsumerOffsetSpecification(OffsetType.LAST, None)
            if self.next is None
            else ConsumerOffsetSpecification(OffsetType.OFFSET, self.next)
        )
        try:
            # Not cancellable (a cancelled connect leaks rstream's socket), but bounded.
            with anyio.CancelScope(shield=True), anyio.fail_after(self.streams.confirm_timeout):
                await consumer.start()
                await consumer.subscribe(
                    self.stream, on_message, offset_specification=spec, initial_credit=self.credit
                )
        except rstream_errors.StreamDoesNotExist:
            await self._close_consumer()
            raise _no_stream(self.stream) from None
        except BaseException:
            await self._close_consumer()
            raise

    async def _resubscribe(self) -> None:
        """Subscribe again from ``next``, with backoff, for up to ``reconnect_timeout``."""
        await self._close_consumer()
        deadline = anyio.current_time() + self.streams.reconnect_timeout
        pause = 0.2
        while True:
            try:
                await self._subscribe()
            except UnknownQueueError:
                raise
            except CONNECTION_ERRORS as exc:
                if anyio.current_time() + pause > deadline:
                    raise BusUnavailableError(
                        self.streams.address.where,
                        f"reading {self.stream!r} from offset {self.next}: {exc}",
                    ) from None
                logger.warning(
                    "stream {stream}: cannot subscribe again ({exc}); retrying in {pause:g}s",
                    stream=self.stream,
                    exc=exc,
                    pause=pause,
                )
                await anyio.sleep(pause)
                pause = min(5.0, pause * 2)
                continue
            return

    def wrote(self, entry: StreamEntry) -> str:
        """Who wrote ``entry`` (readers opened with a ``producer`` only)."""
        return self._writers.pop(entry.offset, "")

    async def entries(self) -> AsyncIterator[StreamEntry]:
        while True:
            if self._receive is None:
                if self.reconnect:
                    await self._resubscribe()
                else:
                    await self._subscribe()
            assert self._receive is not None
            item = await self._receive.receive()
            if item is _LOST:
                if not self.reconnect:
                    raise BusUnavailableError(
                        self.streams.address.where, f"the connection reading {self.stream!r} closed"
                    )
                logger.warning(
                    "stream {stream}: connection lost; subscribing again from offset {offset}",
                    stream=self.stream,
                    offset=self.next,
                )
                await self._close_consumer()
                continue
            assert isinstance(item, StreamEntry)
            if self.next is not None and item.offset < self.next:
                continue  # a chunk starts before the offset asked for
            self.next = item.offset + 1
            yield item

    async def chunks(self) -> AsyncIterator[Sequence[StreamEntry]]:
        entries = self.entries()
        while True:
            chunk = [await anext(entries)]
            receive = self._receive
            while receive is not None and len(chunk) < 500:
                try:
                    item = receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                if item is _LOST:
                    # hand it back to ``entries`` on the next round
                    await self._close_consumer()
                    break
                assert isinstance(item, StreamEntry)
                if self.next is not None and item.offset < self.next:
                    continue
                self.next = item.offset + 1
                chunk.append(item)
            yield chunk

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        send, self._send = self._send, None
        receive, self._receive = self._receive, None
        if send is not None:
            send.close()
        if receive is not None:
            receive.close()
        if consumer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await _close(consumer)

    async def close(self) -> None:
        await self._close_consumer()


def _frames(entries: Sequence[StreamWrite], producer: str) -> list[list[RawMessage]]:
    """The entries as AMQP 1.0 messages, split into frames under ``FRAME_BUDGET`` bytes."""
    frames: list[list[RawMessage]] = [[]]
    size = 0
    for entry in entries:
        data = amqp_data_section(encode_entry(entry, producer))
        if frames[-1] and size + len(data) > FRAME_BUDGET:
            frames.append([])
            size = 0
        frames[-1].append(RawMessage(data, publishing_id=entry.publishing_id))
        size += len(data) + 16
    return frames


def _no_stream(stream: str) -> UnknownQueueError:
    return UnknownQueueError(f"stream {stream!r} does not exist; declare the bus plan first")


async def _quietly(closing: Any) -> None:
    """Await an rstream close, whatever state its connection is in."""
    with contextlib.suppress(Exception):
        await closing


async def _close(entity: Producer | Consumer) -> None:
    """Close an rstream producer or consumer and every socket it opened. rstream 1.1.1's
    ``Client.close`` leaves the socket of a connection the broker closed open (it only
    closes live ones), which leaks a transport per dropped connection."""
    pool = getattr(entity, "_pool", None)
    clients = [c for cs in getattr(pool, "_clients", {}).values() for c in cs]
    await _quietly(entity.close())
    for client in clients:
        writer = getattr(getattr(client, "_conn", None), "_writer", None)
        if writer is not None and not writer.is_closing():
            writer.close()
