"""The stream contract on the in-process bus, plus what only it can show quickly:
retention dropping the head, and a tail lost as by a broker crash."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import BusPlan, StreamSpec, StreamWrite
from runtime.bus.streams import (
    amqp_data_section,
    data_section_body,
    decode_entry,
    decode_written_entry,
    encode_entry,
)
from runtime.errors import BusUnavailableError, MessageDecodeError
from tests.contracts.streams import (
    StreamContract,
    declared_queue,
    entries,
    read_entries,
    read_until,
    unique,
    write_sentinel,
)


class TestMemoryStreams(StreamContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MemoryBus]:
        async with MemoryBus() as bus:
            yield bus


@pytest.fixture
async def memory_bus() -> AsyncIterator[MemoryBus]:
    async with MemoryBus() as bus:
        yield bus


async def test_retention_by_size_drops_the_head_and_a_read_starts_at_the_first_kept(
    memory_bus: MemoryBus,
) -> None:
    spec = StreamSpec(unique("stream"), max_length_bytes=100)
    await memory_bus.declare(BusPlan(streams=(spec,)))
    body = b'"' + b"x" * 28 + b'"'  # 30 bytes: three entries fit, a fourth does not
    await memory_bus.write_stream(
        spec.name, "p", [StreamWrite(i, "k", f"m-{i}", body) for i in range(1, 11)]
    )
    got = await read_entries(memory_bus, spec.name, 0, 3)
    assert [(e.offset, e.publishing_id) for e in got] == [(7, 8), (8, 9), (9, 10)]
    queue = await declared_queue(memory_bus)
    async with memory_bus.consume_stream(
        spec.name, queue=queue, offset=2, routing_keys=["#"], prefetch=10
    ) as deliveries:
        first = await anext(aiter(deliveries))
        assert (deliveries.requested, deliveries.first_offset) == (2, 7)
        assert first.delivery_tag == 7
        assert deliveries.settled == 7


async def test_retention_by_age_drops_what_is_older(memory_bus: MemoryBus) -> None:
    spec = StreamSpec(unique("stream"), max_age=0.05)
    await memory_bus.declare(BusPlan(streams=(spec,)))
    await memory_bus.write_stream(spec.name, "p", entries(1, 3))
    await anyio.sleep(0.1)
    await memory_bus.write_stream(spec.name, "p", entries(4, 4))
    assert [e.offset for e in await read_entries(memory_bus, spec.name, 0, 1)] == [3]


async def test_a_lost_tail_is_what_the_stream_and_its_deduplication_forget(
    memory_bus: MemoryBus,
) -> None:
    spec = StreamSpec(unique("stream"))
    await memory_bus.declare(BusPlan(streams=(spec,)))
    await memory_bus.write_stream(spec.name, "relay", entries(1, 10))
    await memory_bus.write_stream(spec.name, "other", entries(1, 2))  # offsets 10, 11
    memory_bus.lose_stream_tail(spec.name, 5)  # offsets 7 to 11 are gone
    tail = await memory_bus.stream_tail(spec.name, "relay")
    assert tail is not None
    assert (tail.offset, tail.publishing_id) == (6, 7)
    assert await memory_bus.stream_tail(spec.name, "other") is None
    # The relay writes 8 to 10 again: the stream takes them, at the offsets they lost.
    await memory_bus.write_stream(spec.name, "relay", entries(5, 10))
    sentinel = await write_sentinel(memory_bus, spec.name)
    got = await read_until(memory_bus, spec.name, 0, sentinel)
    assert [(e.offset, e.publishing_id) for e in got] == [(i, i + 1) for i in range(10)]


async def test_a_closed_bus_ends_reads_and_refuses_writes(memory_bus: MemoryBus) -> None:
    spec = StreamSpec(unique("stream"))
    await memory_bus.declare(BusPlan(streams=(spec,)))
    await memory_bus.write_stream(spec.name, "p", entries(1, 1))
    async with memory_bus.read_stream(spec.name, 0) as chunks:
        assert len(await anext(chunks)) == 1
        await memory_bus.close()
        with anyio.fail_after(5), pytest.raises(StopAsyncIteration):
            await anext(chunks)
    with pytest.raises(BusUnavailableError):
        await memory_bus.write_stream(spec.name, "p", entries(2, 2))


# --- the entry format (both buses write it; the RabbitMQ bus reads it back) ----------------


def test_an_entry_is_an_amqp_data_section_holding_its_json() -> None:
    write = StreamWrite(7, "complaint.Created", "m-7", b'{"a": [1, 2]}', {"x-ordering-key": "c"})
    encoded = encode_entry(write, "relay")
    message = amqp_data_section(encoded)
    assert message[:5] == b"\x00\x53\x75\xa0" + bytes((len(encoded),))
    assert data_section_body(message) == encoded
    producer, read = decode_written_entry(3, encoded)
    assert producer == "relay"
    assert (read.offset, read.publishing_id, read.routing_key) == (3, 7, "complaint.Created")
    assert (read.message_id, read.body, read.headers) == ("m-7", b'{"a": [1, 2]}', write.headers)
    assert decode_entry(3, encoded) == read


def test_a_long_entry_gets_a_four_byte_length() -> None:
    write = StreamWrite(1, "k", "m", b'"' + b"y" * 400 + b'"')
    encoded = encode_entry(write)
    message = amqp_data_section(encoded)
    assert message[:4] == b"\x00\x53\x75\xb0"
    assert int.from_bytes(message[4:8], "big") == len(encoded)
    assert data_section_body(message) == encoded
    assert decode_written_entry(0, encoded)[0] == ""  # written without a producer


def test_what_is_not_an_entry_is_a_decode_error() -> None:
    with pytest.raises(MessageDecodeError):
        data_section_body(b"\x00\x53\x77\xa1\x01x")  # an AMQP value section, not data
    with pytest.raises(MessageDecodeError):
        decode_entry(0, b'{"not": "an entry"}')
