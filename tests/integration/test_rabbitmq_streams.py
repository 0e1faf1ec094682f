"""The stream contract on RabbitMQ (the stream protocol, rstream), plus what only a real
broker can show: dropped connections while reading and writing, an AMQP 0.9.1 reader of
the entries, retention below the offset asked for, the stream plugin being off.

The tests run in a virtual host of this module's own (``close_all_connections`` then drops
only their connections), and check that its streams are gone with it.

``side``: the stream side the bus connects (``RabbitMQBus.connect``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage

from runtime.bus import rabbitmq_streams as rabbit_streams
from runtime.bus.protocol import BusPlan, QueueSpec, StreamEntry, StreamSpec, StreamWrite
from runtime.bus.rabbitmq import RabbitMQBus, stream_url_for
from runtime.errors import BusError, BusUnavailableError, PublishNotConfirmedError
from tests.contracts.bus import eventually
from tests.contracts.streams import (
    READ_TIMEOUT,
    StreamContract,
    declared_stream,
    entries,
    read_until,
    stream_of,
    unique,
    write_sentinel,
)
from tests.support.rabbitmq import (
    HOST,
    PORT,
    close_connections,
    connection_names,
    create_vhost,
    rabbitmqctl,
)

pytestmark = pytest.mark.integration

MINE = rabbit_streams.RabbitStreams
SIDES = ["default"]  # the bus's own stream side
ConnectBus = Callable[[], Awaitable[RabbitMQBus]]


def _streams_of(vhost: str) -> str:
    """The stream directories the broker holds for ``vhost`` (``<vhost>_<stream>_<id>``)."""
    listing = rabbitmqctl(
        "eval", "file:list_dir(element(2, application:get_env(osiris, data_dir)))."
    )
    return " ".join(name for name in listing.split('"') if name.startswith(f"{vhost}_"))


@pytest.fixture(scope="module")
def stream_vhost() -> Iterator[str]:
    vhost = create_vhost()
    name = next(vhost)
    assert not _streams_of(name)
    yield name
    for _ in vhost:  # deletes the vhost
        pass
    # Its streams went with it (not only their queues: their data on disk).
    deadline = time.monotonic() + 30
    while left := _streams_of(name):
        assert time.monotonic() < deadline, f"vhost {name} is deleted, its streams are not: {left}"
        time.sleep(0.3)


async def declare_classic_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def stream_amqp_url(stream_vhost: str) -> str:
    return f"amqp://guest:guest@{HOST}:{PORT}/{stream_vhost}"


@pytest.fixture(params=SIDES)
async def connect_bus(
    request: pytest.FixtureRequest, stream_amqp_url: str
) -> AsyncIterator[ConnectBus]:
    """Connects buses (closed at the end) with the stream side of ``request.param``."""
    buses: list[RabbitMQBus] = []

    async def connect() -> RabbitMQBus:
        name = f"magasin-test-{uuid.uuid4().hex[:8]}"
        bus = await RabbitMQBus.connect(stream_amqp_url, name=name, reconnect_interval=0.2)
        buses.append(bus)
        if request.param == "rabbit_streams":
            await bus._streams.close()
            bus._streams = await MINE.connect(stream_url_for(stream_amqp_url), name=name)
        return bus

    yield connect
    for bus in buses:
        await bus.close()


@pytest.fixture
async def rabbitmq_bus(connect_bus: ConnectBus) -> RabbitMQBus:
    return await connect_bus()


class TestRabbitMQStreams(StreamContract):
    @pytest.fixture
    def bus(self, rabbitmq_bus: RabbitMQBus) -> RabbitMQBus:
        return rabbitmq_bus


async def write_batches(bus: RabbitMQBus, stream: str, batches: int, size: int = 50) -> None:
    for batch in range(batches):
        await bus.write_stream(stream, "relay", entries(batch * size + 1, (batch + 1) * size))


async def read_more(
    chunks: AsyncIterator[list[StreamEntry]], got: list[StreamEntry], until: int
) -> None:
    got.extend(await stream_of(chunks, until - len(got)))


# --- the tail across connections --------------------------------------------------------------


async def test_a_new_connection_finds_the_same_tail(connect_bus: ConnectBus) -> None:
    first = await connect_bus()
    stream = await declared_stream(first)
    await first.write_stream(stream, "relay", entries(1, 20))
    await first.write_stream(stream, "other", entries(1, 5))
    tail = await first.stream_tail(stream, "relay")
    await first.close()
    second = await connect_bus()  # as a restarted relay would
    assert await second.stream_tail(stream, "relay") == tail
    assert tail is not None
    assert (tail.offset, tail.publishing_id) == (19, 20)
    # The restarted relay writes from its tail on: only what is new is kept.
    await second.write_stream(stream, "relay", entries(11, 25))
    tail = await second.stream_tail(stream, "relay")
    assert tail is not None
    assert (tail.offset, tail.publishing_id) == (29, 25)


# --- dropped connections -------------------------------------------------------------------


async def test_a_reader_whose_connection_drops_gets_every_entry_once_in_order(
    rabbitmq_bus: RabbitMQBus, stream_vhost: str
) -> None:
    stream = await declared_stream(rabbitmq_bus)
    await write_batches(rabbitmq_bus, stream, 40)  # 2,000 entries
    got: list[StreamEntry] = []
    # Little credit: most of the stream is still on the broker when the connection drops.
    async with rabbitmq_bus.read_stream(stream, 0, credit=2) as chunks:
        await read_more(chunks, got, 300)
        await anyio.to_thread.run_sync(close_connections, stream_vhost)
        await read_more(chunks, got, 1200)
        await anyio.to_thread.run_sync(close_connections, stream_vhost)
        await read_more(chunks, got, 2000)
    assert [e.publishing_id for e in got] == list(range(1, 2001))
    assert [e.offset for e in got] == list(range(2000))


async def test_a_writer_whose_connection_drops_writes_again_and_nothing_is_lost_or_doubled(
    rabbitmq_bus: RabbitMQBus, stream_vhost: str
) -> None:
    stream = await declared_stream(rabbitmq_bus)
    reached = {5: anyio.Event(), 15: anyio.Event()}  # batches confirmed: drop the connections

    async def writer() -> None:
        for batch in range(30):
            with anyio.fail_after(120):
                while True:
                    try:
                        await rabbitmq_bus.write_stream(
                            stream, "relay", entries(batch * 50 + 1, batch * 50 + 50)
                        )
                        break
                    except (BusUnavailableError, PublishNotConfirmedError):
                        await anyio.sleep(0.2)  # as the relay does: write it again
            if batch + 1 in reached:
                reached[batch + 1].set()

    async def chaos() -> None:
        for event in reached.values():
            with anyio.fail_after(120):
                await event.wait()
            await anyio.to_thread.run_sync(close_connections, stream_vhost)

    got: list[StreamEntry] = []
    async with rabbitmq_bus.read_stream(stream, 0) as chunks, anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(chaos)
        await read_more(chunks, got, 1500)
    sentinel = await write_sentinel(rabbitmq_bus, stream)
    everything = await read_until(rabbitmq_bus, stream, 0, sentinel)
    assert [e.publishing_id for e in got[:1500]] == list(range(1, 1501))
    assert everything == got[:1500]
    assert [e.offset for e in everything] == list(range(1500))


# --- other readers, retention, refusals -------------------------------------------------------


async def test_an_amqp_0_9_1_reader_gets_each_entry_as_its_json(
    rabbitmq_bus: RabbitMQBus, stream_amqp_url: str
) -> None:
    stream = await declared_stream(rabbitmq_bus)
    written = [
        StreamWrite(1, "complaint.Created", "m-1", b'{"id": "c-1", "n": [1, 2]}', {"h": "v"}),
        StreamWrite(2, "complaint.Closed", "m-2", b'"' + b"z" * 500 + b'"', {"n": 2}),
    ]
    await rabbitmq_bus.write_stream(stream, "relay", written)
    bodies: list[bytes] = []
    both = anyio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        bodies.append(message.body)
        await message.ack()
        if len(bodies) == 2:
            both.set()

    connection = await aio_pika.connect(stream_amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)  # a stream wants a prefetch
        queue = await channel.declare_queue(stream, passive=True)
        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        with anyio.fail_after(READ_TIMEOUT):
            await both.wait()
        assert not connection.is_closed
    finally:
        await connection.close()
    first, second = (json.loads(body) for body in bodies)
    assert first == {
        "publishing_id": 1,
        "routing_key": "complaint.Created",
        "message_id": "m-1",
        "headers": {"h": "v"},
        "body": {"id": "c-1", "n": [1, 2]},
        "producer": "relay",
    }
    assert (second["message_id"], second["body"]) == ("m-2", "z" * 500)


async def test_an_offset_retention_removed_starts_at_the_first_entry_kept(
    rabbitmq_bus: RabbitMQBus,
) -> None:
    spec = StreamSpec(unique("stream"), max_length_bytes=20_000, max_segment_size_bytes=5_000)
    await rabbitmq_bus.declare(BusPlan(streams=(spec,)))
    await write_batches(rabbitmq_bus, spec.name, 40)  # ~10 kB a batch: a segment each
    sentinel = await write_sentinel(rabbitmq_bus, spec.name)

    async def retained() -> list[StreamEntry] | None:  # retention runs after a segment rolls
        kept = await read_until(rabbitmq_bus, spec.name, 0, sentinel)
        return kept if kept[0].offset > 0 else None

    kept = await eventually(retained, within=READ_TIMEOUT)
    ids = [e.publishing_id for e in kept]
    assert ids == list(range(ids[0], 2001))
    assert ids[0] > 1
    offsets = [e.offset for e in kept]
    assert offsets == sorted(set(offsets))  # growing (a new segment starts past an offset)
    queue = QueueSpec(unique("q"), retry_delays=(0.2,))
    await rabbitmq_bus.declare(BusPlan(queues=(queue,)))
    async with rabbitmq_bus.consume_stream(
        spec.name, queue=queue.name, offset=1, routing_keys=["#"], prefetch=10
    ) as deliveries:
        with anyio.fail_after(READ_TIMEOUT):
            first = await anext(aiter(deliveries))
        assert deliveries.requested == 1
        assert deliveries.first_offset is not None
        assert deliveries.first_offset >= offsets[0]
        assert first.delivery_tag == deliveries.first_offset


async def test_without_the_stream_plugin_connecting_says_how_to_enable_it(
    stream_amqp_url: str, stream_vhost: str
) -> None:
    name = f"magasin-test-{uuid.uuid4().hex[:8]}"
    closed_port = f"rabbitmq-stream://guest:s3cret@{HOST}:1/{stream_vhost}"
    with pytest.raises(BusUnavailableError) as caught:
        await RabbitMQBus.connect(stream_amqp_url, name=name, stream_url=closed_port)
    assert "rabbitmq-plugins enable rabbitmq_stream" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(BusUnavailableError) as direct:
        await MINE.connect(closed_port, name=name, connect_timeout=5)
    assert "rabbitmq-plugins enable rabbitmq_stream" in str(direct.value)

    async def amqp_connection_closed() -> bool:  # the one made first (tracking lags a bit)
        return name not in await anyio.to_thread.run_sync(connection_names, stream_vhost)

    await eventually(amqp_connection_closed, within=READ_TIMEOUT)


@pytest.mark.parametrize(
    ("amqp_url", "stream_url"),
    [
        (
            "amqp://guest:guest@127.0.0.1:5672/magasin",
            "rabbitmq-stream://guest:guest@127.0.0.1:5552/magasin",
        ),
        ("amqp://u:p%40ss@broker/", "rabbitmq-stream://u:p%40ss@broker:5552/"),
        ("amqp://u:p@broker:5672/%2F?heartbeat=5", "rabbitmq-stream://u:p@broker:5552/%2F"),
        ("amqp://broker", "rabbitmq-stream://broker:5552"),
    ],
)
def test_the_stream_url_is_the_amqp_one_on_port_5552(amqp_url: str, stream_url: str) -> None:
    assert stream_url_for(amqp_url) == stream_url
    assert rabbit_streams.stream_url_for(amqp_url) == stream_url


def test_a_stream_url_names_host_port_vhost_and_credentials() -> None:
    parse = rabbit_streams.StreamAddress.parse
    assert parse("rabbitmq-stream://u:p%40ss@broker:5553/my%20vhost") == (
        rabbit_streams.StreamAddress("broker", 5553, "my vhost", "u", "p@ss")
    )
    assert parse("rabbitmq-stream://broker").vhost == "/"
    assert parse("rabbitmq-stream://u:p@broker:5552/%2F").vhost == "/"
    with pytest.raises(BusError, match="rabbitmq-stream://"):
        parse("amqp://broker")
