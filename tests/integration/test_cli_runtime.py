"""`magasin run`, `status` and `chaos` as a user runs them, on the embedded backends.

Each test starts `magasin run` in a subprocess on a topology of its own (a test subscriber or
service plus the gateway) and a free port, and kills it in the end whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.bus.rabbitmq import RabbitMQBus
from runtime.store.postgres import PostgresEventStore
from runtime.store.protocol import ParkedKey
from runtime.topology import load_topology
from tests.support.process import clean_env, free_port
from tests.support.rabbitmq import amqp_url, rabbitmq_vhost  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
GRACE_PERIOD = 5.0

RECORDER = "  recorder:\n    kind: subscriber\n    handler: tests.support.handlers:Recorder\n"
IDLER = "  idler:\n    kind: service\n    handler: tests.support.handlers:Idle\n"
STUBBORN = "  stubborn:\n    kind: service\n    handler: tests.support.handlers:Stubborn\n"


@dataclass
class Runtime:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def write_topology(tmp_path: Path, actor: str, *, admin: bool = False) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(
        f"admin: {str(admin).lower()}\n"
        f"grace_period: {GRACE_PERIOD:g}s\n"
        f"actors:\n{actor}  gateway:\n    kind: gateway\n",
        encoding="utf-8",
    )
    return path


def magasin(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        env=clean_env(**(env or {})),
        timeout=60,
        check=False,
    )


def wait_ready(runtime: Runtime) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if runtime.process.poll() is not None:
            raise AssertionError(
                f"magasin run exited with {runtime.process.returncode}:\n{runtime.output()}"
            )
        try:
            if httpx.get(f"{runtime.url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready within {STARTUP_TIMEOUT}s:\n{runtime.output()}")


@contextmanager
def magasin_run(tmp_path: Path, actor: str, *, admin: bool = False) -> Iterator[Runtime]:
    """`magasin run` on a topology of ``actor`` and the gateway, ready; killed at the end."""
    port = free_port()
    topology = write_topology(tmp_path, actor, admin=admin)
    log = tmp_path / "magasin.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", str(topology)],
            cwd=ROOT,
            env=clean_env(MAGASIN_HTTP_PORT=str(port)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    runtime = Runtime(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(runtime)
        yield runtime
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def exit_code(runtime: Runtime, timeout: float) -> int:
    try:
        return runtime.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"magasin run still running after {timeout}s:\n{runtime.output()}"
        ) from None


def test_run_serves_status_until_sigterm_drains_it_to_exit_0(tmp_path: Path) -> None:
    with magasin_run(tmp_path, RECORDER) as runtime:
        actors = httpx.get(f"{runtime.url}/actors", timeout=5).json()
        status = magasin("status", "--url", runtime.url)
        status_json = magasin("status", "--json", "--url", runtime.url)
        chaos = magasin("chaos", "--seed", "1", "--duration", "1s", "--url", runtime.url)

        runtime.process.send_signal(signal.SIGTERM)
        code = exit_code(runtime, GRACE_PERIOD + 10)

    assert [(a["name"], a["state"]) for a in actors] == [
        ("recorder", "running"),
        ("gateway", "running"),
    ]
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].split()[:4] == ["ACTOR", "KIND", "STATE", "RESTARTS"]
    assert "recorder  subscriber  running" in status.stdout
    assert status.stdout.rstrip().endswith(f"runtime at {runtime.url}: ready")
    assert json.loads(status_json.stdout)["ready"] is True
    assert chaos.returncode == 1  # admin is off
    assert chaos.stdout.startswith("chaos seed 1\n")
    assert "`admin: true`" in chaos.stderr
    assert code == 0, runtime.output()


def test_a_second_sigint_exits_at_once_while_draining_hangs(tmp_path: Path) -> None:
    with magasin_run(tmp_path, STUBBORN) as runtime:
        runtime.process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        still_draining = runtime.process.poll() is None
        runtime.process.send_signal(signal.SIGINT)
        code = exit_code(runtime, 5)

    assert still_draining, runtime.output()
    assert code not in {0, None}


def test_chaos_crashes_the_named_actor_and_the_supervisor_restarts_it(tmp_path: Path) -> None:
    with magasin_run(tmp_path, IDLER, admin=True) as runtime:
        chaos = magasin(
            "chaos",
            "--seed",
            "3",
            "--duration",
            "2s",
            "--mean-interval",
            "300ms",
            "--actors",
            "idler",
            "--url",
            runtime.url,
        )
        idler = httpx.get(f"{runtime.url}/actors/idler", timeout=5).json()
        runtime.process.send_signal(signal.SIGTERM)
        exit_code(runtime, GRACE_PERIOD + 10)

    lines = chaos.stdout.splitlines()
    assert chaos.returncode == 0, chaos.stderr
    assert lines[0] == "chaos seed 3"
    assert any(line.endswith("crash idler: crashed") for line in lines)
    assert idler["restarts"] >= 1


def test_status_says_how_to_start_a_runtime_it_cannot_reach() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    status = magasin("status", "--url", url)

    assert status.returncode == 2
    assert url in status.stderr
    assert "magasin run" in status.stderr


# --- dead-letter queues on the real RabbitMQ -------------------------------------------------


async def dead_letter(url: str, topology_path: Path, queue: str, ids: list[str]) -> None:
    """Publish one message per id to ``queue`` and dead-letter each, as a failing actor does."""
    topology = load_topology(topology_path, env={"MAGASIN_AMQP_URL": url}, check_handlers=False)
    bus = await RabbitMQBus.connect(url, name="test-dead-letters")
    try:
        await bus.declare(topology.bus_plan())
        for message_id in ids:
            await bus.publish("", queue, b"{}", message_id=message_id)
        async with bus.consume(queue, prefetch=len(ids)) as deliveries:
            for _ in ids:
                delivery = await anext(deliveries)
                await bus.dead_letter(delivery, error=ValueError("no such complaint"), actor="t")
    finally:
        await bus.close()


@pytest.mark.integration
def test_dlq_lists_replays_and_purges_dead_letters(tmp_path: Path, amqp_url: str) -> None:  # noqa: F811
    topology = write_topology(tmp_path, RECORDER)
    anyio.run(dead_letter, amqp_url, topology, "recorder", ["m-1", "m-2", "m-3"])
    env = {"MAGASIN_AMQP_URL": amqp_url}
    where = ("--topology", str(topology))

    listed = magasin("dlq", "list", "recorder", *where, env=env)
    replayed = magasin("dlq", "replay", "recorder", "--id", "m-2", *where, env=env)
    missing = magasin("dlq", "replay", "recorder", "--id", "m-9", *where, env=env)
    kept = magasin("dlq", "purge", "recorder", *where, env=env, stdin="n\n")
    purged = magasin("dlq", "purge", "recorder", "--yes", *where, env=env)
    empty = magasin("dlq", "list", "recorder", *where, env=env)

    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].startswith("MESSAGE ID  ERROR TYPE  ERROR")
    assert sorted(row.split()[0] for row in rows[1:4]) == ["m-1", "m-2", "m-3"]
    assert all("ValueError  no such complaint  1" in row for row in rows[1:4])
    assert "3 dead letter(s) in recorder.dlq" in listed.stdout
    assert replayed.stdout.strip() == "replayed 1 message(s) from recorder.dlq to recorder"
    assert missing.returncode == 1
    assert "'m-9'" in missing.stderr
    assert kept.returncode == 1  # declined: nothing purged
    assert purged.stdout.strip() == "purged 2 message(s) from recorder.dlq"
    assert empty.stdout.strip() == "no dead letters in recorder.dlq"


def test_dlq_refuses_the_embedded_bus(tmp_path: Path) -> None:
    topology = write_topology(tmp_path, RECORDER)

    listed = magasin("dlq", "list", "recorder", "--topology", str(topology))

    assert listed.returncode == 2
    assert "keeps no dead letters across processes" in listed.stderr


async def park(dsn: str, parked: ParkedKey) -> None:
    store = await PostgresEventStore.connect(dsn)  # the runtime's store: the public schema
    try:
        await store.park(parked)
    finally:
        await store.close()


async def parked_keys(dsn: str, actor: str) -> list[ParkedKey]:
    store = await PostgresEventStore.connect(dsn)
    try:
        return await store.parked_keys(actor)
    finally:
        await store.close()


@pytest.mark.integration
def test_dlq_shows_the_aggregates_held_back_and_skips_a_blocker_on_purpose(
    tmp_path: Path,
    amqp_url: str,  # noqa: F811
    pg_dsn: str,
) -> None:
    actor = f"recorder{uuid.uuid4().hex[:6]}"
    topology = write_topology(tmp_path, RECORDER.replace("recorder:", f"{actor}:"))
    anyio.run(dead_letter, amqp_url, topology, actor, ["m-1", "m-2"])
    since = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
    anyio.run(park, pg_dsn, ParkedKey(actor, "c-42", "m-1", True, "RuntimeError: boom", since))
    env = {"MAGASIN_AMQP_URL": amqp_url, "MAGASIN_DATABASE_URL": pg_dsn}
    where = ("--topology", str(topology))

    listed = magasin("dlq", "list", actor, *where, env=env)
    skipped = magasin("dlq", "skip", actor, "--id", "m-1", *where, env=env)
    again = magasin("dlq", "skip", actor, "--id", "m-1", *where, env=env)
    after = magasin("dlq", "list", actor, *where, env=env)

    assert listed.returncode == 0, listed.stderr
    assert f"{actor}  c-42       m-1          dead-lettered  2026-12-06T09:30:00+00:00" in (
        listed.stdout
    )
    assert "1 aggregate(s) held back" in listed.stdout
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.splitlines() == [
        f"deleted 1 message(s) with id m-1 from {actor}.dlq",
        f"actor {actor}: aggregate c-42 no longer waits behind it",
        f"its parked events are in the DLQ: `magasin dlq replay {actor} --all`",
    ]
    assert anyio.run(parked_keys, pg_dsn, actor) == []
    assert again.returncode == 1
    assert "no dead letter with id 'm-1'" in again.stderr
    assert "held back" not in after.stdout
    assert [row.split()[0] for row in after.stdout.splitlines()[1:2]] == ["m-2"]
