"""The event codec: typed payloads, the errors that name what went wrong, and upcasters.

``tests.support.ledger.Renamed`` is at schema version 3. Its history, as the upcasters of this
module tell it: v1 was an event called ``NameChanged`` with a ``name`` field; v2 renamed the
event to ``Renamed`` and the field to ``holder``; v3 renamed the field to ``owner``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import EventDecodeError, UnknownEventTypeError, UpcastError
from runtime.store import EventCodec, Metadata, NewEvent, RecordedEvent, StreamId
from runtime.store.memory import MemoryEventStore
from tests.support.ledger import Deposited, LedgerEvent, Opened, Renamed, Withdrawn

# --- old shapes of Renamed, as the code that wrote them declared them -------------------------


class NameChangedV1(msgspec.Struct, frozen=True, tag="NameChanged"):
    name: str  # schema_version 1, the default


class RenamedV2(msgspec.Struct, frozen=True, tag="Renamed"):
    holder: str
    schema_version: ClassVar[int] = 2


def renamed_history(codec: EventCodec) -> EventCodec:
    """Register the two upcasters that bring a v1 ``NameChanged`` or a v2 ``Renamed`` to v3."""

    @codec.upcaster("NameChanged", 1, rename_to="Renamed")
    def name_to_holder(data: dict[str, Any]) -> dict[str, Any]:
        data["holder"] = data.pop("name")
        return data

    @codec.upcaster("Renamed", 2)
    def holder_to_owner(data: dict[str, Any]) -> dict[str, Any]:
        data["owner"] = data.pop("holder")
        return data

    return codec


def ledger_codec() -> EventCodec:
    return EventCodec().register(LedgerEvent)


def current_codec() -> EventCodec:
    return renamed_history(ledger_codec())


def record(
    event_type: str,
    data: bytes | dict[str, Any],
    schema_version: int = 1,
    *,
    event_id: uuid.UUID | None = None,
    metadata: Metadata | None = None,
) -> RecordedEvent:
    """A stored event built by hand, ``data`` exactly as the store would hold it."""
    return RecordedEvent(
        event_id=event_id or uuid.uuid4(),
        event_type=event_type,
        aggregate_type="ledger",
        aggregate_id="acc-1",
        version=4,
        position=17,
        tx_id=9,
        data=data if isinstance(data, bytes) else msgspec.json.encode(data),
        metadata=msgspec.structs.replace(metadata or Metadata(), schema_version=schema_version),
        created_at=datetime(2024, 5, 1, 12, 30),
    )


def old_renamed(owner: str, schema_version: int) -> RecordedEvent:
    """A stored rename, in the shape the code of ``schema_version`` wrote it."""
    if schema_version == 1:
        return record("NameChanged", {"type": "NameChanged", "name": owner}, 1)
    if schema_version == 2:
        return record("Renamed", {"type": "Renamed", "holder": owner}, 2)
    return record("Renamed", {"type": "Renamed", "owner": owner}, 3)


text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)


# --- today's events -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [Opened("ana"), Deposited(10, note="salaire"), Withdrawn(3), Renamed("zoë")],
    ids=lambda p: type(p).__name__,
)
def test_a_current_event_decodes_into_its_type_with_the_record_around_it(
    payload: msgspec.Struct,
) -> None:
    event_type = type(payload).__name__
    version = 3 if isinstance(payload, Renamed) else 1
    stored = record(
        event_type, msgspec.json.encode(payload), version, metadata=Metadata(user="u-1")
    )
    envelope = current_codec().decode(stored)
    assert envelope.payload == payload
    assert envelope.event_type == event_type
    assert envelope.event_id == stored.event_id
    assert (envelope.aggregate_type, envelope.aggregate_id) == ("ledger", "acc-1")
    assert (envelope.version, envelope.position, envelope.tx_id) == (4, 17, 9)
    assert envelope.checkpoint == stored.checkpoint
    assert envelope.metadata == stored.metadata
    assert envelope.created_at == stored.created_at


def test_the_codec_lists_the_types_it_knows() -> None:
    assert ledger_codec().event_types == ["Deposited", "Opened", "Renamed", "Withdrawn"]


# --- errors that name the event -------------------------------------------------------------


def test_an_unknown_event_type_is_named_with_its_event_id() -> None:
    stored = record("Vanished", {"type": "Vanished"})
    with pytest.raises(UnknownEventTypeError) as caught:
        ledger_codec().decode(stored)
    error = caught.value
    assert isinstance(error, EventDecodeError)
    assert error.event_id == stored.event_id
    assert error.event_type == "Vanished"
    assert error.known == ["Deposited", "Opened", "Renamed", "Withdrawn"]
    assert str(stored.event_id) in str(error)
    assert "'Vanished'" in str(error)
    assert "Opened" in str(error), "the message lists the types that are known"


def test_an_unknown_event_type_on_an_empty_codec_says_none_is_known() -> None:
    with pytest.raises(UnknownEventTypeError, match=r"known: none"):
        EventCodec().decode(record("Opened", {"type": "Opened", "owner": "a"}))


@pytest.mark.parametrize(
    "data",
    [b'{"type": "Deposited", "amount": ', b"not json at all", b""],
    ids=["truncated", "garbage", "empty"],
)
def test_malformed_stored_json_is_a_decode_error_naming_the_event(data: bytes) -> None:
    stored = record("Deposited", data)
    with pytest.raises(EventDecodeError) as caught:
        ledger_codec().decode(stored)
    assert not isinstance(caught.value, UpcastError | UnknownEventTypeError)
    assert caught.value.event_id == stored.event_id
    assert caught.value.event_type == "Deposited"
    assert str(stored.event_id) in str(caught.value)
    assert "Deposited" in str(caught.value)


def test_malformed_stored_json_of_an_old_version_is_a_decode_error_naming_the_event() -> None:
    stored = record("Renamed", b'{"holder": ', 2)
    with pytest.raises(EventDecodeError, match="stored JSON is invalid") as caught:
        current_codec().decode(stored)
    assert not isinstance(caught.value, UpcastError)
    assert str(stored.event_id) in str(caught.value)


def test_an_old_version_stored_as_something_else_than_an_object_is_a_decode_error() -> None:
    stored = record("Renamed", b'["holder", "ana"]', 2)
    with pytest.raises(EventDecodeError, match="not a JSON object") as caught:
        current_codec().decode(stored)
    assert str(stored.event_id) in str(caught.value)


@pytest.mark.parametrize(
    ("event_type", "data", "field"),
    [
        ("Deposited", {"type": "Deposited", "amount": "ten"}, "amount"),
        ("Deposited", {"type": "Deposited"}, "amount"),
        ("Withdrawn", {"type": "Withdrawn", "amount": [1]}, "amount"),
        ("Opened", {"type": "Opened", "owner": None}, "owner"),
        ("Opened", [1, 2], ""),
        ("Opened", {"type": "Deposited", "owner": "ana"}, "type"),
    ],
    ids=["wrong-field-type", "missing-field", "list-for-int", "null", "array", "wrong-tag"],
)
def test_a_payload_of_the_wrong_shape_is_a_decode_error_naming_the_event(
    event_type: str, data: Any, field: str
) -> None:
    stored = record(event_type, data)
    with pytest.raises(EventDecodeError) as caught:
        ledger_codec().decode(stored)
    assert not isinstance(caught.value, UpcastError | UnknownEventTypeError)
    assert caught.value.event_id == stored.event_id
    assert caught.value.event_type == event_type
    assert str(stored.event_id) in str(caught.value)
    assert field in caught.value.reason


def test_a_payload_of_the_wrong_shape_after_upcasting_is_a_decode_error() -> None:
    codec = ledger_codec()

    @codec.upcaster("Renamed", 2)
    def forgets_the_owner(data: dict[str, Any]) -> dict[str, Any]:
        return {"nickname": data["holder"]}

    stored = record("Renamed", {"holder": "ana"}, 2)
    with pytest.raises(EventDecodeError, match="after upcasting") as caught:
        codec.decode(stored)
    assert not isinstance(caught.value, UpcastError)
    assert str(stored.event_id) in str(caught.value)
    assert "owner" in caught.value.reason


@pytest.mark.parametrize("stored_version", [4, 5, 100])
def test_a_schema_version_newer_than_the_code_says_to_upgrade(stored_version: int) -> None:
    stored = record("Renamed", {"type": "Renamed", "owner": "ana"}, stored_version)
    with pytest.raises(EventDecodeError) as caught:
        current_codec().decode(stored)
    error = caught.value
    assert not isinstance(error, UpcastError | UnknownEventTypeError)
    assert error.event_id == stored.event_id
    assert error.event_type == "Renamed"
    assert f"stored schema version {stored_version} is newer than this code's 3" in str(error)
    assert "upgrade" in str(error)


def test_a_newer_version_reached_through_a_rename_also_says_to_upgrade() -> None:
    """An upcaster that lands past today's version of its target means newer code wrote it."""
    codec = ledger_codec()

    @codec.upcaster("NameChanged", 4, rename_to="Renamed")
    def late_rename(data: dict[str, Any]) -> dict[str, Any]:
        return data

    with pytest.raises(EventDecodeError, match="upgrade"):
        codec.decode(record("NameChanged", {"owner": "ana"}, 4))


