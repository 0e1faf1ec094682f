"""An actor's reading of one domain stream: from its saved offset into its mailboxes.

One reader per actor and stream across every runtime process: the reader holds a lease on
the store (as the relay does); the others wait as standbys and take over when it dies. It
reads from the offset it saved, hands the entries whose routing key the actor binds to the
mailboxes (by the key hash, like queue deliveries, so one aggregate's events stay in order),
and saves the offset every entry before which is settled (handled, or parked in the actor's
retry or dead-letter queue) at most every ``save_interval`` and when it stops. What was
handed out and not settled when the process dies is read again: the effects deduplicate by
event id or aggregate version in their own transaction, as they do for queue redeliveries.

Behind the retention: when the stream no longer holds the offset asked for (its first entry
comes later), the events before the first one it still holds are read from the event store,
the truth, and handed out first; then the stream goes on. Those the actor handled before are
duplicates its effects ignore.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

import anyio
from loguru import logger

from runtime.bus.protocol import Bus, Delivery, StreamDeliveries
from runtime.bus.streams import TopicFilter
from runtime.errors import MagasinError
from runtime.messages import decode_event, encode_event, event_headers, routing_key
from runtime.routing import mailbox_index
from runtime.store.protocol import Checkpoint, EventStore, Lease, RecordedEvent

#: ``delivery_tag``s of the deliveries read from the event store during a catch-up count down
#: from here: negative, so no stream mark or skip takes them for an offset; each is pinned
#: in the reading's settlements until it is settled (``StreamDeliveries.pin``).
FROM_THE_STORE = -2
#: Hands a delivery to the actor's mailboxes (the one its ordering key picks).
Send = Callable[[Delivery], Awaitable[None]]


#: In a worker's task: per stream, the lowest offset the worker holds behind a blocker
#: (``Parking.held_floor``). A stream mark committed with a batch stays below it, so every
#: entry at or below a mark was handled, retried or dead-lettered, never merely held.
HELD_FLOOR: ContextVar[Callable[[], dict[str, int]] | None] = ContextVar(
    "magasin_held_floor", default=None
)


@dataclass(frozen=True)
class Committed:
    """What an actor committed of a stream with its effects (``ProjectionHandler``'s stream
    marks): per worker, the offset up to which all its entries were settled (handled,
    retried or dead-lettered; see ``HELD_FLOOR``). An entry read again at or below its
    worker's mark is skipped."""

    marks: dict[int, int]  # worker -> offset
    workers: int

    @cached_property
    def until(self) -> int:
        """The highest mark: past it, nothing is skipped."""
        return max(self.marks.values(), default=-1)

    def __call__(self, delivery: Delivery) -> bool:
        offset = delivery.delivery_tag
        if offset < 0 or delivery.consumer >= 0:
            return False  # read from the store, or not a stream entry
        return offset <= self.marks.get(mailbox_index(delivery.ordering_key, self.workers), -1)


#: Loads what the actor committed of a stream, as a reading of it starts (None: nothing).
Skipper = Callable[[], Awaitable[Committed | None]]


def stream_offset_name(actor: str, stream: str) -> str:
    """The checkpoint name under which an actor's offset in a stream is saved (its
    ``position`` is the offset to resume from)."""
    return f"stream:{actor}:{stream}"


