"""The aggregate actor's command path on the embedded store: a first delivery of a command
whose id the sender made up skips the command-result lookup; anything that may have run
before (an idempotency key, a redelivery, a retry, a second call in place) looks it up and is
answered from the first result."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from actors.complaints.domain import AssignComplaint, CreateComplaint, Customer
from actors.complaints.handler import ComplaintActor
from runtime.actor import ActorContext
from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import Delivery
from runtime.commands import CommandRequest
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.store.protocol import StreamId
from runtime.topology import parse_topology
from tests.unit.test_projection import NoSupervisor

TOPOLOGY = """
actors:
  complaints:
    kind: aggregate
    handler: actors.complaints.handler:ComplaintActor
    queue: complaint.commands
"""
AT = datetime(2026, 11, 24, tzinfo=UTC)


class CountingStore(MemoryEventStore):
    """The embedded store, counting command-result lookups."""

    lookups = 0

    async def command_result(self, command_id: uuid.UUID) -> object:  # type: ignore[override]
        self.lookups += 1
        return await super().command_result(command_id)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def actor(store: CountingStore) -> ComplaintActor:
    topology = parse_topology(TOPOLOGY, source="test", env={})
    context = ActorContext(
        name="complaints",
        spec=topology.actors["complaints"],
        topology=topology,
        store=store,
        bus=MemoryBus(),
        metrics=Metrics(),
        supervisor=NoSupervisor(),
    )
    return ComplaintActor(context)


def delivery(
    command: object,
    command_id: uuid.UUID,
    *,
    new_id: bool,
    redelivered: bool = False,
    attempts: int = 0,
) -> Delivery:
    request = CommandRequest(
        aggregate_id="c-1",
        command=msgspec.Raw(msgspec.json.encode(command)),
        command_id=command_id,
        correlation_id="corr",
        new_id=new_id,
    )
    return Delivery(
        queue="complaint.commands",
        message_id=str(command_id),
        body=msgspec.json.encode(request),
        headers={"x-attempts": attempts} if attempts else {},
        exchange="",
        routing_key="complaint.commands",
        redelivered=redelivered,
        delivery_tag=1,
    )


CREATE = CreateComplaint(
    complaint_id="c-1",
    store_id="s",
    customer=Customer(id="c", name="Ana", email="ana@example.com"),
    category="damaged_product",
    description="crushed",
    at=AT,
)


async def events(store: MemoryEventStore) -> list[str]:
    return [r.event_type for r in await store.read_stream(StreamId("complaint", "c-1"))]


async def test_a_first_delivery_of_a_made_up_id_skips_the_lookup(
    actor: ComplaintActor, store: CountingStore
) -> None:
    await actor.handle(delivery(CREATE, uuid.uuid4(), new_id=True))
    assert store.lookups == 0
    assert await events(store) == ["ComplaintCreated"]


@pytest.mark.parametrize(
    "how",
    ["idempotency key", "redelivered", "retried", "again in place"],
)
async def test_what_may_have_run_before_is_looked_up_and_answered_once(
    actor: ComplaintActor, store: CountingStore, how: str
) -> None:
    await actor.handle(delivery(CREATE, uuid.uuid4(), new_id=True))
    command_id = uuid.uuid4()
    assign = AssignComplaint("c-1", "agent-7", AT)
    first = delivery(assign, command_id, new_id=how != "idempotency key")
    await actor.handle(first)
    lookups = store.lookups
    again = {
        "idempotency key": first,
        "redelivered": delivery(assign, command_id, new_id=True, redelivered=True),
        "retried": delivery(assign, command_id, new_id=True, attempts=1),
        "again in place": first,
    }[how]
    # The second run would be refused if decided again (already assigned to agent-7): it
    # must be answered from the first result instead.
    await actor.handle(again)
    assert store.lookups == lookups + 1
    assert await events(store) == ["ComplaintCreated", "ComplaintAssigned"]
