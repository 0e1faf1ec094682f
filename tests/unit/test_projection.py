"""Projections on the memory backends: whatever the bus does (duplicates, drops followed by
redeliveries, reordering), the read model ends as the fold of the event store, and each
event's effect is applied exactly once, in version order.

The helpers here are shared with ``tests/integration/test_projection_postgres.py``.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.actor import ActorContext, ActorStatistics
from runtime.bus.memory import MemoryBus
from runtime.bus.protocol import X_ORDERING_KEY, Delivery
from runtime.errors import ActorError, ConfigurationError, MessageDecodeError, Reject, Retry
from runtime.messages import encode_event, event_headers, routing_key
from runtime.observability.metrics import Metrics
from runtime.projection import ProjectionHandler, batch_marks, mark_name
from runtime.routing import mailbox_index
from runtime.store import EventCodec, EventStore, NewEvent, RecordedEvent, StreamId
from runtime.store.codec import Envelope
from runtime.store.memory import MemoryEventStore
from runtime.store.protocol import Checkpoint
from runtime.store.readmodel import ReadModelStore, ReadModelTx, read_model_store_for
from runtime.stream_source import Committed, stream_offset_name
from runtime.supervisor import Supervisor
from runtime.topology import Topology, parse_topology
from tests.contracts.runtime import wait_until
from tests.support.ledger import LEDGER, Deposited, LedgerEvent, Opened, Renamed, Withdrawn
from tests.support.streams import write_events

CODEC = EventCodec().register(LedgerEvent)
EXCHANGE = "complaints.events"

# --- the projection under test ------------------------------------------------------------------


class BalanceProjection(ProjectionHandler):
    """One document per account (owner, balance, version), and one per event counting how
    many times its effect was applied, committed with the effect."""

    codec = CODEC

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        account = await tx.get("accounts", event.aggregate_id) or {
            "owner": None,
            "balance": 0,
            "version": 0,
        }
        assert event.version == account["version"] + 1, "events applied out of order"
        match event.payload:
            case Opened(owner=owner) | Renamed(owner=owner):
                account["owner"] = owner
            case Deposited(amount=amount):
                account["balance"] += amount
            case Withdrawn(amount=amount):
                account["balance"] -= amount
        account["version"] = event.version
        await tx.put("accounts", event.aggregate_id, account)
        applied = await tx.get("applied", str(event.event_id)) or {"count": 0}
        await tx.put("applied", str(event.event_id), {"count": applied["count"] + 1})


# --- wiring: a topology, an actor context, deliveries ---------------------------------------------

TOPOLOGY = """
actors:
  balances:
    kind: projection
    handler: tests.unit.test_projection:BalanceProjection
    bind: {{complaints.events: ["ledger.#"]}}
    consumers: {consumers}
    options: {{schema: {schema}}}
"""


def topology_for(database_url: str, *, schema: str = "public", consumers: int = 1) -> Topology:
    text = TOPOLOGY.format(schema=schema, consumers=consumers)
    topology = parse_topology(text, source="test", env={})
    return msgspec.structs.replace(topology, database_url=database_url)


class NoSupervisor:
    ready = True
    live = True

    def statistics(self) -> list[ActorStatistics]:
        return []

    def crash(self, name: str) -> None:
        raise NotImplementedError


def projection_context(
    store: EventStore,
    database_url: str,
    *,
    schema: str = "public",
    metrics: Metrics | None = None,
) -> ActorContext:
    topology = topology_for(database_url, schema=schema)
    return ActorContext(
        name="balances",
        spec=topology.actors["balances"],
        topology=topology,
        store=store,
        bus=MemoryBus(),
        metrics=metrics or Metrics(),
        supervisor=NoSupervisor(),
    )


def embedded_url() -> str:
    """A read-model store of this test's own (the registry is process-wide)."""
    return f"memory://test-{uuid.uuid4().hex}"


