"""Projections: relayed events folded into read models, each effect exactly once, in order.

A ``ProjectionHandler`` subclass declares its ``codec`` and implements ``apply(tx, event)``, a
pure effect on the read model. ``handle`` does the rest, in one read-model transaction:

1. decode the delivery (``decode_event``; an undecodable body is a ``MessageDecodeError``);
2. lock and read the last version of the event's aggregate this projection applied;
3. ``version <= last``: a duplicate, nothing to do;
   ``version == last + 1``: apply it;
   ``version > last + 1``: a gap (a retry or a redelivery overtook an earlier event): read
   the missing events from the event store, which is the truth, and apply them first;
4. record the new version, commit; the runtime acks once ``handle`` returns.

``handle_batch`` does the same for several deliveries in one transaction (the runtime hands
a worker's waiting mailbox over at once, up to the actor's ``batch_size``): it locks every
aggregate's version in one statement, in key order, reads what ``prefetch`` names in one
statement per collection, applies each stream's events in order, and commits once; the
runtime acks each delivery after that commit. If the batch fails as a whole, the runtime
handles its deliveries one by one, so a bad message still gets its own retry or dead letter.

So the read model is always the fold of a prefix of each stream, whatever the bus does
(guarantees 2 and 3); a late copy of an event the gap healing already applied is then a
duplicate. The read-model store comes from the topology's ``database_url`` (``memory://``:
the process-wide embedded store, which queries share) and the actor's ``schema`` option.

Stream marks: the same transaction records, per worker, the stream offset of the batch's last
entry (``stream_marks``, a document of the reserved collection ``MARKS``). A reader that
starts again (after a crash its saved offset may lag by up to a fraction of a second) skips
the entries at or below its worker's mark without handing them out: what was committed is
not handled twice, and not even looked up.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ClassVar, Self

from loguru import logger

from runtime.actor import ActorContext
from runtime.bus.protocol import Delivery
from runtime.errors import ActorError, ConfigurationError, EventDecodeError, Reject, Retry
from runtime.messages import decode_event
from runtime.routing import mailbox_index
from runtime.store.codec import Envelope, EventCodec
from runtime.store.protocol import RecordedEvent
from runtime.store.readmodel import ReadModelStore, ReadModelTx, open_read_model_store
from runtime.stream_source import HELD_FLOOR


class ReadModelOwner:
    """Opens the topology's read-model store for the life of an actor instance (``async
    with``): ``database_url``, the actor's ``schema`` option, a pool of ``pool_size``."""

    context: ActorContext
    _read_models: ReadModelStore | None = None

    def _pool_size(self) -> int:
        return self.context.spec.consumers + 1

    @property
    def read_models(self) -> ReadModelStore:
        if self._read_models is None:
            raise ActorError(
                f"the read models of actor {self.context.name!r} are not open: use "
                "`async with handler:` (the runtime enters it for the life of the actor instance)"
            )
        return self._read_models

    async def __aenter__(self) -> Self:
        self._stack = AsyncExitStack()
        self._read_models = await self._stack.enter_async_context(
            open_read_model_store(
                self.context.topology.database_url,
                schema=str(self.context.options.get("schema", "public")),
                max_size=self._pool_size(),
            )
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._read_models = None
        await self._stack.aclose()


#: The read-model collection where a projection's stream marks live (one document per
#: stream, worker and number of workers: ``{"offset": N}``).
MARKS = "magasin.stream-marks"


def mark_name(stream: str, worker: int, workers: int) -> str:
    return f"{stream}:{worker}/{workers}"


def batch_marks(
    deliveries: Sequence[Delivery], workers: int, floor: dict[str, int] | None = None
) -> dict[str, int]:
    """The offset of the last stream entry of each (stream, worker) in ``deliveries``
    (entries carry their offset as ``delivery_tag`` and a negative ``consumer``), kept
    below ``floor`` (per stream, the lowest offset the worker holds unhandled)."""
    marks: dict[str, int] = {}
    for delivery in deliveries:
        if delivery.consumer < 0 and delivery.delivery_tag >= 0:
            offset = delivery.delivery_tag
            if floor and delivery.exchange in floor:
                offset = min(offset, floor[delivery.exchange] - 1)
            worker = mailbox_index(delivery.ordering_key, workers)
            name = mark_name(delivery.exchange, worker, workers)
            marks[name] = max(offset, marks.get(name, -1))
    return {name: offset for name, offset in marks.items() if offset >= 0}


class ProjectionHandler(ReadModelOwner, abc.ABC):
    """Base of projection and subscriber handlers; see the module docstring."""

    #: Decodes the payloads ``apply`` receives; register every event type of the streams bound.
    codec: ClassVar[EventCodec]
    #: The read-model namespace; None: the actor's name.
    projection_name: ClassVar[str | None] = None

    def __init__(self, context: ActorContext) -> None:
        if not isinstance(getattr(type(self), "codec", None), EventCodec):
            raise ConfigurationError(
                f"{type(self).__name__} must declare `codec = EventCodec().register(...)` "
                "with the event types it projects"
            )
        self.context = context
        self.projection = self.projection_name or context.name

    @abc.abstractmethod
    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        """The event's effect on the read model, through ``tx`` only (it may run again if
        the transaction is retried, so keep other side effects out of it)."""

    def prefetch(self, record: RecordedEvent) -> Iterable[tuple[str, str]]:
        """The documents (collection, key) that ``apply`` will read for ``record``: a batch
        reads them all in one statement per collection beforehand. Optional."""
        return ()

    async def handle(self, delivery: Delivery) -> None:
        await self.handle_batch([delivery])

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        records = [decode_event(d.message_id, d.body) for d in deliveries]
        held = HELD_FLOOR.get()

        async def work(tx: ReadModelTx) -> int:
            applied = await self.project_all(tx, records)
            floor = held() if held is not None else None  # what is held now, at the commit
            for name, offset in batch_marks(deliveries, self.context.spec.consumers, floor).items():
                await tx.put(MARKS, name, {"offset": offset})
            return applied

        applied = await self.read_models.run(self.projection, work)
        counter = getattr(self.context.metrics, "projection_updates_total", None)
        if applied and counter is not None:
            counter.add({"projection": self.projection}, applied)

    async def stream_marks(self, stream: str) -> dict[int, int]:
        """The last offset of ``stream`` each worker committed (for today's number of
        workers; after a rescale, none: the effects deduplicate by version instead)."""
        workers = self.context.spec.consumers
        wanted = {mark_name(stream, worker, workers): worker for worker in range(workers)}
        found = await self.read_models.run(
            self.projection, lambda tx: tx.get_many(MARKS, list(wanted))
        )
        return {wanted[name]: int(doc["offset"]) for name, doc in found.items()}

    async def project_all(self, tx: ReadModelTx, records: Sequence[RecordedEvent]) -> int:
        """``project`` each record in ``tx``: every aggregate's version locked in one
        statement, the ``prefetch`` documents read in one per collection, each stream's
        records in their order; returns how many events were applied."""
        streams: dict[str, list[RecordedEvent]] = {}
        wanted: dict[str, list[str]] = {}
        for record in records:
            streams.setdefault(record.aggregate_id, []).append(record)
            for collection, key in self.prefetch(record):
                wanted.setdefault(collection, []).append(key)
        await tx.last_versions(list(streams))
        for collection, keys in wanted.items():
            await tx.prefetch(collection, keys)
        applied = 0
        for aggregate_id in sorted(streams):
            for record in streams[aggregate_id]:
                applied += await self.project(tx, record)
        return applied

    async def project(self, tx: ReadModelTx, record: RecordedEvent) -> int:
        """Apply ``record`` after any events of its stream missing before it, unless it was
        applied already; returns how many events were applied."""
        last = await tx.last_version(record.aggregate_id)
        if record.version <= last:
            return 0
        if record.version == last + 1:  # the common case, taken once per event of a replay
            await self.apply(tx, self._decode(record))
            await tx.set_last_version(record.aggregate_id, record.version)
            return 1
        pending = [*await self._missing(record, last), record]
        for event in pending:
            await self.apply(tx, self._decode(event))
        await tx.set_last_version(record.aggregate_id, record.version)
        return len(pending)

    async def _missing(self, record: RecordedEvent, last: int) -> list[RecordedEvent]:
        """The stream's events between ``last`` and ``record``, from the event store."""
        if record.version == last + 1:
            return []
        stored = await self.context.store.read_stream(record.stream, from_version=last + 1)
        missing = [event for event in stored if event.version < record.version]
        if [event.version for event in missing] != list(range(last + 1, record.version)):
            raise Retry(
                f"projection {self.projection!r} needs versions {last + 1}..{record.version - 1} "
                f"of {record.stream} before version {record.version}, and the event store "
                f"does not have them all (found {[event.version for event in missing]})"
            )
        logger.info(
            "projection {projection}: {count} event(s) of {stream} missing before version "
            "{version}; applying them from the event store",
            projection=self.projection,
            count=len(missing),
            stream=record.stream,
            version=record.version,
        )
        return missing

    def _decode(self, record: RecordedEvent) -> Envelope[Any]:
        try:
            return self.codec.decode(record)
        except EventDecodeError as exc:
            # Handling it again cannot help until the code knows the type: dead-letter it.
            # Later events of its stream heal the gap through it, so they follow it there,
            # and replaying the dead letters after the fix applies them in order.
            raise Reject(f"projection {self.projection!r} cannot decode it: {exc}") from exc
