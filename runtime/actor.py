"""One actor instance: queues → bounded mailboxes → workers → handler → settle.

The per-message path is a few named steps: route to a mailbox by ordering key, decode and
handle under a timeout, then settle (ack, retry rung, or dead letter). A delivery is acked
only after the handler returned, i.e. after its effect is committed.

What counts as what:
- the handler returns → ack;
- ``Retry`` → the retry ladder; ``Reject`` or a message that cannot be decoded → the DLQ;
- any other exception → the retry ladder, and the DLQ after ``max_attempts``: a bad
  message is the message's failure, not the actor's;
- the store or the broker unavailable → the message is held and handled again in place
  with backoff (no requeue, so no delivery-limit count is burned during an outage);
- the handler overrunning ``handler_timeout`` → the message takes a retry rung and the
  actor crashes, since a stuck handler's state cannot be trusted.

Batches: a handler that also has ``handle_batch`` (a ``BatchHandler``: projections) is given
what waits in a worker's mailbox at once, up to the actor's ``batch_size``, to commit in one
transaction; each delivery is acked after it returns. If the batch fails in any way (or
overruns the timeout), its deliveries are handled again one by one through ``handle``, which
settles each as above: the handler must be all or nothing and deduplicate, as projections do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from runtime.backoff import outage_pause
from runtime.bus.protocol import Bus, Delivery
from runtime.errors import (
    BusError,
    BusUnavailableError,
    HandlerTimeoutError,
    MessageDecodeError,
    PublishNotConfirmedError,
    Reject,
    Retry,
    StoreUnavailableError,
)
from runtime.hooks import Hooks, Outcome
from runtime.observability.metrics import Metrics
from runtime.parking import Parking
from runtime.routing import mailbox_index
from runtime.store.protocol import EventStore
from runtime.stream_source import HELD_FLOOR, Committed, StreamSource

if TYPE_CHECKING:
    from runtime.topology import ActorSpec, Topology

T = TypeVar("T")

#: Errors that mean "the infrastructure is down", not "this message is bad". Other bus
#: errors (unroutable, unknown exchange) are deterministic: the message's failure.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    StoreUnavailableError,
    BusUnavailableError,
    PublishNotConfirmedError,
)
#: Errors after which handling again cannot help: straight to the DLQ.
DEAD_ON_ARRIVAL: tuple[type[Exception], ...] = (
    Reject,
    MessageDecodeError,
    msgspec.DecodeError,
    msgspec.ValidationError,
)


def decode_body(delivery: Delivery, type_: type[T]) -> T:
    """The delivery's JSON body as ``type_``; a ``MessageDecodeError`` (→ DLQ) otherwise."""
    try:
        return msgspec.json.decode(delivery.body, type=type_)
    except msgspec.DecodeError as exc:
        raise MessageDecodeError(delivery.message_id, delivery.body, exc) from exc


class SupervisorHandle(Protocol):
    """What built-in actors (the HTTP gateway) may ask of the supervisor."""

    @property
    def ready(self) -> bool: ...

    @property
    def live(self) -> bool: ...

    def statistics(self) -> list[ActorStatistics]: ...

    def crash(self, name: str) -> None: ...


@dataclass(frozen=True)
class ActorContext:
    """Everything a handler is given: its spec and the runtime's shared resources."""

    name: str
    spec: ActorSpec
    topology: Topology
    store: EventStore
    bus: Bus
    metrics: Metrics
    supervisor: SupervisorHandle

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.spec.options)


@runtime_checkable
class MessageHandler(Protocol):
    """A queue-consuming actor's code. Constructed with its ``ActorContext`` at each start;
    if it is an async context manager it is entered for the life of the instance."""

    async def handle(self, delivery: Delivery) -> None: ...


@runtime_checkable
class BatchHandler(MessageHandler, Protocol):
    """A handler that can also take several deliveries in one transaction."""

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None: ...


@runtime_checkable
class MarksStreams(Protocol):
    """A handler that commits, with each batch's effects, the stream offset of the batch's
    last entry per worker (``ProjectionHandler``): a reading that starts again skips them."""

    async def stream_marks(self, stream: str) -> dict[int, int]: ...


