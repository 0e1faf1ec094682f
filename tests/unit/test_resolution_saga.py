"""The resolution saga's pure rules and persisted state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from actors.resolution_saga.saga import timer_document
from actors.resolution_saga.state import (
    DEFAULT_SLA,
    DEFAULT_SLA_LOW,
    Compensation,
    Saga,
    Timer,
    decode_saga,
    deterministic_id,
    encode_saga,
    least_loaded,
    sla_for,
)

NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
AGENTS = st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=6, unique=True)


@given(agents=AGENTS, data=st.data())
def test_the_least_loaded_agent_is_chosen_and_the_first_listed_among_equals(
    agents: list[str], data: st.DataObject
) -> None:
    load = {a: data.draw(st.integers(0, 5)) for a in agents}
    chosen = least_loaded(agents, load)
    assert chosen is not None
    assert load[chosen] == min(load.values())
    assert chosen == next(a for a in agents if load[a] == load[chosen])


def test_an_agent_unknown_to_the_workload_counts_as_free() -> None:
    assert least_loaded(["a", "b"], {"a": 1}) == "b"
    assert least_loaded([], {}) is None


def test_the_sla_follows_the_priority_with_low_as_the_default() -> None:
    table = {**DEFAULT_SLA, "low": DEFAULT_SLA_LOW}
    assert sla_for("urgent", table) == timedelta(hours=4)
    assert sla_for("low", table) == timedelta(hours=72)
    assert sla_for("unheard-of", table) == timedelta(hours=72)
    assert sla_for("normal", {"normal": 2.0}) == timedelta(seconds=2)


def test_ids_are_deterministic_per_saga_and_purpose() -> None:
    assert deterministic_id("c-1", "command:assign") == deterministic_id("c-1", "command:assign")
    assert deterministic_id("c-1", "command:assign") != deterministic_id("c-2", "command:assign")
    assert deterministic_id("c-1", "command:assign") != deterministic_id("c-1", "timer:sla")


def test_a_saga_survives_its_document_form() -> None:
    saga = Saga(
        saga_id="c", complaint_id="c", store_id="s", priority="low", started_at=NOW, updated_at=NOW
    )
    saga.record("assign", "done", NOW, detail="agent-7 (0 open)")
    saga.compensations = [Compensation(name="reopen-complaint", attempts=2, status="failed")]
    saga.timers.append(Timer(timer_id="t", saga_id="c", name="sla", due_at=NOW))
    assert decode_saga(encode_saga(saga)) == saga


def test_moving_to_a_final_state_deactivates_and_dates_it() -> None:
    saga = Saga(
        saga_id="c", complaint_id="c", store_id="s", priority="low", started_at=NOW, updated_at=NOW
    )
    saga.move("compensation_failed", NOW)
    assert saga.active
    assert saga.completed_at is None
    saga.move("compensated", NOW)
    assert not saga.active
    assert saga.completed_at == NOW


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_timer_deadlines_sort_as_text_in_time_order(a: datetime, b: datetime) -> None:
    """The timer service finds due timers with a text range on due_at."""
    first = timer_document(Timer(timer_id="1", saga_id="s", name="sla", due_at=a))["due_at"]
    second = timer_document(Timer(timer_id="2", saga_id="s", name="sla", due_at=b))["due_at"]
    assert (first < second) == (a < b)