def test_a_missing_upcaster_rung_is_named() -> None:
    codec = ledger_codec()

    @codec.upcaster("NameChanged", 1, rename_to="Renamed")
    def name_to_holder(data: dict[str, Any]) -> dict[str, Any]:
        return {"holder": data["name"]}

    # No ("Renamed", 2) rung: a v1 event climbs to v2 and stops there.
    stored = record("NameChanged", {"name": "ana"}, 1)
    with pytest.raises(UpcastError) as caught:
        codec.decode(stored)
    error = caught.value
    assert error.event_id == stored.event_id
    assert error.event_type == "Renamed"
    assert "no upcaster from schema version 2" in str(error)
    assert "codec.upcaster('Renamed', 2)" in str(error)
    assert str(stored.event_id) in str(error)


def test_an_old_version_without_any_upcaster_names_its_first_rung() -> None:
    stored = record("Renamed", {"name": "ana"}, 1)
    with pytest.raises(UpcastError, match=r"codec\.upcaster\('Renamed', 1\)"):
        ledger_codec().decode(stored)


def test_an_old_name_without_the_rung_it_is_stored_at_is_an_upcast_error() -> None:
    """``NameChanged`` is known to the codec as an old name: a gap in its history is not an
    unknown type but a missing rung."""
    stored = record("NameChanged", {"name": "ana"}, 0)
    with pytest.raises(UpcastError, match=r"codec\.upcaster\('NameChanged', 0\)") as caught:
        current_codec().decode(stored)
    assert not isinstance(caught.value, UnknownEventTypeError)


