"""The stream contract: ``write_stream``, ``stream_tail``, ``read_stream`` and
``consume_stream``, run against both buses.

A bus's test module subclasses ``StreamContract`` and provides a ``bus`` fixture (entered,
connected, closed afterwards). Every test declares its own streams and queues under fresh
names, so tests share nothing and rerun cleanly on a real broker.

Choices the contract pins down:
- the first entry ever written to a stream is at offset 0, and a stream that no retention
  touched holds the entries at consecutive offsets (a broker that rolled a segment over may
  skip an offset there: readers only rely on offsets growing);
- a producer's publishing ids deduplicate that producer's entries only;
- ``settled`` is where to resume: every entry before it was settled (acked, retried or
  dead-lettered) or is not for the actor; it stays at the oldest unsettled delivery.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import anyio
import msgspec
import pytest
from anyio.abc import TaskStatus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.bus.protocol import (
    X_ATTEMPTS,
    X_ERROR,
    X_ORDERING_KEY,
    Bus,
    BusPlan,
    Delivery,
    QueueSpec,
    StreamDeliveries,
    StreamEntry,
    StreamSpec,
    StreamWrite,
)
from runtime.errors import BusError, UnknownQueueError
from tests.contracts.bus import eventually

READ_TIMEOUT = 30.0  # generous: a noisy 2-core machine, and a broker reconnecting


def unique(kind: str) -> str:
    return f"test.{kind}.{uuid.uuid4().hex[:10]}"


async def declared_stream(bus: Bus) -> str:
    spec = StreamSpec(unique("stream"))
    await bus.declare(BusPlan(streams=(spec,)))
    return spec.name


async def declared_queue(bus: Bus) -> str:
    spec = QueueSpec(unique("q"), retry_delays=(0.2, 0.4))
    await bus.declare(BusPlan(queues=(spec,)))
    return spec.name


def entry(
    publishing_id: int, routing_key: str = "complaint.Created", **headers: str
) -> StreamWrite:
    return StreamWrite(
        publishing_id,
        routing_key,
        f"m-{publishing_id}-{uuid.uuid4().hex[:6]}",
        b'{"n": %d, "text": "caf\\u00e9"}' % publishing_id,
        headers,
    )


def entries(first: int, last: int, routing_key: str = "complaint.Created") -> list[StreamWrite]:
    """Entries with publishing ids ``first`` to ``last`` (inclusive)."""
    return [entry(i, routing_key) for i in range(first, last + 1)]


async def read_entries(bus: Bus, stream: str, offset: int, count: int) -> list[StreamEntry]:
    """The first ``count`` entries from ``offset`` on (waiting for them, within bounds)."""
    got: list[StreamEntry] = []
    with anyio.fail_after(READ_TIMEOUT):
        async with bus.read_stream(stream, offset) as chunks:
            async for chunk in chunks:
                got.extend(chunk)
                if len(got) >= count:
                    break
    return got[:count]


async def stream_of(chunks: AsyncIterator[Sequence[StreamEntry]], count: int) -> list[StreamEntry]:
    """The next ``count`` entries (at least) of an open read."""
    got: list[StreamEntry] = []
    with anyio.fail_after(READ_TIMEOUT):
        while len(got) < count:
            got.extend(await anext(chunks))
    return got


async def read_until(bus: Bus, stream: str, offset: int, message_id: str) -> list[StreamEntry]:
    """Every entry from ``offset`` up to the one with ``message_id`` (excluded): what a
    stream holds before a sentinel, with no waiting for "nothing more"."""
    got: list[StreamEntry] = []
    with anyio.fail_after(READ_TIMEOUT):
        async with bus.read_stream(stream, offset) as chunks:
            async for chunk in chunks:
                for item in chunk:
                    if item.message_id == message_id:
                        return got
                    got.append(item)
    raise AssertionError(f"the stream ended before {message_id}")


async def write_sentinel(bus: Bus, stream: str) -> str:
    sentinel = StreamWrite(1, "sentinel", f"sentinel-{uuid.uuid4().hex}", b"{}")
    await bus.write_stream(stream, f"sentinel-{uuid.uuid4().hex[:8]}", [sentinel])
    return sentinel.message_id


def as_written(item: StreamEntry) -> StreamWrite:
    return StreamWrite(
        item.publishing_id, item.routing_key, item.message_id, item.body, item.headers
    )


async def next_delivery(deliveries: StreamDeliveries) -> Delivery:
    with anyio.fail_after(READ_TIMEOUT):
        return await anext(aiter(deliveries))


class StreamContract:
    # --- declaring ---------------------------------------------------------------------------

    async def test_declaring_a_stream_again_with_the_same_settings_is_fine(self, bus: Bus) -> None:
        spec = StreamSpec(unique("stream"), max_age=3600.0, max_length_bytes=10**8)
        await bus.declare(BusPlan(streams=(spec,)))
        await bus.write_stream(spec.name, "p", entries(1, 2))
        await bus.declare(BusPlan(streams=(spec,)))
        assert [e.publishing_id for e in await read_entries(bus, spec.name, 0, 2)] == [1, 2]

    async def test_declaring_a_stream_with_other_retention_raises_a_bus_error(
        self, bus: Bus
    ) -> None:
        spec = StreamSpec(unique("stream"), max_age=3600.0)
        await bus.declare(BusPlan(streams=(spec,)))
        for other in (
            StreamSpec(spec.name, max_age=7200.0),
            StreamSpec(spec.name, max_age=3600.0, max_length_bytes=10**6),
            StreamSpec(spec.name, max_age=3600.0, max_segment_size_bytes=10**6),
        ):
            with pytest.raises(BusError, match=spec.name):
                await bus.declare(BusPlan(streams=(other,)))

    async def test_declaring_a_stream_over_a_queue_raises_a_bus_error(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        with pytest.raises(BusError, match=queue):
            await bus.declare(BusPlan(streams=(StreamSpec(queue),)))

    async def test_declaring_a_queue_over_a_stream_raises_a_bus_error(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        with pytest.raises(BusError, match=stream):
            await bus.declare(BusPlan(queues=(QueueSpec(stream, retry_delays=()),)))

    async def test_an_undeclared_stream_raises_unknown_queue(self, bus: Bus) -> None:
        missing = unique("missing")
        with pytest.raises(UnknownQueueError):
            await bus.write_stream(missing, "p", entries(1, 1))
        with pytest.raises(UnknownQueueError):
            await bus.stream_tail(missing, "p")
        with pytest.raises(UnknownQueueError):
            async with bus.read_stream(missing, 0) as chunks:
                await anext(chunks)
        queue = await declared_queue(bus)  # a queue is not a stream
        with pytest.raises(UnknownQueueError):
            await bus.write_stream(queue, "p", entries(1, 1))

    # --- writing and reading -------------------------------------------------------------------

    async def test_entries_come_back_in_order_with_offsets_ids_keys_headers_and_bodies(
        self, bus: Bus
    ) -> None:
        stream = await declared_stream(bus)
        first = [
            entry(1, "complaint.Created", **{X_ORDERING_KEY: "c-1"}),
            StreamWrite(2, "complaint.Closed", "m-two", b'[1, 2.5, null, "x"]', {"n": 3}),
            StreamWrite(3, "a.b.c", "m-three", b'"just a string"', {"ok": True, "f": 1.5}),
        ]
        second = [StreamWrite(4, "x", "m-four", b"{}", {"none": None}), entry(5)]
        await bus.write_stream(stream, "relay", first)
        await bus.write_stream(stream, "relay", second)
        got = await read_entries(bus, stream, 0, 5)
        assert [e.offset for e in got] == [0, 1, 2, 3, 4]
        assert [as_written(e) for e in got] == first + second
        assert got[2].headers == {"ok": True, "f": 1.5}
        assert got[3].headers == {"none": None}

    async def test_writing_nothing_does_nothing(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "p", [])
        assert await bus.stream_tail(stream, "p") is None
        sentinel = await write_sentinel(bus, stream)
        assert await read_until(bus, stream, 0, sentinel) == []

    async def test_many_entries_in_one_write_all_arrive_in_order(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        body = b'{"padding": "' + b"x" * 3000 + b'"}'  # 1,200 entries: several frames' worth
        batch = [StreamWrite(i, "k.big", f"m-{i}", body) for i in range(1, 1201)]
        await bus.write_stream(stream, "p", batch)
        got = await read_entries(bus, stream, 0, 1200)
        assert [e.publishing_id for e in got] == list(range(1, 1201))
        assert [e.offset for e in got] == list(range(1200))
        assert {e.body for e in got} == {body}

    async def test_reading_from_a_middle_offset_starts_there(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "p", entries(1, 10))
        got = await read_entries(bus, stream, 6, 4)
        assert [(e.offset, e.publishing_id) for e in got] == [(6, 7), (7, 8), (8, 9), (9, 10)]

    async def test_a_waiting_reader_gets_entries_written_later(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "p", entries(1, 2))
        got: list[StreamEntry] = []

        async def reader(*, task_status: TaskStatus[None]) -> None:
            async with bus.read_stream(stream, 0) as chunks:
                task_status.started()
                got.extend(await stream_of(chunks, 4))

        async with anyio.create_task_group() as tg:
            await tg.start(reader)
            await anyio.sleep(0.2)  # the reader waits at the end of the stream meanwhile
            await bus.write_stream(stream, "p", entries(3, 4))
        assert [(e.offset, e.publishing_id) for e in got] == [(0, 1), (1, 2), (2, 3), (3, 4)]

    async def test_a_read_from_past_the_end_waits_for_that_offset(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "p", entries(1, 2))  # offsets 0 and 1
        async with bus.read_stream(stream, 3) as chunks:
            await bus.write_stream(stream, "p", entries(3, 6))  # offsets 2 to 5
            got = await stream_of(chunks, 3)
        assert [(e.offset, e.publishing_id) for e in got] == [(3, 4), (4, 5), (5, 6)]

    # --- deduplication -------------------------------------------------------------------------

    async def test_a_producer_writing_publishing_ids_again_writes_only_the_new_ones(
        self, bus: Bus
    ) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "relay", entries(1, 100))
        await bus.write_stream(stream, "relay", entries(51, 150))
        await bus.write_stream(stream, "relay", entries(150, 150))
        sentinel = await write_sentinel(bus, stream)
        got = await read_until(bus, stream, 0, sentinel)
        assert [e.publishing_id for e in got] == list(range(1, 151))
        assert [e.offset for e in got] == list(range(150))

    async def test_producers_deduplicate_independently(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "a", entries(1, 3, "from.a"))
        await bus.write_stream(stream, "b", entries(1, 3, "from.b"))
        await bus.write_stream(stream, "a", entries(2, 4, "from.a"))
        sentinel = await write_sentinel(bus, stream)
        got = await read_until(bus, stream, 0, sentinel)
        assert [(e.routing_key, e.publishing_id) for e in got] == [
            ("from.a", 1),
            ("from.a", 2),
            ("from.a", 3),
            ("from.b", 1),
            ("from.b", 2),
            ("from.b", 3),
            ("from.a", 4),
        ]

    @settings(
        max_examples=12,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        writes=st.lists(
            st.tuples(
                st.sampled_from(["a", "b"]),
                st.integers(min_value=1, max_value=40),  # first publishing id
                st.integers(min_value=1, max_value=15),  # how many
            ),
            min_size=1,
            max_size=6,
        )
    )
    async def test_what_is_read_is_the_deduplicated_sequence_of_writes(
        self, bus: Bus, writes: list[tuple[str, int, int]]
    ) -> None:
        stream = await declared_stream(bus)
        expected: list[tuple[str, int]] = []
        last = {"a": 0, "b": 0}
        for producer, first, count in writes:
            batch = [
                StreamWrite(i, f"from.{producer}", f"{producer}-{i}", b"%d" % i)
                for i in range(first, first + count)
            ]
            await bus.write_stream(stream, producer, batch)
            for i in range(first, first + count):
                if i > last[producer]:
                    expected.append((producer, i))
                    last[producer] = i
        sentinel = await write_sentinel(bus, stream)
        got = await read_until(bus, stream, 0, sentinel)
        assert [(e.message_id.split("-")[0], e.publishing_id) for e in got] == expected
        assert [e.offset for e in got] == list(range(len(expected)))

    # --- the tail ------------------------------------------------------------------------------

    async def test_the_tail_of_a_producer_that_wrote_nothing_is_none(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        assert await bus.stream_tail(stream, "relay") is None
        await bus.write_stream(stream, "other", entries(1, 3))
        assert await bus.stream_tail(stream, "relay") is None

    async def test_the_tail_is_the_last_entry_that_producer_wrote(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "relay", entries(1, 5))
        await bus.write_stream(stream, "relay", entries(3, 7))  # 6 and 7 are new
        tail = await bus.stream_tail(stream, "relay")
        assert tail is not None
        assert (tail.offset, tail.publishing_id) == (6, 7)
        [read] = await read_entries(bus, stream, 6, 1)
        assert tail == read

    async def test_the_tail_of_a_producer_others_wrote_after(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        await bus.write_stream(stream, "a", entries(1, 3, "from.a"))
        await bus.write_stream(stream, "b", entries(1, 5, "from.b"))  # b's 3 comes after a's
        for first in (1, 401, 801):  # c writes last, in several chunks, far from a's last
            await bus.write_stream(stream, "c", entries(first, first + 399, "from.c"))
        tail_a = await bus.stream_tail(stream, "a")
        tail_b = await bus.stream_tail(stream, "b")
        assert tail_a is not None
        assert tail_b is not None
        assert (tail_a.offset, tail_a.publishing_id, tail_a.routing_key) == (2, 3, "from.a")
        assert (tail_b.offset, tail_b.publishing_id, tail_b.routing_key) == (7, 5, "from.b")

    # --- consuming -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("patterns", "expected"),
        [
            (["complaint.#"], ["complaint.Created", "complaint.Closed", "complaint.note.Added"]),
            (["*.Created"], ["complaint.Created", "invoice.Created"]),
            (["invoice.Paid"], ["invoice.Paid"]),
            (
                ["invoice.Paid", "complaint.*"],
                ["complaint.Created", "complaint.Closed", "invoice.Paid"],
            ),
            (
                ["#"],
                [
                    "complaint.Created",
                    "invoice.Created",
                    "complaint.Closed",
                    "invoice.Paid",
                    "complaint.note.Added",
                ],
            ),
        ],
    )
    async def test_consume_stream_hands_out_only_the_matching_routing_keys(
        self, bus: Bus, patterns: list[str], expected: list[str]
    ) -> None:
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        keys = [
            "complaint.Created",
            "invoice.Created",
            "complaint.Closed",
            "invoice.Paid",
            "complaint.note.Added",
        ]
        written = [entry(i, key) for i, key in enumerate(keys, start=1)]
        await bus.write_stream(stream, "relay", [*written, entry(99, "zz.end")])
        got: list[Delivery] = []
        async with bus.consume_stream(
            stream, queue=queue, offset=0, routing_keys=[*patterns, "zz.end"], prefetch=10
        ) as deliveries:
            # The last entry matches "zz.end": every matching one before it comes first.
            while not got or got[-1].routing_key != "zz.end":
                got.append(await next_delivery(deliveries))
                await bus.ack(got[-1])
            assert deliveries.settled == 6
        assert [d.routing_key for d in got[:-1]] == expected
        by_key = {w.routing_key: w for w in written}
        for delivery in got[:-1]:
            source = by_key[delivery.routing_key]
            assert delivery.message_id == source.message_id
            assert delivery.body == source.body
            assert delivery.queue == queue
            assert delivery.exchange == stream
            assert delivery.ordering_key == source.message_id  # no ordering key: the id
            assert delivery.attempts == 0

    async def test_settled_moves_past_settled_and_filtered_entries_only(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        keys = ["a.x", "b.y", "a.x", "a.x", "b.y", "a.x"]  # offsets 0..5
        await bus.write_stream(stream, "relay", [entry(i, k) for i, k in enumerate(keys, 1)])
        async with bus.consume_stream(
            stream, queue=queue, offset=0, routing_keys=["a.#"], prefetch=10
        ) as deliveries:
            assert (deliveries.requested, deliveries.settled) == (0, 0)
            d0 = await next_delivery(deliveries)
            assert deliveries.first_offset == 0
            assert deliveries.settled == 0
            d2 = await next_delivery(deliveries)  # offset 1 is not for this actor
            assert (d0.delivery_tag, d2.delivery_tag) == (0, 2)
            await bus.ack(d2)
            assert deliveries.settled == 0  # d0 is still being handled
            await bus.ack(d0)
            assert deliveries.settled == 3  # 0 and 2 settled, 1 filtered
            d3 = await next_delivery(deliveries)
            d5 = await next_delivery(deliveries)
            assert deliveries.settled == 3
            await bus.ack(d5)
            assert deliveries.settled == 3  # later ones settled: still from the oldest
            await bus.nack(d3)  # a stream has no requeue: d3 stays unsettled
            assert deliveries.settled == 3
            await bus.ack(d3)
            assert deliveries.settled == 6
            await bus.ack(d3)  # settling twice is harmless
            assert deliveries.settled == 6

    async def test_a_pinned_delivery_holds_settled_at_the_start_until_it_is_settled(
        self, bus: Bus
    ) -> None:
        """What a reader hands out from the event store before the stream's entries (a
        catch-up behind the retention) keeps the resume point where the reading started."""
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        await bus.write_stream(stream, "relay", [entry(i, "a.x") for i in range(1, 4)])
        async with bus.consume_stream(
            stream, queue=queue, offset=1, routing_keys=["#"], prefetch=10
        ) as deliveries:
            first = await next_delivery(deliveries)
            deliveries.pin(-3)
            from_store = msgspec.structs.replace(first, delivery_tag=-3, message_id="old")
            await bus.ack(first)
            assert deliveries.settled == 1  # the pinned one is not settled
            await bus.ack(from_store)
            assert deliveries.settled == 2
            with pytest.raises(ValueError, match="negative"):
                deliveries.pin(4)

    async def test_consuming_from_a_saved_offset_resumes_there(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        await bus.write_stream(stream, "relay", entries(1, 6))
        async with bus.consume_stream(
            stream, queue=queue, offset=4, routing_keys=["#"], prefetch=10
        ) as deliveries:
            first = await next_delivery(deliveries)
            assert (deliveries.requested, deliveries.first_offset) == (4, 4)
            await bus.ack(first)
            assert deliveries.settled == 5
        assert first.delivery_tag == 4

    async def test_a_retried_stream_delivery_comes_back_through_the_actors_queue(
        self, bus: Bus
    ) -> None:
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        written = entry(1, "complaint.Created", **{X_ORDERING_KEY: "c-9"})
        await bus.write_stream(stream, "relay", [written, entry(2)])
        async with bus.consume_stream(
            stream, queue=queue, offset=0, routing_keys=["#"], prefetch=10
        ) as deliveries:
            delivery = await next_delivery(deliveries)
            await bus.retry(delivery, rung=1, error=RuntimeError("boom"), actor="tests")
            assert deliveries.settled == 1
        async with bus.consume(queue, prefetch=1) as queued:
            with anyio.fail_after(READ_TIMEOUT):
                again = await anext(queued)
            await bus.ack(again)
        assert again.message_id == written.message_id
        assert again.body == written.body
        assert again.headers[X_ATTEMPTS] == 1
        assert again.headers[X_ERROR] == "boom"
        assert again.ordering_key == "c-9"
        assert again.original_exchange == stream
        assert again.original_routing_key == "complaint.Created"

    async def test_a_dead_lettered_stream_delivery_lands_in_the_actors_dlq(self, bus: Bus) -> None:
        stream = await declared_stream(bus)
        queue = await declared_queue(bus)
        await bus.write_stream(stream, "relay", entries(1, 2))
        async with bus.consume_stream(
            stream, queue=queue, offset=0, routing_keys=["#"], prefetch=10
        ) as deliveries:
            first = await next_delivery(deliveries)
            second = await next_delivery(deliveries)
            await bus.dead_letter(second, error=ValueError("never"), actor="tests")
            assert deliveries.settled == 0  # the first one is not settled yet
            await bus.ack(first)
            assert deliveries.settled == 2
        [letter] = await eventually(lambda: bus.list_dead_letters(queue), within=READ_TIMEOUT)
        assert letter.message_id == second.message_id
        assert letter.body == second.body
        assert (letter.error, letter.error_type) == ("never", "ValueError")
