"""The complaint projections' helpers: timestamps whose text order is time order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from actors.complaints.projections import parse_timestamp, position_key, timestamp

moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@given(moments, moments, offsets)
def test_timestamp_text_order_is_time_order_whatever_the_offset(
    a: datetime, b: datetime, zone: timezone
) -> None:
    shown_a, shown_b = timestamp(a.astimezone(zone)), timestamp(b)
    assert (shown_a < shown_b) == (a < b)
    assert parse_timestamp(shown_a) == a
    assert shown_a.endswith("Z")
    assert len(shown_a) == len("2026-11-24T15:00:00.000000Z")


def test_a_naive_moment_is_taken_as_utc() -> None:
    assert timestamp(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000000Z"


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=2**62))
def test_position_keys_sort_as_the_positions(a: int, b: int) -> None:
    assert (position_key(a) < position_key(b)) == (a < b)