def test_an_upcaster_that_raises_is_an_upcast_error_keeping_the_cause() -> None:
    codec = ledger_codec()

    @codec.upcaster("Renamed", 2)
    def needs_a_field(data: dict[str, Any]) -> dict[str, Any]:
        return {"owner": data["holder"]}

    stored = record("Renamed", {"name": "ana"}, 2)
    with pytest.raises(UpcastError) as caught:
        codec.decode(stored)
    error = caught.value
    assert error.event_id == stored.event_id
    assert error.event_type == "Renamed"
    assert "upcaster v2 raised KeyError('holder')" in str(error)
    assert isinstance(error.__cause__, KeyError)


@pytest.mark.parametrize("returned", [None, ["owner", "ana"], "ana", 3])
def test_an_upcaster_that_returns_no_dict_is_an_upcast_error(returned: object) -> None:
    codec = ledger_codec()

    @codec.upcaster("Renamed", 2)
    def loses_the_shape(data: dict[str, Any]) -> Any:
        return returned

    stored = record("Renamed", {"holder": "ana"}, 2)
    with pytest.raises(UpcastError, match="upcaster v2 did not return a dict") as caught:
        codec.decode(stored)
    assert caught.value.event_id == stored.event_id


# --- registration -----------------------------------------------------------------------------


def test_registering_two_classes_under_one_type_name_is_refused() -> None:
    class OtherOpened(msgspec.Struct, frozen=True, tag="Opened"):
        by: str

    codec = ledger_codec()
    with pytest.raises(ValueError, match="'Opened' is registered twice"):
        codec.register(OtherOpened)


def test_registering_the_same_class_again_is_harmless() -> None:
    codec = ledger_codec().register(Opened, LedgerEvent)
    assert codec.event_types == ["Deposited", "Opened", "Renamed", "Withdrawn"]


def test_registering_something_else_than_a_struct_is_refused() -> None:
    with pytest.raises(TypeError, match="not a msgspec Struct"):
        EventCodec().register(dict)
    with pytest.raises(TypeError, match="not a msgspec Struct"):
        EventCodec().register(Opened | int)


def test_registering_one_upcaster_rung_twice_is_refused() -> None:
    codec = current_codec()
    with pytest.raises(ValueError, match="Renamed v2 already exists"):
        codec.upcaster("Renamed", 2)(lambda data: data)


# --- upcaster chains ------------------------------------------------------------------------


