"""The relay: tails the event store and writes every event to its domain's stream.

No dual write: the command side only appends; the relay writes what was committed. It reads
in checkpoint order (never skipping a late commit) and writes each batch to the domain's
stream (named after the domain's exchange) through the stream protocol: one chunk per batch,
waited for the broker's confirms. Each entry carries a publishing id, counted per stream
from 1 in store order under the producer name of the relay (its checkpoint name): the
stream drops an id it already holds, so a relay that writes an entry again writes nothing.

A stream does not fsync each write (PITFALLS): after a broker crash it may hold less than
the relay was told it confirmed. So a relay that starts trusts the streams, not its
checkpoint: it asks each stream for the last entry it wrote there (the event in it names
its store checkpoint and its publishing id), and reads the store from the earliest of
those; an event a stream already holds is not written to it again. A stream that holds
none of its entries (new, or deleted) is written from the store's start. The saved
checkpoint is what the lag metric and ``magasin`` commands show: at most
``checkpoint_interval`` behind what is confirmed.

Batches are written one after the other: a batch sent before the previous one is stored
would make the broker drop the previous one as duplicates of lower ids.

One relay leads across every runtime process: it holds a lease on the store (a PostgreSQL
advisory lock). The others wait as standbys and take over within about a second when the
leader dies or loses its connection; the old leader checks its lease before every
checkpoint and stops when it has lost it.

Options (``actors.relay.options``): ``checkpoint`` (name, also the stream producer's,
default ``relay``), ``batch_size`` (default 500), ``checkpoint_interval`` (seconds, default
0.2; 0 saves after every batch).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from runtime.actor import ActorContext
from runtime.bus.protocol import StreamWrite
from runtime.errors import ConfigurationError, MagasinError
from runtime.messages import decode_event, stream_entry
from runtime.store.protocol import Checkpoint, Lease, RecordedEvent


class Relay:
    def __init__(self, context: ActorContext) -> None:
        options: dict[str, Any] = context.options
        self.context = context
        self.name = str(options.get("checkpoint", "relay"))
        self.batch_size = int(options.get("batch_size", 500))
        self.checkpoint_interval = float(options.get("checkpoint_interval", 0.2))
        self.domains = dict(context.topology.domains)
        self.leading = False
        self.published = 0
        self.checkpoint = Checkpoint.START
        self._saved = Checkpoint.START
        # per stream: the checkpoint of the last event it holds, and its publishing id
        self._tails: dict[str, tuple[Checkpoint, int]] = {}
        self._last_lag_update = 0.0

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Ready at once (a standby is healthy); writes only while holding the lease."""
        task_status.started()
        store = self.context.store
        async with store.leader_lease(f"relay:{self.name}") as lease:
            self.leading = True
            self._saved = await store.load_checkpoint(self.name)
            start = await self._read_tails()
            self.checkpoint = start  # every event up to it is in its stream
            logger.info(
                "relay {name} leads, from {start} (checkpoint {saved}, streams {tails})",
                name=self.name,
                start=start,
                saved=self._saved,
                tails={stream: str(tail[0]) for stream, tail in self._tails.items()},
            )
            try:
                async with anyio.create_task_group() as tg:
                    if self.checkpoint_interval > 0:
                        tg.start_soon(self._save_periodically, lease)
                    async with aclosing(store.subscribe(start, self.batch_size)) as batches:
                        async for batch in batches:
                            await self._relay(batch, lease)
            finally:
                self.leading = False
                await self._save_on_the_way_out(lease)

    async def _read_tails(self) -> Checkpoint:
        """What each stream really holds; returns where the store must be read from."""
        bus = self.context.bus
        start: Checkpoint | None = None
        for stream in dict.fromkeys(self.domains.values()):
            entry = await bus.stream_tail(stream, self.name)
            if entry is None:
                tail = (Checkpoint.START, 0)
            else:
                record = decode_event(entry.message_id, entry.body)
                tail = (record.checkpoint, entry.publishing_id)
            self._tails[stream] = tail
            start = tail[0] if start is None else min(start, tail[0])
        return start or Checkpoint.START

    async def _relay(self, batch: list[RecordedEvent], lease: Lease) -> None:
        writes: dict[str, list[StreamWrite]] = {}
        for record in batch:
            stream = self._stream_of(record)
            written, publishing_id = self._tails[stream]
            if record.checkpoint <= written:
                continue  # the stream holds it already
            publishing_id += 1
            self._tails[stream] = (record.checkpoint, publishing_id)
            writes.setdefault(stream, []).append(stream_entry(record, publishing_id))
        for stream, entries in writes.items():
            await self.context.bus.write_stream(stream, self.name, entries)
        # Every event of this batch is confirmed by the broker: only now may the checkpoint
        # move (saved by ``_save``, only while this process still leads).
        self.checkpoint = max(self.checkpoint, batch[-1].checkpoint)
        self.published += sum(len(entries) for entries in writes.values())
        self._count(batch, writes)
        if not self.checkpoint_interval:
            await self._save(lease)
        await self._update_lag()

    def _stream_of(self, record: RecordedEvent) -> str:
        stream = self.domains.get(record.aggregate_type)
        if stream is None:
            raise ConfigurationError(
                f"the relay has no exchange for aggregate type {record.aggregate_type!r} "
                f"(event {record.event_id}); map it under `domains:` in the topology"
            )
        return stream

    def _count(self, batch: list[RecordedEvent], writes: dict[str, list[StreamWrite]]) -> None:
        if not writes:
            return
        metrics = self.context.metrics
        now = datetime.now(UTC)
        published: Counter[tuple[str, str]] = Counter()
        written = {entry.message_id for entries in writes.values() for entry in entries}
        for record in batch:
            if str(record.event_id) not in written:
                continue
            exchange = self.domains[record.aggregate_type]
            published[exchange, record.event_type] += 1
            committed = record.created_at
            if committed.tzinfo is None:
                committed = committed.replace(tzinfo=UTC)
            latency = max(0.0, (now - committed).total_seconds())
            metrics.event_publishing_duration_seconds.observe({"exchange": exchange}, latency)
        for (exchange, event_type), count in published.items():
            metrics.events_published_total.add(
                {"exchange": exchange, "event_type": event_type}, count
            )

    async def _save(self, lease: Lease) -> None:
        """Save the checkpoint if it moved, after checking the lease."""
        if self.checkpoint == self._saved:
            return
        await lease.check()
        checkpoint = self.checkpoint
        await self.context.store.save_checkpoint(self.name, checkpoint)
        self._saved = checkpoint

    async def _save_on_the_way_out(self, lease: Lease) -> None:
        """What was confirmed since the last save, unless the lease or the store is gone
        (then the next leader replays it: duplicates, never a loss)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._save(lease)
            except MagasinError as exc:
                logger.info(
                    "relay {name}: checkpoint {checkpoint} not saved on the way out ({exc})",
                    name=self.name,
                    checkpoint=self.checkpoint,
                    exc=exc,
                )

    async def _save_periodically(self, lease: Lease) -> None:
        """Every ``checkpoint_interval``, what was confirmed since (a pause included)."""
        while True:
            await anyio.sleep(self.checkpoint_interval)
            await self._save(lease)

    async def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_update < 1.0:
            return
        self._last_lag_update = now
        stats = await self.context.store.statistics()
        lag = max(0, stats.head_position - self.checkpoint.position)
        self.context.metrics.relay_lag_events.set({"relay": self.name}, lag)
