"""Rebuilding a projection from the event store beside the live one, then swapping them.

``magasin replay <projection>`` runs this while the runtime keeps serving:

1. the projection's handler (the topology's actor of that name) folds every event its queue
   is bound to, read from the store in checkpoint order (the next batch is read while one is
   folded), into a read model of its own (``ReadModelStore.rebuild``). The fold runs in
   memory (``Fold``): documents and versions are held encoded and written to the rebuild in
   bulk (PostgreSQL: COPY) whenever ``buffer`` of them are held, and at the end, so a
   million events cost a few statements, not a transaction per batch;
2. the swap transaction locks out projection writes, applies what the store gained since
   (so nothing the live projection applied meanwhile is lost), and puts the rebuilt read
   model in the live one's place (PostgreSQL: attaches its tables as the projection's
   partitions, no row rewritten); readers see the old read model until the commit.

Events delivered to the live projection after the swap are deduplicated by the swapped
versions, so the result is the fold of the store, as a live projection's is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio
import msgspec
from anyio.abc import TaskGroup
from loguru import logger

from runtime.actor import ActorContext, ActorStatistics
from runtime.bus.memory import MemoryBus
from runtime.bus.streams import topic_matches
from runtime.errors import ConfigurationError
from runtime.messages import routing_key
from runtime.observability.metrics import Metrics
from runtime.projection import ProjectionHandler
from runtime.store.protocol import Checkpoint, EventStore, RecordedEvent
from runtime.store.readmodel import (
    Document,
    Entry,
    ReadModelStore,
    ReadModelTx,
    Rebuild,
    check_name,
    check_page,
    check_version,
    decode_document,
    encode_document,
)
from runtime.topology import Topology, resolve_handler

#: Called after each batch with (events read so far, the store's head position).
Progress = Callable[[int, int], None]


class ReplayReport(msgspec.Struct, frozen=True):
    projection: str
    events_read: int
    events_applied: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events_read / self.seconds if self.seconds else 0.0


class _Offline:
    """The supervisor a replayed handler sees: there is none."""

    ready = False
    live = True

    def statistics(self) -> list[ActorStatistics]:
        return []

    def crash(self, name: str) -> None:
        raise ConfigurationError(f"no runtime here to crash {name!r}: this is a replay")


def projection_handler(topology: Topology, actor: str, store: EventStore) -> ProjectionHandler:
    """The topology's ``actor`` handler, made outside a runtime (it must be a projection)."""
    spec = topology.actors.get(actor)
    if spec is None:
        projections = [n for n, a in topology.actors.items() if a.kind == "projection"]
        raise ConfigurationError(
            f"the topology has no actor {actor!r}; its projections: {', '.join(projections)}"
        )
    context = ActorContext(
        name=actor,
        spec=spec,
        topology=topology,
        store=store,
        bus=MemoryBus(),
        metrics=Metrics(),
        supervisor=_Offline(),
    )
    handler = resolve_handler(spec)(context)
    if not isinstance(handler, ProjectionHandler):
        raise ConfigurationError(
            f"actor {actor!r} ({spec.kind}, {spec.handler}) is not a ProjectionHandler: "
            "only projections can be rebuilt from the store"
        )
    return handler


def bound(topology: Topology, handler: ProjectionHandler) -> Callable[[RecordedEvent], bool]:
    """Whether the relay would route an event to one of the handler's queues."""
    bindings = [b for queue in handler.context.spec.work_queues for b in queue.bindings]
    known: dict[tuple[str, str], bool] = {}  # (aggregate type, event type) -> routed to us

    def wanted(record: RecordedEvent) -> bool:
        kind = (record.aggregate_type, record.event_type)
        routed = known.get(kind)
        if routed is None:
            exchange = topology.domains.get(record.aggregate_type)
            key = routing_key(record)
            routed = known[kind] = any(
                b.exchange == exchange and topic_matches(b.routing_key, key) for b in bindings
            )
        return routed

    return wanted


#: Documents (and versions) per write transaction of a replay.
ROWS_PER_WRITE = 2000
#: Writes handed over at once: (documents, versions, none written before).
_Chunk = list[tuple[dict[tuple[str, str], bytes | None], dict[str, int], bool]]


