"""Event store benchmark: magasin's ``PostgresEventStore`` against plain psycopg.

Run with ``python -m bench.store`` (``make bench``). Every figure is measured twice in the
same run, on the same table: once through magasin, once with the plain psycopg statement a
hand-written application would use. The last column is magasin / plain (for throughput,
below 1 means magasin is slower; for latency, above 1 means magasin is slower).

The run creates a throw-away database ``magasin_bench_<random>`` and drops it at the end,
also on error or Ctrl-C. Nothing is asserted: this prints figures, it does not judge them.

Phases (the append table is prefilled with ``--prefill`` events and analyzed first: a
production table is neither empty nor without statistics):

1. single-event appends (one transaction each) at 1, 8 and 32 concurrent writers, each
   writer on its own stream. magasin: ``PostgresEventStore.append`` with a pool of
   ``max(16, writers)`` connections. plain: an autocommit ``INSERT`` per event, one
   connection per writer, the writer computing the version;
2. batched appends of 10 and 100 events by one writer. plain: the same ``INSERT`` sent with
   ``cursor.executemany`` (psycopg pipelines it) inside one transaction;
3. a full ``read_all`` of ``--events`` events loaded beforehand (setup, not measured).
   magasin: ``read_all`` page by page, each record decoded into an ``Envelope`` by an
   ``EventCodec``. plain: ``SELECT * ... ORDER BY tx_id, position`` through a server-side
   cursor fetching the same page size, rows loaded by psycopg's defaults (jsonb -> dict).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from loguru import logger
from psycopg import sql
from psycopg.types.json import Jsonb

from bench.common import (
    Database,
    Table,
    load_average,
    progress,
    raise_interrupt,
)
from runtime.store import Checkpoint, EventCodec, Metadata, NewEvent, StreamId
from runtime.store.postgres import PostgresEventStore, connection_string

ADMIN_DSN = os.environ.get(
    "MAGASIN_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

APPEND_SCHEMA = "bench_append"
READ_SCHEMA = "bench_read"
AGGREGATE_TYPE = "Complaint"
WRITER_COUNTS = (1, 8, 32)
BATCH_SIZES = (10, 100)
READ_PAGE = 5000
LOAD_CHUNK = 20_000  # events per COPY transaction when loading the read_all table
EVENTS_PER_STREAM = 10  # loaded streams hold this many events each, interleaved

PLAIN_INSERT = """INSERT INTO event_store (event_id, event_type, aggregate_id, aggregate_type,
                                           event_data, metadata, version)
                  VALUES (%s, %s, %s, %s, %s, %s, %s)"""
PLAIN_READ_ALL = "SELECT * FROM event_store ORDER BY tx_id, position"


# --- the event ----------------------------------------------------------------------------


class ComplaintFiled(msgspec.Struct, frozen=True, tag=True):
    """A realistic payload: about 200-300 bytes of JSON."""

    complaint_id: str
    customer_id: str
    channel: str
    category: str
    subject: str
    description: str
    amount_cents: int
    priority: int


EVENT_TYPE = "ComplaintFiled"
CODEC = EventCodec().register(ComplaintFiled)
ENCODER = msgspec.json.Encoder()

_CHANNELS = ("email", "phone", "web", "store", "letter")
_CATEGORIES = ("billing", "delivery", "quality", "service", "refund", "warranty")
_TEXT = (
    "order arrived late and the parcel was damaged customer asks for a refund of the "
    "shipping costs and a replacement of the broken item before the end of the month"
)
_WORDS = tuple(_TEXT.split(" "))


def make_payload(rng: random.Random) -> ComplaintFiled:
    words = rng.randint(2, 14)
    start = rng.randrange(len(_WORDS))
    description = " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(words))
    return ComplaintFiled(
        complaint_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        customer_id=f"CUST-{rng.randrange(10**8):08d}",
        channel=rng.choice(_CHANNELS),
        category=rng.choice(_CATEGORIES),
        subject=f"Order {rng.randrange(10**7):07d}",
        description=description,
        amount_cents=rng.randrange(100, 500_000),
        priority=rng.randint(1, 5),
    )


def make_metadata(rng: random.Random, occurred_at: datetime | None = None) -> Metadata:
    return Metadata(
        correlation_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        causation_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        user=f"agent-{rng.randrange(1000):03d}",
        occurred_at=occurred_at,
    )


# --- measurements -------------------------------------------------------------------------


@dataclass
class AppendRun:
    """What one append phase measured: per-append latencies (s) over a window (s)."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    batch: int = 1

    @property
    def appends_per_s(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @property
    def events_per_s(self) -> float:
        return self.appends_per_s * self.batch

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


@dataclass
class ReadRun:
    events: int
    elapsed: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0


# An append step: given (writer index, version before, batch of new events) do one append.
AppendStep = Callable[[int, int, list[tuple[ComplaintFiled, Metadata, uuid.UUID]]], Awaitable[None]]


async def run_writers(
    writers: int, batch: int, warmup: float, duration: float, step: AppendStep, seed: int
) -> AppendRun:
    """``writers`` tasks appending ``batch`` events per append: ``warmup`` seconds unmeasured,
    then ``duration`` seconds measured. Appends started in the window are counted."""
    go = asyncio.Event()
    clock = time.perf_counter
    window: dict[str, float] = {}

    async def writer(index: int) -> tuple[list[float], float]:
        rng = random.Random(seed * 1000 + index)
        version = 0
        latencies: list[float] = []
        last_end = 0.0
        await go.wait()
        while True:
            events = [(make_payload(rng), make_metadata(rng), uuid.uuid4()) for _ in range(batch)]
            started = clock()
            if started >= window["end"]:
                return latencies, last_end
            await step(index, version, events)
            ended = clock()
            version += batch
            if started >= window["start"]:
                latencies.append(ended - started)
                last_end = ended

    tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
    await asyncio.sleep(0)
    now = clock()
    window["start"] = now + warmup
    window["end"] = now + warmup + duration
    go.set()
    results = await asyncio.gather(*tasks)
    run = AppendRun(batch=batch)
    for latencies, _ in results:
        run.latencies.extend(latencies)
    last = max((end for _, end in results), default=window["end"])
    run.elapsed = max(last, window["end"]) - window["start"]
    return run


async def magasin_appends(
    dsn: str, writers: int, batch: int, warmup: float, duration: float, tag: str
) -> AppendRun:
    store = await PostgresEventStore.connect(
        dsn,
        schema=APPEND_SCHEMA,
        min_size=writers,
        max_size=max(16, writers),
        run_migrations=False,
    )
    streams = [StreamId(AGGREGATE_TYPE, f"{tag}-{i}") for i in range(writers)]

    async def step(
        index: int, version: int, events: list[tuple[ComplaintFiled, Metadata, uuid.UUID]]
    ) -> None:
        new = [NewEvent(payload, event_id=eid, metadata=meta) for payload, meta, eid in events]
        await store.append(streams[index], new, version)

    try:
        return await run_writers(
            writers, batch, warmup, duration, step, seed=zlib.crc32(tag.encode())
        )
    finally:
        await store.close()


async def plain_appends(
    dsn: str, writers: int, batch: int, warmup: float, duration: float, tag: str
) -> AppendRun:
    conninfo = connection_string(dsn, schema=APPEND_SCHEMA)
    conns = [
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) for _ in range(writers)
    ]
    streams = [f"{tag}-{i}" for i in range(writers)]
    dumps = ENCODER.encode

    def row(
        stream: str, version: int, payload: ComplaintFiled, meta: Metadata, eid: uuid.UUID
    ) -> tuple[Any, ...]:
        meta = msgspec.structs.replace(meta, occurred_at=datetime.now(UTC))
        return (
            eid,
            EVENT_TYPE,
            stream,
            AGGREGATE_TYPE,
            Jsonb(payload, dumps=dumps),
            Jsonb(meta, dumps=dumps),
            version,
        )

    async def step(
        index: int, version: int, events: list[tuple[ComplaintFiled, Metadata, uuid.UUID]]
    ) -> None:
        conn = conns[index]
        if len(events) == 1:
            payload, meta, eid = events[0]
            await conn.execute(PLAIN_INSERT, row(streams[index], version + 1, payload, meta, eid))
            return
        rows = [
            row(streams[index], version + n, payload, meta, eid)
            for n, (payload, meta, eid) in enumerate(events, start=1)
        ]
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(PLAIN_INSERT, rows)

    try:
        return await run_writers(
            writers, batch, warmup, duration, step, seed=zlib.crc32(tag.encode())
        )
    finally:
        for conn in conns:
            await conn.close()


