"""Aggregates loaded through snapshots: a snapshot is only a cache of the full replay."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConcurrencyError
from runtime.store import (
    AggregateRepository,
    AppendResult,
    Decider,
    EventCodec,
    Metadata,
    NewEvent,
    Snapshot,
    StreamId,
)
from runtime.store.memory import MemoryEventStore
from tests.support.ledger import (
    LEDGER,
    Deposit,
    Deposited,
    Ledger,
    LedgerCommand,
    LedgerError,
    LedgerEvent,
    Open,
    Opened,
    Withdraw,
    Withdrawn,
)

CODEC = EventCodec().register(LedgerEvent)
ACCOUNT = "acc-1"
STREAM = StreamId("ledger", ACCOUNT)

Repository = AggregateRepository[LedgerCommand, LedgerEvent, Ledger]


def repository(
    store: MemoryEventStore,
    snapshot_every: int | None = 100,
    decider: Decider[Any, Any, Any] = LEDGER,
) -> Repository:
    return AggregateRepository(store, CODEC, decider, snapshot_every=snapshot_every)


def replay(events: Sequence[LedgerEvent]) -> Ledger:
    return functools.reduce(LEDGER.evolve, events, LEDGER.initial_state)


async def stored_events(store: MemoryEventStore) -> list[Any]:
    return [CODEC.decode(r).payload for r in await store.read_stream(STREAM)]


async def run(repo: Repository, *commands: LedgerCommand) -> None:
    for command in commands:
        await repo.execute(ACCOUNT, command)


owners = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=12)
commands = st.one_of(
    st.builds(Open, owner=owners),
    st.builds(Deposit, amount=st.integers(-3, 50)),
    st.builds(Withdraw, amount=st.integers(-3, 60)),
)


# --- snapshot + tail == full replay ------------------------------------------------------------


@settings(max_examples=75, deadline=None)
@given(
    script=st.lists(commands, max_size=30),
    snapshot_every=st.sampled_from([1, 2, 3, 7, None]),
)
def test_the_loaded_state_is_the_replay_of_every_stored_event(
    script: list[LedgerCommand], snapshot_every: int | None
) -> None:
    async def scenario() -> None:
        store = MemoryEventStore()
        repo = repository(store, snapshot_every)
        model = LEDGER.initial_state  # the decider run without any store
        for command in script:
            try:
                decision = await repo.execute(ACCOUNT, command)
            except LedgerError:
                with pytest.raises(LedgerError):
                    LEDGER.decide(command, model)
                continue
            assert decision.result is not None
            assert list(decision.events) == LEDGER.decide(command, model)
            model = functools.reduce(LEDGER.evolve, decision.events, model)
        events = await stored_events(store)
        loaded = await repo.load(ACCOUNT)
        assert loaded.state == replay(events) == model
        assert loaded.version == len(events) == await store.stream_version(STREAM)
        snapshot = await store.load_snapshot(STREAM)
        if snapshot_every is None or len(events) < snapshot_every:
            assert snapshot is None
            assert not loaded.from_snapshot
        else:
            assert snapshot is not None
            assert loaded.from_snapshot
            assert snapshot.version == len(events) - len(events) % snapshot_every
            assert msgspec.json.decode(snapshot.state, type=Ledger) == replay(
                events[: snapshot.version]
            )
        unsnapshotted = await repository(store, snapshot_every=None).load(ACCOUNT)
        assert (unsnapshotted.state, unsnapshotted.version) == (loaded.state, loaded.version)

    anyio.run(scenario)


# --- which snapshot is trusted ---------------------------------------------------------------


async def ledger_of_five_operations(store: MemoryEventStore) -> Ledger:
    await run(
        repository(store, snapshot_every=None),
        Open("ana"),
        Deposit(10),
        Deposit(5),
        Withdraw(3),
        Deposit(1),
    )
    return Ledger(owner="ana", balance=13, operations=5)


def lying_snapshot(state_schema: int = 1, state: bytes | None = None) -> Snapshot:
    """A snapshot at the stream's head whose state the events do not support."""
    fake = Ledger(owner="mallory", balance=1_000_000, operations=5)
    return Snapshot(STREAM, 5, state_schema, state or msgspec.json.encode(fake))


async def test_a_fresh_snapshot_is_used() -> None:
    store = MemoryEventStore()
    await ledger_of_five_operations(store)
    await store.save_snapshot(lying_snapshot())
    loaded = await repository(store).load(ACCOUNT)
    assert loaded.from_snapshot
    assert loaded.state == Ledger(owner="mallory", balance=1_000_000, operations=5)
    assert loaded.version == 5


