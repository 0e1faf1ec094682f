"""Flow benchmark: from append to projection commit, through the relay and RabbitMQ.

Run with ``python -m bench.flow`` (``make bench``). Everything runs in this one process, on a
throw-away database ``magasin_bench_<random>`` and a throw-away RabbitMQ virtual host of the
same name (``rabbitmqctl add_vhost``), both removed at the end, also on error or Ctrl-C.
Every figure is measured twice in the same run: once through magasin, once through a plain
per-message aio-pika/psycopg pipeline. The last column is magasin / plain (throughput: below
1 means magasin is slower; latency: above 1 means magasin is slower). Nothing is asserted.

magasin: a ``Supervisor`` runs a topology with the relay and ``--subscribers`` projection
actors (``FlowProjection``: one balance document per account, each actor its own read model;
``--consumers`` workers each, ``prefetch: 256``), as many as the default topology has event
subscribers (six). ``--writers`` tasks append one event per append
(``PostgresEventStore.append``) to many streams of their own, on the runtime's store. The
relay writes them to the domain's RabbitMQ stream (one chunk per batch, confirmed); each
projection reads the stream from its own offset and applies its batches in one read-model
transaction each. An event counts as projected when every subscriber has committed it.

plain: each writer does, per event, an autocommit ``INSERT`` into a copy of the same
``event_store`` table (one connection per writer), then publishes it persistently to a topic
exchange on a confirming aio-pika channel (shared by the writers) and waits for the confirm.
A consumer (one channel, prefetch 256, aio-pika's task per delivery) upserts the account's
balance row with one autocommit statement from a pool of 4 connections, then acks. No
deduplication, no ordering, no retry ladder: the naive pipeline.

Instants are ``time.perf_counter()`` in this process, per event id:

- commit: the writer's append (plain: INSERT) returned;
- confirm: the broker's publisher confirm was received (magasin: the bus's ``write_stream``
  of the relay's batch returned, every entry of it confirmed, observed by a ``RabbitMQBus``
  subclass);
- projected: the read-model transaction committed (magasin: the last of the subscribers'
  ``handle`` returned; plain: the upsert returned, before the ack).

Phases (each after an unmeasured warm-up, both pipelines idle and drained in between):

1. full speed for ``--seconds``: events/s is the events projected divided by the time from
   the first append to the last projection commit (the backlog left when the writers stop
   is drained and counted); latencies are publication (commit -> confirm) and end to end
   (commit -> projected);
2. fixed offered rates (``--rates``, default 500 and 1,000 events/s, spread evenly over
   the writers; 0 skips them): the same latencies at a steady load, and each subscriber's
   commit -> handled on its own (the issue's aim is a publication p95 below 20 ms at
   1,000 events/s). A pipeline that cannot sustain the rate builds a backlog, and its
   latencies grow with the phase.

Each phase also shows the CPU used per event by this process, PostgreSQL and RabbitMQ
(Linux ``/proc``, servers on this machine): on a small machine the three share the cores,
so that is where a throughput difference comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import anyio
import msgspec
import psycopg
from aio_pika.abc import AbstractIncomingMessage
from loguru import logger
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from bench.common import (
    Database,
    Table,
    Vhost,
    load_average,
    progress,
    raise_interrupt,
)
from runtime.bus.protocol import Delivery, StreamWrite
from runtime.bus.rabbitmq import RabbitMQBus
from runtime.observability.metrics import Metrics
from runtime.projection import ProjectionHandler
from runtime.store import EventCodec, Metadata, NewEvent, StreamId
from runtime.store.codec import Envelope
from runtime.store.postgres import PostgresEventStore, connection_string
from runtime.store.protocol import RecordedEvent
from runtime.store.readmodel import ReadModelTx
from runtime.supervisor import Supervisor
from runtime.topology import Topology, parse_topology

ADMIN_DSN = os.environ.get(
    "MAGASIN_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_BASE = os.environ.get("MAGASIN_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

SCHEMA = "bench_flow"  # magasin: event store, checkpoints and read models
PLAIN_SCHEMA = "bench_plain"  # plain: a copy of the event_store table, plus a balance table
AGGREGATE_TYPE = "account"
EXCHANGE = "complaints.events"
PROJECTION = "balances"
CONSUMERS = 4
PREFETCH = 256
PLAIN_EXCHANGE = "plain.events"
PLAIN_QUEUE = "plain.balances"
PLAIN_POOL = CONSUMERS
DRAIN_POLL = 0.005  # seconds between checks that the backlog is projected
# Streams per writer, used round robin: one account rarely has two events in flight at once.
STREAMS_PER_WRITER = 250

# --- the event ----------------------------------------------------------------------------


class Deposited(msgspec.Struct, frozen=True, tag=True):
    amount: int
    reference: str


CODEC = EventCodec().register(Deposited)
EVENT_TYPE = "Deposited"
ROUTING_KEY = f"{AGGREGATE_TYPE}.{EVENT_TYPE}"
ENCODER = msgspec.json.Encoder()


def make_event(rng: random.Random) -> tuple[uuid.UUID, Deposited, Metadata]:
    payload = Deposited(
        amount=rng.randrange(1, 100_000), reference=f"INV-{rng.randrange(10**8):08d}"
    )
    metadata = Metadata(
        correlation_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        causation_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        user=f"agent-{rng.randrange(1000):03d}",
    )
    return uuid.uuid4(), payload, metadata


# --- what is measured ---------------------------------------------------------------------


@dataclass
class Timings:
    """perf_counter instants per event id (``str(uuid)``, the message id on the bus)."""

    committed: dict[str, float] = field(default_factory=dict)
    confirmed: dict[str, float] = field(default_factory=dict)
    projected: dict[str, float] = field(default_factory=dict)
    # magasin: each subscriber's commit of each event (projected = the last of them)
    handled: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class FlowRun:
    """One phase of one pipeline."""

    timings: Timings
    started: float = 0.0  # the first append began
    writing_ended: float = 0.0  # the last writer returned
    backlog: int = 0  # appended but not yet projected when the writers stopped
    errors: int = 0
    drained: bool = True
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process, measured
    batches: list[int] = field(default_factory=list)  # magasin: events per transaction

    @property
    def appended(self) -> int:
        return len(self.timings.committed)

    @property
    def projected(self) -> int:
        committed = self.timings.committed
        return sum(1 for key in self.timings.projected if key in committed)

    @property
    def finished(self) -> float:
        return max(self.timings.projected.values(), default=self.started)

    @property
    def events_per_s(self) -> float:
        elapsed = self.finished - self.started
        return self.projected / elapsed if elapsed > 0 else 0.0

    @property
    def appends_per_s(self) -> float:
        elapsed = self.writing_ended - self.started
        return self.appended / elapsed if elapsed > 0 else 0.0

    def latencies(self, later: dict[str, float]) -> list[float]:
        committed = self.timings.committed
        return sorted(t - committed[k] for k, t in later.items() if k in committed)

    def publication(self) -> list[float]:
        return self.latencies(self.timings.confirmed)

    def end_to_end(self) -> list[float]:
        return self.latencies(self.timings.projected)


def percentile_ms(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


# --- magasin: the projection and the observed bus -----------------------------------------


class FlowProjection(ProjectionHandler):
    """One balance document per account; records when each event's transaction committed."""

    codec = CODEC
    timings: ClassVar[Timings | None] = None
    subscribers: ClassVar[int] = 1  # an event is projected once this many have committed it
    commits: ClassVar[dict[str, int]] = {}
    batches: ClassVar[list[int]] = []  # the size of each read-model transaction's batch

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        doc = await tx.get("accounts", event.aggregate_id) or {"balance": 0, "events": 0}
        doc["balance"] += event.payload.amount
        doc["events"] += 1
        doc["version"] = event.version
        await tx.put("accounts", event.aggregate_id, doc)

    def prefetch(self, record: RecordedEvent) -> Iterable[tuple[str, str]]:
        return [("accounts", record.aggregate_id)]

    async def handle(self, delivery: Delivery) -> None:
        await super().handle(delivery)  # returns once the read-model transaction committed
        self._projected([delivery])

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        await super().handle_batch(deliveries)  # one transaction, committed
        self._projected(deliveries)
        type(self).batches.append(len(deliveries))

    def _projected(self, deliveries: Sequence[Delivery]) -> None:
        timings = type(self).timings
        if timings is None:
            return
        now = time.perf_counter()
        commits = type(self).commits
        everyone = type(self).subscribers
        mine = timings.handled.setdefault(self.projection, {})
        for delivery in deliveries:
            mine.setdefault(delivery.message_id, now)
            seen = commits.get(delivery.message_id, 0) + 1
            commits[delivery.message_id] = seen
            if seen == everyone:
                timings.projected.setdefault(delivery.message_id, now)


