"""The complaint decider: every transition, every refusal, and the properties of any history.

The examples walk the lifecycle (opened → assigned → investigating → resolved → closed, with
reopen, escalation, withdrawal and comments on the side) and check that each refusal names the
complaint, the field or the rule. The properties run random command sequences, valid and
invalid, through ``decide``/``evolve`` from the initial state and check that no history reaches
an impossible state, that a command just executed is refused or changes nothing when repeated
(where it should), and that states and events survive JSON (snapshots, the codec).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.complaints.domain import (
    CATEGORIES,
    CODEC,
    COMMAND_NAMES,
    DEFAULT_REOPEN_WINDOW,
    EVENT_TYPES,
    INITIAL,
    OPEN_STAGES,
    PRIORITIES,
    RESOLUTIONS,
    STATUSES,
    AssignComplaint,
    CloseComplaint,
    Command,
    CommentComplaint,
    ComplaintAssigned,
    ComplaintClosed,
    ComplaintCommented,
    ComplaintCreated,
    ComplaintEscalated,
    ComplaintEvent,
    ComplaintInvestigationStarted,
    ComplaintReopened,
    ComplaintResolved,
    ComplaintState,
    ComplaintWithdrawn,
    CreateComplaint,
    Customer,
    EscalateComplaint,
    ReopenComplaint,
    ResolveComplaint,
    StartInvestigation,
    WithdrawComplaint,
    complaint_decider,
    decide,
    evolve,
)
from actors.complaints.errors import (
    ComplaintAlreadyExists,
    ComplaintError,
    ComplaintNotFound,
    InvalidField,
    InvalidTransition,
    ReopenWindowClosed,
)
from runtime.errors import MagasinError
from runtime.store import AggregateRepository, Metadata, RecordedEvent
from runtime.store.memory import MemoryEventStore

ID = "c-1"
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
ANA = Customer(id="cust-1", name="Ana Souza", email="ana@example.com", phone="+33 1 23 45 67 89")
DECIDER = complaint_decider()


def at(minutes: float = 0) -> datetime:
    return T0 + timedelta(minutes=minutes)


def create(**changes: Any) -> CreateComplaint:
    command = CreateComplaint(
        complaint_id=ID,
        store_id="store-7",
        customer=ANA,
        category="damaged_product",
        description="The kettle arrived with a cracked lid.",
        at=at(),
        order_id="order-42",
        product_id="kettle-3",
    )
    return msgspec.structs.replace(command, **changes)


def run(*commands: Command, state: ComplaintState = INITIAL) -> ComplaintState:
    """The state after executing ``commands`` in order, each of which must be accepted."""
    for command in commands:
        for event in decide(command, state):
            state = evolve(state, event)
    return state


def assign(assignee: str = "bo", minutes: float = 1, note: str | None = None) -> AssignComplaint:
    return AssignComplaint(ID, assignee, at(minutes), note)


def investigate(minutes: float = 2) -> StartInvestigation:
    return StartInvestigation(ID, at(minutes))


def resolve(
    resolution: Any = "refund", minutes: float = 3, reason: str | None = None
) -> ResolveComplaint:
    return ResolveComplaint(ID, resolution, at(minutes), reason=reason)


def opened() -> ComplaintState:
    return run(create())


def assigned() -> ComplaintState:
    return run(create(), assign())


def investigating() -> ComplaintState:
    return run(create(), assign(), investigate())


def resolved() -> ComplaintState:
    return run(create(), assign(), investigate(), resolve())


def closed() -> ComplaintState:
    return run(create(), assign(), investigate(), resolve(), CloseComplaint(ID, at(4)))


def withdrawn() -> ComplaintState:
    return run(create(), assign(), WithdrawComplaint(ID, at(2)))


STATES: dict[str, Callable[[], ComplaintState]] = {
    "opened": opened,
    "assigned": assigned,
    "investigating": investigating,
    "resolved": resolved,
    "closed": closed,
    "withdrawn": withdrawn,
}


# --- create --------------------------------------------------------------------------------


def test_a_created_complaint_is_opened_with_everything_the_command_said() -> None:
    [event] = decide(create(), INITIAL)
    assert event == ComplaintCreated(
        complaint_id=ID,
        store_id="store-7",
        customer=ANA,
        category="damaged_product",
        description="The kettle arrived with a cracked lid.",
        priority="normal",
        created_at=T0,
        order_id="order-42",
        product_id="kettle-3",
    )
    state = evolve(INITIAL, event)
    assert state.exists
    assert (state.complaint_id, state.store_id, state.customer) == (ID, "store-7", ANA)
    assert (state.status, state.priority, state.assignee) == ("opened", "normal", None)
    assert state.created_at == state.updated_at == T0
    assert (state.escalations, state.comments, state.reopen_count) == (0, 0, 0)


def test_create_stores_its_time_in_utc_and_its_description_stripped() -> None:
    paris = timezone(timedelta(hours=2))
    [event] = decide(
        create(at=datetime(2024, 5, 1, 11, 0, tzinfo=paris), description="  broken \n"), INITIAL
    )
    assert isinstance(event, ComplaintCreated)
    assert event.created_at == T0
    assert event.created_at.tzinfo is UTC
    assert event.description == "broken"


def test_a_complaint_cannot_be_created_twice() -> None:
    with pytest.raises(ComplaintAlreadyExists) as caught:
        decide(create(), opened())
    assert caught.value.complaint_id == ID
    assert "complaint c-1 already exists" in str(caught.value)
    assert "another id" in str(caught.value)


NON_CREATE_COMMANDS: list[Command] = [
    assign(),
    investigate(),
    resolve(),
    CloseComplaint(ID, at()),
    ReopenComplaint(ID, at()),
    EscalateComplaint(ID, "customer called twice", at()),
    WithdrawComplaint(ID, at()),
    CommentComplaint(ID, "bo", "called back", at()),
]


@pytest.mark.parametrize("command", NON_CREATE_COMMANDS, ids=lambda c: type(c).__name__)
def test_every_other_command_on_a_complaint_that_does_not_exist_is_not_found(
    command: Command,
) -> None:
    with pytest.raises(ComplaintNotFound) as caught:
        decide(command, INITIAL)
    assert caught.value.complaint_id == ID
    assert "complaint c-1 does not exist" in str(caught.value)
    assert "create the complaint first" in str(caught.value)


def test_a_malformed_command_is_invalid_before_it_is_not_found() -> None:
    with pytest.raises(InvalidField, match="assignee"):
        decide(AssignComplaint(ID, "", at()), INITIAL)


def test_a_command_for_another_complaint_is_refused_on_this_stream() -> None:
    with pytest.raises(InvalidField) as caught:
        decide(AssignComplaint("c-2", "bo", at()), opened())
    assert caught.value.field == "complaint_id"
    assert "'c-2'" in str(caught.value)
    assert "'c-1'" in str(caught.value)


# --- assign ----------------------------------------------------------------------------------


def test_assigning_an_opened_complaint_makes_it_assigned() -> None:
    [event] = decide(assign("bo", note=" urgent customer "), opened())
    assert event == ComplaintAssigned("bo", at(1), previous_assignee=None, note="urgent customer")
    state = evolve(opened(), event)
    assert (state.status, state.assignee, state.updated_at) == ("assigned", "bo", at(1))


def test_reassigning_names_the_previous_assignee() -> None:
    [event] = decide(assign("chen", 5), assigned())
    assert event == ComplaintAssigned("chen", at(5), previous_assignee="bo")
    assert evolve(assigned(), event).assignee == "chen"


def test_reassigning_during_the_investigation_keeps_investigating() -> None:
    state = run(assign("chen", 5), state=investigating())
    assert (state.status, state.assignee) == ("investigating", "chen")


@pytest.mark.parametrize("make", [assigned, investigating], ids=["assigned", "investigating"])
def test_assigning_the_same_assignee_again_changes_nothing(
    make: Callable[[], ComplaintState],
) -> None:
    assert decide(assign("bo", 9, note="again"), make()) == []


def test_an_invalid_transition_names_the_complaint_its_status_and_what_is_allowed() -> None:
    with pytest.raises(InvalidTransition) as caught:
        decide(assign(), resolved())
    error = caught.value
    assert (error.complaint_id, error.status, error.action) == (ID, "resolved", "assign")
    assert error.allowed == OPEN_STAGES
    assert str(error) == (
        "complaint c-1 is resolved: it cannot be assigned "
        "(assign is allowed when opened, assigned, investigating)"
    )


# --- the lifecycle ---------------------------------------------------------------------------


def test_the_investigation_starts_from_assigned() -> None:
    [event] = decide(StartInvestigation(ID, at(2), note="asked for photos"), assigned())
    assert event == ComplaintInvestigationStarted(at(2), "asked for photos")
    assert evolve(assigned(), event).status == "investigating"


@pytest.mark.parametrize("status", ["opened", "investigating", "resolved", "closed", "withdrawn"])
def test_the_investigation_cannot_start_from_anywhere_else(status: str) -> None:
    with pytest.raises(InvalidTransition, match="cannot be put under investigation") as caught:
        decide(investigate(), STATES[status]())
    assert caught.value.status == status
    assert "start_investigation is allowed when assigned" in str(caught.value)


@pytest.mark.parametrize("make", [assigned, investigating], ids=["assigned", "investigating"])
def test_a_complaint_with_an_assignee_can_be_resolved(make: Callable[[], ComplaintState]) -> None:
    [event] = decide(ResolveComplaint(ID, "replacement", at(7), note="sent a new one"), make())
    assert event == ComplaintResolved("replacement", at(7), note="sent a new one")
    state = evolve(make(), event)
    assert (state.status, state.resolution, state.resolved_at) == ("resolved", "replacement", at(7))


@pytest.mark.parametrize("status", ["opened", "resolved", "closed", "withdrawn"])
def test_a_complaint_cannot_be_resolved_without_an_assignee_or_twice(status: str) -> None:
    with pytest.raises(InvalidTransition, match="resolve is allowed when assigned, investigating"):
        decide(resolve(), STATES[status]())


def test_a_rejection_needs_a_reason_for_the_customer() -> None:
    with pytest.raises(InvalidField) as caught:
        decide(resolve("rejected"), investigating())
    assert caught.value.field == "reason"
    assert "required when the resolution is 'rejected'" in str(caught.value)
    with pytest.raises(InvalidField, match="reason"):
        decide(resolve("rejected", reason="   "), investigating())

    state = run(resolve("rejected", reason=" outside warranty "), state=investigating())
    assert (state.resolution, state.resolution_reason) == ("rejected", "outside warranty")


def test_a_resolved_complaint_can_be_closed() -> None:
    [event] = decide(CloseComplaint(ID, at(10), note="customer satisfied"), resolved())
    assert event == ComplaintClosed(at(10), "customer satisfied")
    state = evolve(resolved(), event)
    assert (state.status, state.closed_at, state.resolved_at) == ("closed", at(10), at(3))


@pytest.mark.parametrize("status", ["opened", "assigned", "investigating", "closed", "withdrawn"])
def test_only_a_resolved_complaint_can_be_closed(status: str) -> None:
    with pytest.raises(InvalidTransition, match="cannot be closed"):
        decide(CloseComplaint(ID, at(10)), STATES[status]())


# --- reopen --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [resolved, closed], ids=["resolved", "closed"])
def test_a_reopened_complaint_goes_back_to_its_assignee_and_forgets_the_resolution(
    make: Callable[[], ComplaintState],
) -> None:
    [event] = decide(ReopenComplaint(ID, at(60), note="lid cracked again"), make())
    assert event == ComplaintReopened(at(60), "lid cracked again")
    state = evolve(make(), event)
    assert (state.status, state.assignee, state.reopen_count) == ("assigned", "bo", 1)
    assert (state.resolution, state.resolution_reason) == (None, None)
    assert (state.resolved_at, state.closed_at) == (None, None)


def test_a_reopened_complaint_without_an_assignee_is_opened_again() -> None:
    unassigned_but_resolved = evolve(opened(), ComplaintResolved("voucher", at(1)))
    assert evolve(unassigned_but_resolved, ComplaintReopened(at(2))).status == "opened"


def test_a_complaint_can_be_reopened_until_the_last_moment_of_the_window() -> None:
    last_moment = at(3) + DEFAULT_REOPEN_WINDOW
    assert run(ReopenComplaint(ID, last_moment), state=closed()).status == "assigned"


@pytest.mark.parametrize("make", [resolved, closed], ids=["resolved", "closed"])
def test_a_complaint_cannot_be_reopened_once_the_window_has_passed(
    make: Callable[[], ComplaintState],
) -> None:
    too_late = at(3) + DEFAULT_REOPEN_WINDOW + timedelta(microseconds=1)
    state = make()
    with pytest.raises(ReopenWindowClosed) as caught:
        decide(ReopenComplaint(ID, too_late), state)
    error = caught.value
    assert isinstance(error, InvalidTransition)
    assert (error.complaint_id, error.status, error.action) == (ID, state.status, "reopen")
    assert (error.resolved_at, error.window) == (at(3), DEFAULT_REOPEN_WINDOW)
    assert "cannot be reopened" in str(error)
    assert "2024-05-01T09:03:00+00:00" in str(error)
    assert "within 14 days" in str(error)
    assert "open a new complaint instead" in str(error)


def test_the_reopen_window_is_the_deciders_setting() -> None:
    hourly = complaint_decider(reopen_window=timedelta(hours=1))
    assert hourly.decide(ReopenComplaint(ID, at(63)), resolved())
    with pytest.raises(ReopenWindowClosed, match="within 1 hour of that"):
        hourly.decide(ReopenComplaint(ID, at(64)), resolved())


@pytest.mark.parametrize("status", ["opened", "assigned", "investigating", "withdrawn"])
def test_only_a_resolved_or_closed_complaint_can_be_reopened(status: str) -> None:
    with pytest.raises(InvalidTransition, match="reopen is allowed when resolved, closed"):
        decide(ReopenComplaint(ID, at(5)), STATES[status]())


# --- escalate, withdraw, comment -------------------------------------------------------------


def test_each_escalation_raises_the_priority_one_step_and_urgent_stays_urgent() -> None:
    state = run(create(priority="low"))
    seen = []
    for minute in range(5):
        [event] = decide(EscalateComplaint(ID, "no answer", at(minute), "mgr-1"), state)
        assert isinstance(event, ComplaintEscalated)
        assert event.previous_priority == state.priority
        assert (event.reason, event.manager) == ("no answer", "mgr-1")
        state = evolve(state, event)
        seen.append(state.priority)
    assert seen == ["normal", "high", "urgent", "urgent", "urgent"]
    assert state.escalations == 5


@pytest.mark.parametrize("status", ["resolved", "closed", "withdrawn"])
def test_only_an_open_complaint_can_be_escalated(status: str) -> None:
    with pytest.raises(InvalidTransition, match="cannot be escalated"):
        decide(EscalateComplaint(ID, "slow", at(9)), STATES[status]())


@pytest.mark.parametrize("status", OPEN_STAGES)
def test_the_customer_can_withdraw_before_the_resolution(status: str) -> None:
    [event] = decide(WithdrawComplaint(ID, at(9), note="found a fix"), STATES[status]())
    assert event == ComplaintWithdrawn(at(9), "found a fix")
    assert evolve(STATES[status](), event).status == "withdrawn"


@pytest.mark.parametrize("status", ["resolved", "closed", "withdrawn"])
def test_a_resolved_or_finished_complaint_cannot_be_withdrawn(status: str) -> None:
    with pytest.raises(InvalidTransition, match="cannot be withdrawn"):
        decide(WithdrawComplaint(ID, at(9)), STATES[status]())


def test_a_withdrawn_complaint_accepts_nothing_more() -> None:
    for command in [*NON_CREATE_COMMANDS, assign("chen")]:
        with pytest.raises(InvalidTransition, match="complaint c-1 is withdrawn"):
            decide(command, withdrawn())


@pytest.mark.parametrize("status", [*OPEN_STAGES, "resolved"])
def test_comments_are_welcome_until_the_complaint_is_closed(status: str) -> None:
    [event] = decide(CommentComplaint(ID, "bo", "  called the customer  ", at(9)), STATES[status]())
    assert event == ComplaintCommented("bo", "called the customer", at(9))
    assert evolve(STATES[status](), event).comments == 1


@pytest.mark.parametrize("status", ["closed", "withdrawn"])
def test_a_closed_or_withdrawn_complaint_takes_no_comment(status: str) -> None:
    with pytest.raises(InvalidTransition, match="cannot be commented on"):
        decide(CommentComplaint(ID, "bo", "hello?", at(9)), STATES[status]())


# --- field validation ------------------------------------------------------------------------

LONG_ID = "x" * 256
LONG_TEXT = "y" * 5001
NAIVE = datetime(2024, 5, 1, 9, 0)


def with_customer(**changes: Any) -> CreateComplaint:
    return create(customer=msgspec.structs.replace(ANA, **changes))


INVALID: list[tuple[str, Command, str]] = [
    ("empty complaint id", create(complaint_id=""), "complaint_id"),
    ("blank complaint id", AssignComplaint(" ", "bo", at()), "complaint_id"),
    ("long complaint id", create(complaint_id=LONG_ID), "complaint_id"),
    ("NUL in complaint id", CloseComplaint("c\x001", at()), "complaint_id"),
    ("empty store", create(store_id=""), "store_id"),
    ("empty customer id", with_customer(id=""), "customer.id"),
    ("blank customer name", with_customer(name="  "), "customer.name"),
    ("email without at", with_customer(email="ana.example.com"), "customer.email"),
    ("email without domain", with_customer(email="ana@example"), "customer.email"),
    ("email with a space", with_customer(email="ana souza@example.com"), "customer.email"),
    ("email padded", with_customer(email=" ana@example.com"), "customer.email"),
    ("short phone", with_customer(phone="12345"), "customer.phone"),
    ("phone with letters", with_customer(phone="+33 CALL ME"), "customer.phone"),
    ("phone without digits", with_customer(phone="------"), "customer.phone"),
    ("long phone", with_customer(phone="1" * 33), "customer.phone"),
    ("blank description", create(description=" \n\t"), "description"),
    ("long description", create(description=LONG_TEXT), "description"),
    ("NUL in description", create(description="bad\x00byte"), "description"),
    ("lone surrogate", create(description="half \ud800 a pair"), "description"),
    ("unknown category", create(category="broken"), "category"),
    ("unknown priority", create(priority="critical"), "priority"),
    ("empty order id", create(order_id=""), "order_id"),
    ("long product id", create(product_id=LONG_ID), "product_id"),
    ("naive time", create(at=NAIVE), "at"),
    ("naive time on assign", AssignComplaint(ID, "bo", NAIVE), "at"),
    ("empty assignee", assign(""), "assignee"),
    ("long note", assign(note=LONG_TEXT), "note"),
    ("unknown resolution", resolve("cash"), "resolution"),
    ("long reason", resolve("refund", reason=LONG_TEXT), "reason"),
    ("empty escalation reason", EscalateComplaint(ID, "", at()), "reason"),
    ("empty manager", EscalateComplaint(ID, "slow", at(), manager=""), "manager"),
    ("empty author", CommentComplaint(ID, "", "hi", at()), "author"),
    ("empty comment", CommentComplaint(ID, "bo", "   ", at()), "text"),
    ("long comment", CommentComplaint(ID, "bo", LONG_TEXT, at()), "text"),
    ("long withdraw note", WithdrawComplaint(ID, at(), LONG_TEXT), "note"),
]


@pytest.mark.parametrize(
    ("command", "field"), [(c, f) for _, c, f in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_a_bad_field_is_refused_with_its_name_and_what_would_be_accepted(
    command: Command, field: str
) -> None:
    state = INITIAL if isinstance(command, CreateComplaint) else investigating()
    with pytest.raises(InvalidField) as caught:
        decide(command, state)
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert len(error.reason) > 10, "the message says what a valid value looks like"
    assert isinstance(error, ComplaintError)
    assert isinstance(error, MagasinError)


def test_optional_text_left_blank_is_absent() -> None:
    [event] = decide(assign(note="   "), opened())
    assert isinstance(event, ComplaintAssigned)
    assert event.note is None


def test_a_customer_without_a_phone_is_fine() -> None:
    assert run(with_customer(phone=None)).customer == msgspec.structs.replace(ANA, phone=None)


# --- evolve is total -------------------------------------------------------------------------

ONE_OF_EACH: list[ComplaintEvent] = [
    ComplaintCreated(ID, "store-7", ANA, "billing", "double charge", "high", T0),
    ComplaintAssigned("bo", at(1)),
    ComplaintInvestigationStarted(at(2)),
    ComplaintResolved("refund", at(3)),
    ComplaintClosed(at(4)),
    ComplaintReopened(at(5)),
    ComplaintEscalated("slow", at(6), "high", "urgent"),
    ComplaintWithdrawn(at(7)),
    ComplaintCommented("bo", "hello", at(8)),
]


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("name", [*STATES, "initial"])
def test_evolve_applies_any_event_to_any_state_without_raising(
    event: ComplaintEvent, name: str
) -> None:
    state = INITIAL if name == "initial" else STATES[name]()
    after = evolve(state, event)
    assert isinstance(after, ComplaintState)


def test_an_event_before_the_creation_is_applied_mechanically() -> None:
    state = evolve(INITIAL, ComplaintAssigned("bo", at(1)))
    assert (state.exists, state.status, state.assignee) == (False, None, "bo")


# --- the decider, the codec and the names ----------------------------------------------------


def test_the_decider_describes_the_complaint_aggregate() -> None:
    assert DECIDER.aggregate_type == "complaint"
    assert DECIDER.initial_state is INITIAL
    assert not INITIAL.exists
    assert DECIDER.state_type is ComplaintState
    assert DECIDER.state_schema == 1
    assert DECIDER.evolve is evolve


def test_a_negative_reopen_window_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="reopen_window"):
        complaint_decider(timedelta(seconds=-1))


def test_every_command_has_a_short_name_and_every_event_is_registered() -> None:
    assert set(COMMAND_NAMES) == set(Command.__args__)
    assert len(set(COMMAND_NAMES.values())) == len(COMMAND_NAMES)
    assert CODEC.event_types == sorted(t.__name__ for t in EVENT_TYPES)
    assert {type(e) for e in ONE_OF_EACH} == set(EVENT_TYPES)


def test_the_value_sets_are_the_documented_ones() -> None:
    assert PRIORITIES == ("low", "normal", "high", "urgent")
    assert STATUSES == ("opened", "assigned", "investigating", "resolved", "closed", "withdrawn")
    assert set(RESOLUTIONS) == {"refund", "replacement", "repair", "voucher", "rejected"}
    assert "late_delivery" in CATEGORIES
    assert len(CATEGORIES) == 8


@pytest.mark.parametrize(
    "command", [create(), *NON_CREATE_COMMANDS], ids=lambda c: type(c).__name__
)
def test_commands_travel_as_a_tagged_union(command: Command) -> None:
    data = msgspec.json.encode(command)
    assert msgspec.json.decode(data)["type"] == type(command).__name__
    assert msgspec.json.decode(data, type=Command) == command


async def test_the_repository_runs_the_decider_and_snapshots_its_state() -> None:
    store = MemoryEventStore()
    repository = AggregateRepository(store, CODEC, DECIDER, snapshot_every=2)
    script: list[Command] = [create(), assign(), investigate(), resolve()]
    for command in script:
        await repository.execute(ID, command)
    loaded = await repository.load(ID)
    assert loaded.from_snapshot
    assert loaded.version == 4
    assert loaded.state == resolved()


# --- properties ------------------------------------------------------------------------------


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` fourteen times out of fifteen, else ``bad``."""
    return st.integers(0, 14).flatmap(lambda roll: bad if roll == 0 else good)