class Fold:
    """The ``ReadModelTx`` a replay folds into: one writer, a read model that starts empty.

    Documents (encoded, as a transaction stages them) and versions are held in memory.
    :meth:`write_behind` hands what changed to a write in the background (one at a time, in
    order, in transactions of ``ROWS_PER_WRITE`` rows) and forgets everything held, so
    PostgreSQL ingests one chunk as the next is folded; what stays is the address of every
    document and aggregate written (a set entry each, not the documents). :meth:`flush`
    writes and waits. An address being written is read from the chunk in flight, one the
    rebuild holds is read back from it (one read per batch, through ``prefetch`` and
    ``last_versions``), and one it has never been given is known to be absent without
    asking. Nothing is locked: nobody else writes a rebuild.
    """

    def __init__(self, rebuild: Rebuild) -> None:
        self._rebuild = rebuild
        self._docs: dict[tuple[str, str], bytes | None] = {}  # None: absent
        self._versions: dict[str, int] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_versions: set[str] = set()
        self._stored: set[tuple[str, str]] = set()  # documents given to the rebuild
        self._stored_versions: set[str] = set()
        self._writing: dict[tuple[str, str], bytes | None] = {}  # the chunk in flight
        self._writing_versions: dict[str, int] = {}
        self._written = anyio.Event()
        self._written.set()

    @property
    def held(self) -> int:
        return len(self._docs) + len(self._versions)

    async def _load(self, collection: str, keys: Sequence[str]) -> None:
        for key in keys:
            check_name("key", key)
        wanted = [k for k in dict.fromkeys(keys) if (collection, k) not in self._docs]
        stored = []
        for key in wanted:
            address = (collection, key)
            if address in self._writing:
                self._docs[address] = self._writing[address]
            elif address in self._stored:
                stored.append(key)
            else:
                self._docs[address] = None
        if stored:
            found = await self._rebuild.load(collection, stored)
            for key in stored:
                doc = found.get(key)
                self._docs[(collection, key)] = (
                    None if doc is None else encode_document(collection, key, doc)
                )

    async def get(self, collection: str, key: str, *, for_update: bool = False) -> Document | None:
        address = (collection, key)
        if address not in self._docs:
            check_name("collection", collection)
            await self._load(collection, [key])
        raw = self._docs[address]
        return None if raw is None else decode_document(raw)

    async def get_many(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        check_name("collection", collection)
        await self._load(collection, keys)
        found = {}
        for key in keys:
            raw = self._docs[(collection, key)]
            if raw is not None:
                found[key] = decode_document(raw)
        return found

    async def prefetch(self, collection: str, keys: Sequence[str]) -> None:
        check_name("collection", collection)
        await self._load(collection, keys)

    async def put(self, collection: str, key: str, doc: Document) -> None:
        self._docs[(collection, key)] = encode_document(collection, key, doc)
        self._dirty.add((collection, key))

    async def delete(self, collection: str, key: str) -> None:
        check_name("collection", collection)
        check_name("key", key)
        self._docs[(collection, key)] = None
        self._dirty.add((collection, key))

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        check_page(limit, after_key)
        await self.flush()  # the held writes take part in the page
        return await self._rebuild.list(collection, limit=limit, after_key=after_key)

    async def last_version(self, aggregate_id: str) -> int:
        version = self._versions.get(aggregate_id)
        if version is None:
            version = (await self.last_versions([aggregate_id]))[aggregate_id]
        return version

    async def last_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        for aggregate_id in aggregate_ids:
            check_name("aggregate_id", aggregate_id)
        stored = []
        for aggregate_id in dict.fromkeys(aggregate_ids):
            if aggregate_id in self._versions:
                continue
            if aggregate_id in self._writing_versions:
                self._versions[aggregate_id] = self._writing_versions[aggregate_id]
            elif aggregate_id in self._stored_versions:
                stored.append(aggregate_id)
            else:
                self._versions[aggregate_id] = 0
        if stored:
            self._versions.update(await self._rebuild.load_versions(stored))
        return {a: self._versions[a] for a in aggregate_ids}

    async def set_last_version(self, aggregate_id: str, version: int) -> None:
        check_version(version)
        current = self._versions.get(aggregate_id)
        if current is None:
            current = await self.last_version(aggregate_id)
        if version > current:
            self._versions[aggregate_id] = version
            self._dirty_versions.add(aggregate_id)

    async def write_behind(self, task_group: TaskGroup) -> None:
        """Start writing what changed in ``task_group`` (once the previous write is done)
        and forget everything held."""
        await self._written.wait()
        chunk = self._hand_over()
        if chunk:
            self._written = anyio.Event()
            task_group.start_soon(self._write, chunk)

    async def flush(self) -> None:
        """Write what changed, and wait until the rebuild holds everything."""
        await self._written.wait()
        chunk = self._hand_over()
        if chunk:
            self._written = anyio.Event()
            await self._write(chunk)

    def _hand_over(self) -> _Chunk:
        """What changed, as writes (documents, versions, never written before), the one of
        entries the rebuild never had first; held entries are forgotten."""
        new_docs: dict[tuple[str, str], bytes | None] = {}
        old_docs: dict[tuple[str, str], bytes | None] = {}
        for address in self._dirty:
            raw = self._docs[address]
            if address in self._stored:
                old_docs[address] = raw
                if raw is None:
                    self._stored.discard(address)
            elif raw is not None:  # a document deleted before it was ever written: nothing
                new_docs[address] = raw
                self._stored.add(address)
        new_versions: dict[str, int] = {}
        old_versions: dict[str, int] = {}
        for aggregate_id in self._dirty_versions:
            stored = aggregate_id in self._stored_versions
            (old_versions if stored else new_versions)[aggregate_id] = self._versions[aggregate_id]
        self._stored_versions.update(new_versions)
        self._writing = {**new_docs, **old_docs}
        self._writing_versions = {**new_versions, **old_versions}
        self._docs.clear()
        self._versions.clear()
        self._dirty.clear()
        self._dirty_versions.clear()
        writes = [(new_docs, new_versions, True), (old_docs, old_versions, False)]
        return [(docs, versions, new) for docs, versions, new in writes if docs or versions]

    async def _write(self, chunk: _Chunk) -> None:
        # In short transactions: the live relay reads no further than the oldest transaction
        # open in the cluster, so a long one would hold back every event published meanwhile.
        for documents, versions, new in chunk:
            docs, vers = list(documents.items()), list(versions.items())
            for start in range(0, max(len(docs), len(vers)), ROWS_PER_WRITE):
                await self._rebuild.write(
                    dict(docs[start : start + ROWS_PER_WRITE]),
                    dict(vers[start : start + ROWS_PER_WRITE]),
                    new=new,
                )
        self._writing, self._writing_versions = {}, {}
        self._written.set()


async def replay(
    topology: Topology,
    actor: str,
    *,
    store: EventStore,
    read_models: ReadModelStore,
    batch_size: int = 5000,
    buffer: int = 100_000,
    progress: Progress | None = None,
) -> ReplayReport:
    """Rebuild ``actor``'s read model from ``store`` and swap it in; see the module doc.
    ``buffer``: documents and versions held in memory before they are handed to a write
    (at most twice that is held: the chunk being written and the next)."""
    handler = projection_handler(topology, actor, store)
    live = handler.projection
    wanted = bound(topology, handler)
    started = time.perf_counter()
    head = (await store.statistics()).head_position
    checkpoint = Checkpoint.START
    read = applied = 0

    async def fold(tx: ReadModelTx, batch: Sequence[RecordedEvent]) -> int:
        return await handler.project_all(tx, [r for r in batch if wanted(r)])

    async def catch_up(tx: ReadModelTx) -> None:
        """Fold what the store holds past ``checkpoint`` into ``tx``."""
        nonlocal checkpoint, read, applied
        while batch := await store.read_all(checkpoint, batch_size):
            checkpoint = batch[-1].checkpoint
            applied += await fold(tx, batch)
            read += len(batch)

    # The next batch is read from the store while this one is folded.
    send, receive = anyio.create_memory_object_stream[list[RecordedEvent]](1)

    async def read_ahead() -> None:
        nonlocal checkpoint
        async with send:
            while batch := await store.read_all(checkpoint, batch_size):
                checkpoint = batch[-1].checkpoint
                await send.send(batch)

    async with read_models.rebuild(live) as rebuild:
        memory = Fold(rebuild)
        try:
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(read_ahead)
                async for batch in receive:
                    applied += await fold(memory, batch)
                    read += len(batch)
                    if memory.held >= buffer:
                        await memory.write_behind(tg)
                    if progress is not None:
                        progress(read, max(head, batch[-1].position))
        except BaseExceptionGroup as group:
            if len(group.exceptions) > 1:
                raise
            error = group.exceptions[0]  # the reader's or a write's own, with its cause
            error.__suppress_context__ = True
            raise error from error.__cause__
        # What the store gained while the last chunks were written, folded before the swap
        # (whose catch-up holds every projection's writes back) so that one has little left.
        await catch_up(memory)
        await memory.flush()

        await rebuild.swap(catch_up)
    report = ReplayReport(live, read, applied, time.perf_counter() - started)
    logger.info(
        "projection {projection} rebuilt from {read} events ({applied} applied) in "
        "{seconds:.1f}s and swapped in",
        projection=live,
        read=read,
        applied=applied,
        seconds=report.seconds,
    )
    return report
