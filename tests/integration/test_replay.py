"""Rebuilding a projection from the store (`runtime/replay.py`, `magasin replay`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from psycopg import sql

from runtime.errors import StoreError
from runtime.projection import ProjectionHandler
from runtime.replay import projection_handler, replay
from runtime.store.memory import MemoryEventStore
from runtime.store.postgres import PostgresEventStore, connection_string
from runtime.store.readmodel import ReadModelStore
from runtime.store.readmodel_memory import MemoryReadModelStore
from runtime.store.readmodel_postgres import PostgresReadModelStore, PostgresRebuild
from runtime.topology import Topology, parse_topology
from tests.support.complaints import write_complaints
from tests.support.postgres import terminate_backends
from tests.support.process import clean_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(pg_store: PostgresEventStore) -> PostgresEventStore:
    """The event store on this test's schema."""
    return pg_store


@pytest.fixture
async def read_models(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresReadModelStore]:
    """The read models on this test's schema (room for a live projection beside a replay)."""
    models = await PostgresReadModelStore.connect(pg_dsn, schema=pg_schema, max_size=8)
    yield models
    await models.close()


def topology(database_url: str, schema: str) -> Topology:
    text = f"""
database_url: "{database_url}"
domains: {{complaint: complaints.events}}
actors:
  complaint-list:
    kind: projection
    handler: actors.complaints.projections:ComplaintList
    bind: {{complaints.events: ["complaint.#"]}}
    options: {{schema: {schema}}}
  complaint-store-stats:
    kind: projection
    handler: actors.complaints.projections:StoreStatistics
    bind: {{complaints.events: ["complaint.#"]}}
    options: {{schema: {schema}}}
"""
    return parse_topology(text, source="test", env={})


async def project_live(
    handler: ProjectionHandler, store: Any, read_models: ReadModelStore, batch: int = 7
) -> None:
    """What the live projection actor does, in batches of ``batch`` deliveries."""
    handler._read_models = read_models
    events = await every_event(store)
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        await read_models.run(handler.projection, lambda tx, c=chunk: handler.project_all(tx, c))


async def every_event(store: Any) -> list[Any]:
    """Every stored event, once ``read_all`` shows them all: it never passes a transaction
    still open anywhere in the cluster (another suite's, a benchmark's), so wait for that."""
    head = (await store.statistics()).head_position
    with anyio.fail_after(60):
        while len(events := await store.read_all(limit=100_000)) < head:  # noqa: ASYNC110 - polling the database
            await anyio.sleep(0.05)
    return events


async def dump(read_models: ReadModelStore, projection: str, collections: list[str]) -> dict:
    found = {}
    for collection in collections:
        found[collection] = await read_models.list(projection, collection, limit=1000)
    return found


PROJECTIONS = pytest.mark.parametrize(
    ("actor", "collections"),
    [
        ("complaint-list", ["complaints"]),
        ("complaint-store-stats", ["stores", "complaints"]),
    ],
)
#: Held in memory until the end, or written every few events (and read back from the rebuild).
BUFFERS = pytest.mark.parametrize("buffer", [500_000, 7])


@PROJECTIONS
@BUFFERS
async def test_a_replay_equals_the_live_projection_on_the_embedded_store(
    actor: str, collections: list[str], buffer: int
) -> None:
    store = MemoryEventStore()
    read_models = MemoryReadModelStore()
    await write_complaints(store, 60, seed=3)
    top = topology("memory://", "public")
    live = projection_handler(top, actor, store)
    await project_live(live, store, read_models)
    before = await dump(read_models, live.projection, collections)
    assert before[collections[0]], "the live projection holds nothing: the test proves nothing"

    report = await replay(
        top, actor, store=store, read_models=read_models, batch_size=50, buffer=buffer
    )

    assert await dump(read_models, live.projection, collections) == before
    assert await dump(read_models, live.projection + "~rebuild", collections) == {
        c: [] for c in collections
    }
    assert report.events_read == len(await every_event(store))
    assert report.events_applied == report.events_read


@pytest.mark.integration
@PROJECTIONS
async def test_a_replay_on_postgres_equals_the_live_projection_first_and_again(
    pg_dsn: str,
    pg_schema: str,
    actor: str,
    collections: list[str],
    store: PostgresEventStore,
    read_models: PostgresReadModelStore,
) -> None:
    """The first rebuild replaces rows of the default partition, the second the partition
    the first attached; the second writes every 7 entries (through the staging tables)."""
    await write_complaints(store, 60, seed=13)
    top = topology(pg_dsn, pg_schema)
    live = projection_handler(top, actor, store)
    await project_live(live, store, read_models)
    before = await dump(read_models, live.projection, collections)
    assert before[collections[0]], "the live projection holds nothing: the test proves nothing"
    versions_before = _versions(pg_dsn, pg_schema)
    for buffer in (500_000, 7):
        report = await replay(
            top, actor, store=store, read_models=read_models, batch_size=50, buffer=buffer
        )
        assert await dump(read_models, live.projection, collections) == before
        assert _versions(pg_dsn, pg_schema) == versions_before
        assert report.events_applied == report.events_read
    assert _partitions(pg_dsn, pg_schema) == {
        "read_models": 2,
        "projection_versions": 2,
    }, "the default partition and the rebuilt projection's"
    assert _default_exclusions(pg_dsn, pg_schema) == [
        ("projection_versions_default", True),
        ("read_models_default", True),
    ], "no validated CHECK keeps the projection out of the default partitions"


