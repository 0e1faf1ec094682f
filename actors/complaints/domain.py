"""The complaint aggregate as a pure decider: commands, events, state and the rules between.

Lifecycle: opened → assigned → investigating → resolved → closed. Which command is accepted
in which status (anything else is an ``InvalidTransition``)::

    create               only when the complaint does not exist yet
    assign               opened, assigned, investigating   (the same assignee again: no event)
    start_investigation  assigned
    resolve              assigned, investigating            (rejected needs a reason)
    close                resolved
    reopen               resolved, closed  within the reopen window after the resolution;
                         back to assigned (opened without an assignee), resolution forgotten
    escalate             opened, assigned, investigating    (priority one step up; urgent stays)
    withdraw             opened, assigned, investigating    (by the customer; terminal)
    comment              opened, assigned, investigating, resolved

``decide`` validates every field (a command may be built by code, not only decoded from JSON)
and raises an ``actors.complaints.errors`` error when it refuses; ``evolve`` never raises: it
applies any event mechanically, even one ``decide`` could not have produced. Timestamps come
from the command (``at``, set by the handler), must be timezone-aware, and are stored in UTC.
Free text (description, notes, reasons, comments, the customer's name) is stored stripped of
surrounding whitespace; identifiers are stored as given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeVar, get_args

import msgspec

from actors.complaints.errors import (
    ComplaintAlreadyExists,
    ComplaintNotFound,
    InvalidField,
    InvalidTransition,
    ReopenWindowClosed,
)
from runtime.store import MAX_ID_LENGTH, Decider, EventCodec

# --- values ----------------------------------------------------------------------------------

Priority = Literal["low", "normal", "high", "urgent"]
Status = Literal["opened", "assigned", "investigating", "resolved", "closed", "withdrawn"]
Resolution = Literal["refund", "replacement", "repair", "voucher", "rejected"]

#: In increasing order: escalation moves one step to the right.
PRIORITIES: Final[tuple[Priority, ...]] = get_args(Priority)
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
RESOLUTIONS: Final[tuple[Resolution, ...]] = get_args(Resolution)
CATEGORIES: Final = frozenset(
    {
        "damaged_product",
        "defective_product",
        "wrong_item",
        "missing_item",
        "late_delivery",
        "billing",
        "service",
        "other",
    }
)

#: The stages in which the complaint is still being worked on.
OPEN_STAGES: Final[tuple[Status, ...]] = ("opened", "assigned", "investigating")
DEFAULT_REOPEN_WINDOW: Final = timedelta(days=14)
MAX_TEXT_LENGTH: Final = 5000
MAX_EMAIL_LENGTH: Final = 254

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_PHONE = re.compile(r"[0-9 +\-().]{6,32}")

T = TypeVar("T", bound=str)


class Customer(msgspec.Struct, frozen=True):
    """Who complains. Personal data: subject to GDPR erasure."""

    id: str
    name: str
    email: str
    phone: str | None = None


# --- commands --------------------------------------------------------------------------------


class CreateComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    store_id: str
    customer: Customer
    category: str
    description: str
    at: datetime
    priority: Priority = "normal"
    order_id: str | None = None
    product_id: str | None = None


class AssignComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    assignee: str
    at: datetime
    note: str | None = None


class StartInvestigation(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    at: datetime
    note: str | None = None


class ResolveComplaint(msgspec.Struct, frozen=True, tag=True):
    """``reason`` is required when ``resolution`` is ``rejected``: it tells the customer why."""

    complaint_id: str
    resolution: Resolution
    at: datetime
    note: str | None = None
    reason: str | None = None


class CloseComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    at: datetime
    note: str | None = None


class ReopenComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    at: datetime
    note: str | None = None


class EscalateComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    reason: str
    at: datetime
    manager: str | None = None


class WithdrawComplaint(msgspec.Struct, frozen=True, tag=True):
    """The customer gives up the complaint before it is resolved."""

    complaint_id: str
    at: datetime
    note: str | None = None


class CommentComplaint(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    author: str
    text: str
    at: datetime


Command = (
    CreateComplaint
    | AssignComplaint
    | StartInvestigation
    | ResolveComplaint
    | CloseComplaint
    | ReopenComplaint
    | EscalateComplaint
    | WithdrawComplaint
    | CommentComplaint
)

#: Short names of the commands, for metrics labels and error messages.
COMMAND_NAMES: Final[dict[type[Command], str]] = {
    CreateComplaint: "create",
    AssignComplaint: "assign",
    StartInvestigation: "start_investigation",
    ResolveComplaint: "resolve",
    CloseComplaint: "close",
    ReopenComplaint: "reopen",
    EscalateComplaint: "escalate",
    WithdrawComplaint: "withdraw",
    CommentComplaint: "comment",
}


# --- events ----------------------------------------------------------------------------------
# The stream id is the complaint id: only the first event repeats it.


class ComplaintCreated(msgspec.Struct, frozen=True, tag=True):
    complaint_id: str
    store_id: str
    customer: Customer
    category: str
    description: str
    priority: Priority
    created_at: datetime
    order_id: str | None = None
    product_id: str | None = None


class ComplaintAssigned(msgspec.Struct, frozen=True, tag=True):
    assignee: str
    assigned_at: datetime
    previous_assignee: str | None = None
    note: str | None = None


class ComplaintInvestigationStarted(msgspec.Struct, frozen=True, tag=True):
    started_at: datetime
    note: str | None = None


class ComplaintResolved(msgspec.Struct, frozen=True, tag=True):
    resolution: Resolution
    resolved_at: datetime
    note: str | None = None
    reason: str | None = None


class ComplaintClosed(msgspec.Struct, frozen=True, tag=True):
    closed_at: datetime
    note: str | None = None


class ComplaintReopened(msgspec.Struct, frozen=True, tag=True):
    reopened_at: datetime
    note: str | None = None


class ComplaintEscalated(msgspec.Struct, frozen=True, tag=True):
    reason: str
    escalated_at: datetime
    previous_priority: Priority
    priority: Priority
    manager: str | None = None


class ComplaintWithdrawn(msgspec.Struct, frozen=True, tag=True):
    withdrawn_at: datetime
    note: str | None = None


class ComplaintCommented(msgspec.Struct, frozen=True, tag=True):
    author: str
    text: str
    commented_at: datetime


ComplaintEvent = (
    ComplaintCreated
    | ComplaintAssigned
    | ComplaintInvestigationStarted
    | ComplaintResolved
    | ComplaintClosed
    | ComplaintReopened
    | ComplaintEscalated
    | ComplaintWithdrawn
    | ComplaintCommented
)
EVENT_TYPES: Final[tuple[type[ComplaintEvent], ...]] = get_args(ComplaintEvent)
CODEC: Final = EventCodec().register(ComplaintEvent)


# --- state -----------------------------------------------------------------------------------


class ComplaintState(msgspec.Struct, frozen=True):
    """A complaint as its events left it; snapshotted as JSON (bump ``state_schema`` in
    ``complaint_decider`` when its shape changes)."""

    exists: bool = False
    complaint_id: str = ""
    store_id: str = ""
    customer: Customer | None = None
    category: str = ""
    description: str = ""
    priority: Priority = "normal"
    status: Status | None = None
    assignee: str | None = None
    resolution: Resolution | None = None
    resolution_reason: str | None = None
    order_id: str | None = None
    product_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    escalations: int = 0
    comments: int = 0
    reopen_count: int = 0


INITIAL: Final = ComplaintState()


# --- decide ----------------------------------------------------------------------------------


def decide(  # noqa: PLR0911 - one return per command type: the match is the table
    command: Command, state: ComplaintState, *, reopen_window: timedelta = DEFAULT_REOPEN_WINDOW
) -> list[ComplaintEvent]:
    """The events ``command`` causes on ``state``: none for a no-op; raises a
    ``ComplaintError`` when the command is malformed or not allowed now."""
    complaint_id = _identifier("complaint_id", command.complaint_id)
    at = _timestamp(command.at)
    match command:
        case CreateComplaint():
            return _create(command, state, at)
        case AssignComplaint():
            assignee = _identifier("assignee", command.assignee)
            note = _note("note", command.note)
            _require(state, complaint_id, "assign", OPEN_STAGES)
            if assignee == state.assignee:
                return []
            return [ComplaintAssigned(assignee, at, state.assignee, note)]
        case StartInvestigation():
            note = _note("note", command.note)
            _require(state, complaint_id, "start_investigation", ("assigned",))
            return [ComplaintInvestigationStarted(at, note)]
        case ResolveComplaint():
            return _resolve(command, state, at)
        case CloseComplaint():
            note = _note("note", command.note)
            _require(state, complaint_id, "close", ("resolved",))
            return [ComplaintClosed(at, note)]
        case ReopenComplaint():
            note = _note("note", command.note)
            _require(state, complaint_id, "reopen", ("resolved", "closed"))
            resolved_at = state.resolved_at
            if resolved_at is not None and at - resolved_at > reopen_window:
                raise ReopenWindowClosed(
                    complaint_id, resolved_at, reopen_window, status=str(state.status)
                )
            return [ComplaintReopened(at, note)]
        case EscalateComplaint():
            reason = _text("reason", command.reason)
            manager = None if command.manager is None else _identifier("manager", command.manager)
            _require(state, complaint_id, "escalate", OPEN_STAGES)
            rank = PRIORITIES.index(state.priority)
            raised = PRIORITIES[min(rank + 1, len(PRIORITIES) - 1)]
            return [ComplaintEscalated(reason, at, state.priority, raised, manager)]
        case WithdrawComplaint():
            note = _note("note", command.note)
            _require(state, complaint_id, "withdraw", OPEN_STAGES)
            return [ComplaintWithdrawn(at, note)]
        case CommentComplaint():
            author = _identifier("author", command.author)
            text = _text("text", command.text)
            _require(state, complaint_id, "comment", (*OPEN_STAGES, "resolved"))
            return [ComplaintCommented(author, text, at)]


def _create(command: CreateComplaint, state: ComplaintState, at: datetime) -> list[ComplaintEvent]:
    event = ComplaintCreated(
        complaint_id=command.complaint_id,
        store_id=_identifier("store_id", command.store_id),
        customer=_customer(command.customer),
        category=_choice("category", command.category, sorted(CATEGORIES)),
        description=_text("description", command.description),
        priority=_choice("priority", command.priority, PRIORITIES),
        created_at=at,
        order_id=_optional_identifier("order_id", command.order_id),
        product_id=_optional_identifier("product_id", command.product_id),
    )
    if state.exists:
        raise ComplaintAlreadyExists(command.complaint_id)
    return [event]


def _resolve(
    command: ResolveComplaint, state: ComplaintState, at: datetime
) -> list[ComplaintEvent]:
    resolution = _choice("resolution", command.resolution, RESOLUTIONS)
    note = _note("note", command.note)
    reason = _note("reason", command.reason)
    if resolution == "rejected" and reason is None:
        raise InvalidField(
            "reason", "is required when the resolution is 'rejected': tell the customer why"
        )
    _require(state, command.complaint_id, "resolve", ("assigned", "investigating"))
    return [ComplaintResolved(resolution, at, note, reason)]


def _require(
    state: ComplaintState, complaint_id: str, action: str, allowed: tuple[Status, ...]
) -> None:
    if not state.exists:
        raise ComplaintNotFound(complaint_id)
    if complaint_id != state.complaint_id:
        raise InvalidField(
            "complaint_id",
            f"the command names complaint {complaint_id!r} but reached the stream of "
            f"complaint {state.complaint_id!r}; send it to its own complaint",
        )
    if state.status not in allowed:
        raise InvalidTransition(complaint_id, str(state.status), action, allowed)


# --- field validation ------------------------------------------------------------------------


def _string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidField(field, f"must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidField(field, "must not contain the NUL character (\\x00)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(
            field, "must be valid Unicode text (it holds a lone surrogate)"
        ) from None
    return value


def _identifier(field: str, value: object) -> str:
    text = _string(field, value)
    if not text.strip():
        raise InvalidField(field, "must not be empty")
    if len(text) > MAX_ID_LENGTH:
        raise InvalidField(field, f"is {len(text)} characters long; the limit is {MAX_ID_LENGTH}")
    return text


def _optional_identifier(field: str, value: object) -> str | None:
    return None if value is None else _identifier(field, value)


def _text(field: str, value: object, limit: int = MAX_TEXT_LENGTH) -> str:
    """Free text, stripped; between 1 and ``limit`` characters."""
    text = _string(field, value).strip()
    if not text:
        raise InvalidField(field, "must not be empty")
    if len(text) > limit:
        raise InvalidField(field, f"is {len(text)} characters long; the limit is {limit}")
    return text


def _note(field: str, value: object) -> str | None:
    """Optional free text: ``None`` when absent or blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(field, value)


