"""The relay: tails the event store and publishes every event to its domain's exchange.

No dual write: the command side only appends; the relay publishes what was committed. It
reads in checkpoint order (never skipping a late commit) and publishes each batch with
``Bus.publish_many``: every event in flight at once, each with its own publisher confirm
(mandatory: an unroutable event is a failure). Batches overlap: the next one is read and
published while earlier ones await their confirms, and the checkpoint moves past a batch
only once it and every batch before it are confirmed. A crash anywhere replays from the
checkpoint: duplicates downstream are possible (consumers deduplicate), losses are not.

One relay leads across every runtime process: it holds a lease on the store (a PostgreSQL
advisory lock). The others wait as standbys and take over within about a second when the
leader dies or loses its connection; the old leader checks its lease before every
checkpoint and stops when it has lost it.

The checkpoint is saved at most every ``checkpoint_interval`` (and when the relay stops),
not after every batch: at a low rate a batch holds one event, and two more round trips per
event would double the relay's cost. A crash replays at most that interval's events, which
consumers deduplicate.

Options (``actors.relay.options``): ``checkpoint`` (name, default ``relay``),
``batch_size`` (default 500), ``max_in_flight`` (events read and published whose batch, or
an earlier one, awaits confirms: default 1,000, two batches; a larger batch goes alone),
``checkpoint_interval`` (seconds, default 0.2; 0 saves after every batch).
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
from runtime.bus.protocol import Outgoing
from runtime.errors import ConfigurationError, MagasinError
from runtime.messages import encode_event, event_headers, routing_key
from runtime.store.protocol import Checkpoint, Lease, RecordedEvent


class Relay:
    def __init__(self, context: ActorContext) -> None:
        options: dict[str, Any] = context.options
        self.context = context
        self.name = str(options.get("checkpoint", "relay"))
        self.batch_size = int(options.get("batch_size", 500))
        self.max_in_flight = int(options.get("max_in_flight", 1000))
        self.checkpoint_interval = float(options.get("checkpoint_interval", 0.2))
        self.domains = dict(context.topology.domains)
        self.leading = False
        self.published = 0
        self.checkpoint = Checkpoint.START
        self._saved = Checkpoint.START
        self._in_flight = _InFlight(self.max_in_flight)
        self._last_lag_update = 0.0

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Ready at once (a standby is healthy); publishes only while holding the lease."""
        task_status.started()
        store = self.context.store
        async with store.leader_lease(f"relay:{self.name}") as lease:
            self.leading = True
            self.checkpoint = await store.load_checkpoint(self.name)
            logger.info(
                "relay {name} leads, from checkpoint {checkpoint}",
                name=self.name,
                checkpoint=self.checkpoint,
            )
            self._saved = self.checkpoint
            try:
                async with anyio.create_task_group() as tg:
                    if self.checkpoint_interval > 0:
                        tg.start_soon(self._save_periodically, lease)
                    async with aclosing(
                        store.subscribe(self.checkpoint, self.batch_size)
                    ) as batches:
                        # Batches overlap: the next is read and published while the broker
                        # confirms the previous ones; the checkpoint follows them in order.
                        previous: anyio.Event | None = None
                        async for batch in batches:
                            await self._in_flight.take(len(batch))
                            done = anyio.Event()
                            tg.start_soon(self._relay, batch, previous, done, lease)
                            previous = done
            finally:
                self.leading = False
                await self._save_on_the_way_out(lease)

    async def _relay(
        self,
        batch: list[RecordedEvent],
        previous: anyio.Event | None,
        done: anyio.Event,
        lease: Lease,
    ) -> None:
        await self.context.bus.publish_many([self._outgoing(record) for record in batch])
        if previous is not None:
            await previous.wait()
        # Room for the next batch only now: a batch held unconfirmed holds back the
        # batches after it (their checkpoint waits for it), so they count until then.
        self._in_flight.give(len(batch))
        # Every event of this batch and of the ones before is confirmed by the broker:
        # only now may the checkpoint move (saved by ``_save``, only while this process
        # still leads).
        self.checkpoint = batch[-1].checkpoint
        self.published += len(batch)
        self._count(batch)
        if not self.checkpoint_interval:
            await self._save(lease)
        await self._update_lag()
        done.set()

    def _outgoing(self, record: RecordedEvent) -> Outgoing:
        exchange = self.domains.get(record.aggregate_type)
        if exchange is None:
            raise ConfigurationError(
                f"the relay has no exchange for aggregate type {record.aggregate_type!r} "
                f"(event {record.event_id}); map it under `domains:` in the topology"
            )
        return Outgoing(
            exchange,
            routing_key(record),
            encode_event(record),
            str(record.event_id),
            event_headers(record),
            mandatory=True,
        )

    def _count(self, batch: list[RecordedEvent]) -> None:
        metrics = self.context.metrics
        now = datetime.now(UTC)
        published: Counter[tuple[str, str]] = Counter()
        for record in batch:
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


class _InFlight:
    """Events published whose checkpoint cannot move yet, up to ``limit`` (one taker: the
    relay's loop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._freed = anyio.Event()

    async def take(self, n: int) -> None:
        while self.count and self.count + n > self.limit:
            await self._freed.wait()
        self.count += n

    def give(self, n: int) -> None:
        self.count -= n
        self._freed.set()
        self._freed = anyio.Event()
