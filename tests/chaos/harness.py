"""What the chaos drills share: `magasin run` as a subprocess (always killed in the end), the
`magasin` CLI, a paced publisher on the real RabbitMQ, and a readiness prober.

Every drill has its own queues and routing-key prefix in the session's vhost, so drills never
see each other's messages and a rerun starts from nothing.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from runtime.bus.protocol import X_ORDERING_KEY
from runtime.bus.rabbitmq import RabbitMQBus
from tests.support.durable import Record, read_records, task
from tests.support.process import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
EXCHANGE = "saga.events"  # the drills exercise the queue path (domain exchanges are streams)
LONG = os.environ.get("MAGASIN_CHAOS_LONG", "") not in {"", "0"}
STARTUP_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0

# Short ladders and backoffs: a drill waits on them.
DEFAULTS = """\
defaults:
  restart: {min_backoff: 100ms, max_backoff: 500ms, max_restarts: 1000, window: 60s}
  retry: {delays: [200ms, 500ms], max_attempts: 3, handler_timeout: 5s}
"""


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def poll_until(
    check: Callable[[], bool | Awaitable[bool]], *, within: float, every: float = 0.05
) -> bool:
    """Whether ``check`` came true within ``within`` seconds, asking every ``every``."""
    with anyio.move_on_after(within):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return True
            await anyio.sleep(every)
    return False


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step: a SIGHUP never reads a half-written topology."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


# --- the runtime ------------------------------------------------------------------------------


@dataclass
class Runtime:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            return await client.get(path)

    async def actors(self) -> dict[str, dict[str, Any]]:
        response = await self.get("/actors")
        assert response.status_code == 200, response.text
        return {actor["name"]: actor for actor in response.json()}

    async def ready(self) -> bool:
        try:
            return (await self.get("/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, within: float = STARTUP_TIMEOUT) -> None:
        async def ready_or_exited() -> bool:
            return self.process.poll() is not None or await self.ready()

        if not await poll_until(ready_or_exited, within=within) or self.process.poll() is not None:
            raise AssertionError(
                f"magasin run not ready within {within}s (exit code {self.process.poll()}):\n"
                f"{self.output()}"
            )

    async def wait_exit(self, within: float) -> int:
        if not await poll_until(lambda: self.process.poll() is not None, within=within, every=0.02):
            raise AssertionError(f"magasin run still running after {within}s:\n{self.output()}")
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL (if still running) and reap: no process outlives its drill."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@contextmanager
def magasin_run(topology: Path, amqp_url: str, *, port: int | None = None) -> Iterator[Runtime]:
    """``magasin run topology`` on the real RabbitMQ (embedded store), killed at the end."""
    port = port or free_port()
    log = topology.parent / f"magasin-{port}-{time.monotonic_ns()}.log"
    env = clean_env(MAGASIN_AMQP_URL=amqp_url, MAGASIN_HTTP_PORT=str(port))
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", str(topology)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    runtime = Runtime(process, f"http://127.0.0.1:{port}", log)
    try:
        yield runtime
    finally:
        runtime.kill()


async def magasin(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``magasin`` CLI as a user does (from the project root), off the event loop."""
    run = functools.partial(
        subprocess.run,
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(**(env or {})),
        timeout=CLI_TIMEOUT,
        check=False,
    )
    return await anyio.to_thread.run_sync(run)


# --- publishing -------------------------------------------------------------------------------


@asynccontextmanager
async def publisher(amqp_url: str) -> AsyncIterator[RabbitMQBus]:
    bus = await RabbitMQBus.connect(amqp_url, name=unique("drill-publisher-"))
    try:
        yield bus
    finally:
        await bus.close()


def message_id(key: str, seq: int) -> str:
    return f"{key}-{seq}"


async def publish(
    bus: RabbitMQBus, prefix: str, key: str, seq: int, do: str = "ok"
) -> tuple[str, int]:
    await bus.publish(
        EXCHANGE,
        f"{prefix}.{key}",
        task(key, seq, do),
        message_id=message_id(key, seq),
        headers={X_ORDERING_KEY: key},
    )
    return key, seq


