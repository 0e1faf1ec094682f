"""SIGKILL of a real `magasin run` process while it relays, then a restart: every event
committed before, during and after the kills reaches the bus (duplicates allowed)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from runtime.store.postgres import PostgresEventStore
from tests.contracts.runtime import wait_until
from tests.contracts.store import drain, ledger, new
from tests.integration.test_cli_runtime import ROOT, Runtime, clean_env, free_port, wait_ready
from tests.integration.test_relay import Sink
from tests.support.ledger import Deposited, Opened

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SEED = int(os.environ.get("MAGASIN_CHAOS_SEED", "20261124"))
KILLS = 6 if os.environ.get("MAGASIN_CHAOS_LONG") else 3


def start(topology: Path, log: Path, port: int) -> Runtime:
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", str(topology)],
            cwd=ROOT,
            env=clean_env(MAGASIN_HTTP_PORT=str(port)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Runtime(process, f"http://127.0.0.1:{port}", log)


async def test_sigkill_between_commit_and_publish_loses_no_event(
    tmp_path: Path, pg_dsn: str, amqp_url: str
) -> None:
    from runtime.bus.rabbitmq import RabbitMQBus  # noqa: PLC0415
    from runtime.topology import parse_topology  # noqa: PLC0415

    print(f"chaos seed {SEED}")
    rng = random.Random(SEED)
    stream = f"ledger.{uuid.uuid4().hex[:8]}"  # the vhost outlives the test's database
    text = f"""
database_url: "{pg_dsn}"
amqp_url: "{amqp_url}"
exchanges: [{stream}]
domains: {{ledger: {stream}}}
defaults:
  restart: {{min_backoff: 50ms, max_backoff: 300ms}}
actors:
  relay: {{kind: relay, options: {{batch_size: 50}}}}
  gateway: {{kind: gateway}}
"""
    topology_file = tmp_path / "topology.yaml"
    topology_file.write_text(text)
    topology = parse_topology(text, check_handlers=False)
    store = await PostgresEventStore.connect(pg_dsn, schema="public")
    bus = await RabbitMQBus.connect(amqp_url, name=f"sigkill-{uuid.uuid4().hex[:6]}")
    sink = Sink(bus)
    await sink.declare(topology)
    log = tmp_path / "magasin.log"
    runtime: Runtime | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.run)
            writing = True

            async def writer() -> None:
                while writing:
                    stream = ledger()
                    await store.append(
                        stream, [new(Opened("k")), *[new(Deposited(i)) for i in range(1, 5)]], 0
                    )
                    await anyio.sleep(0.005)

            tg.start_soon(writer)
            for kill in range(KILLS):
                runtime = start(topology_file, log, free_port())
                await anyio.to_thread.run_sync(wait_ready, runtime)
                await anyio.sleep(rng.uniform(0.3, 1.5))
                runtime.process.send_signal(signal.SIGKILL)
                assert runtime.process.wait(timeout=10) == -signal.SIGKILL, f"kill {kill}"
            runtime = start(topology_file, log, free_port())
            await anyio.to_thread.run_sync(wait_ready, runtime)
            writing = False
            await anyio.sleep(0.2)
            expected = {r.event_id for r in await drain(store)}
            await wait_until(lambda: set(sink.received) >= expected, within=60)
            tg.cancel_scope.cancel()
        duplicates = len(sink.received) - len(set(sink.received))
        print(f"{len(expected)} events, {KILLS} SIGKILLs, {duplicates} duplicate entries")
        assert expected
        assert duplicates == 0, "a restarted relay wrote entries the stream already held"
    finally:
        if runtime is not None and runtime.process.poll() is None:
            runtime.process.kill()
            runtime.process.wait(timeout=10)
        await bus.close()
        await store.close()
