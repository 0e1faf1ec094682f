"""Audit coverage under load with duplicate deliveries: 5,000 events appended through the
complaint decider (as the aggregate actor would), relayed, some delivered twice more, and
`magasin audit verify` says 100 % with an intact chain and no event recorded twice.

A topology of its own (relay, audit, gateway) on a database and vhost of its own.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest

from runtime.bus.rabbitmq import RabbitMQBus
from runtime.store.postgres import PostgresEventStore
from runtime.store.protocol import Checkpoint
from tests.support.complaints import write_complaints
from tests.support.postgres import create_database
from tests.support.process import ROOT, clean_env, magasin_running
from tests.support.rabbitmq import HOST, PORT, create_vhost
from tests.support.streams import write_events

pytestmark = pytest.mark.integration

EVENTS = 5_000
TOPOLOGY = """
actors:
  relay:
    kind: relay
  audit:
    kind: subscriber
    handler: actors.audit:AuditTrail
    queue: audit.all.events
    bind: {complaints.events: ["#"], saga.events: ["#"], notifications.events: ["#"],
           audit.events: ["#"]}
    prefetch: 256
    batch_size: 128
  gateway:
    kind: gateway
"""


@pytest.fixture
def services() -> Iterator[tuple[str, str]]:
    databases, vhosts = create_database(), create_vhost()
    try:
        yield next(databases), f"amqp://guest:guest@{HOST}:{PORT}/{next(vhosts)}"
    finally:
        databases.close()
        vhosts.close()


async def append_events(dsn: str, at_least: int) -> int:
    store = await PostgresEventStore.connect(dsn)
    try:
        seed = 0
        while (await store.statistics()).event_count < at_least:
            seed += 1
            await write_complaints(store, 200, seed=seed)
        return len(await _all(store))
    finally:
        await store.close()


async def _all(store: PostgresEventStore) -> list[object]:
    found: list[object] = []
    after = Checkpoint.START
    while page := await store.read_all(after, limit=1000):
        found += page
        after = page[-1].checkpoint
    return found


async def duplicate_some(dsn: str, amqp: str, share: float, seed: int) -> int:
    """Write again a random ``share`` of the stored events to the domain stream, as a
    replaying writer whose deduplication failed would."""
    store = await PostgresEventStore.connect(dsn)
    bus = await RabbitMQBus.connect(amqp, name="test-duplicates")
    rng = random.Random(seed)
    sent = 0
    try:
        after = Checkpoint.START
        while page := await store.read_all(after, limit=1000):
            after = page[-1].checkpoint
            again = [
                record for record in page for _ in range(rng.choice([0] * int(1 / share) + [1, 2]))
            ]
            await write_events(bus, "complaints.events", again)
            sent += len(again)
    finally:
        await bus.close()
        await store.close()
    return sent


def test_every_event_is_audited_once_despite_duplicates(
    services: tuple[str, str], tmp_path: Path
) -> None:
    dsn, amqp = services
    topology = tmp_path / "topology.yaml"
    topology.write_text(TOPOLOGY)
    env = {"MAGASIN_DATABASE_URL": dsn, "MAGASIN_AMQP_URL": amqp}
    with magasin_running(env, tmp_path / "magasin.log", topology=str(topology)):
        stored = anyio.run(append_events, dsn, EVENTS)
        duplicates = anyio.run(duplicate_some, dsn, amqp, 0.1, 7)
        assert duplicates > 0

        def verify() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "runtime.cli", "audit", "verify"],
                cwd=ROOT,
                env=clean_env(**env),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        deadline = time.monotonic() + 120
        while (result := verify()).returncode != 0:
            assert time.monotonic() < deadline, result.stdout + result.stderr
            time.sleep(1)
    assert stored >= EVENTS
    assert "coverage: 100.00 %" in result.stdout
    assert f"({stored} of {stored} stored events audited)" in result.stdout
    assert "chain: intact" in result.stdout
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM audit_log WHERE kind = 'event'"
        ).fetchone()
    assert row == (stored, stored)