@dataclass
class Stream:
    """A paced stream of messages over ``keys`` ordering keys (``seq`` counts per stream)."""

    bus: RabbitMQBus
    prefix: str
    rate: float  # messages per second
    keys: int = 8
    sent: list[tuple[str, int]] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, count: int | None = None) -> None:
        """Publish ``count`` messages (or until ``stop`` is set) at ``rate``."""
        started = anyio.current_time()
        seq = 0
        while (count is None or seq < count) and not self.stop.is_set():
            self.sent.append(await publish(self.bus, self.prefix, f"k{seq % self.keys}", seq))
            seq += 1
            await anyio.sleep(max(0.0, started + seq / self.rate - anyio.current_time()))


# --- evidence ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a recorder's file says about a set of expected messages."""

    records: list[Record]
    expected: set[tuple[str, int]]

    @property
    def counts(self) -> Counter[tuple[str, int]]:
        return Counter((r.key, r.seq) for r in self.records)

    @property
    def missing(self) -> set[tuple[str, int]]:
        return self.expected - set(self.counts)

    @property
    def duplicates(self) -> int:
        """Extra handlings: lines beyond the first of each message."""
        return sum(n - 1 for n in self.counts.values())

    @property
    def unexpected(self) -> set[tuple[str, int]]:
        return set(self.counts) - self.expected

    def out_of_order(self) -> int:
        """Messages recorded before an earlier message of their key (first handlings only)."""
        last: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        late = 0
        for r in self.records:
            if (r.key, r.seq) in seen:
                continue
            seen.add((r.key, r.seq))
            if r.seq < last.get(r.key, -1):
                late += 1
            last[r.key] = max(r.seq, last.get(r.key, -1))
        return late


async def wait_recorded(
    path: Path, expected: Iterable[tuple[str, int]], within: float, runtime: Runtime
) -> Tally:
    """Wait until every expected message is in the file (then a little longer, so late
    duplicates show up too); fail with what is missing."""
    wanted = set(expected)

    def complete() -> bool:
        return runtime.process.poll() is not None or not Tally(read_records(path), wanted).missing

    await poll_until(complete, within=within, every=0.1)
    await anyio.sleep(0.5)
    tally = Tally(read_records(path), wanted)
    assert not tally.missing, (
        f"{len(tally.missing)} of {len(wanted)} message(s) never handled in {path.name}, "
        f"e.g. {sorted(tally.missing)[:5]}\n{runtime.output()[-4000:]}"
    )
    return tally


@dataclass
class ReadinessProbe:
    """Polls /health/ready every ``interval``; the answers, with their times."""

    runtime: Runtime
    interval: float = 0.05
    # (unix time, HTTP status or None when nothing answered), comparable with records' times
    answers: list[tuple[float, int | None]] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)  # each answer's body ("" for none)

    async def run(self) -> None:
        # a fresh connection per poll: a keep-alive one waits ~40 ms per answer (see the
        # TCP_NODELAY drill in test_drills.py), which is not "polling fast"
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=self.runtime.url, timeout=1.0, limits=fresh
        ) as client:
            while True:
                try:
                    response = await client.get("/health/ready")
                except httpx.TransportError:
                    status, body = None, ""
                else:
                    status, body = response.status_code, response.text
                self.answers.append((time.time(), status))
                self.bodies.append(body)
                if status is None and self.runtime.process.poll() is not None:
                    return
                await anyio.sleep(self.interval)

    def longest_unready(self) -> float:
        """The longest stretch, in seconds, without a 200 between two 200s (or the end)."""
        longest = 0.0
        since: float | None = None
        for at, status in self.answers:
            if status == 200:
                if since is not None:
                    longest = max(longest, at - since)
                since = None
            elif since is None:
                since = at
        if since is not None and self.answers:
            longest = max(longest, self.answers[-1][0] - since)
        return longest