class TimedBus(RabbitMQBus):
    """The RabbitMQ bus, recording when each entry the relay wrote was confirmed."""

    timings: Timings | None = None

    async def write_stream(
        self, stream: str, producer: str, entries: Sequence[StreamWrite]
    ) -> None:
        await super().write_stream(stream, producer, entries)  # all confirmed now
        timings = self.timings
        if timings is not None:
            now = time.perf_counter()
            for entry in entries:
                timings.confirmed.setdefault(entry.message_id, now)


# When run as ``python -m bench.flow`` this module is ``__main__``: name it so, or the
# supervisor would import a second copy of it whose ``FlowProjection.timings`` stays None.
TOPOLOGY = f"""
domains: {{{AGGREGATE_TYPE}: {EXCHANGE}}}
actors:
  relay:
    kind: relay
    options: {{batch_size: 500}}
"""
SUBSCRIBER = f"""
kind: projection
handler: {__name__}:FlowProjection
bind: {{{EXCHANGE}: ["{AGGREGATE_TYPE}.#"]}}
prefetch: {PREFETCH}
batch_size: 500
options: {{schema: {SCHEMA}}}
"""


def flow_topology(dsn: str, amqp_url: str, subscribers: int = 1, consumers: int = 1) -> Topology:
    text = TOPOLOGY + "".join(
        f"  {PROJECTION}-{k}:\n"
        + "".join(f"    {line}\n" for line in SUBSCRIBER.strip().splitlines())
        + f"    consumers: {consumers}\n"
        for k in range(subscribers)
    )
    topology = parse_topology(text, source="bench.flow", env={})
    return msgspec.structs.replace(topology, database_url=dsn, amqp_url=amqp_url)


