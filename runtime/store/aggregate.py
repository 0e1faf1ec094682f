"""Aggregates as deciders, loaded from the store through snapshots.

A ``Decider`` is three pure functions and an initial state: ``decide(command, state) ->
events`` and ``evolve(state, event) -> state``. The ``AggregateRepository`` loads a state
(latest snapshot + the events after it, or a full replay), runs a decision and appends its
events with the version it loaded as the expected version, snapshotting every N events.
A snapshot is only a cache: one written by another ``state_schema``, or that no longer
decodes, is ignored and the stream replayed in full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from loguru import logger

from runtime.errors import ConcurrencyError
from runtime.store.codec import EventCodec
from runtime.store.protocol import AppendResult, EventStore, Metadata, NewEvent, Snapshot, StreamId

C = TypeVar("C")
E = TypeVar("E", bound=msgspec.Struct)
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Decider(Generic[C, E, S]):
    aggregate_type: str
    initial_state: S
    decide: Callable[[C, S], Sequence[E]]
    evolve: Callable[[S, E], S]
    state_type: type[S]
    #: Bump when the state's shape changes: older snapshots are then ignored.
    state_schema: int = 1


@dataclass(frozen=True, slots=True)
class Loaded(Generic[S]):
    state: S
    version: int
    from_snapshot: bool = False


@dataclass(frozen=True, slots=True)
class Decision(Generic[E]):
    events: Sequence[E]
    result: AppendResult | None  # None when the decision produced no event
    version: int = 0  # the aggregate's version after the decision


class AggregateRepository(Generic[C, E, S]):
    def __init__(
        self,
        store: EventStore,
        codec: EventCodec,
        decider: Decider[C, E, S],
        snapshot_every: int | None = 100,
    ) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every must be at least 1 or None, got {snapshot_every}")
        self.store = store
        self.codec = codec
        self.decider = decider
        self.snapshot_every = snapshot_every
        self._state_decoder = msgspec.json.Decoder(decider.state_type)

    def stream(self, aggregate_id: str) -> StreamId:
        return StreamId(self.decider.aggregate_type, aggregate_id)

    async def load(self, aggregate_id: str) -> Loaded[S]:
        stream = self.stream(aggregate_id)
        state, version, from_snapshot = self.decider.initial_state, 0, False
        if self.snapshot_every is not None:
            snapshot = await self.store.load_snapshot(stream)
            if snapshot is not None:
                trusted = self._trust(snapshot)
                if trusted is not None:
                    state, version, from_snapshot = trusted, snapshot.version, True
        for record in await self.store.read_stream(stream, version + 1):
            event: Any = self.codec.decode(record).payload
            state = self.decider.evolve(state, event)
            version = record.version
        return Loaded(state, version, from_snapshot)

    def _trust(self, snapshot: Snapshot) -> S | None:
        if snapshot.state_schema != self.decider.state_schema:
            logger.info(
                "ignoring snapshot of {stream} at v{version}: state schema {old} != {new}",
                stream=str(snapshot.stream),
                version=snapshot.version,
                old=snapshot.state_schema,
                new=self.decider.state_schema,
            )
            return None
        try:
            state: S = self._state_decoder.decode(snapshot.state)
        except msgspec.DecodeError as exc:
            logger.warning(
                "ignoring snapshot of {stream} that no longer decodes: {exc}",
                stream=str(snapshot.stream),
                exc=exc,
            )
            return None
        return state

    async def execute(
        self,
        aggregate_id: str,
        command: C,
        metadata: Metadata | None = None,
        *,
        expected_version: int | None = None,
        new_command: bool = False,
    ) -> Decision[E]:
        """Load, decide, append at the loaded version. Raises ``ConcurrencyError`` if the
        stream moved on in between (the caller may reload and retry), or if
        ``expected_version`` is given and the loaded version is another (nothing decided).

        A command whose ``metadata.command_id`` was already executed is answered from its
        first result (no events, ``result.replayed``) without deciding again: deciding on
        today's state could refuse what was accepted the first time. ``new_command`` says the
        caller knows the command id has never been executed, which saves that lookup (the
        append still refuses to run a command id twice).
        """
        if metadata is not None and metadata.command_id is not None and not new_command:
            first = await self.store.command_result(metadata.command_id)
            if first is not None:
                return Decision((), first, first.last_version)
        loaded = await self.load(aggregate_id)
        if expected_version is not None and expected_version != loaded.version:
            raise ConcurrencyError(str(self.stream(aggregate_id)), expected_version, loaded.version)
        events = self.decider.decide(command, loaded.state)
        if not events:
            return Decision(events, None, loaded.version)
        meta = metadata or Metadata()
        result = await self.store.append(
            self.stream(aggregate_id),
            [NewEvent(payload=e, metadata=meta) for e in events],
            loaded.version,
        )
        if not result.replayed:
            await self._maybe_snapshot(aggregate_id, loaded, events, result)
        return Decision(events, result, result.last_version)

    async def _maybe_snapshot(
        self, aggregate_id: str, loaded: Loaded[S], events: Sequence[E], result: AppendResult
    ) -> None:
        every = self.snapshot_every
        if every is None or result.last_version // every == loaded.version // every:
            return
        state = loaded.state
        for event in events:
            state = self.decider.evolve(state, event)
        await self.store.save_snapshot(
            Snapshot(
                stream=self.stream(aggregate_id),
                version=result.last_version,
                state_schema=self.decider.state_schema,
                state=msgspec.json.encode(state),
            )
        )