async def test_a_snapshot_is_followed_by_the_events_after_it() -> None:
    store = MemoryEventStore()
    await ledger_of_five_operations(store)
    state_at_3 = Ledger(owner="ana", balance=15, operations=3)
    await store.save_snapshot(Snapshot(STREAM, 3, 1, msgspec.json.encode(state_at_3)))
    loaded = await repository(store).load(ACCOUNT)
    assert loaded.from_snapshot
    assert (loaded.state, loaded.version) == (Ledger("ana", 13, 5), 5)


async def test_a_snapshot_of_an_old_state_schema_is_ignored() -> None:
    store = MemoryEventStore()
    expected = await ledger_of_five_operations(store)
    await store.save_snapshot(lying_snapshot(state_schema=1))
    repo = repository(store, decider=dataclasses.replace(LEDGER, state_schema=2))
    loaded = await repo.load(ACCOUNT)
    assert not loaded.from_snapshot
    assert (loaded.state, loaded.version) == (expected, 5)


@pytest.mark.parametrize(
    "state",
    [
        b"not json",
        b'{"owner": "ana", "balance": "a lot"}',
        b'["ana", 13, 5]',
        b"null",
        b'{"balance": 13',
    ],
    ids=["garbage", "wrong-field-type", "array", "null", "truncated"],
)
async def test_a_snapshot_that_no_longer_decodes_is_ignored(state: bytes) -> None:
    store = MemoryEventStore()
    expected = await ledger_of_five_operations(store)
    await store.save_snapshot(lying_snapshot(state=state))
    loaded = await repository(store).load(ACCOUNT)
    assert not loaded.from_snapshot
    assert (loaded.state, loaded.version) == (expected, 5)


async def test_snapshots_are_ignored_when_snapshotting_is_off() -> None:
    store = MemoryEventStore()
    expected = await ledger_of_five_operations(store)
    await store.save_snapshot(lying_snapshot())
    loaded = await repository(store, snapshot_every=None).load(ACCOUNT)
    assert not loaded.from_snapshot
    assert loaded.state == expected


async def test_a_snapshot_is_written_when_a_decision_crosses_a_multiple_of_the_interval() -> None:
    store = MemoryEventStore()
    repo = repository(store, snapshot_every=2)
    await run(repo, Open("ana"))
    assert await store.load_snapshot(STREAM) is None
    await run(repo, Deposit(4))
    snapshot = await store.load_snapshot(STREAM)
    assert snapshot is not None
    assert (snapshot.version, snapshot.state_schema) == (2, LEDGER.state_schema)
    assert msgspec.json.decode(snapshot.state, type=Ledger) == Ledger("ana", 4, 2)
    await run(repo, Withdraw(1))
    assert (await store.load_snapshot(STREAM)) == snapshot


async def test_an_unknown_aggregate_loads_as_the_initial_state() -> None:
    loaded = await repository(MemoryEventStore()).load("nobody")
    assert (loaded.state, loaded.version, loaded.from_snapshot) == (Ledger(), 0, False)


@pytest.mark.parametrize("every", [0, -1])
def test_a_snapshot_interval_below_one_is_refused(every: int) -> None:
    with pytest.raises(ValueError, match="snapshot_every"):
        repository(MemoryEventStore(), snapshot_every=every)


# --- deciding ---------------------------------------------------------------------------------


async def test_a_decision_appends_its_events_with_the_metadata_given() -> None:
    store = MemoryEventStore()
    repo = repository(store)
    await run(repo, Open("ana"))
    decision = await repo.execute(ACCOUNT, Deposit(7), Metadata(correlation_id="c-9"))
    assert list(decision.events) == [Deposited(7)]
    assert decision.result is not None
    assert (decision.result.first_version, decision.result.last_version) == (2, 2)
    records = await store.read_stream(STREAM)
    assert records[-1].metadata.correlation_id == "c-9"


async def test_a_refused_command_appends_nothing() -> None:
    store = MemoryEventStore()
    repo = repository(store)
    await run(repo, Open("ana"))
    with pytest.raises(LedgerError):
        await repo.execute(ACCOUNT, Withdraw(1))
    assert await store.stream_version(STREAM) == 1


class Note(msgspec.Struct, frozen=True):
    text: str


