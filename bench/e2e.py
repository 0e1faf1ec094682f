"""End-to-end benchmark: HTTP commands against `magasin run topology.yaml` on the real services.

Run with ``python -m bench.e2e`` (``make bench`` runs it). It starts ``magasin run`` on the
default topology (every actor of it) in a subprocess, on a throw-away database and RabbitMQ
virtual host ``magasin_bench_<random>`` (both removed at the end), then drives it with
``--clients`` concurrent HTTP clients (httpx, keep-alive), each looping over one complaint's
create → assign → resolve for ``--seconds``, after ``--warmup`` unmeasured seconds.
``--processes N`` starts N runtimes on the same database and vhost (competing consumers, one
relay leading), each with its own gateway, and spreads the clients over them.

Figures: commands/s (each is one HTTP request, one aggregate decision, one event appended),
p50/p95/p99 command latency, the time until the complaint list shows the resolution (a GET
with ``min_position`` of the resolve's answer, issued right after it: the read-your-writes
wait), how long after the load stops every complaint is at its latest version in the three
projections (read from PostgreSQL: each projection's recorded version of each complaint
against the store's), and the runtime's RSS (sampled from /proc). The raw limit beside it:
the same number of appends through ``PostgresEventStore`` alone from this process (no HTTP,
no bus), measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.common import Database, Vhost, load_average, progress
from runtime.store.postgres import PostgresEventStore
from tests.support.complaints import write_complaints

ROOT = Path(__file__).resolve().parents[1]
AMQP_BASE = os.environ.get("MAGASIN_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = {
    "store_id": "store-042",
    "customer": {"id": "c-1", "name": "Ana Silva", "email": "ana@example.com"},
    "order_id": "o-981",
    "category": "damaged_product",
    "description": "Box arrived crushed",
    "priority": "normal",
}


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


class Run:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.visible: list[float] = []
        self.errors: dict[str, int] = {}
        self.commands = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def client(http: httpx.AsyncClient, until: float, run: Run | None) -> None:
    clock = time.perf_counter
    while clock() < until:
        steps = [
            ("/complaints", BODY),
            ("/complaints/{id}/assign", {"assignee": "agent-7"}),
            ("/complaints/{id}/resolve", {"resolution": "refund"}),
        ]
        complaint_id = ""
        position = 0
        for path, body in steps:
            started = clock()
            answer = await http.post(path.format(id=complaint_id), json=body)
            if answer.status_code not in (200, 201):
                if run is not None:
                    run.error(f"{path.split('/')[-1]} {answer.status_code}")
                break
            if run is not None:
                run.latencies.append(clock() - started)
                run.commands += 1
            complaint_id = answer.json()["id"]
            position = answer.json()["position"]
        else:
            started = clock()
            seen = await http.get(f"/complaints/{complaint_id}", params={"min_position": position})
            if run is not None:
                if seen.status_code == 200 and seen.json()["status"] == "resolved":
                    run.visible.append(clock() - started)
                else:
                    run.error(f"visible {seen.status_code}")


async def drive(urls: Sequence[str], clients: int, seconds: float, run: Run | None) -> float:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    https = [httpx.AsyncClient(base_url=url, timeout=30, limits=limits) for url in urls]
    try:
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(client(https[n % len(https)], until, run) for n in range(clients)))
        return time.perf_counter() - started
    finally:
        for http in https:
            await http.aclose()


async def raw_appends(dsn: str, complaints: int) -> float:
    """The same decisions and appends, from this process, straight to the store."""
    store = await PostgresEventStore.connect(dsn, schema="bench_raw")
    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(write_complaints(store, complaints // 32, seed=n) for n in range(32))
        )
        elapsed = time.perf_counter() - started
        events = len(await store.read_all(limit=1_000_000))
        return events / elapsed
    finally:
        await store.close()


def start(dsn: str, amqp_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env |= {
        "MAGASIN_DATABASE_URL": dsn,
        "MAGASIN_AMQP_URL": amqp_url,
        "MAGASIN_HTTP_PORT": str(port),
        "MAGASIN_LOG_LEVEL": "WARNING",
    }
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", "topology.yaml"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"magasin run exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"magasin run not ready within 60 s:\n{log.read_text(errors='replace')}")


PROJECTIONS = ("complaints", "workload", "store-stats")  # their read-model namespaces
BEHIND = """
SELECT count(*) FROM (
  SELECT aggregate_id, max(version) AS version FROM event_store
   WHERE aggregate_type = 'complaint' GROUP BY aggregate_id) AS e
 CROSS JOIN unnest(%s::text[]) AS p (projection)
 LEFT JOIN projection_versions AS v
   ON v.projection = p.projection AND v.aggregate_id = e.aggregate_id
 WHERE coalesce(v.version, 0) < e.version"""


async def caught_up_after(dsn: str, within: float) -> tuple[float, int]:
    """Seconds until every complaint is at its latest version in the three projections
    (and how many (complaint, projection) pairs were behind when the load stopped)."""
    import psycopg  # noqa: PLC0415

    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        first: int | None = None
        while True:
            cur = await conn.execute(BEHIND, (list(PROJECTIONS),))
            row = await cur.fetchone()
            behind = int(row[0]) if row else 0
            first = behind if first is None else first
            elapsed = time.perf_counter() - started
            if behind == 0 or elapsed > within:
                return (elapsed if behind == 0 else float("inf")), first
            await asyncio.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=1, help="runtimes sharing the queues")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    database = Database(args.admin_url)
    vhost = Vhost(AMQP_BASE, database.name)
    dsn = database.create()
    log = Path(f"/tmp/{database.name}.log")  # every runtime appends to it
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        amqp_url = vhost.create()
        for _ in range(args.processes):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            processes.append(start(dsn, amqp_url, port, log))
            wait_ready(urls[-1], processes[-1], log)
        progress(f"warm-up {args.warmup:g} s")
        asyncio.run(drive(urls, args.clients, args.warmup, None))
        progress(f"measuring {args.seconds:g} s with {args.clients} clients")
        run = Run()
        rss: list[float] = []

        async def measured() -> float:
            async def sample() -> None:
                while True:
                    rss.append(sum(rss_mib(p.pid) for p in processes))
                    await asyncio.sleep(0.5)

            sampler = asyncio.ensure_future(sample())
            try:
                return await drive(urls, args.clients, args.seconds, run)
            finally:
                sampler.cancel()

        elapsed = asyncio.run(measured())
        progress("waiting for the read models to show every complaint's latest version")
        caught_up, behind_at_stop = asyncio.run(caught_up_after(dsn, 120.0))
        progress("raw limit: the same appends straight to PostgreSQL")
        raw = asyncio.run(raw_appends(dsn, max(64, run.commands // 3)))
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
        vhost.delete()
        database.drop()
    rate = run.commands / elapsed
    print(f"{'figure':<52}{'value':>12}")
    print("-" * 64)
    print(f"{'commands/s (create, assign, resolve over HTTP)':<52}{rate:>12,.0f}")
    for q in (0.5, 0.95, 0.99):
        label = f"command latency p{int(q * 100)} ms"
        print(f"{label:<52}{percentile(run.latencies, q):>12.1f}")
    for q in (0.5, 0.95, 0.99):
        label = f"resolved visible in the list, p{int(q * 100)} ms"
        print(f"{label:<52}{percentile(run.visible, q):>12.1f}")
    print(f"{'(complaint, projection) behind when the load stopped':<52}{behind_at_stop:>12,}")
    print(f"{'all three projections at the latest version after, s':<52}{caught_up:>12.2f}")
    print(f"{'runtime RSS (all processes), max MiB':<52}{max(rss, default=float('nan')):>12.0f}")
    print(f"{'raw limit: decide + append from one process, ev/s':<52}{raw:>12,.0f}")
    print("-" * 64)
    print(
        f"errors: {run.errors or 'none'}; {args.clients} clients, {args.seconds:g} s measured, "
        f"{args.processes} runtime process(es)"
    )
    print(f"load average at the end {load_average()}; runtime log {log} (kept on error only)")
    if not run.errors:
        log.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