def delivery(record: RecordedEvent, tag: int = 1) -> Delivery:
    return Delivery(
        queue="balances",
        message_id=str(record.event_id),
        body=encode_event(record),
        headers=event_headers(record),
        exchange=EXCHANGE,
        routing_key=routing_key(record),
        redelivered=tag > 1,
        delivery_tag=tag,
    )


# --- appends, schedules and the expected result --------------------------------------------------

Script = list[tuple[int, list[LedgerEvent]]]  # (account index, the events of one append)

payloads = st.one_of(
    st.builds(Opened, owner=st.text(alphabet="abcé", max_size=4)),
    st.builds(Renamed, owner=st.text(alphabet="xyz", max_size=3)),
    st.builds(Deposited, amount=st.integers(1, 100)),
    st.builds(Withdrawn, amount=st.integers(1, 100)),
)
scripts = st.lists(
    st.tuples(st.integers(0, 3), st.lists(payloads, min_size=1, max_size=3)),
    min_size=1,
    max_size=12,
)


async def append_script(store: EventStore, script: Script) -> list[RecordedEvent]:
    """Append each batch to its account (fresh ids); returns every event, in store order."""
    streams = [StreamId("ledger", f"acc-{uuid.uuid4().hex[:10]}") for _ in range(4)]
    versions = [0] * len(streams)
    records: list[RecordedEvent] = []
    for index, events in script:
        stream = streams[index]
        await store.append(stream, [NewEvent(e) for e in events], versions[index])
        versions[index] += len(events)
    for stream in streams:
        records.extend(await store.read_stream(stream))
    return sorted(records, key=lambda r: r.checkpoint)


def schedule_for(data: st.DataObject, count: int) -> list[int]:
    """Indexes of the events in delivery order: a random prefix (reordered, duplicated,
    some dropped), then the dropped ones redelivered in random order, then more copies."""
    indexes = st.integers(0, count - 1)
    early = data.draw(st.lists(indexes, max_size=2 * count), label="early")
    dropped = sorted(set(range(count)) - set(early))
    late = data.draw(st.permutations(dropped), label="redelivered")
    again = data.draw(st.lists(indexes, max_size=count), label="duplicates")
    return [*early, *late, *again]


def expected_accounts(records: Sequence[RecordedEvent]) -> dict[str, dict[str, Any]]:
    """The fold of the store, per account, as the projection should have it."""
    by_account: dict[str, list[Any]] = {}
    for record in records:
        by_account.setdefault(record.aggregate_id, []).append(CODEC.decode(record).payload)
    expected = {}
    for account, events in by_account.items():
        state = functools.reduce(LEDGER.evolve, events, LEDGER.initial_state)
        expected[account] = {"owner": state.owner, "balance": state.balance, "version": len(events)}
    return expected


async def assert_projected_exactly_once(
    read_models: ReadModelStore, records: Sequence[RecordedEvent], projection: str = "balances"
) -> None:
    for account, doc in expected_accounts(records).items():
        assert await read_models.get(projection, "accounts", account) == doc
    for record in records:
        applied = await read_models.get(projection, "applied", str(record.event_id))
        assert applied == {"count": 1}, f"event v{record.version} of {record.aggregate_id}"


def updates_counted(metrics: Metrics, projection: str = "balances") -> int | None:
    """``projection_updates_total`` for the projection, or None if ``Metrics`` lacks it."""
    counter = getattr(metrics, "projection_updates_total", None)
    return None if counter is None else int(counter.get({"projection": projection}))


# --- the property -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(script=scripts, data=st.data())
def test_any_delivery_schedule_projects_the_fold_of_the_store_once(
    script: Script, data: st.DataObject
) -> None:
    async def scenario() -> None:
        store = MemoryEventStore()
        records = await append_script(store, script)
        schedule = schedule_for(data, len(records))
        metrics = Metrics()
        async with BalanceProjection(
            projection_context(store, embedded_url(), metrics=metrics)
        ) as handler:
            for tag, index in enumerate(schedule, start=1):
                await handler.handle(delivery(records[index], tag))
            await assert_projected_exactly_once(handler.read_models, records)
        assert updates_counted(metrics) in (None, len(records))

    anyio.run(scenario)