# --- driving the writers --------------------------------------------------------------------

# One event for writer ``index``: append it, record its instants.
AppendOne = Callable[[int], Awaitable[None]]


async def drive(
    run: FlowRun, writers: int, seconds: float, rate: float, append_one: AppendOne
) -> None:
    """``writers`` tasks calling ``append_one`` for ``seconds``: back to back (rate 0), or
    on a fixed schedule of ``rate`` events/s in all, interleaved across the writers (a late
    writer goes on at once, without skipping)."""
    clock = time.perf_counter
    started = clock() + 0.01
    end = started + seconds

    async def writer(index: int) -> int:
        errors = 0
        n = 0
        while True:
            if rate:
                due = started + (index + n * writers) / rate
                if due >= end:
                    return errors
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif clock() >= end:
                return errors
            n += 1
            try:
                await append_one(index)
            except Exception as exc:
                errors += 1
                if errors == 1:
                    print(f"  !! writer {index}: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.05)

    async def start(index: int) -> int:
        await asyncio.sleep(max(0.0, started - clock()))
        return await writer(index)

    run.started = started
    run.errors = sum(await asyncio.gather(*(start(i) for i in range(writers))))
    run.writing_ended = clock()
    run.backlog = run.appended - run.projected


async def wait_projected(run: FlowRun, within: float) -> None:
    """Wait until every appended event is projected (after ``within`` s: marked not drained)."""
    deadline = time.perf_counter() + within
    target = run.appended
    while len(run.timings.projected) < target:
        if time.perf_counter() > deadline:
            run.drained = False
            return
        await asyncio.sleep(DRAIN_POLL)


class StreamCursor:
    """A writer's streams, used round robin; each stream's version is known locally."""

    def __init__(self, prefix: str, count: int) -> None:
        self.names = [f"{prefix}-{k:05d}" for k in range(count)]
        self.versions = [0] * count
        self.next = 0

    def take(self) -> tuple[int, str, int]:
        """The next stream: its index, name and version before the append."""
        k = self.next
        self.next = (k + 1) % len(self.names)
        return k, self.names[k], self.versions[k]

    def appended(self, k: int) -> None:
        self.versions[k] += 1


# --- magasin ------------------------------------------------------------------------------


@dataclass
class Runtime:
    store: PostgresEventStore
    bus: TimedBus
    supervisor: Supervisor


@asynccontextmanager
async def magasin_runtime(ctx: Context) -> AsyncIterator[Runtime]:
    """The store, the bus and a supervisor running the flow topology, as ``magasin run``
    wires them; the writers append through the same store."""
    metrics = Metrics()
    store = await PostgresEventStore.connect(
        ctx.dsn, schema=SCHEMA, metrics=metrics, min_size=ctx.args.writers, max_size=16
    )
    try:
        bus = await TimedBus.connect(ctx.amqp_url, name="magasin-bench-flow")
        try:
            args = ctx.args
            topology = flow_topology(ctx.dsn, ctx.amqp_url, args.subscribers, args.consumers)
            FlowProjection.subscribers = args.subscribers
            await bus.declare(topology.bus_plan())
            supervisor = Supervisor(topology, store=store, bus=bus, metrics=metrics)
            async with anyio.create_task_group() as tg:
                await tg.start(supervisor.run)
                try:
                    yield Runtime(store, bus, supervisor)
                finally:
                    supervisor.stop()
        finally:
            await bus.close()
    finally:
        await store.close()


async def magasin_phase(
    runtime: Runtime, writers: int, seconds: float, rate: float, tag: str, drain_timeout: float
) -> FlowRun:
    timings = Timings()
    FlowProjection.timings = timings
    FlowProjection.commits = {}
    FlowProjection.batches = []
    runtime.bus.timings = timings
    run = FlowRun(timings)
    store = runtime.store
    cursors = [StreamCursor(f"{tag}-w{i}", STREAMS_PER_WRITER) for i in range(writers)]
    rngs = [random.Random(f"{tag}-{i}") for i in range(writers)]
    committed = timings.committed

    async def append_one(index: int) -> None:
        cursor = cursors[index]
        k, name, version = cursor.take()
        event_id, payload, metadata = make_event(rngs[index])
        await store.append(
            StreamId(AGGREGATE_TYPE, name),
            [NewEvent(payload, event_id=event_id, metadata=metadata)],
            version,
        )
        committed[str(event_id)] = time.perf_counter()
        cursor.appended(k)

    await drive(run, writers, seconds, rate, append_one)
    await wait_projected(run, drain_timeout)
    run.batches = list(FlowProjection.batches)
    return run


# --- plain ---------------------------------------------------------------------------------

PLAIN_INSERT = """INSERT INTO event_store (event_id, event_type, aggregate_id, aggregate_type,
                                           event_data, metadata, version)
                  VALUES (%s, %s, %s, %s, %s, %s, %s)"""
PLAIN_BALANCES = """CREATE TABLE IF NOT EXISTS plain_balances (
    account  text PRIMARY KEY,
    balance  bigint  NOT NULL,
    events   integer NOT NULL,
    version  integer NOT NULL)"""
PLAIN_UPSERT = """INSERT INTO plain_balances (account, balance, events, version)
                  VALUES (%s, %s, 1, %s)
                  ON CONFLICT (account) DO UPDATE
                  SET balance = plain_balances.balance + excluded.balance,
                      events = plain_balances.events + 1,
                      version = greatest(plain_balances.version, excluded.version)"""


class PlainMessage(msgspec.Struct, frozen=True):
    """What the plain writer publishes: the event as JSON."""

    event_id: uuid.UUID
    event_type: str
    aggregate_type: str
    aggregate_id: str
    version: int
    payload: Deposited
    metadata: Metadata


PLAIN_DECODER = msgspec.json.Decoder(PlainMessage)


@dataclass
class Plain:
    connection: aio_pika.abc.AbstractConnection
    exchange: aio_pika.abc.AbstractExchange
    writer_conns: list[psycopg.AsyncConnection[Any]]
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]
    timings: Timings | None = None
    failures: int = 0