ZONES = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5.5))])
#: Within a month: a reopen falls inside the 14-day window about half the time.
aware_times = st.datetimes(datetime(2024, 1, 1), datetime(2024, 2, 1), timezones=ZONES)
times = mostly(aware_times, st.datetimes(datetime(2024, 1, 1), datetime(2024, 2, 1)))  # naive
ids = mostly(st.just(ID), st.sampled_from(["", " ", LONG_ID, "c\x00", "c-2"]))
assignees = st.sampled_from(["bo", "chen", "dee"])
people = mostly(assignees, st.sampled_from(["", LONG_ID]))
texts = st.text(st.characters(codec="utf-8"), max_size=12)
notes = mostly(st.none() | texts, st.just(LONG_TEXT))
required_texts = mostly(texts.filter(str.strip), st.sampled_from(["", "  ", LONG_TEXT]))
customers = st.builds(
    Customer,
    id=mostly(st.just("cust-1"), st.just("")),
    name=mostly(st.just("Ana"), st.just(" ")),
    email=mostly(st.just("ana@example.com"), st.sampled_from(["ana", "a@b", "@x.io"])),
    phone=mostly(st.none() | st.just("+44 20 7946 0000"), st.sampled_from(["12", "phone"])),
)
valid_create = st.builds(
    CreateComplaint,
    complaint_id=st.just(ID),
    store_id=st.just("store-7"),
    customer=st.just(ANA),
    category=st.sampled_from(sorted(CATEGORIES)),
    description=st.just("cracked lid"),
    at=aware_times,
    priority=st.sampled_from(PRIORITIES),
)
#: Well-formed steps of the lifecycle, so that histories often get as far as resolution,
#: closure and reopening.
lifecycle: st.SearchStrategy[Command] = st.one_of(
    st.builds(AssignComplaint, complaint_id=st.just(ID), assignee=assignees, at=aware_times),
    st.builds(StartInvestigation, complaint_id=st.just(ID), at=aware_times),
    st.builds(
        ResolveComplaint,
        complaint_id=st.just(ID),
        resolution=st.sampled_from(RESOLUTIONS),
        at=aware_times,
        reason=st.just("outside warranty"),
    ),
    st.builds(CloseComplaint, complaint_id=st.just(ID), at=aware_times),
    st.builds(ReopenComplaint, complaint_id=st.just(ID), at=aware_times),
)
#: Any command, each field mostly valid.
anything: st.SearchStrategy[Command] = st.one_of(
    st.builds(
        CreateComplaint,
        complaint_id=ids,
        store_id=mostly(st.just("store-7"), st.just("")),
        customer=customers,
        category=mostly(st.sampled_from(sorted(CATEGORIES)), st.just("broken")),
        description=required_texts,
        at=times,
        priority=mostly(st.sampled_from(PRIORITIES), st.just("critical")),
        order_id=mostly(st.none() | st.just("order-1"), st.just("")),
        product_id=st.none() | st.just("kettle-3"),
    ),
    st.builds(AssignComplaint, complaint_id=ids, assignee=people, at=times, note=notes),
    st.builds(StartInvestigation, complaint_id=ids, at=times, note=notes),
    st.builds(
        ResolveComplaint,
        complaint_id=ids,
        resolution=mostly(st.sampled_from(RESOLUTIONS), st.just("cash")),
        at=times,
        note=notes,
        reason=notes,
    ),
    st.builds(CloseComplaint, complaint_id=ids, at=times, note=notes),
    st.builds(ReopenComplaint, complaint_id=ids, at=times, note=notes),
    st.builds(
        EscalateComplaint,
        complaint_id=ids,
        reason=required_texts,
        at=times,
        manager=st.none() | people,
    ),
    st.builds(WithdrawComplaint, complaint_id=ids, at=times, note=notes),
    st.builds(CommentComplaint, complaint_id=ids, author=people, text=required_texts, at=times),
)
histories = st.tuples(
    mostly(valid_create.map(lambda c: [c]), st.just([])),
    st.lists(st.one_of(lifecycle, anything), min_size=5, max_size=40),
).map(lambda parts: [*parts[0], *parts[1]])


