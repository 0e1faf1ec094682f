"""Three `magasin run` processes on one database and one broker, SIGKILLed one at a time
while events are appended: the projection reading the domain stream ends equal to the fold
of the store, every event's effect applied once, each aggregate's events in order.

One process at a time holds each lease (the relay's, the projection's stream reader's); the
others stand by and take over when the holder dies. The kills are seeded
(``MAGASIN_CHAOS_SEED``); ``make chaos`` kills more often."""

from __future__ import annotations

import os
import random
import signal
import uuid
from pathlib import Path

import anyio
import pytest

from runtime.store.postgres import PostgresEventStore
from tests.contracts.store import drain, ledger, new
from tests.integration.test_cli_runtime import Runtime, free_port, wait_ready
from tests.integration.test_flow_faults import fold, read_models
from tests.integration.test_relay_sigkill import start
from tests.support.ledger import Deposited, Opened, Withdrawn

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SEED = int(os.environ.get("MAGASIN_CHAOS_SEED", "20261206"))
LONG = bool(os.environ.get("MAGASIN_CHAOS_LONG"))
KILLS = 9 if LONG else 3
PROCESSES = 3


async def test_three_processes_killed_in_turn_apply_every_event_once_in_order(
    tmp_path: Path, pg_dsn: str, pg_schema: str, amqp_url: str
) -> None:
    print(f"chaos seed {SEED}")
    rng = random.Random(SEED)
    stream = f"ledger.{uuid.uuid4().hex[:8]}"  # the vhost outlives the test's database
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        f"""
database_url: "{pg_dsn}"
amqp_url: "{amqp_url}"
exchanges: [{stream}]
domains: {{ledger: {stream}}}
defaults:
  restart: {{min_backoff: 50ms, max_backoff: 300ms}}
  retry: {{delays: [100ms, 300ms], max_attempts: 10}}
actors:
  relay: {{kind: relay, options: {{batch_size: 100}}}}
  balances:
    kind: projection
    handler: tests.support.projections:LedgerBalances
    queue: balances.{stream}
    bind: {{{stream}: ["ledger.#"]}}
    consumers: 2
    batch_size: 64
    options: {{schema: {pg_schema}}}
  gateway: {{kind: gateway}}
""",
        encoding="utf-8",
    )
    store = await PostgresEventStore.connect(pg_dsn, schema="public")
    runtimes: list[Runtime] = []
    try:
        for index in range(PROCESSES):
            runtimes.append(start(topology, tmp_path / f"magasin-{index}-0.log", free_port()))
        for runtime in runtimes:
            await anyio.to_thread.run_sync(wait_ready, runtime)
        writing = True
        written = 0
        mine: set[str] = set()  # the session's database holds other tests' ledgers too
        takeovers = 0
        reader = f"lease stream:balances:{stream} acquired"

        async def writer() -> None:
            nonlocal written
            while writing:
                account = ledger()
                mine.add(account.aggregate_id)
                events = [new(Opened("o")), *[new(Deposited(rng.randint(1, 9))) for _ in range(3)]]
                events.append(new(Withdrawn(1)))
                for version, event in enumerate(events):  # one append each: interleaved
                    await store.append(account, [event], version)
                    written += 1
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            for kill in range(KILLS):
                await anyio.sleep(rng.uniform(0.5, 1.5))
                # every other kill hits the stream reader, so a standby must take over
                holders = [i for i, r in enumerate(runtimes) if reader in r.output()]
                index = holders[0] if kill % 2 == 0 and holders else rng.randrange(PROCESSES)
                victim = runtimes[index]
                victim.process.send_signal(signal.SIGKILL)
                assert victim.process.wait(timeout=10) == -signal.SIGKILL, f"kill {kill}"
                takeovers += index in holders
                log = tmp_path / f"magasin-{index}-{kill + 1}.log"
                runtimes[index] = start(topology, log, free_port())
                await anyio.to_thread.run_sync(wait_ready, runtimes[index])
            writing = False
        records = [r for r in await drain(store) if r.aggregate_id in mine]
        expected = fold(records)

        async def caught_up() -> bool:
            docs = await read_models(pg_dsn, pg_schema, "accounts")
            return all(docs.get(k, {}).get("version") == v["version"] for k, v in expected.items())

        with anyio.fail_after(120):
            while not await caught_up():  # noqa: ASYNC110 - polling the database
                await anyio.sleep(0.3)
    finally:
        for runtime in runtimes:
            if runtime.process.poll() is None:
                runtime.process.kill()
                runtime.process.wait(timeout=10)
        await store.close()
    docs = {
        k: v for k, v in (await read_models(pg_dsn, pg_schema, "accounts")).items() if k in mine
    }
    ids = {str(r.event_id) for r in records}
    applied = {
        k: v for k, v in (await read_models(pg_dsn, pg_schema, "applied")).items() if k in ids
    }
    print(
        f"{len(records)} events, {KILLS} SIGKILLs among {PROCESSES} processes, "
        f"{takeovers} of the stream reader"
    )
    assert takeovers >= KILLS // 2, "the stream reader was not killed: no takeover tried"
    assert len(records) == written > 0
    assert docs == expected, "the read model is not the fold of the store"
    assert len(applied) == len(records), "an event's effect is missing"
    assert {doc["count"] for doc in applied.values()} == {1}, "an effect was applied twice"
