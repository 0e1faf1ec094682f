"""The resolution saga's persisted state and its pure rules.

A saga instance is one document (namespace ``sagas``, collection ``instances``, key = the
complaint id) holding its state, the steps it ran, its compensations and its timers. Durable
timers are also documents of their own (collection ``timers``) so that the timer service finds
the due ones with one indexed query. The version number gives optimistic concurrency: a save
whose version moved since the load is refused and the message handled again.

States: ``running`` (assigned, SLA armed) → ``awaiting_payment`` (a refund or voucher was
asked of the payments participant) → ``completed``; a payment that failed after its retries
→ ``compensating`` → ``compensated``, or ``compensation_failed`` (parked until ``magasin saga
retry``). A complaint resolved without payment, or withdrawn, completes the saga.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Final, Literal

import msgspec

SAGA_TYPE: Final = "ComplaintResolutionSaga"
#: Read-model namespace and collections of the saga's state.
NAMESPACE: Final = "sagas"
INSTANCES: Final = "instances"
TIMERS: Final = "timers"
HANDLED: Final = "handled"
#: Deterministic ids of the saga's commands, messages and timers.
SAGA_NAMESPACE = uuid.UUID("9a0e2d61-7f1b-4c55-8d3a-2b6e4f1c7d90")

SagaState = Literal[
    "running", "awaiting_payment", "compensating", "completed", "compensated", "compensation_failed"
]
ACTIVE: Final = frozenset({"running", "awaiting_payment", "compensating", "compensation_failed"})
FINISHED: Final = frozenset({"completed", "compensated"})
StepStatus = Literal["done", "skipped", "failed", "pending"]
TimerStatus = Literal["armed", "fired", "cancelled"]

#: The default SLA per priority (seconds until the complaint must be resolved).
DEFAULT_SLA: Final = {"urgent": 4 * 3600.0, "high": 24 * 3600.0, "normal": 48 * 3600.0}
DEFAULT_SLA_LOW: Final = 72 * 3600.0
#: Resolutions that pay the customer back, through the payments participant.
DEFAULT_COMPENSABLE: Final = ("refund", "voucher")
#: The compensations of a failed payment, in the order they run (the reverse of the steps
#: they undo: the resolution is reopened, the customer told, the assignment handed up).
COMPENSATIONS: Final = ("reopen-complaint", "notify-customer", "flag-for-manager")


class Step(msgspec.Struct, kw_only=True):
    name: str
    status: StepStatus
    at: datetime
    detail: str | None = None
    command_id: str | None = None


class Compensation(msgspec.Struct, kw_only=True):
    name: str
    status: StepStatus = "pending"
    attempts: int = 0
    at: datetime | None = None
    detail: str | None = None
    command_id: str | None = None


class Timer(msgspec.Struct, kw_only=True):
    timer_id: str
    saga_id: str
    name: str
    due_at: datetime
    status: TimerStatus = "armed"
    fired_at: datetime | None = None


class Saga(msgspec.Struct, kw_only=True):
    saga_id: str
    complaint_id: str
    store_id: str
    priority: str
    started_at: datetime
    updated_at: datetime
    type: str = SAGA_TYPE
    state: SagaState = "running"
    version: int = 0
    active: bool = True
    correlation_id: str | None = None  # of the request that opened the complaint
    current_correlation: str | None = None  # of the message being handled (what we send carries it)
    customer_id: str | None = None
    customer_email: str | None = None
    customer_name: str | None = None
    assignee: str | None = None
    resolution: str | None = None
    payment_failure: str | None = None
    completed_at: datetime | None = None
    retries: int = 0
    steps: list[Step] = []
    compensations: list[Compensation] = []
    timers: list[Timer] = []

    def record(self, name: str, status: StepStatus, at: datetime, **extra: str | None) -> Step:
        step = Step(name=name, status=status, at=at, **extra)
        self.steps.append(step)
        return step

    def move(self, state: SagaState, at: datetime) -> None:
        self.state = state
        self.active = state in ACTIVE
        self.updated_at = at
        if state in FINISHED:
            self.completed_at = at

    @property
    def correlation(self) -> str:
        return self.current_correlation or self.correlation_id or self.saga_id

    def timer(self, name: str) -> Timer | None:
        return next((t for t in self.timers if t.name == name), None)

    def pending_compensations(self) -> list[Compensation]:
        return [c for c in self.compensations if c.status != "done"]


def deterministic_id(saga_id: str, purpose: str) -> uuid.UUID:
    """The id of what the saga sends for ``purpose``: the same on every replay, so a command
    or message sent again is recognised (the aggregate answers its first result, consumers
    deduplicate the message)."""
    return uuid.uuid5(SAGA_NAMESPACE, f"{saga_id}:{purpose}")


def sla_for(priority: str, table: dict[str, float]) -> timedelta:
    return timedelta(seconds=table.get(priority, table.get("low", DEFAULT_SLA_LOW)))


def least_loaded(agents: list[str], load: dict[str, int]) -> str | None:
    """The agent with the fewest open complaints; the first listed among equals (``min``
    keeps the first of equal items)."""
    return min(agents, key=lambda agent: load.get(agent, 0), default=None)


def encode_saga(saga: Saga) -> dict[str, object]:
    document: dict[str, object] = msgspec.to_builtins(saga)
    return document


def decode_saga(document: dict[str, object]) -> Saga:
    return msgspec.convert(document, Saga)