@dataclass(frozen=True)
class Step:
    command: Command
    before: ComplaintState
    events: Sequence[ComplaintEvent]
    error: ComplaintError | None
    after: ComplaintState
    version: int


def walk(history: Sequence[Command]) -> Iterator[Step]:
    """Each command decided on the state the previous ones left; refusals change nothing.
    Any exception other than a ``ComplaintError`` escapes and fails the test."""
    state, version = INITIAL, 0
    for command in history:
        before = state
        try:
            events = DECIDER.decide(command, state)
            error = None
        except ComplaintError as exc:
            events, error = [], exc
        for event in events:
            state = DECIDER.evolve(state, event)
            version += 1
        yield Step(command, before, events, error, state, version)


def check_invariants(state: ComplaintState, version: int) -> None:
    assert state.exists == (version > 0), "exists exactly once something was recorded"
    if not state.exists:
        assert state == INITIAL
        return
    assert state.complaint_id == ID
    assert state.status in STATUSES
    assert state.priority in PRIORITIES
    assert state.customer is not None
    assert state.created_at is not None
    assert state.updated_at is not None
    assert state.category in CATEGORIES
    if state.status in ("investigating", "resolved", "closed"):
        assert state.assignee is not None
    if state.status in ("resolved", "closed"):
        assert state.resolution is not None
        assert state.resolved_at is not None
    else:
        assert (state.resolution, state.resolved_at) == (None, None)
    if state.status == "closed":
        assert state.closed_at is not None
    if state.resolution == "rejected":
        assert state.resolution_reason
    assert min(state.escalations, state.comments, state.reopen_count) >= 0