@asynccontextmanager
async def plain_pipeline(ctx: Context) -> AsyncIterator[Plain]:
    conninfo = connection_string(ctx.dsn, schema=PLAIN_SCHEMA)
    connection = await aio_pika.connect(
        ctx.amqp_url, client_properties={"connection_name": "plain"}
    )
    writer_conns: list[psycopg.AsyncConnection[Any]] = []
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        conninfo,
        min_size=PLAIN_POOL,
        max_size=PLAIN_POOL,
        kwargs={"autocommit": True},
        open=False,
        name="plain-consumer",
    )
    try:
        publisher = await connection.channel(publisher_confirms=True)
        exchange = await publisher.declare_exchange(
            PLAIN_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=PREFETCH)
        queue = await consumer.declare_queue(
            PLAIN_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(PLAIN_EXCHANGE, f"{AGGREGATE_TYPE}.#")
        for _ in range(ctx.args.writers):
            writer_conns.append(await psycopg.AsyncConnection.connect(conninfo, autocommit=True))
        await pool.open(wait=True)
        plain = Plain(connection, exchange, writer_conns, pool)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                event = PLAIN_DECODER.decode(message.body)
                async with pool.connection() as conn:
                    await conn.execute(
                        PLAIN_UPSERT, (event.aggregate_id, event.payload.amount, event.version)
                    )
            except Exception as exc:
                plain.failures += 1
                if plain.failures == 1:
                    print(f"  !! plain consumer: {exc!r}", file=sys.stderr, flush=True)
                await message.nack(requeue=True)
                return
            timings = plain.timings
            if timings is not None and message.message_id not in timings.projected:
                timings.projected[message.message_id or ""] = time.perf_counter()
            await message.ack()

        tag = await queue.consume(on_message)
        try:
            yield plain
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
    finally:
        await pool.close()
        for conn in writer_conns:
            await conn.close()
        await connection.close()


async def plain_phase(
    plain: Plain, writers: int, seconds: float, rate: float, tag: str, drain_timeout: float
) -> FlowRun:
    timings = Timings()
    plain.timings = timings
    run = FlowRun(timings)
    cursors = [StreamCursor(f"{tag}-w{i}", STREAMS_PER_WRITER) for i in range(writers)]
    rngs = [random.Random(f"{tag}-{i}") for i in range(writers)]
    committed, confirmed = timings.committed, timings.confirmed
    dumps = ENCODER.encode
    exchange = plain.exchange

    async def append_one(index: int) -> None:
        cursor = cursors[index]
        k, name, version = cursor.take()
        event_id, payload, metadata = make_event(rngs[index])
        await plain.writer_conns[index].execute(
            PLAIN_INSERT,
            (
                event_id,
                EVENT_TYPE,
                name,
                AGGREGATE_TYPE,
                Jsonb(payload, dumps=dumps),
                Jsonb(metadata, dumps=dumps),
                version + 1,
            ),
        )
        key = str(event_id)
        committed[key] = time.perf_counter()
        cursor.appended(k)
        body = dumps(
            PlainMessage(event_id, EVENT_TYPE, AGGREGATE_TYPE, name, version + 1, payload, metadata)
        )
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=key,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            ROUTING_KEY,
            mandatory=True,
        )
        confirmed[key] = time.perf_counter()

    await drive(run, writers, seconds, rate, append_one)
    await wait_projected(run, drain_timeout)
    return run