def decide_noting(command: Note, state: Ledger) -> list[LedgerEvent]:
    """Notes on an empty text decide nothing; others deposit one coin."""
    return [Deposited(1, note=command.text)] if command.text else []


NOTES = Decider(
    aggregate_type="ledger",
    initial_state=Ledger(),
    decide=decide_noting,
    evolve=LEDGER.evolve,
    state_type=Ledger,
)


async def test_a_decision_that_produces_no_event_appends_nothing() -> None:
    store = MemoryEventStore()
    repo: AggregateRepository[Note, LedgerEvent, Ledger] = AggregateRepository(
        store, CODEC, NOTES, snapshot_every=1
    )
    decision = await repo.execute(ACCOUNT, Note(""))
    assert list(decision.events) == []
    assert decision.result is None
    assert await store.stream_version(STREAM) == 0
    assert await store.load_snapshot(STREAM) is None
    assert (await store.statistics()).event_count == 0
    await repo.execute(ACCOUNT, Note("x"))
    decision = await repo.execute(ACCOUNT, Note(""))
    assert decision.result is None
    assert await store.stream_version(STREAM) == 1


async def test_a_retried_command_is_answered_from_its_first_append() -> None:
    store = MemoryEventStore()
    repo = repository(store, snapshot_every=1)
    await run(repo, Open("ana"))
    meta = Metadata(command_id=uuid.uuid4())
    first = await repo.execute(ACCOUNT, Deposit(3), meta)
    again = await repo.execute(ACCOUNT, Deposit(3), meta)
    assert again.result is not None
    assert first.result is not None
    assert again.result.replayed
    assert again.result.first_version == first.result.first_version == 2
    loaded = await repo.load(ACCOUNT)
    assert (loaded.state.balance, loaded.version) == (3, 2)


# --- concurrency ------------------------------------------------------------------------------


async def test_an_append_at_a_stale_version_is_a_concurrency_error() -> None:
    store = MemoryEventStore()
    repo = repository(store)
    await run(repo, Open("ana"))
    loaded = await repo.load(ACCOUNT)
    await run(repo, Deposit(5))  # another writer moves the stream on
    with pytest.raises(ConcurrencyError) as caught:
        await store.append(STREAM, [NewEvent(payload=Deposited(1))], loaded.version)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert await stored_events(store) == [Opened("ana"), Deposited(5)]


class RacingStore(MemoryEventStore):
    """A store where, just before the next append, a rival's append slips in first."""

    def __init__(self) -> None:
        super().__init__()
        self.rival: list[NewEvent] = []

    async def append(
        self, stream: StreamId, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        if self.rival:
            rival, self.rival = self.rival, []
            await super().append(stream, rival, await self.stream_version(stream))
        return await super().append(stream, events, expected_version)


async def test_a_writer_that_slips_in_between_load_and_append_makes_execute_fail() -> None:
    store = RacingStore()
    repo = repository(store, snapshot_every=1)
    await run(repo, Open("ana"), Deposit(10))
    store.rival = [NewEvent(payload=Withdrawn(10))]
    with pytest.raises(ConcurrencyError) as caught:
        await repo.execute(ACCOUNT, Withdraw(10))
    assert (caught.value.expected, caught.value.actual) == (2, 3)
    assert await stored_events(store) == [Opened("ana"), Deposited(10), Withdrawn(10)]
    snapshot = await store.load_snapshot(STREAM)
    assert snapshot is not None
    assert snapshot.version == 2, "the losing decision wrote no snapshot"
    # Reloading and deciding again sees the rival's withdrawal.
    with pytest.raises(LedgerError):
        await repo.execute(ACCOUNT, Withdraw(10))
    await repo.execute(ACCOUNT, Deposit(1))
    loaded = await repo.load(ACCOUNT)
    assert (loaded.state, loaded.version) == (Ledger("ana", 1, 4), 4)


async def test_a_retried_command_is_not_decided_again_on_todays_state() -> None:
    """Open twice with the same command id: the retry is answered from the first append,
    although deciding Open again on the opened ledger would refuse it."""
    store = MemoryEventStore()
    repo = repository(store, snapshot_every=1)
    meta = Metadata(command_id=uuid.uuid4())
    first = await repo.execute(ACCOUNT, Open("ana"), meta)
    again = await repo.execute(ACCOUNT, Open("ana"), meta)
    assert first.result is not None
    assert again.result is not None
    assert again.result.replayed
    assert list(again.events) == []
    assert again.result.first_position == first.result.first_position
    assert await store.stream_version(STREAM) == 1