async def test_competing_consumers_apply_every_effect_once() -> None:
    """Two handler instances on one read-model store, each with three workers, fed the same
    events (shuffled, with duplicates) at once."""
    store = MemoryEventStore()
    script: Script = [(n % 4, [Opened(f"o{n}"), Deposited(n + 1)]) for n in range(12)]
    records = await append_script(store, script)
    url = embedded_url()
    rng = random.Random(7)
    async with (
        BalanceProjection(projection_context(store, url)) as first,
        BalanceProjection(projection_context(store, url)) as second,
    ):

        async def worker(handler: BalanceProjection, queue: list[RecordedEvent]) -> None:
            while queue:
                await handler.handle(delivery(queue.pop()))
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for handler in (first, second):
                    queue = records * 2
                    rng.shuffle(queue)
                    for _ in range(3):
                        tg.start_soon(worker, handler, queue)
        await assert_projected_exactly_once(first.read_models, records)


# --- gaps --------------------------------------------------------------------------------------


async def test_a_gap_is_healed_from_the_event_store_before_the_event() -> None:
    store = MemoryEventStore()
    stream = StreamId("ledger", "acc-gap")
    await store.append(
        stream, [NewEvent(Opened("ana")), NewEvent(Deposited(10)), NewEvent(Deposited(5))], 0
    )
    v1, v2, v3 = await store.read_stream(stream)
    async with BalanceProjection(projection_context(store, embedded_url())) as handler:
        read_models = handler.read_models
        await handler.handle(delivery(v1))
        await handler.handle(delivery(v3))  # v2 is late: healed from the store first
        assert await read_models.get("balances", "accounts", "acc-gap") == {
            "owner": "ana",
            "balance": 15,
            "version": 3,
        }
        assert await read_models.get("balances", "applied", str(v2.event_id)) == {"count": 1}
        await handler.handle(delivery(v2, tag=2))  # the late copy is now a duplicate
        await assert_projected_exactly_once(read_models, [v1, v2, v3])


async def test_a_gap_the_event_store_cannot_fill_asks_for_a_retry_and_writes_nothing() -> None:
    store = MemoryEventStore()
    stream = StreamId("ledger", "acc-elsewhere")
    await store.append(stream, [NewEvent(Opened("ana")), NewEvent(Deposited(10))], 0)
    v1, v2 = await store.read_stream(stream)
    async with BalanceProjection(projection_context(MemoryEventStore(), embedded_url())) as handler:
        with pytest.raises(Retry, match="does not have them"):
            await handler.handle(delivery(v2))
        assert await handler.read_models.get("balances", "accounts", "acc-elsewhere") is None
        await handler.handle(delivery(v1))
        assert await handler.read_models.get("balances", "applied", str(v1.event_id)) == {
            "count": 1
        }


# --- failures ------------------------------------------------------------------------------------


class Boom(Exception):
    pass


class FailsOnce(BalanceProjection):
    """Fails after writing its effect, the first time it sees each listed event."""

    failures: set[uuid.UUID] = set()

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        await super().apply(tx, event)
        if event.event_id in self.failures:
            self.failures.discard(event.event_id)
            raise Boom(f"v{event.version}")


async def test_a_failing_apply_leaves_neither_effect_nor_version() -> None:
    store = MemoryEventStore()
    stream = StreamId("ledger", "acc-fail")
    await store.append(stream, [NewEvent(Opened("ana")), NewEvent(Deposited(10))], 0)
    v1, v2 = await store.read_stream(stream)
    FailsOnce.failures = {v2.event_id}
    async with FailsOnce(projection_context(store, embedded_url())) as handler:
        await handler.handle(delivery(v1))
        with pytest.raises(Boom):
            await handler.handle(delivery(v2))
        assert (await handler.read_models.get("balances", "accounts", "acc-fail") or {})[
            "balance"
        ] == 0
        await handler.handle(delivery(v2, tag=2))
        await assert_projected_exactly_once(handler.read_models, [v1, v2])