class StreamSource:
    def __init__(
        self,
        *,
        actor: str,
        stream: str,
        routing_keys: Sequence[str],
        queue: str,
        prefetch: int,
        store: EventStore,
        bus: Bus,
        save_interval: float = 0.2,
        skipper: Skipper | None = None,
        before_reading: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.actor = actor
        self.stream = stream
        self.routing_keys = tuple(routing_keys)
        self.queue = queue
        self.prefetch = prefetch
        self.store = store
        self.bus = bus
        self.save_interval = save_interval
        self.skipper = skipper
        self.before_reading = before_reading  # once the lease is held, before the offset
        self.skipped = 0  # entries read again and skipped, committed before
        self.name = stream_offset_name(actor, stream)
        self.saved = -1
        self.reading = False  # holds the lease and reads

    async def run(self, send: Send) -> None:
        async with self.store.leader_lease(self.name) as lease:
            if self.before_reading is not None:
                await self.before_reading()
            offset = (await self.store.load_checkpoint(self.name)).position
            self.saved = offset
            async with self.bus.consume_stream(
                self.stream,
                queue=self.queue,
                offset=offset,
                routing_keys=self.routing_keys,
                prefetch=self.prefetch,
            ) as deliveries:
                self.reading = True
                logger.info(
                    "actor {actor} reads stream {stream} from offset {offset}",
                    actor=self.actor,
                    stream=self.stream,
                    offset=offset,
                )
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._save_periodically, deliveries, lease)
                        await self._pump(deliveries, send)
                finally:
                    self.reading = False
                    await self._save_on_the_way_out(deliveries, lease)

    async def _pump(self, deliveries: StreamDeliveries, send: Send) -> None:
        first = True
        skip = await self.skipper() if self.skipper is not None else None
        async for delivery in deliveries:
            if first:
                first = False
                if deliveries.first_offset is not None and (
                    deliveries.first_offset > deliveries.requested
                ):
                    await self._catch_up(deliveries, delivery, send)
            if skip is not None:
                if skip(delivery):
                    self.skipped += 1
                    await self.bus.ack(delivery)  # settled: its effect is committed
                    continue
                if delivery.delivery_tag > skip.until:
                    skip = None  # past every mark: nothing more to skip
                    self._skipped_so_far()
            await send(delivery)

    def _skipped_so_far(self) -> None:
        if self.skipped:
            logger.info(
                "actor {actor}: {count} entry(ies) of {stream} read again were committed "
                "before (stream marks): skipped",
                actor=self.actor,
                count=self.skipped,
                stream=self.stream,
            )

    async def _catch_up(self, deliveries: StreamDeliveries, delivery: Delivery, send: Send) -> None:
        """The events before ``delivery`` that the stream no longer holds, from the store."""
        until = decode_event(delivery.message_id, delivery.body).checkpoint
        logger.warning(
            "actor {actor}: stream {stream} no longer holds offset {offset}; reading the "
            "events before {until} from the event store",
            actor=self.actor,
            stream=self.stream,
            offset=self.saved,
            until=until,
        )
        matches = TopicFilter(self.routing_keys)
        after = Checkpoint.START
        count = 0
        while True:
            batch = await self.store.read_all(after, 500)
            for record in batch:
                if record.checkpoint >= until:
                    logger.info(
                        "actor {actor}: {count} event(s) of {stream} read from the event store",
                        actor=self.actor,
                        count=count,
                        stream=self.stream,
                    )
                    return
                if matches(routing_key(record)):
                    count += 1
                    tag = FROM_THE_STORE - count
                    deliveries.pin(tag)  # the saved offset waits for it
                    await send(self._from_store(record, delivery.consumer, tag))
            if not batch:
                return
            after = batch[-1].checkpoint

    def _from_store(self, record: RecordedEvent, consumer: int, tag: int) -> Delivery:
        return Delivery(
            queue=self.queue,
            message_id=str(record.event_id),
            body=encode_event(record),
            headers=event_headers(record),
            exchange=self.stream,
            routing_key=routing_key(record),
            redelivered=True,
            delivery_tag=tag,
            consumer=consumer,
        )

    async def _save(self, deliveries: StreamDeliveries, lease: Lease) -> None:
        settled = deliveries.settled
        if settled == self.saved:
            return
        await lease.check()
        await self.store.save_checkpoint(self.name, Checkpoint(0, settled))
        self.saved = settled

    async def _save_periodically(self, deliveries: StreamDeliveries, lease: Lease) -> None:
        while True:
            await anyio.sleep(self.save_interval)
            await self._save(deliveries, lease)

    async def _save_on_the_way_out(self, deliveries: StreamDeliveries, lease: Lease) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._save(deliveries, lease)
            except MagasinError as exc:
                logger.info(
                    "actor {actor}: offset {offset} of {stream} not saved on the way out ({exc})",
                    actor=self.actor,
                    offset=deliveries.settled,
                    stream=self.stream,
                    exc=exc,
                )
