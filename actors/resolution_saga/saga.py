"""The resolution saga orchestrator (``kind: saga``, queue ``saga.orchestration``).

Started by ``ComplaintCreated``, it:

1. assigns the complaint to the least loaded agent of its store (the ``workload`` projection;
   the store's agents are the ``agents`` option), with ``If-Match: 1`` so that a complaint
   someone already touched is left alone;
2. asks the notifier to acknowledge the complaint to the customer;
3. arms the SLA timer of the complaint's priority (a document in PostgreSQL that the
   ``SagaTimers`` service fires once, also after restarts). A deadline that passes before the
   resolution escalates the complaint.

On ``ComplaintResolved`` the timer is cancelled; a refund or a voucher is then asked of the
payments participant. If the payment fails after the participant's retries, the saga runs its
compensations in reverse order of the steps: reopen the complaint, tell the customer, flag it
for a manager (an escalation). A compensation that is refused parks the saga in
``compensation_failed`` until ``magasin saga retry <complaint id>``.

Exactly once: every command and message the saga sends has an id derived from the saga and
the step (``deterministic_id``), so a step run again after a crash is answered from its first
result (commands) or deduplicated (messages). The complaint events it handled are recorded
by version, other messages by message id, in the transaction that saves the saga; the save
checks the saga's version (optimistic concurrency) and a conflict hands the message back.
A message that names a saga never starts one; a timer that fires after the saga finished is
ignored.

Options: ``agents`` (store id → agent ids), ``sla`` (priority → duration; defaults urgent 4h,
high 24h, normal 48h, low 72h), ``compensable`` (resolutions paid back; default refund,
voucher), ``manager`` (who compensations flag), ``command_timeout`` (seconds, default 5),
``start_window`` (a complaint first seen through a later event is taken on only if created
within this many seconds; default 3600), ``schema``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from uuid import UUID

import msgspec
from loguru import logger

from actors.complaints.domain import CODEC as COMPLAINT_CODEC
from actors.complaints.domain import (
    AssignComplaint,
    ComplaintAssigned,
    ComplaintCreated,
    ComplaintEscalated,
    ComplaintResolved,
    ComplaintWithdrawn,
    EscalateComplaint,
    ReopenComplaint,
)
from actors.complaints.handler import COMMAND_QUEUE
from actors.complaints.projections import timestamp
from actors.notifications.messages import (
    NOTIFICATION_REQUESTED,
    NOTIFICATIONS_EXCHANGE,
    NotificationRequested,
)
from actors.resolution_saga.messages import (
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_REQUESTED,
    RETRY_REQUESTED,
    SAGA_EXCHANGE,
    TIMER_FIRED,
    PaymentRequested,
    PaymentResult,
    RetryRequested,
    TimerFired,
)
from actors.resolution_saga.state import (
    COMPENSATIONS,
    DEFAULT_COMPENSABLE,
    DEFAULT_SLA,
    DEFAULT_SLA_LOW,
    HANDLED,
    INSTANCES,
    NAMESPACE,
    SAGA_TYPE,
    TIMERS,
    Compensation,
    Saga,
    StepStatus,
    Timer,
    decode_saga,
    deterministic_id,
    encode_saga,
    least_loaded,
    sla_for,
)
from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import Delivery, HeaderValue
from runtime.commands import CommandReply, CommandRequest, send_command
from runtime.errors import (
    ActorError,
    BusUnavailableError,
    ConfigurationError,
    Reject,
    RequestTimeoutError,
    Retry,
)
from runtime.messages import (
    X_AGGREGATE_ID,
    X_AGGREGATE_TYPE,
    X_CAUSATION_ID,
    X_CORRELATION_ID,
    X_EVENT_TYPE,
    X_OCCURRED_AT,
    X_USER,
    decode_event,
)
from runtime.projection import ReadModelOwner
from runtime.store.protocol import RecordedEvent, as_utc
from runtime.store.readmodel import ReadModelTx
from runtime.topology import parse_duration

SAGA_USER: Final = "resolution-saga"


SagaMessage = TimerFired | PaymentResult | RetryRequested
Reaction = Callable[[Saga, Any, str], Awaitable[list[Timer] | None]]


class SagaConflictError(ActorError):
    """The saga moved on since it was loaded (another worker or process handled a message of
    it): the message is handed back and handled again on the new state."""


def timer_document(timer: Timer) -> dict[str, Any]:
    """A timer as the timer service queries it: ``due_at`` as text in time order, and
    ``send_at`` (when to send it next; the service moves it on after each send) starting at
    the deadline."""
    document: dict[str, Any] = msgspec.to_builtins(timer)
    document["due_at"] = document["send_at"] = timestamp(timer.due_at)
    return document


def _now() -> datetime:
    return datetime.now(UTC)


class ComplaintResolutionSaga(ReadModelOwner):
    def __init__(self, context: ActorContext) -> None:
        self.context = context
        options = context.options
        try:
            self.agents = {
                str(store): [str(agent) for agent in agents]
                for store, agents in dict(options.get("agents") or {}).items()
            }
            self.sla = {
                **DEFAULT_SLA,
                "low": DEFAULT_SLA_LOW,
                **{
                    str(p): parse_duration(value)
                    for p, value in dict(options.get("sla") or {}).items()
                },
            }
            self.compensable = tuple(
                str(r) for r in options.get("compensable", DEFAULT_COMPENSABLE)
            )
            self.command_timeout = float(options.get("command_timeout", 5.0))
            self.start_window = float(options.get("start_window", 3600.0))
        except (TypeError, ValueError, ConfigurationError) as exc:
            raise ConfigurationError(
                f"actor {context.name!r}: bad saga options ({exc}); expected agents: "
                "{store: [agent, ...]}, sla: {priority: duration}, compensable: [resolution]"
            ) from exc
        manager = options.get("manager")
        self.manager = None if manager is None else str(manager)
        self._domains = frozenset(context.topology.domains.values())
        #: routing key -> (message type, reaction): a reaction gets the saga, the decoded
        #: message and the delivery's message id (the cause of what it sends); it returns the
        #: timers it changed, or None when it ignored the message (nothing to save).
        self._messages: dict[str, tuple[type[SagaMessage], Reaction]] = {
            TIMER_FIRED: (TimerFired, self._on_timer),
            PAYMENT_COMPLETED: (PaymentResult, self._on_payment),
            PAYMENT_FAILED: (PaymentResult, self._on_payment),
            RETRY_REQUESTED: (RetryRequested, self._on_retry),
        }

    # --- entry -----------------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        if delivery.original_exchange in self._domains:
            record = decode_event(delivery.message_id, delivery.body)
            if record.aggregate_type == "complaint":
                await self._on_complaint_event(record)
            return
        reaction = self._messages.get(delivery.original_routing_key)
        if reaction is None:
            raise Reject(
                f"the resolution saga does not handle {delivery.original_routing_key!r} messages "
                f"(it handles {', '.join(sorted(self._messages))})"
            )
        message_type, react = reaction
        message = decode_body(delivery, message_type)
        saga_id = message.saga_id
        saga = await self._load(saga_id)
        if saga is None:
            logger.info(
                "{kind} for saga {saga_id}, which does not exist: ignored (a message never "
                "starts a saga)",
                kind=delivery.original_routing_key,
                saga_id=saga_id,
            )
            return
        correlation = delivery.headers.get(X_CORRELATION_ID)
        saga.current_correlation = str(correlation) if correlation else None
        handled_key = f"{saga_id}:{delivery.message_id}"
        if await self.read_models.get(NAMESPACE, HANDLED, handled_key) is not None:
            return
        changed = await react(saga, message, delivery.message_id)
        if changed is not None:  # None: ignored, nothing to record
            await self._save(saga, timers=changed, handled=handled_key)

    # --- complaint events ------------------------------------------------------------------

    async def _on_complaint_event(self, record: RecordedEvent) -> None:
        async def last_version(tx: ReadModelTx) -> int:
            return await tx.last_version(record.aggregate_id)

        last = await self.read_models.run(NAMESPACE, last_version)
        if record.version <= last:
            return  # a duplicate
        if record.version > last + 1:
            missing = [
                r
                for r in await self.context.store.read_stream(record.stream, last + 1)
                if r.version < record.version
            ]
            if last == 0 and not await self._takes_on(missing, record):
                return
            for earlier in missing:
                await self._apply(earlier)
        await self._apply(record)

    async def _takes_on(self, missing: list[RecordedEvent], record: RecordedEvent) -> bool:
        """A complaint seen first through a later event (its creation was overtaken, or it
        was created before this saga ran): taken on only if created recently, so that
        enabling the saga does not replay the payments of old resolutions."""
        created = as_utc(missing[0].created_at if missing else record.created_at)
        recent = _now() - created <= timedelta(seconds=self.start_window)
        if not recent:
            logger.debug(
                "complaint {complaint_id} was created before the saga ran: not taken on",
                complaint_id=record.aggregate_id,
            )
        return recent

    async def _apply(self, record: RecordedEvent) -> None:
        event = COMPLAINT_CODEC.decode(record).payload
        saga = await self._load(record.aggregate_id)
        changed: list[Timer] = []
        if saga is not None:
            saga.current_correlation = record.metadata.correlation_id
        if saga is None:
            if not isinstance(event, ComplaintCreated):
                return  # no saga for it: nothing to do
            saga, changed = await self._start(record, event)
        elif isinstance(event, ComplaintAssigned):
            saga.assignee = event.assignee
        elif isinstance(event, ComplaintEscalated):
            saga.priority = event.priority
        elif isinstance(event, ComplaintResolved):
            changed = await self._on_resolved(saga, record, event)
        elif isinstance(event, ComplaintWithdrawn):
            changed = self._cancel_timers(saga)
            if saga.state in {"running", "awaiting_payment"}:
                saga.record("withdrawn", "done", _now())
                await self._finish(saga, "completed", record.event_id)
        await self._save(saga, timers=changed, event=record)

    async def _start(
        self, record: RecordedEvent, event: ComplaintCreated
    ) -> tuple[Saga, list[Timer]]:
        now = _now()
        customer = event.customer
        saga = Saga(
            saga_id=record.aggregate_id,
            complaint_id=record.aggregate_id,
            store_id=event.store_id,
            priority=event.priority,
            started_at=now,
            updated_at=now,
            correlation_id=record.metadata.correlation_id,
            customer_id=customer.id,
            customer_email=customer.email,
            customer_name=customer.name,
        )
        self.context.metrics.saga_executions_total.inc({"saga": SAGA_TYPE, "outcome": "started"})
        await self._publish_event(saga, "started", record.event_id)
        await self._assign(saga, record)
        await self._notify(
            saga,
            "notify-customer",
            template="complaint-received",
            recipient=customer.email,
            causation=record.event_id,
        )
        sla = sla_for(event.priority, self.sla)
        timer = Timer(
            timer_id=str(deterministic_id(saga.saga_id, "timer:sla")),
            saga_id=saga.saga_id,
            name="sla",
            due_at=event.created_at + sla,
        )
        saga.timers.append(timer)
        saga.record("arm-sla", "done", _now(), detail=f"due {timestamp(timer.due_at)} ({sla})")
        self._count_step("arm-sla", "done")
        return saga, [timer]

    async def _assign(self, saga: Saga, record: RecordedEvent) -> None:
        agents = self.agents.get(saga.store_id, [])
        if not agents:
            saga.record(
                "assign",
                "skipped",
                _now(),
                detail=f"no agents listed for store {saga.store_id!r} in the saga's options",
            )
            self._count_step("assign", "skipped")
            return
        load = {}
        for candidate in agents:
            doc = await self.read_models.get("workload", "assignees", candidate)
            load[candidate] = int(doc["open"]) if doc else 0
        agent = least_loaded(agents, load)
        assert agent is not None
        command = AssignComplaint(
            saga.complaint_id,
            agent,
            _now(),
            note=f"assigned by the resolution saga: least loaded agent of {saga.store_id}",
        )
        reply = await self._command(saga, "assign", command, record.event_id, expected_version=1)
        if reply.error is None:
            saga.assignee = agent
            saga.record(
                "assign",
                "done",
                _now(),
                detail=f"{agent} ({load[agent]} open)",
                command_id=str(self._command_id(saga, "assign")),
            )
            self._count_step("assign", "done")
        else:
            saga.record("assign", "skipped", _now(), detail=reply.error.detail)
            self._count_step("assign", "skipped")

    async def _on_resolved(
        self, saga: Saga, record: RecordedEvent, event: ComplaintResolved
    ) -> list[Timer]:
        changed = self._cancel_timers(saga)
        saga.resolution = event.resolution
        if saga.state != "running":
            return changed  # a later resolution (after a reopen) starts nothing new
        if event.resolution not in self.compensable:
            saga.record("resolved", "done", _now(), detail=event.resolution)
            await self._finish(saga, "completed", record.event_id)
            return changed
        request = PaymentRequested(
            request_id=str(deterministic_id(saga.saga_id, f"payment:{record.version}")),
            saga_id=saga.saga_id,
            complaint_id=saga.complaint_id,
            kind=event.resolution,
            customer_id=saga.customer_id,
        )
        await self._publish(
            saga,
            PAYMENT_REQUESTED,
            msgspec.json.encode(request),
            message_id=request.request_id,
            event_type="PaymentRequested",
            causation=record.event_id,
            mandatory=True,  # the participant must be there
        )
        saga.record("payment", "pending", _now(), detail=f"{event.resolution} requested")
        self._count_step("payment", "requested")
        saga.move("awaiting_payment", _now())
        return changed

    def _cancel_timers(self, saga: Saga) -> list[Timer]:
        changed = []
        for timer in saga.timers:
            if timer.status == "armed":
                timer.status = "cancelled"
                changed.append(timer)
        return changed

    # --- saga messages ---------------------------------------------------------------------

    async def _on_timer(self, saga: Saga, fired: TimerFired, cause: str) -> list[Timer] | None:
        timer = saga.timer(fired.name)
        if timer is None or timer.status != "armed":
            logger.info(
                "timer {name} of saga {saga_id} fired after it was settled: ignored",
                name=fired.name,
                saga_id=saga.saga_id,
            )
            return None
        if saga.state != "running":
            timer.status = "cancelled"  # the saga moved on: the deadline no longer applies
            return [timer]  # so that the timer service stops sending it
        timer.status = "fired"
        timer.fired_at = _now()
        reason = f"SLA of the {saga.priority} priority passed ({timestamp(fired.due_at)})"
        command = EscalateComplaint(saga.complaint_id, reason, _now(), self.manager)
        reply = await self._command(saga, "sla-escalation", command, fired.timer_id)
        status: StepStatus = "done" if reply.error is None else "skipped"
        detail = reason if reply.error is None else reply.error.detail
        saga.record("sla-escalation", status, _now(), detail=detail)
        self._count_step("sla-escalation", status)
        return [timer]

    async def _on_payment(
        self, saga: Saga, result: PaymentResult, cause: str
    ) -> list[Timer] | None:
        if saga.state == "compensating" and not result.ok:
            await self._compensate(saga, cause)  # resumed after a crash
            return []
        if saga.state == "running":
            # The answer overtook the commit of the request (another worker or process is
            # still saving it): hand it back rather than lose it.
            raise Retry(f"saga {saga.saga_id} has not recorded its payment request yet")
        if saga.state != "awaiting_payment":
            logger.info(
                "payment result for saga {saga_id} in state {state}: ignored",
                saga_id=saga.saga_id,
                state=saga.state,
            )
            return None
        step = next(s for s in reversed(saga.steps) if s.name == "payment")
        step.at = _now()
        step.detail = f"{result.detail or ''} after {result.attempts} attempt(s)".strip()
        if result.ok:
            step.status = "done"
            self._count_step("payment", "done")
            await self._finish(saga, "completed", cause)
            return []
        step.status = "failed"
        self._count_step("payment", "failed")
        saga.payment_failure = result.detail or "the payment failed"
        saga.compensations = [Compensation(name=name) for name in COMPENSATIONS]
        saga.move("compensating", _now())
        await self._compensate(saga, cause)
        return []

    async def _on_retry(
        self, saga: Saga, _request: RetryRequested, cause: str
    ) -> list[Timer] | None:
        if saga.state == "compensating":
            await self._compensate(saga, cause)  # resumed after a crash
            return []
        if saga.state != "compensation_failed":
            logger.warning(
                "saga {saga_id} is {state}, not compensation_failed: nothing to retry",
                saga_id=saga.saga_id,
                state=saga.state,
            )
            return None
        saga.retries += 1
        saga.move("compensating", _now())
        await self._compensate(saga, cause)
        return []

    # --- compensations ---------------------------------------------------------------------

    async def _compensate(self, saga: Saga, causation: object) -> None:
        """Run the compensations not done yet, in order, saving after each so that a crash
        resumes where it stopped; the first refused one parks the saga."""
        for compensation in saga.pending_compensations():
            compensation.attempts += 1
            compensation.at = _now()
            error = await self._run_compensation(saga, compensation, causation)
            outcome: StepStatus = "failed" if error else "done"
            compensation.status = outcome
            compensation.detail = error
            self.context.metrics.saga_compensations_total.inc(
                {"saga": SAGA_TYPE, "step": compensation.name, "outcome": outcome}
            )
            await self._publish_event(
                saga,
                f"compensation.{outcome}",
                causation,
                detail=f"{compensation.name}:{compensation.attempts}",
            )
            if error:
                saga.move("compensation_failed", _now())
                self.context.metrics.saga_executions_total.inc(
                    {"saga": SAGA_TYPE, "outcome": "compensation_failed"}
                )
                await self._publish_event(saga, "compensation_failed", causation)
                return
            await self._save(saga, timers=[])
        await self._finish(saga, "compensated", causation)

    async def _run_compensation(
        self, saga: Saga, compensation: Compensation, causation: object
    ) -> str | None:
        """Run one compensation; the refusal's detail, or None when it applied."""
        name = compensation.name
        failure = saga.payment_failure or "the payment failed"
        if name == "notify-customer":
            await self._notify(
                saga,
                "compensate:notify-customer",
                template="payment-failed",
                recipient=saga.customer_email or saga.customer_id or "customer",
                causation=causation,
                data={"reason": failure},
            )
            return None
        if name == "reopen-complaint":
            command: Any = ReopenComplaint(
                saga.complaint_id, _now(), note=f"reopened by the saga: {failure}"
            )
        else:
            command = EscalateComplaint(
                saga.complaint_id,
                f"the {saga.resolution or 'payment'} failed ({failure}): a manager must decide",
                _now(),
                self.manager,
            )
        compensation.command_id = str(self._command_id(saga, f"compensate:{name}"))
        reply = await self._command(saga, f"compensate:{name}", command, causation)
        return None if reply.error is None else reply.error.detail

    # --- effects ---------------------------------------------------------------------------

    def _command_id(self, saga: Saga, purpose: str) -> UUID:
        return deterministic_id(saga.saga_id, f"command:{purpose}")

    async def _command(
        self,
        saga: Saga,
        purpose: str,
        command: Any,
        causation: object,
        *,
        expected_version: int | None = None,
    ) -> CommandReply:
        request = CommandRequest(
            aggregate_id=saga.complaint_id,
            command=msgspec.Raw(msgspec.json.encode(command)),
            command_id=self._command_id(saga, purpose),
            correlation_id=saga.correlation,
            causation_id=str(causation),
            user=SAGA_USER,
            expected_version=expected_version,
        )
        try:
            return await send_command(
                self.context.bus, COMMAND_QUEUE, request, timeout=self.command_timeout
            )
        except RequestTimeoutError as exc:
            # The aggregate actor is down or backing off: hold the message and try again in
            # place (the command id makes that safe) instead of burning retry rungs.
            raise BusUnavailableError(COMMAND_QUEUE, exc) from exc

    async def _notify(
        self,
        saga: Saga,
        purpose: str,
        *,
        template: str,
        recipient: str,
        causation: object,
        data: dict[str, str] | None = None,
    ) -> None:
        request = NotificationRequested(
            notification_id=str(deterministic_id(saga.saga_id, f"notification:{purpose}")),
            template=template,
            recipient=recipient,
            complaint_id=saga.complaint_id,
            data={
                "complaint_id": saga.complaint_id,
                "store_id": saga.store_id,
                "customer_name": saga.customer_name or "",
                **(data or {}),
            },
        )
        await self.context.bus.publish(
            NOTIFICATIONS_EXCHANGE,
            NOTIFICATION_REQUESTED,
            msgspec.json.encode(request),
            message_id=request.notification_id,
            headers=self._headers(saga, "NotificationRequested", causation),
            mandatory=False,
        )
        if not purpose.startswith("compensate:"):
            saga.record(purpose, "done", _now(), detail=f"{template} to {recipient}")
            self._count_step(purpose, "done")

    async def _publish_event(
        self, saga: Saga, what: str, causation: object, *, detail: str = ""
    ) -> None:
        """The saga's own event on ``saga.events`` (``saga.<what>``), for the audit trail."""
        body = msgspec.json.encode(
            {"saga_id": saga.saga_id, "type": SAGA_TYPE, "event": what, "state": saga.state}
        )
        await self._publish(
            saga,
            f"saga.{what}",
            body,
            message_id=str(deterministic_id(saga.saga_id, f"event:{what}:{detail}:{saga.retries}")),
            event_type=f"{SAGA_TYPE}.{what}",
            causation=causation,
            mandatory=False,
        )

    async def _publish(
        self,
        saga: Saga,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        event_type: str,
        causation: object,
        mandatory: bool,
    ) -> None:
        await self.context.bus.publish(
            SAGA_EXCHANGE,
            routing_key,
            body,
            message_id=message_id,
            headers=self._headers(saga, event_type, causation),
            mandatory=mandatory,
        )

    def _headers(self, saga: Saga, event_type: str, causation: object) -> dict[str, HeaderValue]:
        return {
            X_CORRELATION_ID: saga.correlation,
            X_CAUSATION_ID: str(causation),
            X_AGGREGATE_ID: saga.saga_id,
            X_AGGREGATE_TYPE: "saga",
            X_EVENT_TYPE: event_type,
            X_USER: SAGA_USER,
            X_OCCURRED_AT: _now().isoformat(),
        }

    async def _finish(
        self, saga: Saga, state: Literal["completed", "compensated"], causation: object
    ) -> None:
        saga.move(state, _now())
        self.context.metrics.saga_executions_total.inc({"saga": SAGA_TYPE, "outcome": state})
        await self._publish_event(saga, state, causation)

    def _count_step(self, step: str, outcome: str) -> None:
        self.context.metrics.saga_step_executions_total.inc(
            {"saga": SAGA_TYPE, "step": step, "outcome": outcome}
        )

    # --- persistence -----------------------------------------------------------------------

    async def _load(self, saga_id: str) -> Saga | None:
        document = await self.read_models.get(NAMESPACE, INSTANCES, saga_id)
        return None if document is None else decode_saga(document)

    async def _save(
        self,
        saga: Saga,
        *,
        timers: list[Timer],
        event: RecordedEvent | None = None,
        handled: str | None = None,
    ) -> None:
        """Write the saga if nobody did since it was loaded, with its changed timers and the
        record of what it just handled, in one transaction."""
        expected = saga.version
        saga.version += 1
        saga.updated_at = _now()
        document = encode_saga(saga)

        async def work(tx: ReadModelTx) -> None:
            if event is not None:
                if await tx.last_version(event.aggregate_id) >= event.version:
                    raise SagaConflictError(f"event {event.event_id} was handled meanwhile")
                await tx.set_last_version(event.aggregate_id, event.version)
            current = await tx.get(INSTANCES, saga.saga_id, for_update=True)
            found = 0 if current is None else int(current["version"])
            if found != expected:
                raise SagaConflictError(
                    f"saga {saga.saga_id} is at version {found}, not {expected}"
                )
            await tx.put(INSTANCES, saga.saga_id, document)
            for timer in timers:
                await tx.put(TIMERS, timer.timer_id, timer_document(timer))
            if handled is not None:
                await tx.put(HANDLED, handled, {"at": timestamp(_now())})

        try:
            await self.read_models.run(NAMESPACE, work)
        except SagaConflictError as exc:
            saga.version = expected
            raise Retry(f"{exc}; handling the message again on the saga's new state") from exc