async def test_an_undecodable_body_is_a_message_decode_error() -> None:
    async with BalanceProjection(projection_context(MemoryEventStore(), embedded_url())) as handler:
        bad = msgspec.structs.replace(delivery(await one_event()), body=b'{"event_id": 3')
        with pytest.raises(MessageDecodeError) as caught:
            await handler.handle(bad)
    assert caught.value.body == b'{"event_id": 3'


async def test_an_event_type_the_codec_does_not_know_is_rejected() -> None:
    class OpenedOnly(BalanceProjection):
        codec = EventCodec().register(Opened)

    store = MemoryEventStore()
    stream = StreamId("ledger", "acc-unknown")
    await store.append(stream, [NewEvent(Opened("a")), NewEvent(Deposited(1))], 0)
    v1, v2 = await store.read_stream(stream)
    async with OpenedOnly(projection_context(store, embedded_url())) as handler:
        await handler.handle(delivery(v1))
        with pytest.raises(Reject, match="Deposited"):
            await handler.handle(delivery(v2))
        assert await handler.read_models.get("balances", "applied", str(v2.event_id)) is None


async def one_event() -> RecordedEvent:
    store = MemoryEventStore()
    stream = StreamId("ledger", f"acc-{uuid.uuid4().hex[:8]}")
    await store.append(stream, [NewEvent(Opened("a"))], 0)
    (record,) = await store.read_stream(stream)
    return record


# --- how a handler is built and opened ---------------------------------------------------------


async def test_a_handler_that_was_not_entered_says_so() -> None:
    handler = BalanceProjection(projection_context(MemoryEventStore(), embedded_url()))
    with pytest.raises(ActorError, match="async with"):
        await handler.handle(delivery(await one_event()))


def test_a_projection_without_a_codec_is_refused_at_construction() -> None:
    class NoCodec(ProjectionHandler):
        async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
            return None

    with pytest.raises(ConfigurationError, match="codec"):
        NoCodec(projection_context(MemoryEventStore(), embedded_url()))


async def test_the_projection_name_defaults_to_the_actor_name_and_can_be_set() -> None:
    class Named(BalanceProjection):
        projection_name = "ledger-balances"

    context = projection_context(MemoryEventStore(), embedded_url())
    assert BalanceProjection(context).projection == "balances"
    assert Named(context).projection == "ledger-balances"