def _default_exclusions(dsn: str, schema: str) -> list[tuple[str, bool]]:
    """The CHECK constraints on the default partitions (which spare ATTACH its scan)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT t.relname, c.convalidated FROM pg_constraint c
                 JOIN pg_class t ON t.oid = c.conrelid
                 JOIN pg_namespace n ON n.oid = t.relnamespace
                WHERE n.nspname = %s AND t.relname LIKE '%%\\_default' AND c.contype = 'c'
                  AND pg_get_constraintdef(c.oid) LIKE '%%<>%%'
                ORDER BY 1""",
            (schema,),
        ).fetchall()
    return [(name, valid) for name, valid in rows]


def _partitions(dsn: str, schema: str) -> dict[str, int]:
    with psycopg.connect(connection_string(dsn, schema=schema)) as conn:
        rows = conn.execute(
            """SELECT parent.relname, count(*) FROM pg_inherits
                 JOIN pg_class parent ON parent.oid = inhparent
                 JOIN pg_namespace n ON n.oid = parent.relnamespace
                WHERE n.nspname = %s AND parent.relkind = 'p' GROUP BY parent.relname""",
            (schema,),
        ).fetchall()
    return {name: count for name, count in rows}


@pytest.mark.integration
async def test_a_replay_on_postgres_equals_the_live_projection_and_keeps_serving(
    pg_dsn: str,
    pg_schema: str,
    store: PostgresEventStore,
    read_models: PostgresReadModelStore,
) -> None:
    await write_complaints(store, 150, seed=5)
    top = topology(pg_dsn, pg_schema)
    live = projection_handler(top, "complaint-list", store)
    await project_live(live, store, read_models)
    before = await dump(read_models, "complaints", ["complaints"])
    versions_before = _versions(pg_dsn, pg_schema)

    served: list[int] = []

    async def reader() -> None:  # the live read model answers throughout
        while True:
            page = await read_models.list("complaints", "complaints", limit=1000)
            served.append(len(page))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        report = await replay(top, "complaint-list", store=store, read_models=read_models)
        tg.cancel_scope.cancel()

    assert await dump(read_models, "complaints", ["complaints"]) == before
    assert _versions(pg_dsn, pg_schema) == versions_before
    assert served
    assert set(served) == {150}, "a reader saw a half-built or empty read model"
    assert report.events_applied == report.events_read > 150


@pytest.mark.integration
async def test_events_the_live_projection_applies_during_the_replay_are_kept(
    pg_dsn: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    store: PostgresEventStore,
    read_models: PostgresReadModelStore,
) -> None:
    """Written and projected live after the rebuild's last read, before its swap: the swap
    catches up from the store inside its transaction, so they survive it."""
    await write_complaints(store, 20, seed=7)
    top = topology(pg_dsn, pg_schema)
    live = projection_handler(top, "complaint-list", store)
    await project_live(live, store, read_models)
    original = PostgresRebuild.swap
    late: list[str] = []

    async def swap_after_a_late_write(*args: Any) -> None:
        late.extend(await write_complaints(store, 3, seed=99))
        await project_live(live, store, read_models)
        await original(*args)

    monkeypatch.setattr(PostgresRebuild, "swap", swap_after_a_late_write)
    await replay(top, "complaint-list", store=store, read_models=read_models)
    for complaint_id in late:
        assert await read_models.get("complaints", "complaints", complaint_id) is not None
    assert len(await read_models.list("complaints", "complaints", limit=1000)) == 23