async def magasin_read_all(dsn: str) -> ReadRun:
    store = await PostgresEventStore.connect(dsn, schema=READ_SCHEMA, run_migrations=False)
    try:
        started = time.perf_counter()
        count = 0
        after = Checkpoint.START
        decode = CODEC.decode
        while True:
            batch = await store.read_all(after, limit=READ_PAGE)
            if not batch:
                break
            for record in batch:
                decode(record)
            count += len(batch)
            after = batch[-1].checkpoint
        return ReadRun(count, time.perf_counter() - started)
    finally:
        await store.close()


async def plain_read_all(dsn: str) -> ReadRun:
    conninfo = connection_string(dsn, schema=READ_SCHEMA)
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        started = time.perf_counter()
        count = 0
        async with conn.cursor(name="bench_read_all") as cur:
            cur.itersize = READ_PAGE
            await cur.execute(PLAIN_READ_ALL)
            async for _row in cur:
                count += 1
        elapsed = time.perf_counter() - started
        await conn.rollback()
    return ReadRun(count, elapsed)


# --- setup --------------------------------------------------------------------------------


def _copy_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


async def load_events(dsn: str, schema: str, total: int) -> tuple[float, int]:
    """COPY ``total`` events into ``schema``'s table, ``LOAD_CHUNK`` per transaction, then
    VACUUM ANALYZE it. Returns (seconds, average JSON bytes of event_data)."""
    conninfo = connection_string(dsn, schema=schema)
    rng = random.Random(42)
    streams = max(1, total // EVENTS_PER_STREAM)
    stream_ids = [f"load-{i:08d}" for i in range(streams)]
    started = time.perf_counter()
    data_bytes = 0
    copy = sql.SQL(
        "COPY event_store (event_id, event_type, aggregate_id, aggregate_type, "
        "event_data, metadata, version, created_at) FROM STDIN"
    )
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute("SET synchronous_commit = off")
        written = 0
        while written < total:
            size = min(LOAD_CHUNK, total - written)
            lines = []
            for i in range(written, written + size):
                payload = make_payload(rng)
                occurred = datetime.now(UTC)
                data = ENCODER.encode(payload).decode()
                meta = ENCODER.encode(make_metadata(rng, occurred)).decode()
                data_bytes += len(data)
                lines.append(
                    "\t".join(
                        (
                            str(uuid.uuid4()),
                            EVENT_TYPE,
                            stream_ids[i % streams],
                            AGGREGATE_TYPE,
                            _copy_escape(data),
                            _copy_escape(meta),
                            str(i // streams + 1),
                            occurred.replace(tzinfo=None).isoformat(),
                        )
                    )
                )
            async with conn.cursor() as cur, cur.copy(copy) as pipe:
                await pipe.write(("\n".join(lines) + "\n").encode())
            await conn.commit()
            written += size
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("VACUUM (ANALYZE) event_store")
        await conn.execute("CHECKPOINT")
    return time.perf_counter() - started, data_bytes // max(1, total)


async def settle(dsn: str, schema: str) -> None:
    """Before a measurement: refresh the table's statistics (what autovacuum would do; it may
    be off, and a never-analyzed table gets sequential-scan plans) and flush dirty buffers,
    so no measurement pays for the previous one's writes."""
    conninfo = connection_string(dsn, schema=schema)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("ANALYZE event_store")
        await conn.execute("CHECKPOINT")


async def server_facts(dsn: str) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            """SELECT current_setting('server_version'), current_setting('fsync'),
                      current_setting('synchronous_commit'), current_setting('shared_buffers'),
                      current_setting('autovacuum')"""
        )
        row = await cur.fetchone()
    assert row is not None
    keys = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "autovacuum")
    return dict(zip(keys, (str(v) for v in row), strict=True))


