"""The in-memory event store: the embedded default and the fast twin for unit tests.

It keeps the same contract as the PostgreSQL store (``tests/contracts/store.py``). Every
append runs without awaiting between its checks and its write, so on one event loop it is
atomic; each append is one "transaction" with its own ``tx_id``.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import UUID

import anyio
import msgspec

from runtime.errors import ConcurrencyError, InvalidAppendError
from runtime.store.protocol import (
    AppendResult,
    Checkpoint,
    EncodedEvent,
    Lease,
    NewEvent,
    ParkedKey,
    RecordedEvent,
    Snapshot,
    StoreStatistics,
    StreamId,
    check_read_args,
    prepare_append,
    utcnow,
)


class MemoryEventStore:
    """An ``EventStore`` held in lists and dicts; lost when the process ends."""

    def __init__(self, poll_interval: float = 1.0) -> None:
        self._events: list[RecordedEvent] = []
        self._keys: list[tuple[int, int]] = []  # (tx_id, position), parallel to _events
        self._by_id: dict[UUID, RecordedEvent] = {}
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._commands: dict[UUID, AppendResult] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._checkpoints: dict[str, Checkpoint] = {}
        self._parked: dict[tuple[str, str], ParkedKey] = {}
        self._leases: dict[str, anyio.Lock] = {}
        self._tx = 0
        self._bytes = 0
        self._appended = anyio.Event()
        self._poll_interval = poll_interval

    async def append(
        self, stream: StreamId, events: Sequence[NewEvent], expected_version: int
    ) -> AppendResult:
        encoded = prepare_append(stream, events, expected_version)
        replay = self._replayed(stream, encoded)
        if replay is not None:
            return replay
        history = self._streams.get(stream.aggregate_id, [])
        if history and history[0].aggregate_type != stream.aggregate_type:
            raise InvalidAppendError(
                f"aggregate id {stream.aggregate_id!r} already belongs to a "
                f"{history[0].aggregate_type!r} stream, not {stream.aggregate_type!r}"
            )
        if len(history) != expected_version:
            raise ConcurrencyError(str(stream), expected_version, len(history))
        self._tx += 1
        now = utcnow().replace(tzinfo=None)
        recorded = [
            RecordedEvent(
                event_id=e.event_id,
                event_type=e.event_type,
                aggregate_type=stream.aggregate_type,
                aggregate_id=stream.aggregate_id,
                version=expected_version + i,
                position=len(self._events) + i,
                tx_id=self._tx,
                data=e.data,
                metadata=e.metadata,
                created_at=now,
            )
            for i, e in enumerate(encoded, start=1)
        ]
        for record in recorded:
            self._events.append(record)
            self._keys.append((record.tx_id, record.position))
            self._by_id[record.event_id] = record
            self._bytes += len(record.data) + 200
        self._streams.setdefault(stream.aggregate_id, []).extend(recorded)
        result = _result(stream, recorded, replayed=False)
        command_id = encoded[0].metadata.command_id
        if command_id is not None:
            self._commands[command_id] = result
        self._appended.set()
        self._appended = anyio.Event()
        return result

    def _replayed(self, stream: StreamId, encoded: list[EncodedEvent]) -> AppendResult | None:
        command_id = encoded[0].metadata.command_id
        if command_id is not None and command_id in self._commands:
            first = self._commands[command_id]
            if first.stream != stream:
                raise InvalidAppendError(
                    f"command id {command_id} was already used for stream {first.stream}, "
                    f"not {stream}"
                )
            return msgspec.structs.replace(first, replayed=True)
        found = [self._by_id[e.event_id] for e in encoded if e.event_id in self._by_id]
        if not found:
            return None
        if len(found) != len(encoded) or any(r.stream != stream for r in found):
            raise InvalidAppendError(
                f"event id {found[0].event_id} is already stored in stream {found[0].stream}; "
                "a retried append must resend exactly the same events"
            )
        return _result(stream, sorted(found, key=lambda r: r.version), replayed=True)

    async def command_result(self, command_id: UUID) -> AppendResult | None:
        first = self._commands.get(command_id)
        return None if first is None else msgspec.structs.replace(first, replayed=True)

    async def read_stream(self, stream: StreamId, from_version: int = 1) -> list[RecordedEvent]:
        check_read_args(1, from_version)
        history = self._streams.get(stream.aggregate_id, [])
        if history and history[0].aggregate_type != stream.aggregate_type:
            return []
        return history[from_version - 1 :]

    async def stream_version(self, stream: StreamId) -> int:
        history = self._streams.get(stream.aggregate_id, [])
        if history and history[0].aggregate_type != stream.aggregate_type:
            return 0
        return len(history)

    async def read_all(
        self, after: Checkpoint = Checkpoint.START, limit: int = 500
    ) -> list[RecordedEvent]:
        check_read_args(limit)
        start = bisect.bisect_right(self._keys, (after.tx_id, after.position))
        return self._events[start : start + limit]

    async def subscribe(
        self, after: Checkpoint = Checkpoint.START, batch_size: int = 500
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        checkpoint = after
        while True:
            wake = self._appended
            batch = await self.read_all(checkpoint, batch_size)
            if batch:
                checkpoint = batch[-1].checkpoint
                yield batch
                if len(batch) == batch_size:
                    continue
            with anyio.move_on_after(self._poll_interval):
                await wake.wait()

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        key = snapshot.stream.aggregate_id
        current = self._snapshots.get(key)
        if current is None or current.version < snapshot.version:
            self._snapshots[key] = snapshot

    async def load_snapshot(self, stream: StreamId) -> Snapshot | None:
        snapshot = self._snapshots.get(stream.aggregate_id)
        if snapshot is None or snapshot.stream != stream:
            return None
        return snapshot

    async def load_checkpoint(self, name: str) -> Checkpoint:
        return self._checkpoints.get(name, Checkpoint.START)

    async def save_checkpoint(self, name: str, checkpoint: Checkpoint) -> None:
        self._checkpoints[name] = max(checkpoint, self._checkpoints.get(name, Checkpoint.START))

    async def park(self, parked: ParkedKey) -> None:
        self._parked[parked.actor, parked.key] = parked

    async def unpark(self, actor: str, key: str, blocker: str | None = None) -> bool:
        held = self._parked.get((actor, key))
        if held is None or (blocker is not None and held.blocker != blocker):
            return False
        del self._parked[actor, key]
        return True

    async def parked_keys(self, actor: str | None = None) -> list[ParkedKey]:
        rows = [p for p in self._parked.values() if actor is None or p.actor == actor]
        return sorted(rows, key=lambda p: (p.since, p.actor, p.key))

    @asynccontextmanager
    async def leader_lease(self, name: str) -> AsyncIterator[Lease]:
        lock = self._leases.setdefault(name, anyio.Lock())
        async with lock:
            yield _HeldLease()

    async def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            event_count=len(self._events),
            size_bytes=self._bytes,
            head_position=len(self._events),
            oldest_transaction_age_seconds=0.0,
        )

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryEventStore(events={len(self._events)})"


class _HeldLease:
    """In one process the lease cannot be lost."""

    async def check(self) -> None:
        return None


def _result(stream: StreamId, recorded: list[RecordedEvent], *, replayed: bool) -> AppendResult:
    return AppendResult(
        stream=stream,
        first_version=recorded[0].version,
        last_version=recorded[-1].version,
        first_position=min(r.position for r in recorded),
        last_position=max(r.position for r in recorded),
        replayed=replayed,
    )