# --- setup and checks -----------------------------------------------------------------------


async def prepare_database(dsn: str) -> dict[str, str]:
    """Both schemas by magasin's own migrations; the plain balance table; server facts."""
    for schema in (SCHEMA, PLAIN_SCHEMA):
        store = await PostgresEventStore.connect(dsn, schema=schema)
        await store.close()
    async with await psycopg.AsyncConnection.connect(
        connection_string(dsn, schema=PLAIN_SCHEMA), autocommit=True
    ) as conn:
        await conn.execute(PLAIN_BALANCES)
        cur = await conn.execute(
            """SELECT current_setting('server_version'), current_setting('fsync'),
                      current_setting('synchronous_commit'), current_setting('shared_buffers'),
                      current_setting('max_connections')"""
        )
        row = await cur.fetchone()
    assert row is not None
    keys = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")
    return dict(zip(keys, (str(v) for v in row), strict=True))


async def settle(dsn: str) -> None:
    """Before a measurement: fresh statistics, and no dirty buffers left by the last one."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for schema in (SCHEMA, PLAIN_SCHEMA):
            await conn.execute(sql.SQL("ANALYZE {}.event_store").format(sql.Identifier(schema)))
        await conn.execute("CHECKPOINT")


async def projected_totals(dsn: str) -> tuple[int, int]:
    """Events counted in the read models (magasin: the least of its subscribers; plain):
    the effects really committed."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL(
                # magasin: the subscriber that applied the fewest (each must have them all)
                "SELECT (SELECT coalesce(min(n), 0) FROM (SELECT sum((doc->>'events')::bigint) n"
                " FROM {}.read_models WHERE projection LIKE %s AND collection = 'accounts'"
                " GROUP BY projection) counts),"
                " (SELECT coalesce(sum(events), 0) FROM {}.plain_balances)"
            ).format(sql.Identifier(SCHEMA), sql.Identifier(PLAIN_SCHEMA)),
            (f"{PROJECTION}-%",),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def rabbitmq_version(amqp_url: str) -> str:
    connection = await aio_pika.connect(amqp_url)
    try:
        transport = connection.transport
        properties = transport.connection.server_properties if transport else {}
        version = properties.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


_CLIENT_BACKEND = re.compile(r"\(\d+\) |\[local\] ")