# --- the report ---------------------------------------------------------------------------


def add_append_rows(table: Table, label: str, magasin: AppendRun, plain: AppendRun) -> None:
    if magasin.batch == 1:
        table.add(f"{label}: appends/s", magasin.appends_per_s, plain.appends_per_s)
    else:
        table.add(f"{label}: events/s", magasin.events_per_s, plain.events_per_s)
        table.add(f"{label}: appends/s", magasin.appends_per_s, plain.appends_per_s)
    for q, name in ((0.50, "p50"), (0.95, "p95"), (0.99, "p99")):
        table.add(
            f"{label}: {name} latency ms",
            magasin.percentile_ms(q),
            plain.percentile_ms(q),
            digits=2,
        )
    table.add(f"{label}: appends measured", len(magasin.latencies), len(plain.latencies))


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller run: 2 s per append phase, 100,000 events for read_all",
    )
    parser.add_argument(
        "--events", type=int, default=None, help="events loaded for read_all (default 1,000,000)"
    )
    parser.add_argument(
        "--prefill",
        type=int,
        default=None,
        help="events in the append table before the append phases (default 100,000)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="measured seconds per append phase (5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="unmeasured seconds before each phase (1)"
    )
    parser.add_argument("--admin-url", default=ADMIN_DSN, help="DSN allowed to CREATE DATABASE")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 100_000 if args.quick else 1_000_000
    if args.prefill is None:
        args.prefill = 20_000 if args.quick else 100_000
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.events < 1 or args.prefill < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--events and --prefill must be >= 1, --duration > 0 and --warmup >= 0")
    return args


@dataclass
class Context:
    dsn: str
    args: argparse.Namespace
    table: Table = field(default_factory=Table)
    notes: list[str] = field(default_factory=list)


async def bench(ctx: Context) -> None:
    args, dsn = ctx.args, ctx.dsn
    # Both schemas are created by magasin's own migrations.
    for schema in (APPEND_SCHEMA, READ_SCHEMA):
        store = await PostgresEventStore.connect(dsn, schema=schema)
        await store.close()
    progress(f"prefilling the append table with {args.prefill:,} events (setup, not measured)")
    load_seconds, _ = await load_events(dsn, APPEND_SCHEMA, args.prefill)
    ctx.notes.append(
        f"append setup: the table held {args.prefill:,} events (COPY, {load_seconds:.1f} s) "
        "before the first phase; ANALYZE + CHECKPOINT before every measurement"
    )

    for writers in WRITER_COUNTS:
        label = f"append 1 ev x {writers:>2} writers"
        progress(label)
        await settle(dsn, APPEND_SCHEMA)
        mag = await magasin_appends(dsn, writers, 1, args.warmup, args.duration, f"m1-{writers}")
        await settle(dsn, APPEND_SCHEMA)
        plain = await plain_appends(dsn, writers, 1, args.warmup, args.duration, f"p1-{writers}")
        add_append_rows(ctx.table, label, mag, plain)
        ctx.table.rule()

    for batch in BATCH_SIZES:
        label = f"append {batch:>3} ev x 1 writer"
        progress(label)
        await settle(dsn, APPEND_SCHEMA)
        mag = await magasin_appends(dsn, 1, batch, args.warmup, args.duration, f"mb-{batch}")
        await settle(dsn, APPEND_SCHEMA)
        plain = await plain_appends(dsn, 1, batch, args.warmup, args.duration, f"pb-{batch}")
        add_append_rows(ctx.table, label, mag, plain)
        ctx.table.rule()

    progress(f"loading {args.events:,} events for read_all (setup, not measured)")
    load_seconds, avg_bytes = await load_events(dsn, READ_SCHEMA, args.events)
    ctx.notes.append(
        f"read_all setup: {args.events:,} events loaded by COPY in {load_seconds:.1f} s "
        f"(+ VACUUM ANALYZE), event_data averages {avg_bytes} bytes of JSON"
    )
    progress("read_all magasin")
    mag_read = await magasin_read_all(dsn)
    progress("read_all plain")
    plain_read = await plain_read_all(dsn)
    for run, who in ((mag_read, "magasin"), (plain_read, "plain")):
        if run.events != args.events:
            ctx.notes.append(f"WARNING: {who} read_all returned {run.events:,} events")
    label = f"read_all {args.events:,} ev"
    ctx.table.add(f"{label}: events/s", mag_read.events_per_s, plain_read.events_per_s)
    ctx.table.add(f"{label}: seconds", mag_read.elapsed, plain_read.elapsed, digits=2)


def header(args: argparse.Namespace, facts: dict[str, str], dbname: str) -> Iterator[str]:
    yield "magasin event store benchmark"
    yield f"options: {' '.join(sys.argv[1:]) or '(none)'}"
    yield (
        f"         quick={args.quick} events={args.events:,} prefill={args.prefill:,} "
        f"duration={args.duration}s "
        f"warmup={args.warmup}s writers={','.join(map(str, WRITER_COUNTS))} "
        f"batches={','.join(map(str, BATCH_SIZES))} read page={READ_PAGE}"
    )
    yield (
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__} libpq {psycopg.pq.version()}), msgspec {msgspec.__version__}, "
        f"load average (1, 5, 15 min) {load_average()}"
    )
    yield (
        f"server:  PostgreSQL {facts['server_version']}, fsync={facts['fsync']}, "
        f"synchronous_commit={facts['synchronous_commit']}, "
        f"shared_buffers={facts['shared_buffers']}, autovacuum={facts['autovacuum']}, "
        f"database {dbname}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logger.disable("runtime")
    signal.signal(signal.SIGTERM, raise_interrupt)
    database = Database(args.admin_url)
    started = time.perf_counter()
    try:
        dsn = database.create()
    except psycopg.OperationalError as exc:
        print(f"cannot create the bench database via {args.admin_url}: {exc}", file=sys.stderr)
        return 2
    ctx = Context(dsn, args)
    try:
        facts = asyncio.run(server_facts(dsn))
        for line in header(args, facts, database.name):
            print(line, flush=True)
        print(flush=True)
        asyncio.run(bench(ctx))
    except KeyboardInterrupt:
        print("\ninterrupted; dropping the bench database", file=sys.stderr)
        return 130
    finally:
        database.drop()
    print(ctx.table.render())
    print()
    print("ratio = magasin / plain (throughput: < 1 is slower; latency: > 1 is slower)")
    print(
        "plain appends: one autocommit INSERT per event, one connection per writer; batches: "
        "cursor.executemany (pipelined) in one transaction"
    )
    print(
        "plain read_all: server-side cursor, itersize = page size, psycopg default loaders "
        "(jsonb -> dict); magasin: read_all pages + EventCodec.decode"
    )
    for note in ctx.notes:
        print(note)
    print(
        f"wall time: {time.perf_counter() - started:.1f} s, "
        f"load average at the end {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