@runtime_checkable
class Service(Protocol):
    """A non-consuming actor (HTTP gateway, relay): runs until cancelled or drained."""

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...


class ActorStatistics(msgspec.Struct, frozen=True):
    name: str
    kind: str
    state: str
    restarts: int
    last_error: str | None
    mailbox_depth: int
    in_flight: int
    consumers: int
    handled: int
    failed: int
    queues: tuple[str, ...] = ()
    waiting_on: str | None = None  # an outage it is waiting out, holding a message


@dataclass
class InstanceFigures:
    mailbox_depth: int = 0
    in_flight: int = 0
    handled: int = 0
    failed: int = 0
    consumers: int = 0
    waiting_on: str | None = None  # an outage the actor is waiting out (not ready)


class ActorInstance(Protocol):
    async def run(self, *, task_status: TaskStatus[None]) -> None: ...

    def drain(self) -> None: ...

    def figures(self) -> InstanceFigures: ...


#: Put in a worker's mailbox to make it look at its parked aggregates (``Parking.poll``
#: found a block lifted or dead-lettered elsewhere). Compared by identity.
WAKE = Delivery("", "", b"", {}, "", "", False, -1)


@dataclass
class QueueActor:
    """Consumes the actor's queues with ``consumers`` workers, one mailbox each."""

    context: ActorContext
    handler: MessageHandler
    hooks: Hooks
    grace_period: float = 10.0
    _draining: anyio.Event = field(default_factory=anyio.Event)
    _in_flight: int = 0
    _waiting: dict[tuple[int, int], str] = field(default_factory=dict)  # delivery -> outage
    _handled: int = 0
    _failed: int = 0
    _receivers: list[MemoryObjectReceiveStream[Delivery]] = field(default_factory=list)
    _parking: Parking | None = None
    _changed: list[set[str]] = field(default_factory=list)  # per worker: blocks to look at
    parking_poll_interval: float = 1.0

    def drain(self) -> None:
        self._draining.set()

    def figures(self) -> InstanceFigures:
        depth = sum(r.statistics().current_buffer_used for r in self._receivers)
        waiting = next(iter(self._waiting.values()), None)
        return InstanceFigures(
            depth, self._in_flight, self._handled, self._failed, len(self._receivers), waiting
        )

    def stream_sources(self) -> list[StreamSource]:
        """One per domain stream the actor binds (its events are read there, not queued)."""
        ctx = self.context
        spec = ctx.spec
        return [
            StreamSource(
                actor=ctx.name,
                stream=stream,
                routing_keys=keys,
                queue=spec.queue_names[0],
                prefetch=spec.prefetch,
                store=ctx.store,
                bus=ctx.bus,
                skipper=partial(self._committed, stream),
                before_reading=self._learn_blocks,
            )
            for stream, keys in spec.stream_bindings(ctx.topology.stream_names).items()
        ]

    async def _learn_blocks(self) -> None:
        """Taking over a stream's reading: learn the blocks another process recorded."""
        if self._parking is not None:
            await self._parking.load()

    async def _committed(self, stream: str) -> Committed | None:
        """The handler's stream marks, if it keeps them with its effects."""
        if not isinstance(self.handler, MarksStreams):
            return None
        marks = await self.handler.stream_marks(stream)
        return Committed(marks, self.context.spec.consumers) if marks else None

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        spec = self.context.spec
        bus = self.context.bus
        async with AsyncExitStack() as stack:
            if hasattr(self.handler, "__aenter__"):
                await stack.enter_async_context(self.handler)  # type: ignore[arg-type]
            sources = [
                await stack.enter_async_context(bus.consume(queue, spec.prefetch))
                for queue in spec.queue_names
            ]
            streams = self.stream_sources()
            self._parking = self._make_parking(streams)
            await self._parking.load()
            senders: list[MemoryObjectSendStream[Delivery]] = []
            for _ in range(spec.consumers):
                send, receive = anyio.create_memory_object_stream[Delivery](spec.prefetch)
                senders.append(stack.enter_context(send))  # closed on every way out
                self._receivers.append(stack.enter_context(receive))
                self._changed.append(set())
            async with anyio.create_task_group() as workers:
                for index, receive in enumerate(self._receivers):
                    workers.start_soon(self._worker, receive, index)
                async with anyio.create_task_group() as pumps:
                    for source in sources:
                        pumps.start_soon(self._pump, source, senders)
                    for stream in streams:
                        pumps.start_soon(stream.run, partial(self._route, senders))
                    if streams:
                        pumps.start_soon(self._poll_parking, senders)
                    task_status.started()
                    await self._draining.wait()
                    pumps.cancel_scope.cancel()  # stop taking deliveries; keep the channels
                for send in senders:
                    send.close()  # workers finish their mailboxes, then end
                workers.cancel_scope.deadline = anyio.current_time() + self.grace_period
            if workers.cancel_scope.cancelled_caught:
                logger.warning(
                    "actor {actor}: grace period over; unsettled messages go back to the queue",
                    actor=self.context.name,
                )

    def _make_parking(self, streams: Sequence[StreamSource]) -> Parking:
        ctx = self.context
        retry = ctx.spec.retry
        ladder = sum(retry.delays) + retry.max_attempts * retry.handler_timeout
        return Parking(
            actor=ctx.name,
            store=ctx.store,
            streams=frozenset(source.stream for source in streams),
            dead_letter=self._dead_letter_parked,
            metrics=ctx.metrics,
            stale_after=max(600.0, 2 * ladder),
            # held copies use up the prefetch that blockers' own copies need to get through
            max_held_copies=max(1, ctx.spec.prefetch // 4),
        )

    async def _dead_letter_parked(self, delivery: Delivery, error: BaseException) -> None:
        ctx = self.context
        await ctx.bus.dead_letter(delivery, error=error, actor=ctx.name)
        self._failed += 1
        self.hooks.after_handle(ctx.name, delivery, "dead_letter", 0.0, error)

    async def _poll_parking(self, senders: list[MemoryObjectSendStream[Delivery]]) -> None:
        """Look for blocks changed elsewhere (lifted by the CLI or by another process that
        handled the blocker, recorded or dead-lettered by another process) and tell their
        workers: a busy worker looks at its changes before its next batch, an idle one is
        woken (``WAKE``)."""
        parking = self._parking
        assert parking is not None
        while True:
            await anyio.sleep(self.parking_poll_interval)
            try:
                changed = await parking.poll()
            except INFRASTRUCTURE_ERRORS as exc:
                logger.warning(
                    "actor {actor}: cannot look at its parked aggregates ({error!r})",
                    actor=self.context.name,
                    error=exc,
                )
                continue
            woken: set[int] = set()
            for key in changed:
                index = mailbox_index(key, len(senders))
                self._changed[index].add(key)
                woken.add(index)
            for index in woken:
                with contextlib.suppress(anyio.WouldBlock):  # full: the worker is busy
                    senders[index].send_nowait(WAKE)

    @staticmethod
    async def _route(senders: list[MemoryObjectSendStream[Delivery]], delivery: Delivery) -> None:
        mailbox = senders[mailbox_index(delivery.ordering_key, len(senders))]
        try:
            mailbox.send_nowait(delivery)  # no checkpoint: anyio's costs more than the rest
        except anyio.WouldBlock:
            await mailbox.send(delivery)  # full: wait for the worker

    async def _pump(
        self, source: AsyncIterator[Delivery], senders: list[MemoryObjectSendStream[Delivery]]
    ) -> None:
        async for delivery in source:
            await self._route(senders, delivery)
        # The source only ends if the consumer was cancelled under us (queue deleted, ...).
        raise BusError(f"the consumer of actor {self.context.name!r} was cancelled")

    async def _worker(self, receive: MemoryObjectReceiveStream[Delivery], index: int) -> None:
        # On drain the mailbox is finished, not handed back: it holds at most ``prefetch``
        # messages, and requeueing them would let later messages of the same key overtake
        # them. What the grace period cannot finish goes back when the channel closes.
        limit = self.context.spec.batch_size
        batching = limit > 1 and isinstance(self.handler, BatchHandler)
        parking = self._parking
        if parking is not None and parking.streams:  # this task's stream marks stay below
            workers = self.context.spec.consumers  # what it holds, whenever they commit
            HELD_FLOOR.set(partial(parking.held_floor, index, workers))
        async with receive:
            async for delivery in receive:
                if self._changed[index]:
                    await self._parking_changed(index)
                if delivery is WAKE:
                    continue
                batch = [delivery]
                while batching and len(batch) < limit:
                    try:
                        waiting = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    if waiting is WAKE:
                        break  # its changes are looked at before the next batch
                    batch.append(waiting)
                await self._run_batch(batch)

    async def _parking_changed(self, index: int) -> None:
        parking = self._parking
        keys, self._changed[index] = self._changed[index], set()
        if parking is not None:
            for released in await parking.take_changes(keys):
                await self._one(released)

    async def _run_batch(self, batch: list[Delivery]) -> None:
        parking = self._parking
        if parking is not None and parking.blocks:
            if any(parking.is_blocker(d) for d in batch):
                # a blocker's copy (a retry, a replay): what follows it in the batch must
                # see the outcome of it first, so one by one
                for delivery in batch:
                    await self._one(delivery)
                return
            batch = [d for d in batch if not await parking.intercept(d)]
        if len(batch) > 1 and await self._process_batch(batch):
            if parking is not None:
                for delivery in batch:
                    for released in await parking.succeeded(delivery):
                        await self._one(released)
            return
        for delivery in batch:
            await self._one(delivery)

    async def _one(self, delivery: Delivery) -> None:
        """Handle one delivery unless it waits behind its aggregate's blocker; if it was the
        blocker and succeeded, what waited behind it follows, in order."""
        parking = self._parking
        if parking is not None and await parking.intercept(delivery):
            return
        if await self._process(delivery) == "ack" and parking is not None:
            for released in await parking.succeeded(delivery):
                await self._one(released)

    async def _process_batch(self, batch: list[Delivery]) -> bool:
        """Handle and ack ``batch`` in one go; False (nothing settled) if that failed."""
        ctx = self.context
        handler = self.handler
        assert isinstance(handler, BatchHandler)
        for delivery in batch:
            self.hooks.before_handle(ctx.name, delivery)
        started = time.perf_counter()
        self._in_flight += len(batch)
        try:
            with (
                logger.contextualize(actor=ctx.name, batch=len(batch)),
                anyio.move_on_after(ctx.spec.retry.handler_timeout) as deadline,
            ):
                await handler.handle_batch(batch)
        except Exception as exc:  # noqa: BLE001 - each message gets its own outcome next
            logger.debug(
                "actor {actor}: a batch of {count} failed ({error!r}); handling them one by one",
                actor=ctx.name,
                count=len(batch),
                error=exc,
            )
            return False
        finally:
            self._in_flight -= len(batch)
        if deadline.cancelled_caught:
            return False
        await ctx.bus.ack_many(batch)  # one multiple ack where the broker allows
        self._handled += len(batch)
        self.hooks.after_batch(ctx.name, batch, time.perf_counter() - started)
        return True

    async def _process(self, delivery: Delivery) -> Outcome:
        ctx = self.context
        self._in_flight += 1
        self.hooks.before_handle(ctx.name, delivery)
        started = time.perf_counter()
        outcome: Outcome = "requeue"  # unless _handle settles it: a crash requeues it
        error: BaseException | None = None
        try:
            with logger.contextualize(
                actor=ctx.name,
                message_id=delivery.message_id,
                correlation_id=delivery.headers.get("x-correlation-id"),
            ):
                outcome, error = await self._handle(delivery)
        finally:
            self._in_flight -= 1
            if outcome == "ack":
                self._handled += 1
            else:
                self._failed += 1
            self.hooks.after_handle(
                ctx.name, delivery, outcome, time.perf_counter() - started, error
            )
        return outcome

    async def _handle(self, delivery: Delivery) -> tuple[Outcome, BaseException | None]:
        ctx = self.context
        bus = ctx.bus
        retry = ctx.spec.retry
        outage = 0
        while True:
            try:
                with anyio.move_on_after(retry.handler_timeout) as deadline:
                    await self.handler.handle(delivery)
            except DEAD_ON_ARRIVAL as exc:
                self._waiting.pop((delivery.consumer, delivery.delivery_tag), None)
                await self._dead_letter(delivery, exc)
                return "dead_letter", exc
            except INFRASTRUCTURE_ERRORS as exc:
                # The store or the broker is down, not this message. Hold the delivery and
                # try again in place: requeueing it (or crashing, which requeues the whole
                # mailbox) would count against every message's delivery limit at each
                # restart and dead-letter innocent messages during a long outage. The rest
                # of the mailbox waits behind it; a drain or a crash cancels the wait.
                outage += 1
                waiting = f"{type(exc).__name__}: {exc}"
                self._waiting[delivery.consumer, delivery.delivery_tag] = waiting
                pause = outage_pause(outage)
                logger.warning(
                    "actor {actor}: {error!r}; holding the message, retry in {pause:g}s",
                    actor=ctx.name,
                    error=exc,
                    pause=pause,
                )
                await anyio.sleep(pause)
                continue
            except Exception as exc:  # noqa: BLE001 - any other handler failure is the message's
                return await self._retry_or_dead_letter(delivery, exc), exc
            self._waiting.pop((delivery.consumer, delivery.delivery_tag), None)
            if deadline.cancelled_caught:
                timeout = HandlerTimeoutError(ctx.name, retry.handler_timeout)
                await self._retry_or_dead_letter(delivery, timeout)
                raise timeout
            await bus.ack(delivery)
            return "ack", None

    async def _retry_or_dead_letter(self, delivery: Delivery, error: BaseException) -> Outcome:
        ctx = self.context
        policy = ctx.spec.retry
        attempts = delivery.attempts + 1
        if attempts >= policy.max_attempts:
            await self._dead_letter(delivery, error)
            return "dead_letter"
        rung = min(attempts, len(policy.delays))
        if isinstance(error, Retry) and error.delay is not None:
            # The smallest rung that waits at least as long as asked (the last one at most).
            longer = [i for i, d in enumerate(policy.delays, start=1) if d >= error.delay]
            rung = longer[0] if longer else len(policy.delays)
        if self._parking is not None:  # before the retry: later events wait behind it
            await self._parking.failed(delivery, dead=False, reason=_reason(error))
        await ctx.bus.retry(delivery, rung=rung, error=error, actor=ctx.name)
        return "retry"

    async def _dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        ctx = self.context
        parking = self._parking
        if parking is not None:  # before the DLQ: later events follow it there
            await parking.failed(delivery, dead=True, reason=_reason(error))
        await ctx.bus.dead_letter(delivery, error=error, actor=ctx.name)
        if parking is not None:
            await parking.dead_lettered(delivery)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class ServiceActor:
    """Runs a ``Service``; draining asks it to stop if it can, else cancels it."""

    context: ActorContext
    service: Service
    grace_period: float = 10.0
    _scope: anyio.CancelScope | None = None

    def drain(self) -> None:
        """Ask the service to finish; cancel it if it has not within the grace period."""
        stop: Callable[[], object] | None = getattr(self.service, "drain", None)
        if stop is not None:
            stop()
        if self._scope is not None:
            self._scope.deadline = min(
                self._scope.deadline,
                anyio.current_time() + (self.grace_period if stop is not None else 0),
            )

    def figures(self) -> InstanceFigures:
        return InstanceFigures()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        async with AsyncExitStack() as stack:
            if hasattr(self.service, "__aenter__"):
                await stack.enter_async_context(self.service)  # type: ignore[arg-type]
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with anyio.create_task_group() as tg:
                    await tg.start(_start_service, self.service)
                    task_status.started()


async def _start_service(service: Service, *, task_status: TaskStatus[None]) -> None:
    await service.run(task_status=task_status)