@settings(max_examples=75, deadline=None)
@given(owner=text, schema_version=st.sampled_from([1, 2, 3]))
def test_a_rename_decodes_as_todays_type_whatever_version_it_was_stored_at(
    owner: str, schema_version: int
) -> None:
    stored = old_renamed(owner, schema_version)
    envelope = current_codec().decode(stored)
    assert envelope.payload == Renamed(owner)
    assert envelope.event_type == "Renamed"
    assert envelope.metadata.schema_version == 3
    assert envelope.event_id == stored.event_id
    assert (envelope.version, envelope.position, envelope.tx_id) == (4, 17, 9)


@settings(max_examples=50, deadline=None)
@given(owner=text, correlation_id=st.none() | text, user=st.none() | text)
def test_upcasting_keeps_the_metadata_but_its_schema_version(
    owner: str, correlation_id: str | None, user: str | None
) -> None:
    metadata = Metadata(correlation_id=correlation_id, user=user, extra={"k": "v"})
    stored = record("NameChanged", {"name": owner}, 1, metadata=metadata)
    envelope = current_codec().decode(stored)
    assert envelope.metadata == msgspec.structs.replace(metadata, schema_version=3)


def test_each_upcaster_runs_once_and_in_order() -> None:
    calls: list[str] = []
    codec = ledger_codec()

    @codec.upcaster("NameChanged", 1, rename_to="Renamed")
    def first(data: dict[str, Any]) -> dict[str, Any]:
        calls.append("NameChanged v1")
        return {"holder": data["name"]}

    @codec.upcaster("Renamed", 2)
    def second(data: dict[str, Any]) -> dict[str, Any]:
        calls.append("Renamed v2")
        return {"owner": data["holder"]}

    assert codec.decode(record("NameChanged", {"name": "ana"}, 1)).payload == Renamed("ana")
    assert calls == ["NameChanged v1", "Renamed v2"]
    calls.clear()
    assert codec.decode(record("Renamed", {"holder": "ana"}, 2)).payload == Renamed("ana")
    assert calls == ["Renamed v2"]
    calls.clear()
    assert codec.decode(record("Renamed", {"owner": "ana"}, 3)).payload == Renamed("ana")
    assert calls == []


old_or_current_events = st.one_of(
    st.builds(NameChangedV1, name=text),
    st.builds(RenamedV2, holder=text),
    st.builds(Renamed, owner=text),
    st.builds(Opened, owner=text),
    st.builds(Deposited, amount=st.integers(), note=text),
    st.builds(Withdrawn, amount=st.integers()),
)


def as_today(payload: msgspec.Struct) -> msgspec.Struct:
    match payload:
        case NameChangedV1(name=name):
            return Renamed(name)
        case RenamedV2(holder=holder):
            return Renamed(holder)
        case _:
            return payload


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(old_or_current_events, min_size=1, max_size=12))
def test_events_written_by_older_code_read_back_as_todays_types(
    payloads: list[msgspec.Struct],
) -> None:
    """Older code appended its own classes (same tag, older ``schema_version``) to the store;
    today's code reads them with a codec that only knows today's classes and the upcasters."""

    async def scenario() -> list[msgspec.Struct]:
        store = MemoryEventStore()
        stream = StreamId("ledger", "acc-1")
        for i, payload in enumerate(payloads):
            await store.append(stream, [NewEvent(payload=payload)], i)
        records = await store.read_stream(stream)
        stored_types = [(r.event_type, r.metadata.schema_version) for r in records]
        assert stored_types == [
            ("NameChanged", 1)
            if isinstance(p, NameChangedV1)
            else ("Renamed", 2)
            if isinstance(p, RenamedV2)
            else (type(p).__name__, 3 if isinstance(p, Renamed) else 1)
            for p in payloads
        ]
        codec = current_codec()
        envelopes = [codec.decode(r) for r in records]
        assert all(e.event_type == type(e.payload).__name__ for e in envelopes)
        assert all(
            e.metadata.schema_version == (3 if isinstance(e.payload, Renamed) else 1)
            for e in envelopes
        )
        return [e.payload for e in envelopes]

    assert anyio.run(scenario) == [as_today(p) for p in payloads]


def test_a_decoded_record_keeps_its_created_at_even_when_aware() -> None:
    stored = msgspec.structs.replace(
        old_renamed("ana", 1), created_at=datetime(2024, 5, 1, tzinfo=UTC)
    )
    assert current_codec().decode(stored).created_at == datetime(2024, 5, 1, tzinfo=UTC)
