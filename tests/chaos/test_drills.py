"""Process-level chaos drills: `magasin run` as a subprocess on the real RabbitMQ (embedded
store), its subscribers recording every handled message durably (tests/support/durable.py),
while the drill rescales it, crashes its actors, SIGKILLs it, feeds it poison or a crash loop.

Short by default (inside `make test`); `MAGASIN_CHAOS_LONG=1` (`make chaos`) runs the same
drills longer and with more messages. The chaos drill's seed comes from MAGASIN_CHAOS_SEED (or
a fixed default) and is printed, so a failure replays.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.chaos.harness import (
    DEFAULTS,
    EXCHANGE,
    LONG,
    ReadinessProbe,
    Runtime,
    Stream,
    Tally,
    magasin,
    magasin_run,
    message_id,
    poll_until,
    publish,
    publisher,
    unique,
    wait_recorded,
    write_atomically,
)
from tests.support.durable import read_records

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

RECORDER = "tests.support.durable:DurableRecorder"
LOOPER = "tests.support.durable:CrashLooper"
DEFAULT_SEED = 20240611


def subscriber(
    name: str,
    *,
    queue: str,
    prefix: str,
    options: dict[str, Any],
    handler: str = RECORDER,
    consumers: int = 1,
    prefetch: int = 16,
    restart: str | None = None,
    retry: str | None = None,
) -> str:
    lines = [
        f"  {name}:",
        "    kind: subscriber",
        f"    handler: {handler}",
        f"    queue: {queue}",
        f'    bind: {{{EXCHANGE}: ["{prefix}.#"]}}',
        f"    consumers: {consumers}",
        f"    prefetch: {prefetch}",
        f"    options: {json.dumps(options)}",  # JSON is YAML
    ]
    if restart:
        lines.append(f"    restart: {restart}")
    if retry:
        lines.append(f"    retry: {retry}")
    return "\n".join(lines) + "\n"


def topology(*actors: str, admin: bool = False) -> str:
    return (
        f"admin: {str(admin).lower()}\n"
        "grace_period: 5s\n"
        f"{DEFAULTS}"
        f"actors:\n{''.join(actors)}"
        "  gateway:\n    kind: gateway\n"
    )


async def wait_consumers(runtime: Runtime, actor: str, consumers: int, within: float) -> None:
    """Until GET /actors shows ``actor`` running with ``consumers`` workers."""
    seen: list[dict[str, Any] | None] = [None]

    async def scaled() -> bool:
        seen[0] = current = (await runtime.actors()).get(actor)
        return bool(current and current["state"] == "running" and current["consumers"] == consumers)

    if not await poll_until(scaled, within=within):
        raise AssertionError(
            f"{actor} never showed {consumers} consumer(s) within {within}s (last: {seen[0]})\n"
            f"{runtime.output()[-4000:]}"
        )


# --- 1. SIGHUP rescale ------------------------------------------------------------------------


async def test_sighup_rescales_a_subscriber_up_and_down_and_loses_or_repeats_nothing(
    tmp_path: Path, amqp_url: str
) -> None:
    prefix = unique("rescale")
    queue = f"drill.{prefix}"
    record = tmp_path / "sink.log"
    path = tmp_path / "topology.yaml"

    def text(consumers: int) -> str:
        return topology(
            subscriber(
                "sink",
                queue=queue,
                prefix=prefix,
                options={"path": str(record)},
                consumers=consumers,
            )
        )

    cycles = 5 if LONG else 1
    write_atomically(path, text(1))
    reloads: list[tuple[int, float]] = []
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        probe = ReadinessProbe(runtime)
        async with anyio.create_task_group() as probing:
            probing.start_soon(probe.run)
            async with publisher(amqp_url) as bus:
                stream = Stream(bus, prefix, rate=200)
                async with anyio.create_task_group() as publishing:
                    publishing.start_soon(stream.run)
                    for _ in range(cycles):
                        for consumers in (4, 1):
                            await anyio.sleep(1.0)  # messages flow at this scale first
                            write_atomically(path, text(consumers))
                            began = time.monotonic()
                            runtime.signal(signal.SIGHUP)
                            await wait_consumers(runtime, "sink", consumers, within=15)
                            reloads.append((consumers, time.monotonic() - began))
                    await anyio.sleep(1.0)
                    stream.stop.set()
            tally = await wait_recorded(record, stream.sent, 30, runtime)
            probing.cancel_scope.cancel()
        still_running = runtime.process.poll() is None
        log = runtime.output()

    longest_unready = probe.longest_unready()
    print(
        f"rescale drill: {len(stream.sent)} messages, {len(reloads)} reloads "
        f"({', '.join(f'->{n}: {s:.2f}s' for n, s in reloads)}), {tally.duplicates} duplicates, "
        f"{sum(r.redelivered for r in tally.records)} redelivered (requeued by a drain), "
        f"{tally.out_of_order()} out of per-key order, longest unready {longest_unready:.2f}s"
    )
    assert still_running, log
    assert "topology reloaded" in log
    assert tally.duplicates == 0, f"{tally.duplicates} duplicate(s) without any crash"
    assert not tally.unexpected
    assert {r.pid for r in tally.records} == {runtime.pid}  # one process did it all
    assert tally.out_of_order() == 0, "a key's messages were handled out of order"
    assert longest_unready < 2.0, f"unready for {longest_unready:.2f}s during a reload"


# --- 2. seeded chaos drill --------------------------------------------------------------------

SCHEDULE_LINE = re.compile(r"^\+\s*(\d+\.\d+)s\s+crash (\S+?)(?::\s+(.*))?$")


def schedule(output: str) -> list[tuple[str, str, str | None]]:
    """The (offset, actor, result) lines `magasin chaos` printed."""
    found = []
    for line in output.splitlines():
        if match := SCHEDULE_LINE.match(line):
            found.append((match.group(1), match.group(2), match.group(3)))
    return found


async def test_a_seeded_chaos_drill_loses_nothing_and_replays_from_its_seed(
    tmp_path: Path, amqp_url: str
) -> None:
    seed = int(os.environ.get("MAGASIN_CHAOS_SEED") or DEFAULT_SEED)
    print(f"chaos seed {seed} (replay with MAGASIN_CHAOS_SEED={seed})")
    duration, mean_interval, count = (60, 2.0, 5000) if LONG else (5, 0.7, 300)
    prefix = unique("chaos")
    consumers, prefetch = 2, 8
    files = {"audit": tmp_path / "audit.log", "notify": tmp_path / "notify.log"}
    path = tmp_path / "topology.yaml"
    write_atomically(
        path,
        topology(
            *(
                subscriber(
                    name,
                    queue=f"drill.{prefix}.{name}",
                    prefix=prefix,
                    options={"path": str(file)},
                    consumers=consumers,
                    prefetch=prefetch,
                )
                for name, file in files.items()
            ),
            admin=True,
        ),
    )
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        args = (
            *("chaos", "--seed", str(seed), "--duration", f"{duration}s"),
            *("--mean-interval", f"{mean_interval}s", "--url", runtime.url),
        )
        dry_runs = [await magasin(*args, "--dry-run") for _ in range(2)]
        async with publisher(amqp_url) as bus, anyio.create_task_group() as tg:
            stream = Stream(bus, prefix, rate=count / (duration * 0.8))
            tg.start_soon(stream.run, count)
            drill = await magasin(*args)
        tallies: dict[str, Tally] = {}
        for name, file in files.items():
            tallies[name] = await wait_recorded(file, stream.sent, 60 if LONG else 30, runtime)
        ready_at_end = await poll_until(runtime.ready, within=10, every=0.1)
        status = await magasin("status", "--url", runtime.url)
        log = runtime.output()

    assert drill.returncode == 0, drill.stdout + drill.stderr
    actions = schedule(drill.stdout)
    crashes = {name: 0 for name in files}
    for _, actor, result in actions:
        if result == "crashed":
            crashes[actor] += 1
    print(
        f"chaos drill (seed {seed}, {duration}s, mean interval {mean_interval}s): "
        f"{len(stream.sent)} messages to each of {', '.join(files)}; "
        f"{len(actions)} scheduled, crashes {crashes}; duplicates "
        f"{ {name: t.duplicates for name, t in tallies.items()} } "
        f"(bound: crashes x prefetch {prefetch}); redelivered "
        f"{ {name: sum(r.redelivered for r in t.records) for name, t in tallies.items()} }; "
        f"out of per-key order { {name: t.out_of_order() for name, t in tallies.items()} }"
    )
    # determinism: two dry runs print the same actions, and the live drill followed them
    assert [run.returncode for run in dry_runs] == [0, 0], dry_runs[0].stderr
    assert dry_runs[0].stdout == dry_runs[1].stdout
    assert dry_runs[0].stdout.startswith(f"chaos seed {seed}\n")
    assert [(offset, actor) for offset, actor, _ in actions] == [
        (offset, actor) for offset, actor, _ in schedule(dry_runs[0].stdout)
    ], f"seed {seed}: the live drill did not follow its dry run"
    assert sum(crashes.values()) >= 1, f"seed {seed} crashed nothing:\n{drill.stdout}"
    for name, tally in tallies.items():
        assert not tally.unexpected
        assert tally.duplicates <= crashes[name] * prefetch, (
            f"seed {seed}: {name} handled {tally.duplicates} message(s) twice after "
            f"{crashes[name]} crash(es) with prefetch {prefetch}"
        )
        for message, times in tally.counts.items():
            if times > 1:  # in flight at a crash: its next handlings are redeliveries
                handlings = [r for r in tally.records if (r.key, r.seq) == message]
                assert all(r.redelivered for r in handlings[1:]), (seed, name, handlings)
    assert ready_at_end, f"seed {seed}: not ready after the drill\n{log[-4000:]}"
    assert status.returncode == 0, status.stdout + status.stderr


# --- 3. SIGKILL mid-stream, then restart ------------------------------------------------------


async def test_sigkill_mid_stream_redelivers_the_unacked_to_the_next_process(
    tmp_path: Path, amqp_url: str
) -> None:
    count, rate = (4000, 300) if LONG else (600, 300)
    prefetch = 16
    prefix = unique("kill")
    record = tmp_path / "sink.log"
    path = tmp_path / "topology.yaml"
    # 2 workers x 10 ms per message: slower than the stream, so a backlog waits at the kill
    write_atomically(
        path,
        topology(
            subscriber(
                "sink",
                queue=f"drill.{prefix}",
                prefix=prefix,
                options={"path": str(record), "delay": 0.01},
                consumers=2,
                prefetch=prefetch,
            )
        ),
    )
    async with publisher(amqp_url) as bus, anyio.create_task_group() as tg:
        stream = Stream(bus, prefix, rate=rate)
        with magasin_run(path, amqp_url) as first:
            await first.wait_ready()
            tg.start_soon(stream.run, count)
            assert await poll_until(lambda: len(read_records(record)) >= count // 4, within=30)
            first.signal(signal.SIGKILL)
            killed = await first.wait_exit(10)
        at_kill = read_records(record)
        with magasin_run(path, amqp_url) as second:
            await second.wait_ready()
            # the stream went on while nothing consumed
            assert await poll_until(lambda: len(stream.sent) >= count, within=60)
            tally = await wait_recorded(record, stream.sent, 60, second)

    redelivered = [r for r in tally.records if r.pid == second.pid and r.redelivered]
    repeated = {message for message, n in tally.counts.items() if n > 1}
    print(
        f"SIGKILL drill: {count} messages, {len({(r.key, r.seq) for r in at_kill})} recorded "
        f"before the kill, {len(redelivered)} redelivered to the new process, "
        f"{tally.duplicates} duplicates (bound: prefetch {prefetch}), "
        f"{tally.out_of_order()} out of per-key order"
    )
    assert killed == -signal.SIGKILL
    assert len(at_kill) < count, "the kill came after the stream: nothing was in flight"
    assert {r.pid for r in tally.records} == {first.pid, second.pid}
    assert redelivered, "no message unacked at the kill came back to the new process"
    assert tally.duplicates <= prefetch
    assert not tally.unexpected
    for message in repeated:  # handled by the killed process, not acked, so handled again
        handlings = [r for r in tally.records if (r.key, r.seq) == message]
        assert handlings[0].pid == first.pid, handlings
        assert all(r.pid == second.pid and r.redelivered for r in handlings[1:]), handlings


# --- 4. a poison message: DLQ, list, replay ---------------------------------------------------


async def test_a_poison_message_is_dead_lettered_listed_and_replayed_while_others_flow(
    tmp_path: Path, amqp_url: str
) -> None:
    count = 1000 if LONG else 100
    prefix = unique("poison")
    queue = f"drill.{prefix}"
    record = tmp_path / "inbox.log"
    heal = tmp_path / "healed"
    path = tmp_path / "topology.yaml"
    write_atomically(
        path,
        topology(
            subscriber(
                "inbox",
                queue=queue,
                prefix=prefix,
                options={"path": str(record), "heal": str(heal)},
                consumers=2,
                prefetch=8,
            )
        ),
    )
    cli = {"MAGASIN_AMQP_URL": amqp_url}
    where = ("--topology", str(path))
    poison = ("poison", 0)
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        async with publisher(amqp_url) as bus:
            stream = Stream(bus, prefix, rate=100)
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.run, count)
                assert await poll_until(lambda: len(stream.sent) >= count // 3, within=30)
                await publish(bus, prefix, *poison, do="poison")
                poisoned_after = len(stream.sent)

            # the ladder: 3 attempts, 200 ms and 500 ms apart, then the DLQ
            async def dead_lettered() -> bool:
                return bool(await bus.list_dead_letters(queue))

            assert await poll_until(dead_lettered, within=20, every=0.2), runtime.output()
        tally = await wait_recorded(record, stream.sent, 30, runtime)
        listed = await magasin("dlq", "list", queue, *where, env=cli)
        heal.touch()  # the handler is fixed: the poison is handled on replay
        replayed = await magasin("dlq", "replay", queue, "--all", *where, env=cli)
        after = await wait_recorded(record, [*stream.sent, poison], 30, runtime)
        empty = await magasin("dlq", "list", queue, *where, env=cli)

    rows = [line.split() for line in listed.stdout.splitlines()]
    print(
        f"poison drill: {count} messages ({count - poisoned_after} after the poison) handled "
        f"once each; the poison dead-lettered, listed, replayed and handled"
    )
    assert listed.returncode == 0, listed.stderr
    assert rows[0][:3] == ["MESSAGE", "ID", "ERROR"]
    poison_rows = [row for row in rows if row and row[0] == message_id(*poison)]
    assert len(poison_rows) == 1, listed.stdout
    assert poison_rows[0][1] == "RuntimeError"
    assert "poison message poison/0" in listed.stdout
    assert poison_rows[0][-2] == "3"  # attempts
    assert f"1 dead letter(s) in {queue}.dlq" in listed.stdout
    assert poison not in tally.counts  # never handled before the replay
    assert tally.duplicates == 0
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed 1 message(s) from {queue}.dlq to {queue}"
    assert after.counts[poison] == 1
    assert after.duplicates == 0
    assert empty.stdout.strip() == f"no dead letters in {queue}.dlq"


# --- 5. a crash-looping actor escalates ------------------------------------------------------


def crash_loop_topology(tmp_path: Path, loop_prefix: str, steady_prefix: str, record: Path) -> Path:
    """``looper`` crashes on every message: a stuck handler overruns its 100 ms timeout, the
    message takes a retry rung, the actor restarts (at most 3 restarts in 60 s, 20 attempts per
    message so the DLQ does not end the loop first); ``steady`` records what it handles."""
    path = tmp_path / "topology.yaml"
    write_atomically(
        path,
        topology(
            subscriber(
                "looper",
                queue=f"drill.{loop_prefix}",
                prefix=loop_prefix,
                handler=LOOPER,
                options={},
                restart="{max_restarts: 3, window: 60s, min_backoff: 200ms, max_backoff: 1s}",
                retry="{handler_timeout: 100ms, max_attempts: 20}",
            ),
            subscriber(
                "steady",
                queue=f"drill.{steady_prefix}",
                prefix=steady_prefix,
                options={"path": str(record)},
            ),
        ),
    )
    return path


async def test_a_crash_looping_actor_makes_the_runtime_unready_then_exit_70(
    tmp_path: Path, amqp_url: str
) -> None:
    loop_prefix, steady_prefix = unique("loop"), unique("steady")
    record = tmp_path / "steady.log"
    path = crash_loop_topology(tmp_path, loop_prefix, steady_prefix, record)
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        probe = ReadinessProbe(runtime, interval=0.01)
        async with publisher(amqp_url) as bus, anyio.create_task_group() as tg:
            tg.start_soon(probe.run)
            stream = Stream(bus, steady_prefix, rate=100)
            tg.start_soon(stream.run)
            await anyio.sleep(0.5)
            looping_from = time.time()
            await publish(bus, loop_prefix, "loop", 0)
            code = await runtime.wait_exit(30)
            exited_at = time.time()
            stream.stop.set()
        log = runtime.output()

    answered = [(at, status) for at, status in probe.answers if status is not None]
    looping = [(at, status) for at, status in answered if at >= looping_from]
    unready = [at for at, status in looping if status == 503]
    records = read_records(record)
    during = [r for r in records if unready and unready[0] <= r.at <= exited_at]
    print(
        f"crash-loop drill: exit {code} {exited_at - looping_from:.2f}s after the first crash; "
        f"{len(unready)} of {len(looping)} answers since then unready, the last "
        f"{exited_at - unready[-1] if unready else float('nan'):.3f}s before the exit; the "
        f"sibling handled {len(during)} message(s) meanwhile, {len(records)} in all"
    )
    assert code == 70, log[-4000:]
    assert re.search(r"actor 'looper' restarted 4 times within 60s", log), log[-4000:]
    assert unready, "never saw /health/ready answer 503 while the actor crash-looped"
    # Unready while it restarts, and from the escalation to the exit: the supervisor
    # lingers (escalation_linger) so probes see the 503 before the gateway goes.
    assert unready[-1] >= exited_at - 1.5, "no 503 in the last 1.5 s before the exit"
    assert during, "the sibling handled nothing while its neighbour crash-looped"
    assert any(r.at >= exited_at - 1.0 for r in records), "the sibling stopped before the end"
    assert not any(r.redelivered for r in records)  # the sibling never crashed
    assert {r.pid for r in records} == {runtime.pid}


async def test_liveness_answers_503_between_an_escalation_and_the_exit(
    tmp_path: Path, amqp_url: str
) -> None:
    loop_prefix = unique("loop")
    path = crash_loop_topology(tmp_path, loop_prefix, unique("steady"), tmp_path / "steady.log")
    answers: list[tuple[int, str]] = []
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        async with publisher(amqp_url) as bus:
            await publish(bus, loop_prefix, "loop", 0)
        fresh = httpx.Limits(max_keepalive_connections=0)  # fast polls (see the next drill)
        async with httpx.AsyncClient(base_url=runtime.url, timeout=1.0, limits=fresh) as client:
            with anyio.move_on_after(30):
                while runtime.process.poll() is None:
                    try:
                        response = await client.get("/health/live")
                    except httpx.TransportError:
                        pass
                    else:
                        answers.append((response.status_code, response.text))
                    await anyio.sleep(0.002)
        code = await runtime.wait_exit(5)

    print(f"liveness answers: {dict(Counter(status for status, _ in answers))}, exit {code}")
    assert code == 70
    assert any(status == 503 and "escalated" in body for status, body in answers), (
        f"{len(answers)} answers to GET /health/live, none of them 503 before exit {code}"
    )


async def test_the_gateway_answers_a_keep_alive_client_without_a_nagle_delay(
    tmp_path: Path, amqp_url: str
) -> None:
    path = tmp_path / "topology.yaml"
    write_atomically(path, "actors:\n  gateway:\n    kind: gateway\n")
    times: list[float] = []
    with magasin_run(path, amqp_url) as runtime:
        await runtime.wait_ready()
        async with httpx.AsyncClient(base_url=runtime.url, timeout=2.0) as client:
            await client.get("/health/live")  # the connection every request below reuses
            for _ in range(20):
                began = time.perf_counter()
                response = await client.get("/health/live")
                times.append(time.perf_counter() - began)
                assert response.status_code == 200

    median = statistics.median(times)
    print(f"keep-alive GET /health/live: median {median * 1000:.1f} ms over {len(times)}")
    assert median < 0.02, f"median answer {median * 1000:.1f} ms on a reused connection"