@settings(max_examples=200, deadline=None)
@given(histories)
def test_no_history_reaches_an_impossible_state(history: list[Command]) -> None:
    escalations = 0
    for step in walk(history):
        check_invariants(step.after, step.version)
        assert len(step.events) <= 1
        if step.before.status == "withdrawn":
            assert not step.events, "withdrawn is terminal"
        if step.before.status == "closed":
            assert all(isinstance(e, ComplaintReopened) for e in step.events)
        if step.before.exists:
            rank = PRIORITIES.index(step.before.priority)
            assert PRIORITIES.index(step.after.priority) >= rank, "priority never decreases"
        escalations += sum(isinstance(e, ComplaintEscalated) for e in step.events)
        assert step.after.escalations == escalations
        if step.error is not None:
            assert step.after == step.before
            assert str(step.error)


#: What deciding an accepted command again, on the state it produced, gives: refused with this
#: error, or ``None`` for "accepted again without events", or ``1`` for "accepted again".
AGAIN: dict[type[Command], type[ComplaintError] | int | None] = {
    CreateComplaint: ComplaintAlreadyExists,
    AssignComplaint: None,
    StartInvestigation: InvalidTransition,
    ResolveComplaint: InvalidTransition,
    CloseComplaint: InvalidTransition,
    ReopenComplaint: InvalidTransition,
    WithdrawComplaint: InvalidTransition,
    EscalateComplaint: 1,
    CommentComplaint: 1,
}