class CpuMeter:
    """CPU seconds used so far (Linux ``/proc``, servers on this machine): by this process,
    by PostgreSQL (its auxiliary processes and the bench database's backends, not other
    databases' backends) and by RabbitMQ (the whole broker: it cannot be split by vhost)."""

    def __init__(self, dbname: str) -> None:
        self.dbname = f" {dbname} "
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> dict[str, float]:
        totals = {"process": time.process_time(), "postgres": 0.0, "rabbitmq": 0.0}
        proc = Path("/proc")
        if not proc.is_dir():
            return totals
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                if comm == "postgres":
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    if _CLIENT_BACKEND.search(cmdline) and self.dbname not in cmdline:
                        continue
                    key = "postgres"
                elif comm.startswith("beam.smp"):
                    key = "rabbitmq"
                else:
                    continue
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
            fields = stat[stat.rindex(")") + 2 :].split()
            totals[key] += (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        return totals


async def measured(meter: CpuMeter, phase: Awaitable[FlowRun]) -> FlowRun:
    """Run ``phase`` (writing, then draining) and record the CPU used meanwhile."""
    before = meter.sample()
    run = await phase
    after = meter.sample()
    run.cpu = {key: after[key] - before[key] for key in before}
    return run


class LogTally:
    """The runtime's warnings and gap healings, counted instead of printed."""

    def __init__(self) -> None:
        self.warnings: Counter[str] = Counter()
        self.healed = 0

    def sink(self, message: Any) -> None:
        record = message.record
        if record["level"].no >= 30:
            self.warnings[f"{record['name']}: {record['message'][:160]}"] += 1
        elif "missing before version" in record["message"]:
            self.healed += 1


# --- the report ---------------------------------------------------------------------------


def add_latency_rows(
    table: Table, label: str, name: str, mag: list[float], plain: list[float]
) -> None:
    for q, qname in ((0.50, "p50"), (0.95, "p95"), (0.99, "p99")):
        table.add(
            f"{label}: {name} {qname} ms",
            percentile_ms(mag, q),
            percentile_ms(plain, q),
            digits=2,
        )


def add_phase_rows(table: Table, label: str, mag: FlowRun, plain: FlowRun, *, rate: float) -> None:
    if rate:
        table.add(f"{label}: offered events/s achieved", mag.appends_per_s, plain.appends_per_s)
    else:
        table.add(f"{label}: events/s, append -> projected", mag.events_per_s, plain.events_per_s)
        table.add(f"{label}: appends/s while writing", mag.appends_per_s, plain.appends_per_s)
        table.add(f"{label}: backlog when writers stopped", mag.backlog, plain.backlog)
    add_latency_rows(table, label, "publication", mag.publication(), plain.publication())
    add_latency_rows(table, label, "end-to-end", mag.end_to_end(), plain.end_to_end())
    if rate:  # each subscriber on its own, beside the plain pipeline's one consumer
        plain_e2e = plain.end_to_end()
        for name, handled in sorted(mag.timings.handled.items()):
            mine = mag.latencies(handled)
            for q, qname in ((0.50, "p50"), (0.95, "p95")):
                table.add(
                    f"{label}: {name} commit -> handled {qname} ms",
                    percentile_ms(mine, q),
                    percentile_ms(plain_e2e, q),
                    digits=2,
                )
    table.add(f"{label}: events measured", mag.projected, plain.projected)
    if mag.batches:  # plain commits each event on its own
        table.add(
            f"{label}: events per read-model transaction",
            sum(mag.batches) / len(mag.batches),
            1,
            digits=1,
        )
    for key, name in CPU_ROWS:
        if mag.cpu.get(key) or plain.cpu.get(key):
            table.add(
                f"{label}: CPU ms/event, {name}",
                1000 * mag.cpu[key] / max(1, mag.projected),
                1000 * plain.cpu[key] / max(1, plain.projected),
                digits=3,
            )


CPU_ROWS = (("process", "bench process"), ("postgres", "PostgreSQL"), ("rabbitmq", "RabbitMQ"))


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flow", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter run: 4 s phases, 1 s warm-ups"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per phase (default 12)"
    )
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers (8)")
    parser.add_argument(
        "--subscribers", type=int, default=6, help="projections reading the stream (6)"
    )
    parser.add_argument("--consumers", type=int, default=1, help="workers of each projection (1)")
    parser.add_argument(
        "--rates",
        default="500,1000",
        help="offered events/s of the fixed-rate phases, comma-separated (500,1000; 0 skips)",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="unmeasured seconds before each phase (2)"
    )
    parser.add_argument("--admin-url", default=ADMIN_DSN, help="DSN allowed to CREATE DATABASE")
    parser.add_argument(
        "--amqp-url",
        default=AMQP_BASE,
        help="RabbitMQ URL (its vhost is replaced by the bench's own)",
    )
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 4.0 if args.quick else 12.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    try:
        args.rates = [float(r) for r in str(args.rates).split(",") if r.strip() and float(r)]
    except ValueError:
        parser.error(f"--rates takes numbers separated by commas, not {args.rates!r}")
    if args.seconds <= 0 or args.warmup < 0 or args.writers < 1 or min(args.rates, default=0) < 0:
        parser.error("--seconds > 0, --warmup >= 0, --writers >= 1 and --rates >= 0, please")
    return args


