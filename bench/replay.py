"""Replay benchmark: rebuilding the complaint list from a million stored events.

Run with ``python -m bench.replay`` (``make bench`` runs it). On a throw-away database
``magasin_bench_<random>`` (dropped at the end, also on error or Ctrl-C):

1. stores ``--events`` complaint events (default 1,000,000), four per complaint (created,
   assigned, investigation started, resolved), generated server-side from the JSON one real
   history encodes to (``INSERT ... SELECT generate_series``): the figures are about the
   replay, not about writing;
2. rebuilds ``complaint-list`` with ``runtime.replay.replay`` (what ``magasin replay`` runs):
   read in checkpoint order, decode, fold in memory, write in bulk (COPY) in the background,
   swap the tables in;
3. measures, in the same run, the client-side read of every event (``read_all`` + decode),
   and what PostgreSQL alone takes to store the rebuilt documents: ``INSERT ... SELECT`` of
   them, server-side, into a table with the same indexes (no client at all: the floor of the
   writing part of any rebuild here).

The design document's floor is 30 s for a million events; the issue aims below 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence

import msgspec
import psycopg

from bench.common import Database, load_average, progress, raise_interrupt
from runtime.replay import replay
from runtime.store.memory import MemoryEventStore
from runtime.store.postgres import PostgresEventStore, connection_string
from runtime.store.protocol import Checkpoint, RecordedEvent
from runtime.store.readmodel_postgres import PostgresReadModelStore
from runtime.topology import parse_topology
from tests.support.complaints import write_complaints

SCHEMA = "bench_replay"
PER_COMPLAINT = 4
TOPOLOGY = """
domains: {complaint: complaints.events}
actors:
  complaint-list:
    kind: projection
    handler: actors.complaints.projections:ComplaintList
    bind: {complaints.events: ["complaint.#"]}
"""


async def template() -> list[tuple[str, str, str]]:
    """(event_type, event_data, metadata) of one real four-event history, as stored."""
    store = MemoryEventStore()
    await write_complaints(store, 20, seed=4)
    streams: dict[str, list[RecordedEvent]] = {}
    for record in await store.read_all(limit=1000):
        streams.setdefault(record.aggregate_id, []).append(record)
    history = next(events for events in streams.values() if len(events) >= PER_COMPLAINT)
    return [
        (r.event_type, r.data.decode(), msgspec.json.encode(r.metadata).decode())
        for r in history[:PER_COMPLAINT]
    ]


async def fill(dsn: str, events: int) -> None:
    rows = await template()
    complaints = events // PER_COMPLAINT
    values = ", ".join(f"({v}, %s, %s::jsonb, %s::jsonb)" for v in range(1, PER_COMPLAINT + 1))
    params = [item for row in rows for item in row]
    chunk = 50_000
    async with await psycopg.AsyncConnection.connect(
        connection_string(dsn, schema=SCHEMA), autocommit=True
    ) as conn:
        for first in range(0, complaints, chunk):
            last = min(complaints, first + chunk)
            await conn.execute(
                f"""
                INSERT INTO event_store (event_id, event_type, aggregate_id, aggregate_type,
                                         event_data, metadata, version)
                SELECT gen_random_uuid(), t.type, 'c-' || g, 'complaint',
                       CASE WHEN t.v = 1
                            THEN jsonb_set(jsonb_set(t.data, '{{complaint_id}}',
                                                     to_jsonb('c-' || g)),
                                           '{{store_id}}', to_jsonb('store-' || (g %% 50)))
                            ELSE t.data END,
                       t.meta, t.v
                  FROM generate_series({first + 1}, {last}) AS g
                 CROSS JOIN (VALUES {values}) AS t (v, type, data, meta)
                 ORDER BY g, t.v""",
                params,
            )
            progress(f"stored {last * PER_COMPLAINT:,} events")
        await conn.execute("VACUUM ANALYZE event_store")


async def floor_server_side(dsn: str, projection: str) -> float:
    """PostgreSQL alone: storing the rebuilt documents again, server-side, into a table with
    the same indexes (primary key and the jsonb GIN): what writing the result costs with no
    client at all."""
    async with await psycopg.AsyncConnection.connect(
        connection_string(dsn, schema=SCHEMA), autocommit=True
    ) as conn:
        await conn.execute("CREATE TABLE floor_documents (LIKE read_models INCLUDING ALL)")
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO floor_documents SELECT * FROM read_models WHERE projection = %s",
            (projection,),
        )
        seconds = time.perf_counter() - started
        await conn.execute("DROP TABLE floor_documents")
        return seconds


async def read_everything(store: PostgresEventStore, batch: int) -> tuple[int, float]:
    started = time.perf_counter()
    checkpoint, count = Checkpoint.START, 0
    while rows := await store.read_all(checkpoint, batch):
        checkpoint = rows[-1].checkpoint
        count += len(rows)
    return count, time.perf_counter() - started


async def bench(dsn: str, events: int, batch: int) -> None:
    store = await PostgresEventStore.connect(dsn, schema=SCHEMA, statement_timeout_ms=0)
    read_models = await PostgresReadModelStore.connect(dsn, schema=SCHEMA)
    try:
        progress(f"storing {events:,} events")
        await fill(dsn, events)
        topology = parse_topology(TOPOLOGY, source="bench.replay", env={})
        progress("reading every event (read_all + decode)")
        read, read_seconds = await read_everything(store, batch)
        progress("magasin: replay complaint-list")
        last = 0.0

        def show(done: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last > 2:
                last = time.monotonic()
                progress(f"replayed {done:,} / {total:,}")

        report = await replay(
            topology,
            "complaint-list",
            store=store,
            read_models=read_models,
            batch_size=batch,
            progress=show,
        )
        progress("PostgreSQL alone: INSERT ... SELECT of the rebuilt documents")
        floor = await floor_server_side(dsn, "complaints")
    finally:
        await read_models.close()
        await store.close()
    complaints = events // PER_COMPLAINT
    print(f"{'figure':<58}{'value':>14}")
    print("-" * 72)
    print(f"{'events stored':<58}{report.events_read:>14,}")
    print(f"{'complaints (documents built)':<58}{complaints:>14,}")
    print(f"{'magasin replay: seconds (rebuild + swap)':<58}{report.seconds:>14.1f}")
    print(f"{'magasin replay: events/s':<58}{report.events_per_second:>14,.0f}")
    print(f"{'client read of every event (read_all + decode): seconds':<58}{read_seconds:>14.1f}")
    print(f"{'  events/s':<58}{read / read_seconds:>14,.0f}")
    print(f"{'PostgreSQL alone, storing the rebuilt documents: seconds':<58}{floor:>14.1f}")
    print("-" * 72)
    print(f"batch size {batch:,} events per read; one Python process")
    print("design document's floor: 30 s for 1,000,000 events; aim: < 10 s")
    print(f"load average at the end {load_average()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="stored events (1M)")
    parser.add_argument("--batch", type=int, default=5000, help="events per read")
    parser.add_argument(
        "--admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="DSN allowed to CREATE DATABASE",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    database = Database(args.admin_url)
    dsn = database.create()
    try:
        asyncio.run(bench(dsn, args.events, args.batch))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        database.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
