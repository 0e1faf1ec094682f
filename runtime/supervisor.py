"""The supervisor: one ``ActorRunner`` per actor of the topology, each in its own scope.

A runner starts an actor instance, waits for it to end, and decides as OTP does: restart
it after a backoff (``permanent`` always, ``transient`` only after a crash, ``temporary``
never), or escalate when it restarted more than ``max_restarts`` times within ``window``.
A crash restarts only that actor; unsettled messages go back to RabbitMQ meanwhile (the
instance's channels close with it) and no consumer is held while it backs off.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from runtime.actor import (
    ActorContext,
    ActorInstance,
    ActorStatistics,
    QueueActor,
    ServiceActor,
)
from runtime.bus.protocol import Bus
from runtime.errors import EscalationError, InjectedCrash, UnknownActorError
from runtime.hooks import Hooks, default_hooks
from runtime.observability.metrics import Metrics
from runtime.store.protocol import EventStore

if TYPE_CHECKING:
    from runtime.topology import ActorSpec, Topology

State = Literal["starting", "running", "restarting", "stopping", "stopped", "failed"]
STATES: tuple[State, ...] = ("starting", "running", "restarting", "stopping", "stopped", "failed")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
InstanceFactory = Callable[[str, "ActorSpec"], ActorInstance]


class ActorRunner:
    """Runs one actor: start, watch, restart with backoff, escalate."""

    def __init__(
        self,
        name: str,
        spec: ActorSpec,
        make_instance: Callable[[], ActorInstance],
        *,
        hooks: Hooks,
        metrics: Metrics,
        rng: random.Random,
        clock: Clock,
        sleep: Sleep,
        on_escalate: Callable[[EscalationError], None] | None = None,
    ) -> None:
        from runtime.backoff import Backoff, RestartIntensity  # noqa: PLC0415

        policy = spec.restart
        self.name = name
        self.spec = spec
        self._make_instance = make_instance
        self._on_escalate = on_escalate
        self._hooks = hooks
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self.backoff = Backoff(policy.min_backoff, policy.max_backoff, policy.jitter, rng)
        self.intensity = RestartIntensity(policy.max_restarts, policy.window)
        self.state: State = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self.delays: list[float] = []  # every backoff slept, for introspection and tests
        self._instance: ActorInstance | None = None
        self._scope: anyio.CancelScope | None = None
        self._injected: InjectedCrash | None = None
        self._stopping = False
        self._wake = anyio.Event()
        self.done = anyio.Event()

    def _set_state(self, state: State) -> None:
        self.state = state
        for known in STATES:
            self._metrics.actor_up.set({"actor": self.name, "state": known}, int(known == state))

    def waiting_on(self) -> str | None:
        """The outage this actor is waiting out (holding a message), if any."""
        return self._instance.figures().waiting_on if self._instance is not None else None

    def statistics(self) -> ActorStatistics:
        figures = self._instance.figures() if self._instance is not None else None
        return ActorStatistics(
            name=self.name,
            kind=self.spec.kind,
            state=self.state,
            restarts=self.restarts,
            last_error=self.last_error,
            mailbox_depth=figures.mailbox_depth if figures else 0,
            in_flight=figures.in_flight if figures else 0,
            consumers=figures.consumers if figures and self.state == "running" else 0,
            handled=figures.handled if figures else 0,
            failed=figures.failed if figures else 0,
            queues=tuple(self.spec.queue_names),
            waiting_on=figures.waiting_on if figures else None,
        )

    def stop_requested(self) -> bool:
        return self._stopping

    def _injected_crash(self) -> InjectedCrash | None:
        return self._injected

    def crash(self) -> None:
        """Make the running instance fail as if its handler had raised (chaos drills)."""
        if self._scope is not None and self.state == "running":
            self._injected = InjectedCrash(f"crash of actor {self.name!r} requested")
            self._scope.cancel()

    async def stop(self) -> None:
        """Drain the instance (finish in-flight within the grace period) and end the loop."""
        self._stopping = True
        self._wake.set()
        if self._instance is not None:
            # Whatever its state: an instance still starting must not start running after
            # the stop was asked for (drain before run is remembered by the instance).
            if self.state == "running":
                self._set_state("stopping")
            self._instance.drain()
        await self.done.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        restart = 0
        started = _Once(task_status)
        try:
            while not self.stop_requested():
                began = self._clock()
                error = await self._run_instance(started)
                if self.stop_requested():
                    break
                if not self._should_restart(error):
                    break
                if self._clock() - began >= self.spec.restart.reset_after:
                    restart = 0
                restart += 1
                self.restarts += 1
                # Two ways restarting is not helping: too many in the window, or (with a
                # backoff that spreads them past any window) too many in a row without one
                # healthy run of reset_after seconds.
                in_window = self.intensity.record(self._clock())
                if in_window or restart > self.spec.restart.max_restarts:
                    self._set_state("failed")
                    reason = EscalationError(
                        self.name,
                        max(self.intensity.recent, restart),
                        self.intensity.window,
                        self.last_error,
                    )
                    self._hooks.on_escalation(self.name, str(reason))
                    if self._on_escalate is None:
                        raise reason
                    self._on_escalate(reason)
                    return
                delay = self.backoff.delay(restart)
                self.delays.append(delay)
                self._set_state("restarting")
                self._hooks.on_actor_restarting(self.name, restart, delay)
                await self._interruptible_sleep(delay)
        finally:
            if self.state not in {"failed"}:
                self._set_state("stopped")
            self._hooks.on_actor_stopped(self.name)
            started()
            self.done.set()

    async def _interruptible_sleep(self, delay: float) -> None:
        """Sleep ``delay`` with the injected sleep, cut short by ``stop()``."""
        async with anyio.create_task_group() as tg:

            async def sleeper() -> None:
                await self._sleep(delay)
                tg.cancel_scope.cancel()

            async def waker() -> None:
                await self._wake.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            tg.start_soon(waker)

    async def _run_instance(self, started: _Once) -> BaseException | None:
        """Run one instance to its end; returns the crash, or None for a normal exit."""
        self._injected = None
        error: BaseException | None = None
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                # Building the handler is part of the start: a constructor that raises is
                # this actor's crash, not the runtime's.
                self._instance = self._make_instance()
                if self.stop_requested():
                    self._instance.drain()
                async with anyio.create_task_group() as tg:
                    await tg.start(self._instance.run)
                    self._set_state("running")
                    self._hooks.on_actor_started(self.name)
                    started()
            except Exception as exc:  # noqa: BLE001 - a crash: the supervisor's business
                error = _unwrap(exc)
        self._scope = None
        injected = self._injected_crash()
        if scope.cancelled_caught and injected is not None:
            error = injected
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"
            self._hooks.on_actor_crashed(self.name, error)
        started()  # a first start that failed still lets the supervisor go on
        return error

    def _should_restart(self, error: BaseException | None) -> bool:
        kind = self.spec.restart.type
        if kind == "temporary":
            if error is not None:
                self._set_state("failed")
            return False
        # permanent: always; transient: only after a crash
        return kind == "permanent" or error is not None


class _Once:
    """Signals a task status once, however many times it is called."""

    def __init__(self, task_status: TaskStatus[None]) -> None:
        self._task_status: TaskStatus[None] | None = task_status

    def __call__(self) -> None:
        if self._task_status is not None:
            status, self._task_status = self._task_status, None
            status.started()


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Supervisor:
    """Starts the topology's actors in order, stops them in reverse, reloads on demand."""

    def __init__(
        self,
        topology: Topology,
        *,
        store: EventStore,
        bus: Bus,
        metrics: Metrics,
        hooks: Hooks | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        make_instance: InstanceFactory | None = None,
    ) -> None:
        self.topology = topology
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.hooks = hooks or default_hooks(metrics)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._clock = clock or anyio.current_time
        self._sleep = sleep or anyio.sleep
        self._make_instance = make_instance or self._default_instance
        self.runners: dict[str, ActorRunner] = {}
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        self.escalated: EscalationError | None = None
        self.escalation_linger = 1.0  # seconds /health answers 503 before the exit
        self._started = False

    # --- the handle built-in actors see ----------------------------------------------------

    @property
    def live(self) -> bool:
        return self.escalated is None

    @property
    def ready(self) -> bool:
        ready = (
            self._started
            and self.escalated is None
            and not self._stop.is_set()
            and self.bus.connected
            and all(r.state == "running" for r in self.runners.values())
            and not any(r.waiting_on() for r in self.runners.values())
        )
        self.metrics.runtime_ready.set({}, int(ready))
        return ready

    def statistics(self) -> list[ActorStatistics]:
        return [runner.statistics() for runner in self.runners.values()]

    def crash(self, name: str) -> None:
        runner = self.runners.get(name)
        if runner is None:
            raise UnknownActorError(name, list(self.runners))
        runner.crash()

    # --- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop: actors drain in reverse topology order."""
        self._stop.set()

    def _escalate(self, error: EscalationError) -> None:
        if self.escalated is None:
            self.escalated = error
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for name, spec in self.topology.actors.items():
                    await self._start(name, spec)
                self._started = True
                task_status.started()
                await self._stop.wait()
                if self.escalated is not None:
                    # Unready and not live from the moment of the escalation; let probes
                    # see it before the gateway goes, then drain the others as on SIGTERM.
                    # Wall-clock time for probes, not a backoff: not the injected sleep.
                    await anyio.sleep(self.escalation_linger)
                for runner in reversed(list(self.runners.values())):
                    await runner.stop()
        except Exception as exc:
            error = _unwrap(exc)
            if isinstance(error, EscalationError):
                self.escalated = error
                raise error from None
            raise
        finally:
            self._tg = None
        if self.escalated is not None:
            raise self.escalated

    async def _start(self, name: str, spec: ActorSpec) -> None:
        assert self._tg is not None
        runner = ActorRunner(
            name,
            spec,
            lambda: self._make_instance(name, spec),
            hooks=self.hooks,
            metrics=self.metrics,
            rng=self._rng,
            clock=self._clock,
            sleep=self._sleep,
            on_escalate=self._escalate,
        )
        self.runners[name] = runner
        await self._tg.start(runner.run)

    async def reload(self, topology: Topology) -> dict[str, list[str]]:
        """Apply a new topology: start new actors, restart changed ones, drain removed
        ones; unchanged actors keep running untouched. Returns what changed."""
        old = self.topology.actors
        new = topology.actors
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and new[n] != old[n]]
        added = [n for n in new if n not in old]
        await self.bus.declare(topology.bus_plan())
        self.topology = topology
        for name in reversed(removed + changed):
            await self.runners[name].stop()  # visible (stopping) while it drains
            del self.runners[name]
        for name in changed + added:
            await self._start(name, new[name])
        self.runners = {n: self.runners[n] for n in new}
        logger.info(
            "topology reloaded: added {added}, changed {changed}, removed {removed}",
            added=added,
            changed=changed,
            removed=removed,
        )
        return {"added": added, "changed": changed, "removed": removed}

    # --- instances ---------------------------------------------------------------------------

    def _default_instance(self, name: str, spec: ActorSpec) -> ActorInstance:
        from runtime.topology import resolve_handler  # noqa: PLC0415

        context = ActorContext(
            name=name,
            spec=spec,
            topology=self.topology,
            store=self.store,
            bus=self.bus,
            metrics=self.metrics,
            supervisor=self,
        )
        handler = resolve_handler(spec)(context)
        grace = self.topology.grace_period
        if spec.queue_names:
            return QueueActor(context, handler, self.hooks, grace)
        return ServiceActor(context, handler, grace)
