"""Rebuilding a projection from the store (`runtime/replay.py`, `magasin replay`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest

from runtime.projection import ProjectionHandler
from runtime.replay import projection_handler, replay
from runtime.store.memory import MemoryEventStore
from runtime.store.postgres import PostgresEventStore, connection_string
from runtime.store.readmodel import ReadModelStore
from runtime.store.readmodel_memory import MemoryReadModelStore
from runtime.store.readmodel_postgres import PostgresReadModelStore
from runtime.topology import Topology, parse_topology
from tests.support.complaints import write_complaints
from tests.support.process import clean_env

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    ("actor", "collections"),
    [
        ("complaint-list", ["complaints"]),
        ("complaint-store-stats", ["stores", "complaints"]),
    ],
)
async def test_a_replay_equals_the_live_projection_on_the_embedded_store(
    actor: str, collections: list[str]
) -> None:
    store = MemoryEventStore()
    read_models = MemoryReadModelStore()
    await write_complaints(store, 60, seed=3)
    top = topology("memory://", "public")
    live = projection_handler(top, actor, store)
    await project_live(live, store, read_models)
    before = await dump(read_models, live.projection, collections)
    assert before[collections[0]], "the live projection holds nothing: the test proves nothing"

    report = await replay(top, actor, store=store, read_models=read_models, batch_size=50)

    assert await dump(read_models, live.projection, collections) == before
    assert await dump(read_models, live.projection + "~replay", collections) == {
        c: [] for c in collections
    }
    assert report.events_read == len(await every_event(store))
    assert report.events_applied == report.events_read


@pytest.mark.integration
async def test_a_replay_on_postgres_equals_the_live_projection_and_keeps_serving(
    pg_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema)
    read_models = await PostgresReadModelStore.connect(pg_dsn, schema=pg_schema)
    try:
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
    finally:
        await read_models.close()
        await store.close()


@pytest.mark.integration
async def test_events_the_live_projection_applies_during_the_replay_are_kept(
    pg_dsn: str, pg_schema: str
) -> None:
    """Written and projected live after the rebuild's last read, before its swap: the swap
    catches up from the store inside its transaction, so they survive it."""
    store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema)
    read_models = await PostgresReadModelStore.connect(pg_dsn, schema=pg_schema)
    try:
        await write_complaints(store, 20, seed=7)
        top = topology(pg_dsn, pg_schema)
        live = projection_handler(top, "complaint-list", store)
        await project_live(live, store, read_models)
        original = read_models.swap
        late: list[str] = []

        async def swap_after_a_late_write(*args: Any) -> None:
            late.extend(await write_complaints(store, 3, seed=99))
            await project_live(live, store, read_models)
            await original(*args)

        read_models.swap = swap_after_a_late_write  # type: ignore[method-assign]
        await replay(top, "complaint-list", store=store, read_models=read_models)
        for complaint_id in late:
            assert await read_models.get("complaints", "complaints", complaint_id) is not None
        assert len(await read_models.list("complaints", "complaints", limit=1000)) == 23
    finally:
        await read_models.close()
        await store.close()


def _versions(dsn: str, schema: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(connection_string(dsn, schema=schema)) as conn:
        rows = conn.execute(
            "SELECT projection, aggregate_id, version FROM projection_versions ORDER BY 1, 2"
        ).fetchall()
    return [(p, a, v) for p, a, v in rows]


@pytest.mark.integration
async def test_magasin_replay_prints_its_figures_and_refuses_the_embedded_store(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema)
    try:
        await write_complaints(store, 10, seed=11)
    finally:
        await store.close()
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