@dataclass
class Context:
    dsn: str
    amqp_url: str
    args: argparse.Namespace
    meter: CpuMeter
    table: Table = field(default_factory=Table)
    notes: list[str] = field(default_factory=list)
    aims: list[str] = field(default_factory=list)


def check_run(ctx: Context, who: str, label: str, run: FlowRun) -> None:
    if not run.drained:
        ctx.notes.append(
            f"WARNING: {label}, {who}: only {run.projected:,} of {run.appended:,} events were "
            "projected before the drain timeout"
        )
    if run.errors:
        ctx.notes.append(f"WARNING: {label}, {who}: {run.errors} append(s) failed")


async def bench(ctx: Context, tally: LogTally) -> None:
    args = ctx.args
    writers, seconds = args.writers, args.seconds
    drain_timeout = max(60.0, 6 * seconds)
    phases: list[tuple[str, float]] = [(f"full speed, {writers} writers", 0.0)]
    phases += [(f"{rate:,.0f} ev/s offered", rate) for rate in args.rates]
    appended = {"magasin": 0, "plain": 0}
    stopping = on_stop_signals()
    for number, (label, rate) in enumerate(phases, start=1):
        runs: dict[str, FlowRun] = {}
        for who in ("magasin", "plain"):
            progress(f"{label}: {who} (warm-up {args.warmup:g} s, then {seconds:g} s measured)")
            await settle(ctx.dsn)
            if who == "magasin":
                async with magasin_runtime(ctx) as runtime:
                    if args.warmup:
                        warm = await magasin_phase(
                            runtime, writers, args.warmup, rate, f"mw{number}", drain_timeout
                        )
                        appended[who] += warm.appended
                    run = await measured(
                        ctx.meter,
                        magasin_phase(runtime, writers, seconds, rate, f"m{number}", drain_timeout),
                    )
            else:
                async with plain_pipeline(ctx) as plain:
                    if args.warmup:
                        warm = await plain_phase(
                            plain, writers, args.warmup, rate, f"pw{number}", drain_timeout
                        )
                        appended[who] += warm.appended
                    run = await measured(
                        ctx.meter,
                        plain_phase(plain, writers, seconds, rate, f"p{number}", drain_timeout),
                    )
            check_stop(stopping)
            appended[who] += run.appended
            check_run(ctx, who, label, run)
            runs[who] = run
        add_phase_rows(ctx.table, label, runs["magasin"], runs["plain"], rate=rate)
        ctx.table.rule()
        judge(ctx, rate, runs["magasin"], runs["plain"])
    mag_total, plain_total = await projected_totals(ctx.dsn)
    for who, total in (("magasin", mag_total), ("plain", plain_total)):
        if total != appended[who]:
            ctx.notes.append(
                f"WARNING: {who} read model counts {total:,} events applied, "
                f"{appended[who]:,} were appended (duplicates or losses)"
            )
    ctx.notes.append(
        f"read models checked: magasin {mag_total:,} events applied, plain {plain_total:,}, "
        "as appended (warm-ups included)"
    )
    if tally.healed:
        ctx.notes.append(f"magasin projection healed {tally.healed} gap(s) from the event store")
    for message, count in tally.warnings.most_common(5):
        ctx.notes.append(f"runtime warning x{count}: {message}")