def _choice(field: str, value: object, choices: Sequence[T]) -> T:
    for choice in choices:
        if value == choice:
            return choice
    raise InvalidField(field, f"must be one of {', '.join(choices)}; got {value!r}")


def _customer(value: object) -> Customer:
    if not isinstance(value, Customer):
        raise InvalidField("customer", f"must be a Customer, got {type(value).__name__}")
    email = _string("customer.email", value.email)
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        raise InvalidField(
            "customer.email", f"must be an email address such as name@example.com; got {email!r}"
        )
    phone = value.phone
    if phone is not None:
        phone = _string("customer.phone", phone)
        if not _PHONE.fullmatch(phone) or not any(c.isdigit() for c in phone):
            raise InvalidField(
                "customer.phone",
                "must be 6 to 32 digits, spaces, dots, dashes, parentheses or '+', "
                f"such as +33 1 23 45 67 89; got {phone!r}",
            )
    return Customer(
        id=_identifier("customer.id", value.id),
        name=_text("customer.name", value.name, MAX_ID_LENGTH),
        email=email,
        phone=phone,
    )


def _timestamp(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidField("at", f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidField(
            "at", f"must be timezone-aware (such as 2024-05-01T12:00:00+00:00); got {value}"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise InvalidField("at", f"is out of range in UTC: {value.isoformat()}") from None


# --- evolve ----------------------------------------------------------------------------------


def evolve(state: ComplaintState, event: ComplaintEvent) -> ComplaintState:  # noqa: PLR0911
    """The state after ``event``. Total: any event applies to any state, mechanically."""
    replace = msgspec.structs.replace
    match event:
        case ComplaintCreated():
            return ComplaintState(
                exists=True,
                complaint_id=event.complaint_id,
                store_id=event.store_id,
                customer=event.customer,
                category=event.category,
                description=event.description,
                priority=event.priority,
                status="opened",
                order_id=event.order_id,
                product_id=event.product_id,
                created_at=event.created_at,
                updated_at=event.created_at,
            )
        case ComplaintAssigned():
            status = "assigned" if state.status == "opened" else state.status
            return replace(
                state, assignee=event.assignee, status=status, updated_at=event.assigned_at
            )
        case ComplaintInvestigationStarted():
            return replace(state, status="investigating", updated_at=event.started_at)
        case ComplaintResolved():
            return replace(
                state,
                status="resolved",
                resolution=event.resolution,
                resolution_reason=event.reason,
                resolved_at=event.resolved_at,
                updated_at=event.resolved_at,
            )
        case ComplaintClosed():
            return replace(
                state, status="closed", closed_at=event.closed_at, updated_at=event.closed_at
            )
        case ComplaintReopened():
            return replace(
                state,
                status="assigned" if state.assignee is not None else "opened",
                resolution=None,
                resolution_reason=None,
                resolved_at=None,
                closed_at=None,
                reopen_count=state.reopen_count + 1,
                updated_at=event.reopened_at,
            )
        case ComplaintEscalated():
            return replace(
                state,
                priority=event.priority,
                escalations=state.escalations + 1,
                updated_at=event.escalated_at,
            )
        case ComplaintWithdrawn():
            return replace(state, status="withdrawn", updated_at=event.withdrawn_at)
        case ComplaintCommented():
            return replace(state, comments=state.comments + 1, updated_at=event.commented_at)


# --- the decider -----------------------------------------------------------------------------


def complaint_decider(
    reopen_window: timedelta = DEFAULT_REOPEN_WINDOW,
) -> Decider[Command, ComplaintEvent, ComplaintState]:
    """The complaint aggregate for the repository; ``reopen_window`` is how long after its
    resolution a complaint may still be reopened."""
    if reopen_window < timedelta(0):
        raise ValueError(f"reopen_window must not be negative, got {reopen_window}")

    def decide_within_window(command: Command, state: ComplaintState) -> list[ComplaintEvent]:
        return decide(command, state, reopen_window=reopen_window)

    return Decider(
        aggregate_type="complaint",
        initial_state=INITIAL,
        decide=decide_within_window,
        evolve=evolve,
        state_type=ComplaintState,
        state_schema=1,
    )