async def test_a_supervised_projection_fills_the_shared_embedded_read_model() -> None:
    """The real message path: a supervisor, the memory bus, two workers; the test queries
    the read model through the process-wide registry, as a query handler would."""
    store = MemoryEventStore()
    url = embedded_url()
    topology = topology_for(url, consumers=2)
    records = await append_script(
        store, [(n % 3, [Opened(f"o{n}"), Deposited(n + 1), Withdrawn(1)]) for n in range(9)]
    )
    async with MemoryBus() as bus:
        await bus.declare(topology.bus_plan())
        supervisor = Supervisor(
            topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            shuffled = [*records, *records[::3]]  # some published twice, out of order
            random.Random(3).shuffle(shuffled)
            await write_events(bus, EXCHANGE, shuffled)
            handled = len(records) + len(records[::3])
            await wait_until(lambda: sum(a.handled for a in supervisor.statistics()) == handled)
            supervisor.stop()
    await assert_projected_exactly_once(read_model_store_for(url), records)


async def test_a_projection_behind_the_streams_retention_catches_up_from_the_store() -> None:
    """The stream kept only its last entries: the account whose events all went with the
    retention is read from the event store, then the stream goes on; nothing twice."""
    store = MemoryEventStore()
    url = embedded_url()
    topology = topology_for(url)
    topology = msgspec.structs.replace(
        topology, streams=msgspec.structs.replace(topology.streams, max_length_bytes=2000)
    )
    early = await append_script(store, [(0, [Opened("gone"), Deposited(5), Deposited(6)])])
    later = await append_script(
        store, [(n % 3, [Opened(f"o{n}")] if n < 3 else [Deposited(n)]) for n in range(12)]
    )
    async with MemoryBus() as bus:
        await bus.declare(topology.bus_plan())
        await write_events(bus, EXCHANGE, [*early, *later])
        async with bus.read_stream(EXCHANGE, 0) as chunks:
            kept = await anext(chunks)
        assert kept[0].offset > len(early), "the retention dropped the early entries"
        supervisor = Supervisor(
            topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            await wait_until(
                lambda: sum(a.handled for a in supervisor.statistics()) >= len(early) + len(kept)
            )
            supervisor.stop()
    await assert_projected_exactly_once(read_model_store_for(url), [*early, *later])


async def test_a_restart_whose_saved_offset_lags_skips_what_the_projection_committed() -> None:
    """A crash loses up to a fraction of a second of the reader's saved offset; the stream
    marks committed with the effects make the next reading skip those entries without
    handing them to the projection again."""
    store = MemoryEventStore()
    url = embedded_url()
    topology = topology_for(url, consumers=2)
    first = await append_script(
        store, [(n % 4, [Opened(f"o{n}"), Deposited(n + 1)]) for n in range(8)]
    )
    then = await append_script(store, [(n % 4, [Deposited(n + 10)]) for n in range(6)])

    async def run_until_handled(bus: MemoryBus, count: int) -> int:
        supervisor = Supervisor(
            topology, store=store, bus=bus, metrics=Metrics(), rng=random.Random(1)
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            await wait_until(lambda: sum(a.handled for a in supervisor.statistics()) >= count)
            supervisor.stop()
        return sum(a.handled for a in supervisor.statistics())

    def lose_the_saved_offset() -> None:  # as if the process died before saving it
        store._checkpoints[stream_offset_name("balances", EXCHANGE)] = Checkpoint.START

    async with MemoryBus() as bus:
        await bus.declare(topology.bus_plan())
        await write_events(bus, EXCHANGE, first)
        assert await run_until_handled(bus, len(first)) == len(first)
        lose_the_saved_offset()
        await write_events(bus, EXCHANGE, then)
        handled = await run_until_handled(bus, len(then))
    assert handled == len(then), "entries committed before were handed out again"
    await assert_projected_exactly_once(read_model_store_for(url), [*first, *then])


def stream_entry_delivery(key: str, offset: int, stream: str = EXCHANGE) -> Delivery:
    return Delivery(
        "q", f"{key}-{offset}", b"{}", {X_ORDERING_KEY: key}, stream, "r", False, offset, -1
    )


def test_committed_marks_skip_what_each_worker_committed() -> None:
    worker = {key: mailbox_index(key, 2) for key in ("a", "b", "c", "d")}
    a, other = "a", next(k for k, w in worker.items() if w != worker["a"])
    committed = Committed({worker[a]: 10, worker[other]: 4}, 2)
    assert committed.until == 10
    assert committed(stream_entry_delivery(a, 10))
    assert not committed(stream_entry_delivery(a, 11))
    assert committed(stream_entry_delivery(other, 4))
    assert not committed(stream_entry_delivery(other, 5))
    queue_copy = msgspec.structs.replace(stream_entry_delivery(a, 2), consumer=1)
    assert not committed(queue_copy)  # a retried or replayed copy: never skipped
    assert not committed(stream_entry_delivery(a, -1))  # read from the event store


def test_a_mark_stays_below_what_the_worker_holds_behind_a_blocker() -> None:
    batch = [stream_entry_delivery("a", 7), stream_entry_delivery("a", 12)]
    name = mark_name(EXCHANGE, mailbox_index("a", 1), 1)
    assert batch_marks(batch, 1) == {name: 12}
    assert batch_marks(batch, 1, {EXCHANGE: 9}) == {name: 8}  # offset 9 is held
    assert batch_marks(batch, 1, {"other.events": 3}) == {name: 12}
    assert batch_marks([stream_entry_delivery("a", 0)], 1, {EXCHANGE: 0}) == {}
    copies = [msgspec.structs.replace(d, consumer=3) for d in batch]
    assert batch_marks(copies, 1) == {}  # queue copies carry no offset