@settings(max_examples=200, deadline=None)
@given(histories)
def test_a_command_decided_again_on_the_state_it_produced_is_refused_or_changes_nothing(
    history: list[Command],
) -> None:
    for step in walk(history):
        if not step.events:
            continue
        [event] = step.events
        stamp = msgspec.structs.asdict(event)
        moment = step.command.at.astimezone(UTC)
        assert moment in stamp.values(), "the event carries the command's time, in UTC"
        assert step.after.updated_at == moment
        expected = AGAIN[type(step.command)]
        if isinstance(expected, type):
            with pytest.raises(expected):
                DECIDER.decide(step.command, step.after)
        elif expected is None:
            assert DECIDER.decide(step.command, step.after) == []
        else:
            again = DECIDER.decide(step.command, step.after)
            assert [type(e) for e in again] == [type(event)]


@settings(max_examples=150, deadline=None)
@given(histories)
def test_every_state_survives_a_snapshot(history: list[Command]) -> None:
    decoder = msgspec.json.Decoder(DECIDER.state_type)
    for state in [INITIAL, *(step.after for step in walk(history))]:
        data = msgspec.json.encode(state)
        restored = decoder.decode(data)
        assert restored == state
        assert msgspec.json.encode(restored) == data


def stored(event: ComplaintEvent, version: int = 1) -> RecordedEvent:
    """``event`` as the store would hand it back."""
    return RecordedEvent(
        event_id=uuid.uuid4(),
        event_type=type(event).__name__,
        aggregate_type="complaint",
        aggregate_id=ID,
        version=version,
        position=version,
        tx_id=version,
        data=msgspec.json.encode(event),
        metadata=Metadata(),
        created_at=T0,
    )


def check_codec_round_trip(event: ComplaintEvent) -> None:
    envelope = CODEC.decode(stored(event))
    assert envelope.payload == event
    assert type(envelope.payload) is type(event)
    assert envelope.event_type == type(event).__name__


@settings(max_examples=150, deadline=None)
@given(histories)
def test_every_decided_event_survives_the_codec(history: list[Command]) -> None:
    for step in walk(history):
        for event in step.events:
            check_codec_round_trip(event)


@settings(max_examples=100, deadline=None)
@given(st.one_of(*(st.from_type(t) for t in EVENT_TYPES)))
def test_any_event_whatever_its_text_survives_the_codec(event: ComplaintEvent) -> None:
    check_codec_round_trip(event)
