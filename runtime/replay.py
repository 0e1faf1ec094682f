"""Rebuilding a projection from the event store beside the live one, then swapping them.

``magasin replay <projection>`` runs this while the runtime keeps serving:

1. the projection's handler (the topology's actor of that name) folds every event its queue
   is bound to, read from the store in checkpoint order, into a shadow namespace
   ``<projection>~replay`` (a batch of events per read-model transaction);
2. the swap transaction locks out projection writes, applies what the store gained since
   (so nothing the live projection applied meanwhile is lost), and gives the shadow's
   documents and versions to the live name; readers see the old read model until the commit.

Events delivered to the live projection after the swap are deduplicated by the swapped
versions, so the result is the fold of the store, as a live projection's is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import anyio
import msgspec
from loguru import logger

from runtime.actor import ActorContext, ActorStatistics
from runtime.bus.memory import MemoryBus, topic_matches
from runtime.errors import ConfigurationError
from runtime.messages import routing_key
from runtime.observability.metrics import Metrics
from runtime.projection import ProjectionHandler
from runtime.store.protocol import Checkpoint, EventStore, RecordedEvent
from runtime.store.readmodel import ReadModelStore, ReadModelTx
from runtime.topology import Topology, resolve_handler

SHADOW_SUFFIX = "~replay"

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


async def replay(
    topology: Topology,
    actor: str,
    *,
    store: EventStore,
    read_models: ReadModelStore,
    batch_size: int = 2000,
    progress: Progress | None = None,
) -> ReplayReport:
    """Rebuild ``actor``'s read model from ``store`` and swap it in; see the module doc."""
    handler = projection_handler(topology, actor, store)
    live = handler.projection
    shadow = live + SHADOW_SUFFIX
    handler.projection = shadow
    handler._read_models = read_models  # the store is ours, not the actor's
    wanted = bound(topology, handler)
    started = time.perf_counter()
    await read_models.drop(shadow)  # what an interrupted replay left
    head = (await store.statistics()).head_position
    checkpoint = Checkpoint.START
    read = applied = 0

    async def fold(tx: ReadModelTx, *, batch: Sequence[RecordedEvent]) -> int:
        return await handler.project_all(tx, [r for r in batch if wanted(r)])

    # The next batch is read from the store while this one is folded (two connections).
    send, receive = anyio.create_memory_object_stream[list[RecordedEvent]](1)

    async def read_ahead() -> None:
        nonlocal checkpoint
        async with send:
            while batch := await store.read_all(checkpoint, batch_size):
                checkpoint = batch[-1].checkpoint
                await send.send(batch)

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(read_ahead)
        async for batch in receive:
            applied += await read_models.run(shadow, partial(fold, batch=batch))
            read += len(batch)
            if progress is not None:
                progress(read, max(head, batch[-1].position))

    async def catch_up(tx: ReadModelTx) -> None:
        nonlocal checkpoint, read, applied
        while batch := await store.read_all(checkpoint, batch_size):
            checkpoint = batch[-1].checkpoint
            applied += await fold(tx, batch=batch)
            read += len(batch)

    await read_models.swap(live, shadow, catch_up)
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
