"""The event store contract: the definition of the behaviour, run against both backends.

A backend's test module subclasses ``EventStoreContract`` and provides a ``store`` fixture.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest

from runtime.errors import (
    ConcurrencyError,
    EventEncodeError,
    InvalidAppendError,
    InvalidRequestError,
    StreamIdTooLongError,
)
from runtime.store import (
    MAX_ID_LENGTH,
    Checkpoint,
    EventCodec,
    EventStore,
    Metadata,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StreamId,
)
from runtime.store.protocol import ParkedKey
from tests.support.ledger import Deposited, LedgerEvent, Opened, Withdrawn

CODEC = EventCodec().register(LedgerEvent)


def ledger(name: str | None = None) -> StreamId:
    return StreamId("ledger", name or f"acc-{uuid.uuid4().hex[:10]}")


def new(payload: msgspec.Struct, **meta: Any) -> NewEvent:
    return NewEvent(payload=payload, metadata=Metadata(**meta))


def payloads(records: list[RecordedEvent]) -> list[msgspec.Struct]:
    return [CODEC.decode(r).payload for r in records]


class Opaque(msgspec.Struct, tag=True):
    value: Any


async def drain(
    store: EventStore, after: Checkpoint = Checkpoint.START, *, at_least: int = 0
) -> list[RecordedEvent]:
    """Everything ``read_all`` returns from ``after``, page by page; with ``at_least``, wait
    (bounded) until that many are visible: a transaction open anywhere in the cluster holds
    committed rows back from tailing readers, by design."""
    seen: list[RecordedEvent] = []
    with anyio.fail_after(30):
        while True:
            while batch := await store.read_all(after, limit=97):
                seen.extend(batch)
                after = batch[-1].checkpoint
            if len(seen) >= at_least:
                return seen
            await anyio.sleep(0.05)


class EventStoreContract:
    # --- appending and reading one stream -----------------------------------------------

    async def test_appended_events_read_back_in_version_order(self, store: EventStore) -> None:
        stream = ledger()
        result = await store.append(
            stream, [new(Opened("ana"), correlation_id="c-1"), new(Deposited(10))], 0
        )
        assert (result.first_version, result.last_version, result.replayed) == (1, 2, False)
        assert result.last_position > result.first_position > 0
        records = await store.read_stream(stream)
        assert [r.version for r in records] == [1, 2]
        assert [r.event_type for r in records] == ["Opened", "Deposited"]
        assert payloads(records) == [Opened("ana"), Deposited(10)]
        assert records[0].metadata.correlation_id == "c-1"
        assert records[0].metadata.occurred_at is not None
        assert [r.position for r in records] == [result.first_position, result.last_position]
        assert await store.stream_version(stream) == 2

    async def test_read_stream_from_a_version(self, store: EventStore) -> None:
        stream = ledger()
        await store.append(stream, [new(Opened("a")), *[new(Deposited(i)) for i in range(1, 6)]], 0)
        records = await store.read_stream(stream, from_version=4)
        assert [r.version for r in records] == [4, 5, 6]
        assert await store.read_stream(stream, from_version=7) == []

    async def test_unknown_stream_is_empty_at_version_zero(self, store: EventStore) -> None:
        assert await store.read_stream(ledger()) == []
        assert await store.stream_version(ledger()) == 0

    async def test_appends_continue_a_stream(self, store: EventStore) -> None:
        stream = ledger()
        await store.append(stream, [new(Opened("a"))], 0)
        result = await store.append(stream, [new(Deposited(5)), new(Withdrawn(2))], 1)
        assert (result.first_version, result.last_version) == (2, 3)

    # --- optimistic concurrency -----------------------------------------------------------

    @pytest.mark.parametrize("expected", [0, 2, 5])
    async def test_wrong_expected_version_conflicts_and_writes_nothing(
        self, store: EventStore, expected: int
    ) -> None:
        stream = ledger()
        await store.append(stream, [new(Opened("a"))], 0)
        with pytest.raises(ConcurrencyError) as caught:
            await store.append(stream, [new(Deposited(1)), new(Deposited(2))], expected)
        assert (caught.value.expected, caught.value.actual) == (expected, 1)
        assert str(stream) in str(caught.value)
        assert [r.version for r in await store.read_stream(stream)] == [1]

    async def test_fifty_racers_one_winner_per_version(self, store: EventStore) -> None:
        """50 tasks read the same version, then all append at it: exactly one wins. The
        losers reload and retry until every one has appended exactly once."""
        stream = ledger()
        await store.append(stream, [new(Opened("race"))], 0)
        all_read = anyio.Event()
        readers = 0
        first_round: list[int] = []

        async def racer(n: int) -> None:
            nonlocal readers
            version = await store.stream_version(stream)
            readers += 1
            if readers == 50:
                all_read.set()
            await all_read.wait()
            while True:
                try:
                    await store.append(stream, [new(Deposited(n))], version)
                except ConcurrencyError as exc:
                    if version == 1:
                        first_round.append(exc.actual)
                    version = await store.stream_version(stream)
                    continue
                return

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(racer, n)
        records = await store.read_stream(stream)
        assert [r.version for r in records] == list(range(1, 52))
        amounts = sorted(p.amount for p in payloads(records)[1:] if isinstance(p, Deposited))
        assert amounts == list(range(50))
        assert len(first_round) == 49, "exactly one racer may win version 2"
        assert all(actual >= 2 for actual in first_round)

    # --- idempotency ------------------------------------------------------------------------

    async def test_reappending_the_same_events_returns_the_first_result(
        self, store: EventStore
    ) -> None:
        stream = ledger()
        events = [new(Opened("a")), new(Deposited(3))]
        first = await store.append(stream, events, 0)
        again = await store.append(stream, events, 0)
        assert again.replayed
        assert (again.first_position, again.last_position) == (
            first.first_position,
            first.last_position,
        )
        assert len(await store.read_stream(stream)) == 2

    async def test_retried_command_is_answered_from_its_first_append(
        self, store: EventStore
    ) -> None:
        stream = ledger()
        command_id = uuid.uuid4()
        first = await store.append(stream, [new(Opened("a"), command_id=command_id)], 0)
        await store.append(stream, [new(Deposited(1))], 1)  # the stream moved on
        again = await store.append(stream, [new(Opened("a"), command_id=command_id)], 0)
        assert again.replayed
        assert (again.first_version, again.first_position) == (1, first.first_position)
        assert len(await store.read_stream(stream)) == 2

    async def test_a_command_id_finds_its_first_append(self, store: EventStore) -> None:
        stream = ledger()
        command_id = uuid.uuid4()
        assert await store.command_result(command_id) is None
        first = await store.append(
            stream,
            [new(Opened("a"), command_id=command_id), new(Deposited(2), command_id=command_id)],
            0,
        )
        found = await store.command_result(command_id)
        assert found is not None
        assert found.replayed
        assert (found.stream, found.first_version, found.last_version) == (stream, 1, 2)
        assert (found.first_position, found.last_position) == (
            first.first_position,
            first.last_position,
        )

    async def test_command_id_reused_on_another_stream_is_refused(self, store: EventStore) -> None:
        command_id = uuid.uuid4()
        await store.append(ledger(), [new(Opened("a"), command_id=command_id)], 0)
        with pytest.raises(InvalidAppendError, match="already"):
            await store.append(ledger(), [new(Opened("b"), command_id=command_id)], 0)

    async def test_partially_repeated_event_ids_are_refused(self, store: EventStore) -> None:
        stream = ledger()
        opened = new(Opened("a"))
        await store.append(stream, [opened], 0)
        with pytest.raises(InvalidAppendError, match="already"):
            await store.append(stream, [opened, new(Deposited(1))], 0)
        assert len(await store.read_stream(stream)) == 1

    # --- the global order -------------------------------------------------------------------

    async def test_read_all_pages_through_every_event_once(self, store: EventStore) -> None:
        for _ in range(5):
            stream = ledger()
            await store.append(
                stream, [new(Opened("x")), *[new(Deposited(i)) for i in range(40)]], 0
            )
        seen = await drain(store, at_least=5 * 41)
        assert len(seen) == 5 * 41
        assert len({r.event_id for r in seen}) == len(seen)
        keys = [r.checkpoint for r in seen]
        assert keys == sorted(keys)
        assert len(set(keys)) == len(keys)

    async def test_read_all_under_eight_concurrent_writers_has_no_gap_or_duplicate(
        self, store: EventStore
    ) -> None:
        written: set[uuid.UUID] = set()
        seen: list[RecordedEvent] = []
        writers_done = anyio.Event()

        async def writer() -> None:
            for _ in range(8):
                stream = ledger()
                events = [new(Opened("w")), *[new(Deposited(i)) for i in range(1, 1 + _ % 3)]]
                await store.append(stream, events, 0)
                for i in range(15):
                    event = new(Deposited(i + 1))
                    await store.append(stream, [event], len(events) + i)
                    written.add(event.event_id)
                written.update(e.event_id for e in events)

        async def tailer() -> None:
            checkpoint = Checkpoint.START
            while True:
                finished = writers_done.is_set()
                batch = await store.read_all(checkpoint, limit=50)
                seen.extend(batch)
                if batch:
                    checkpoint = batch[-1].checkpoint
                elif finished:
                    return
                else:
                    await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tailer)
            async with anyio.create_task_group() as writers:
                for _ in range(8):
                    writers.start_soon(writer)
            writers_done.set()
        ids = [r.event_id for r in seen]
        assert len(ids) == len(set(ids)), "an event was read twice"
        assert set(ids) == written, "the tailing reader missed events"
        assert ids == [r.event_id for r in await drain(store, at_least=len(written))]

    async def test_read_all_after_the_head_is_empty(self, store: EventStore) -> None:
        await store.append(ledger(), [new(Opened("a"))], 0)
        everything = await drain(store, at_least=1)
        assert await store.read_all(everything[-1].checkpoint) == []

    async def test_subscription_delivers_existing_then_new_events(self, store: EventStore) -> None:
        stream = ledger()
        await store.append(stream, [new(Opened("a"))], 0)
        start = (await drain(store, at_least=1))[-1].checkpoint
        await store.append(stream, [new(Deposited(1))], 1)
        received: list[RecordedEvent] = []
        with anyio.fail_after(20):
            subscription = store.subscribe(start, batch_size=10)
            try:
                async for batch in subscription:
                    received.extend(batch)
                    if len(received) == 1:
                        await store.append(stream, [new(Deposited(2)), new(Deposited(3))], 2)
                    if len(received) >= 3:
                        break
            finally:
                await subscription.aclose()  # type: ignore[attr-defined]
        assert [r.version for r in received] == [2, 3, 4]

    # --- payloads -----------------------------------------------------------------------------

    async def test_large_and_unicode_payloads_round_trip(self, store: EventStore) -> None:
        stream = ledger()
        big = "x" * 2_000_000
        unicode = 'Zoë — 東京 — مرحبا — 🧾🛒 — \u200d\t\n"quoted" \\ back'
        await store.append(stream, [new(Opened(unicode), user="ünïcode"), new(Opened(big))], 0)
        records = await store.read_stream(stream)
        assert payloads(records) == [Opened(unicode), Opened(big)]
        assert records[0].metadata.user == "ünïcode"

    # --- bad input ----------------------------------------------------------------------------

    async def test_an_empty_append_is_refused(self, store: EventStore) -> None:
        with pytest.raises(InvalidAppendError, match="at least one event"):
            await store.append(ledger(), [], 0)

    @pytest.mark.parametrize("version", [-1, -100])
    async def test_a_negative_expected_version_is_refused(
        self, store: EventStore, version: int
    ) -> None:
        with pytest.raises(InvalidAppendError, match="expected_version"):
            await store.append(ledger(), [new(Opened("a"))], version)

    async def test_a_non_integer_expected_version_is_refused(self, store: EventStore) -> None:
        with pytest.raises(InvalidAppendError, match="must be an int"):
            await store.append(ledger(), [new(Opened("a"))], "0")  # type: ignore[arg-type]

    async def test_too_long_a_stream_id_is_refused(self, store: EventStore) -> None:
        with pytest.raises(StreamIdTooLongError) as caught:
            await store.append(ledger("k" * (MAX_ID_LENGTH + 1)), [new(Opened("a"))], 0)
        assert caught.value.limit == MAX_ID_LENGTH
        assert "aggregate_id" in str(caught.value)
        longest = ledger("é" * MAX_ID_LENGTH)  # the limit counts characters, not bytes
        await store.append(longest, [new(Opened("a"))], 0)
        assert await store.stream_version(longest) == 1

    async def test_a_payload_msgspec_cannot_encode_is_refused(self, store: EventStore) -> None:
        stream = ledger()
        with pytest.raises(EventEncodeError, match="Opaque"):
            await store.append(stream, [new(Opened("a")), new(Opaque(object()))], 0)
        assert await store.read_stream(stream) == []

    async def test_a_nul_character_is_refused_on_every_backend(self, store: EventStore) -> None:
        with pytest.raises(EventEncodeError, match="NUL"):
            await store.append(ledger(), [new(Opened("a\x00b"))], 0)
        await store.append(ledger(), [new(Opened("a\\u0000b"))], 0)  # escaped text is fine

    async def test_a_payload_that_is_not_a_struct_is_refused(self, store: EventStore) -> None:
        with pytest.raises(EventEncodeError, match="not a msgspec Struct"):
            await store.append(ledger(), [NewEvent(payload={"a": 1})], 0)  # type: ignore[arg-type]

    async def test_an_aggregate_id_of_another_type_is_refused(self, store: EventStore) -> None:
        stream = ledger()
        await store.append(stream, [new(Opened("a"))], 0)
        other = StreamId("basket", stream.aggregate_id)
        with pytest.raises(InvalidAppendError, match="belongs to"):
            await store.append(other, [new(Opened("b"))], 1)
        assert await store.read_stream(other) == []

    @pytest.mark.parametrize("limit", [0, -5])
    async def test_a_non_positive_read_limit_is_refused(
        self, store: EventStore, limit: int
    ) -> None:
        with pytest.raises(InvalidRequestError, match="limit"):
            await store.read_all(Checkpoint.START, limit)

    async def test_versions_count_from_one(self, store: EventStore) -> None:
        with pytest.raises(InvalidRequestError, match="from_version"):
            await store.read_stream(ledger(), 0)

    # --- snapshots and figures ---------------------------------------------------------------

    async def test_the_newest_snapshot_wins(self, store: EventStore) -> None:
        stream = ledger()
        assert await store.load_snapshot(stream) is None
        await store.save_snapshot(Snapshot(stream, 10, 1, b'{"balance": 10}'))
        await store.save_snapshot(Snapshot(stream, 5, 1, b'{"balance": 5}'))
        await store.save_snapshot(Snapshot(stream, 12, 2, b'{"balance": 12}'))
        loaded = await store.load_snapshot(stream)
        assert loaded is not None
        assert (loaded.version, loaded.state_schema) == (12, 2)
        assert msgspec.json.decode(loaded.state) == {"balance": 12}
        assert await store.load_snapshot(StreamId("basket", stream.aggregate_id)) is None

    async def test_a_checkpoint_never_moves_backwards(self, store: EventStore) -> None:
        assert await store.load_checkpoint("relay") == Checkpoint.START
        await store.save_checkpoint("relay", Checkpoint(10, 40))
        await store.save_checkpoint("relay", Checkpoint(9, 99))  # a stale writer
        await store.save_checkpoint("other", Checkpoint(1, 1))
        assert await store.load_checkpoint("relay") == Checkpoint(10, 40)
        await store.save_checkpoint("relay", Checkpoint(10, 41))
        assert await store.load_checkpoint("relay") == Checkpoint(10, 41)
        assert await store.load_checkpoint("other") == Checkpoint(1, 1)

    async def test_parked_keys_are_recorded_replaced_and_lifted(self, store: EventStore) -> None:
        since = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
        first = ParkedKey("projector", "acc-1", "m-1", False, "boom", since)
        await store.park(first)
        await store.park(
            ParkedKey("projector", "acc-2", "m-7", True, "bad", since.replace(hour=13))
        )
        await store.park(ParkedKey("saga", "acc-1", "m-3", False, "other actor", since))
        assert await store.parked_keys("projector") == [
            first,
            ParkedKey("projector", "acc-2", "m-7", True, "bad", since.replace(hour=13)),
        ]
        dead = msgspec.structs.replace(first, dead=True, reason="dead-lettered")
        await store.park(dead)  # the same key: replaced
        assert (await store.parked_keys("projector"))[0] == dead
        assert len(await store.parked_keys()) == 3
        assert not await store.unpark("projector", "acc-1", blocker="m-9")  # another's block
        assert await store.unpark("projector", "acc-1", blocker="m-1")
        assert not await store.unpark("projector", "acc-1")
        assert await store.unpark("projector", "acc-2")
        assert [p.actor for p in await store.parked_keys()] == ["saga"]
        assert await store.unpark("saga", "acc-1")

    async def test_a_lease_has_one_holder_at_a_time(self, store: EventStore) -> None:
        holders: list[str] = []
        second_waiting = anyio.Event()
        release_first = anyio.Event()

        async def hold(name: str, release: anyio.Event) -> None:
            if name == "second":
                second_waiting.set()
            async with store.leader_lease("relay") as lease:
                await lease.check()
                holders.append(name)
                await release.wait()
                holders.append(f"{name} done")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "first", release_first)
                while not holders:  # noqa: ASYNC110 - polling the other task's list
                    await anyio.sleep(0.01)
                tg.start_soon(hold, "second", anyio.Event())
                await second_waiting.wait()
                await anyio.sleep(1.5)  # longer than the lease's retry interval
                assert holders == ["first"], "two holders at once"
                release_first.set()
                while len(holders) < 3:  # noqa: ASYNC110 - polling the other task's list
                    await anyio.sleep(0.01)
                assert holders == ["first", "first done", "second"]
                tg.cancel_scope.cancel()

    async def test_statistics_follow_the_store(self, store: EventStore) -> None:
        result = await store.append(ledger(), [new(Opened("a")), new(Deposited(1))], 0)
        stats = await store.statistics()
        assert stats.head_position >= result.last_position
        assert stats.size_bytes > 0
        assert stats.event_count >= 0
        assert stats.oldest_transaction_age_seconds >= 0