def judge(ctx: Context, rate: float, mag: FlowRun, plain: FlowRun) -> None:
    """The issue's must and aims, measured in this run."""
    if not rate:
        speed, ratio = mag.events_per_s, mag.events_per_s / max(plain.events_per_s, 1e-9)
        caught_up = "all caught up" if mag.drained else "NOT all caught up"
        verdict = "met" if speed >= 1000 and mag.drained else "NOT met"
        ctx.aims.append(
            f"must: >= 1,000 events/s with all {ctx.args.subscribers} subscribers caught up: "
            f"{speed:,.0f} events/s, {caught_up} ({verdict})"
        )
        verdict = "met" if speed >= 2000 and ratio >= 1.5 else "NOT met"
        ctx.aims.append(
            f"aim: 2,000 events/s and >= 1.5x the plain pipeline: {speed:,.0f} events/s, "
            f"{ratio:.2f}x ({verdict})"
        )
    elif rate == 1000.0:
        p95 = percentile_ms(mag.publication(), 0.95)
        verdict = "met" if p95 < 20.0 else "NOT met"
        ctx.aims.append(
            f"aim: publication p95 < 20 ms at 1,000 events/s: magasin {p95:.2f} ms ({verdict})"
        )


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the event loop ran."""


def on_stop_signals() -> asyncio.Event:
    """SIGINT / SIGTERM cancel the main task (a second one: KeyboardInterrupt at once).
    The returned event tells that a stop was asked for: the cancellation itself can be
    swallowed when it lands just as the anyio task group hosting the supervisor exits
    (anyio 4.16 takes it for its own), so check the event after each runtime's block."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        if task is not None:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    return stopping


def check_stop(stopping: asyncio.Event) -> None:
    if stopping.is_set():
        raise Interrupted


def header(args: argparse.Namespace, facts: dict[str, str], name: str) -> Iterator[str]:
    yield "magasin flow benchmark: append -> relay -> RabbitMQ -> projection"
    yield f"options: {' '.join(sys.argv[1:]) or '(none)'}"
    yield (
        f"         quick={args.quick} seconds={args.seconds:g} warmup={args.warmup:g} "
        f"writers={args.writers} rates={','.join(f'{r:g}' for r in args.rates) or '-'} "
        f"streams/writer={STREAMS_PER_WRITER} "
        f"consumers={CONSUMERS} prefetch={PREFETCH}"
    )
    yield (
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__} libpq {psycopg.pq.version()}), aio-pika "
        f"{aio_pika.__version__}, load average (1, 5, 15 min) {load_average()}"
    )
    yield (
        f"server:  PostgreSQL {facts['server_version']}, fsync={facts['fsync']}, "
        f"synchronous_commit={facts['synchronous_commit']}, "
        f"shared_buffers={facts['shared_buffers']}; RabbitMQ {facts['rabbitmq']}; "
        f"database and vhost {name}"
    )


async def _setup(dsn: str, amqp_url: str) -> dict[str, str]:
    facts = await prepare_database(dsn)
    facts["rabbitmq"] = await rabbitmq_version(amqp_url)
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tally = LogTally()
    logger.remove()
    logger.add(tally.sink, level="INFO", filter="runtime")
    signal.signal(signal.SIGTERM, raise_interrupt)  # outside the event loop
    started = time.perf_counter()
    name = f"magasin_bench_{uuid.uuid4().hex[:12]}"
    database = Database(args.admin_url, name)
    vhost = Vhost(args.amqp_url, name)
    try:
        dsn = database.create()
    except psycopg.OperationalError as exc:
        print(f"cannot create the bench database via {args.admin_url}: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            amqp_url = vhost.create()
        except RuntimeError as exc:
            print(f"cannot create the bench vhost: {exc}", file=sys.stderr)
            return 2
        ctx = Context(dsn, amqp_url, args, CpuMeter(name))
        facts = asyncio.run(_setup(dsn, amqp_url))
        for line in header(args, facts, name):
            print(line, flush=True)
        print(flush=True)
        asyncio.run(bench(ctx, tally))
    except (KeyboardInterrupt, Interrupted, asyncio.CancelledError):
        print("\ninterrupted; dropping the bench database and vhost", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, raise_interrupt)  # the event loop reset it
        try:
            vhost.delete()
        finally:
            database.drop()
    print(ctx.table.render())
    print()
    print("ratio = magasin / plain (throughput: < 1 is slower; latency: > 1 is slower)")
    print(
        "publication = append returned -> publisher confirm received; end-to-end = append "
        "returned -> read-model transaction committed (before the ack)"
    )
    print(
        "plain: autocommit INSERT per event (a connection per writer), then a persistent "
        "publish awaiting its confirm (one shared confirming channel); consumer prefetch "
        f"{PREFETCH}, autocommit upsert from a pool of {PLAIN_POOL}, ack; quorum queue as "
        "magasin's"
    )
    print(
        "CPU ms/event: CPU seconds used from the first append until every event was "
        "projected, per event; PostgreSQL = its auxiliary processes + the bench database's "
        "backends; RabbitMQ = the whole broker (Linux /proc; local servers only)"
    )
    for line in ctx.aims:
        print(line)
    for note in ctx.notes:
        print(note)
    print(
        f"wall time: {time.perf_counter() - started:.1f} s, "
        f"load average at the end {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