def _versions(dsn: str, schema: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(connection_string(dsn, schema=schema)) as conn:
        rows = conn.execute(
            "SELECT projection, aggregate_id, version FROM projection_versions ORDER BY 1, 2"
        ).fetchall()
    return [(p, a, v) for p, a, v in rows]


@pytest.mark.integration
async def test_magasin_replay_prints_its_figures_and_refuses_the_embedded_store(
    pg_dsn: str,
    pg_schema: str,
    tmp_path: Path,
    store: PostgresEventStore,
) -> None:
    await write_complaints(store, 10, seed=11)
    file = tmp_path / "topology.yaml"
    file.write_text(msgspec.yaml.encode(_topology_dict(pg_schema)).decode())

    def magasin(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "runtime.cli",
                "replay",
                "complaint-list",
                "--topology",
                str(file),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=clean_env(**env),
            timeout=120,
            check=False,
        )

    done = magasin({"MAGASIN_DATABASE_URL": pg_dsn})
    assert done.returncode == 0, done.stderr
    assert "complaints:" in done.stdout
    assert "events/s" in done.stdout
    assert "swapped in" in done.stdout
    embedded = magasin({})
    assert embedded.returncode == 2
    assert "MAGASIN_DATABASE_URL" in embedded.stderr


def _topology_dict(schema: str) -> dict[str, Any]:
    return {
        "domains": {"complaint": "complaints.events"},
        "actors": {
            "complaint-list": {
                "kind": "projection",
                "handler": "actors.complaints.projections:ComplaintList",
                "bind": {"complaints.events": ["complaint.#"]},
                "options": {"schema": schema},
            }
        },
    }


@pytest.mark.integration
async def test_a_replay_beside_a_live_projection_that_keeps_writing_ends_equal_to_the_store(
    pg_dsn: str,
    pg_schema: str,
    store: PostgresEventStore,
    read_models: PostgresReadModelStore,
) -> None:
    """Writers and the live projection run throughout the replay and its swap (no deadlock,
    nothing lost): afterwards the live read model equals a fold of the store into another
    namespace."""
    await write_complaints(store, 80, seed=21)
    top = topology(pg_dsn, pg_schema)
    live = projection_handler(top, "complaint-list", store)
    await project_live(live, store, read_models)
    writing = anyio.Event()

    async def writer() -> None:
        for seed in range(100, 130):
            await write_complaints(store, 2, seed=seed)
            await anyio.sleep(0.01)
        writing.set()

    async def live_projection() -> None:
        while True:
            await project_live(live, store, read_models, batch=25)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(live_projection)
        await anyio.sleep(0.05)
        report = await replay(
            top, "complaint-list", store=store, read_models=read_models, batch_size=40
        )
        await writing.wait()
        tg.cancel_scope.cancel()
    await project_live(live, store, read_models)
    reference = projection_handler(top, "complaint-list", store)
    reference.projection = "complaints-reference"
    await project_live(reference, store, read_models)
    folded = await dump(read_models, "complaints-reference", ["complaints"])
    assert len(folded["complaints"]) == 140
    assert await dump(read_models, "complaints", ["complaints"]) == folded
    assert report.events_read > 0


@pytest.mark.integration
async def test_a_replay_whose_connections_are_terminated_leaves_the_live_model_and_reruns(
    pg_dsn: str,
    pg_schema: str,
    store: PostgresEventStore,
    read_models: PostgresReadModelStore,
) -> None:
    """``pg_terminate_backend`` on every connection in the middle of a replay: it either
    survives (the stores reconnect) or fails with a store error; either way the live read
    model is intact, and a replay run again rebuilds it exactly, leaving no tables behind."""
    await write_complaints(store, 60, seed=31)
    top = topology(pg_dsn, pg_schema)
    live = projection_handler(top, "complaint-list", store)
    await project_live(live, store, read_models)
    before = await dump(read_models, "complaints", ["complaints"])
    killed: list[int] = []

    def kill_once(done: int, total: int) -> None:
        if not killed:
            killed.append(terminate_backends(pg_dsn))

    with contextlib.suppress(StoreError):
        await replay(
            top,
            "complaint-list",
            store=store,
            read_models=read_models,
            batch_size=20,
            buffer=30,
            progress=kill_once,
        )
    assert killed, "the replay never reported progress"
    assert killed[0] >= 1, "no connection was terminated: the test proves nothing"
    assert await dump(read_models, "complaints", ["complaints"]) == before
    report = await replay(top, "complaint-list", store=store, read_models=read_models)
    assert report.events_applied == report.events_read
    assert await dump(read_models, "complaints", ["complaints"]) == before
    assert not _rebuild_tables(pg_dsn, pg_schema)


@pytest.mark.integration
async def test_tables_a_killed_replay_left_are_dropped_by_the_next_one(
    pg_dsn: str,
    pg_schema: str,
    read_models: PostgresReadModelStore,
) -> None:
    left = PostgresRebuild(read_models, "complaints", "lock", 0)  # as a killed replay left it
    await left.create()
    with psycopg.connect(connection_string(pg_dsn, schema=pg_schema)) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (projection, collection, key, doc)"
                " VALUES ('complaints', 'complaints', 'ghost', '{{}}')"
            ).format(sql.Identifier(left._sql.docs))
        )
    assert _rebuild_tables(pg_dsn, pg_schema)
    async with read_models.rebuild("complaints") as rebuild:
        assert await rebuild.load("complaints", ["ghost"]) == {}
        assert await rebuild.load_versions(["ghost"]) == {"ghost": 0}
        await rebuild.swap(_nothing)
    assert await read_models.get("complaints", "complaints", "ghost") is None
    assert not _rebuild_tables(pg_dsn, pg_schema)


async def _nothing(tx: object) -> None:
    return None


def _rebuild_tables(dsn: str, schema: str) -> list[str]:
    with psycopg.connect(connection_string(dsn, schema=schema)) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
            (schema, "%\\_rebuild\\_%"),
        ).fetchall()
    return [r[0] for r in rows]
