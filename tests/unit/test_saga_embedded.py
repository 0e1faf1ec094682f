"""The resolution saga and its timer service in process, on the embedded store, bus and read
models: the paths the end-to-end tests cannot aim at (a complaint first seen through a later
event, a payment answer that overtakes the saga's commit, a timer message lost on the way)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.complaints.domain import (
    CODEC,
    CommentComplaint,
    CreateComplaint,
    Customer,
    complaint_decider,
)
from actors.resolution_saga import ComplaintResolutionSaga, SagaTimers
from actors.resolution_saga.saga import timer_document
from actors.resolution_saga.state import INSTANCES, NAMESPACE, TIMERS, Timer
from runtime.actor import ActorContext
from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import Delivery
from runtime.errors import MessageDecodeError, Reject, Retry
from runtime.messages import encode_event, event_headers, routing_key
from runtime.observability.metrics import Metrics
from runtime.store.aggregate import AggregateRepository
from runtime.store.memory import MemoryEventStore
from runtime.store.protocol import Metadata, RecordedEvent, StreamId
from runtime.topology import Topology, parse_topology
from tests.unit.test_projection import NoSupervisor

TOPOLOGY = """
actors:
  resolution-saga:
    kind: saga
    handler: actors.resolution_saga:ComplaintResolutionSaga
    queue: saga.orchestration
    bind:
      complaints.events: ["complaint.#"]
      saga.events: [timer.fired, payment.completed, payment.failed, retry.requested]
    options: {start_window: 3600}
  saga-timers:
    kind: service
    handler: actors.resolution_saga:SagaTimers
    options: {resend_after: 60}
"""


@pytest.fixture
def topology() -> Topology:
    parsed = parse_topology(TOPOLOGY, source="test", env={})
    return msgspec.structs.replace(parsed, database_url=f"memory://{uuid.uuid4().hex}")


@pytest.fixture
def store() -> MemoryEventStore:
    return MemoryEventStore()


@pytest.fixture
async def bus(topology: Topology) -> MemoryBus:
    bus = MemoryBus()
    await bus.declare(topology.bus_plan())
    return bus


def context(name: str, topology: Topology, store: MemoryEventStore, bus: MemoryBus) -> ActorContext:
    return ActorContext(
        name=name,
        spec=topology.actors[name],
        topology=topology,
        store=store,
        bus=bus,
        metrics=Metrics(),
        supervisor=NoSupervisor(),
    )


@pytest.fixture
async def saga(
    topology: Topology, store: MemoryEventStore, bus: MemoryBus
) -> AsyncIterator[ComplaintResolutionSaga]:
    async with ComplaintResolutionSaga(context("resolution-saga", topology, store, bus)) as s:
        yield s


async def complaint_events(store: MemoryEventStore, created: datetime) -> list[RecordedEvent]:
    """A complaint of a store without agents (no command to send), created then moved on."""
    repository = AggregateRepository(store, CODEC, complaint_decider(), snapshot_every=None)
    cid = str(uuid.uuid4())
    customer = Customer(id="c", name="Ana", email="ana@example.com")
    create = CreateComplaint(cid, "store-x", customer, "damaged_product", "crushed", created)
    await repository.execute(cid, create, Metadata(correlation_id="corr"))
    await repository.execute(cid, CommentComplaint(cid, "ana", "any news?", created), Metadata())
    return await store.read_stream(StreamId("complaint", cid))


def delivery_of(record: RecordedEvent) -> Delivery:
    return Delivery(
        queue="saga.orchestration",
        message_id=str(record.event_id),
        body=encode_event(record),
        headers=event_headers(record),
        exchange="complaints.events",
        routing_key=routing_key(record),
        redelivered=False,
        delivery_tag=1,
    )


def saga_message(routing_key: str, body: bytes, message_id: str) -> Delivery:
    """A message on saga.events, as the saga's queue delivers it."""
    return Delivery(
        queue="saga.orchestration",
        message_id=message_id,
        body=body,
        headers={},
        exchange="saga.events",
        routing_key=routing_key,
        redelivered=False,
        delivery_tag=2,
    )


async def test_a_complaint_first_seen_through_a_later_event_starts_its_saga(
    saga: ComplaintResolutionSaga, store: MemoryEventStore
) -> None:
    created, commented = await complaint_events(store, datetime.now(UTC))
    await saga.handle(delivery_of(commented))  # the creation was overtaken
    found = await saga.read_models.get(NAMESPACE, INSTANCES, created.aggregate_id)
    assert found is not None
    assert found["state"] == "running"
    assert [s["name"] for s in found["steps"]] == ["assign", "notify-customer", "arm-sla"]
    assert found["steps"][0]["status"] == "skipped"  # store-x has no agents


async def test_an_old_complaint_seen_first_through_a_later_event_is_left_alone(
    saga: ComplaintResolutionSaga, store: MemoryEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    created, commented = await complaint_events(store, datetime.now(UTC))
    monkeypatch.setattr(saga, "start_window", 0.0)  # "created before the saga ran"
    await saga.handle(delivery_of(commented))
    assert await saga.read_models.get(NAMESPACE, INSTANCES, created.aggregate_id) is None


async def test_a_payment_answer_that_overtakes_the_request_is_handed_back(
    saga: ComplaintResolutionSaga, store: MemoryEventStore
) -> None:
    created, _ = await complaint_events(store, datetime.now(UTC))
    await saga.handle(delivery_of(created))
    answer = {"request_id": "r", "saga_id": created.aggregate_id, "ok": True, "attempts": 1}
    with pytest.raises(Retry, match="has not recorded its payment request"):
        await saga.handle(
            saga_message("payment.completed", msgspec.json.encode(answer), "r:result")
        )


async def test_a_due_timer_is_sent_again_until_the_saga_settles_it(
    topology: Topology, store: MemoryEventStore, bus: MemoryBus
) -> None:
    due = Timer(
        timer_id="t-1",
        saga_id="s-1",
        name="sla",
        due_at=datetime.now(UTC) - timedelta(seconds=1),
    )
    async with SagaTimers(context("saga-timers", topology, store, bus)) as timers:
        async with timers.read_models.transaction(NAMESPACE) as tx:
            await tx.put(TIMERS, due.timer_id, timer_document(due))
        assert await timers.fire_due() == 1
        assert await timers.fire_due() == 0  # not again before resend_after
        document = await timers.read_models.get(NAMESPACE, TIMERS, due.timer_id)
        assert document is not None
        assert (document["status"], document["sent"]) == ("armed", 1)  # the saga settles it
        timers.resend_after = 0.0
        async with timers.read_models.transaction(NAMESPACE) as tx:
            await tx.put(TIMERS, due.timer_id, {**document, "send_at": document["due_at"]})
        assert await timers.fire_due() == 1  # lost on the way? sent again
        async with timers.read_models.transaction(NAMESPACE) as tx:
            await tx.put(TIMERS, due.timer_id, {**document, "status": "fired"})
        assert await timers.fire_due() == 0


@pytest.mark.parametrize(
    ("routing_key", "body", "error"),
    [
        ("payment.refunded", b"{}", Reject),  # not a message the saga handles
        ("payment.completed", b"not json", MessageDecodeError),  # undecodable
    ],
)
async def test_a_message_the_saga_cannot_handle_goes_to_the_dead_letter_queue(
    saga: ComplaintResolutionSaga, routing_key: str, body: bytes, error: type[Exception]
) -> None:
    """Reject and MessageDecodeError are what the runtime dead-letters at once."""
    with pytest.raises(error):
        await saga.handle(saga_message(routing_key, body, "m-1"))
