"""The ``magasin`` command line."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import click

from runtime.cli_support import importable_cwd, load_or_exit, run_or_exit
from runtime.observability.logging import configure_logging

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import httpx

    from runtime.bus.protocol import Bus
    from runtime.store.protocol import ParkedKey
    from runtime.topology import Topology

_T = TypeVar("_T")

DATABASE_URL_ENV = "MAGASIN_DATABASE_URL"
#: Entry-point group through which installed packages add commands (``magasin saga`` comes
#: from ``actors``): the runtime stays generic and never imports the application.
COMMANDS_GROUP = "magasin.commands"


class _Magasin(click.Group):
    """The runtime's commands, and those of ``magasin.commands`` entry points, each loaded
    only when named (or when help lists them), so a command does not pay for the others'
    imports."""

    def _plugins(self) -> dict[str, EntryPoint]:
        from importlib.metadata import entry_points  # noqa: PLC0415

        return {
            e.name: e for e in entry_points(group=COMMANDS_GROUP) if e.name not in self.commands
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._plugins()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        entry = None if command is not None else self._plugins().get(name)
        if entry is None:
            return command
        try:
            loaded = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            click.echo(f"warning: cannot load command {name!r} ({entry.value}): {exc}", err=True)
            return None
        self.add_command(loaded, name)
        return self.commands[name]


@click.group(cls=_Magasin)
@click.option("--log-level", default="INFO", show_default=True, envvar="MAGASIN_LOG_LEVEL")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="MAGASIN_LOG_FORMAT",
)
def main(log_level: str, log_format: str) -> None:
    """magasin: an actor runtime for an event-sourced complaint-handling backend."""
    configure_logging(log_level, log_format)


@main.group()
def db() -> None:
    """Event store administration."""


@db.command("migrate")
@click.option("--database-url", envvar=DATABASE_URL_ENV, help="PostgreSQL URL.")
@click.option("--schema", default="public", show_default=True)
def db_migrate(database_url: str | None, schema: str) -> None:
    """Create or upgrade the event store schema (idempotent, safe to run concurrently)."""
    if not database_url:
        click.echo(
            f"error: set {DATABASE_URL_ENV} (or --database-url) to a PostgreSQL URL; "
            "the embedded in-memory store needs no migration",
            err=True,
        )
        sys.exit(2)

    async def go() -> None:
        import psycopg  # noqa: PLC0415

        from runtime.store.migrate import migrate  # noqa: PLC0415
        from runtime.store.postgres import connection_string, describe_dsn  # noqa: PLC0415

        conninfo = connection_string(database_url, schema=schema)
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo)
        except psycopg.OperationalError as exc:
            from runtime.errors import StoreUnavailableError  # noqa: PLC0415

            raise StoreUnavailableError(describe_dsn(database_url), exc) from exc
        async with conn:
            applied = await migrate(conn, schema)
        click.echo(
            f"schema {schema!r} is up to date"
            + (f"; applied {', '.join(applied)}" if applied else "; nothing to apply")
        )

    run_or_exit(go)


@main.command("replay")
@click.argument("projection")
@click.option(
    "--topology",
    "topology_path",
    type=click.Path(dir_okay=False, exists=True),
    default="topology.yaml",
    show_default=True,
    help="The topology naming the projection and the database (MAGASIN_DATABASE_URL overrides).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Events per read from the store.",
)
@click.option(
    "--buffer",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Documents and versions held in memory before they are written (COPY) in the "
    "background; at most about twice that is held, plus the address of every document "
    "and aggregate written.",
)
def replay_command(projection: str, topology_path: str, batch_size: int, buffer: int) -> None:
    """Rebuild PROJECTION (an actor of the topology) from the event store into tables of its
    own while the live one keeps serving, then swap them in atomically."""
    importable_cwd()
    topology = load_or_exit(topology_path, check_handlers=True)
    url = topology.database_url
    if not url or url.startswith("memory://"):
        click.echo(
            "error: the topology runs the embedded in-memory store (database_url is memory://), "
            "whose read models live in the running process; set MAGASIN_DATABASE_URL to the "
            "PostgreSQL database to rebuild",
            err=True,
        )
        sys.exit(2)
    spec = topology.actors.get(projection)
    schema = str((spec.options if spec else {}).get("schema", "public"))

    async def go() -> None:
        from runtime.replay import replay  # noqa: PLC0415
        from runtime.store.postgres import PostgresEventStore  # noqa: PLC0415
        from runtime.store.readmodel_postgres import PostgresReadModelStore  # noqa: PLC0415

        store = await PostgresEventStore.connect(url, schema=schema)
        read_models = await PostgresReadModelStore.connect(url, schema=schema)
        try:
            head = max(1, (await store.statistics()).head_position)
            with click.progressbar(length=head, label=f"replaying {projection}") as bar:
                done = 0

                def advance(read: int, total: int) -> None:
                    nonlocal done
                    bar.length = max(bar.length or 0, total)
                    bar.update(read - done)
                    done = read

                report = await replay(
                    topology,
                    projection,
                    store=store,
                    read_models=read_models,
                    batch_size=batch_size,
                    buffer=buffer,
                    progress=advance,
                )
        finally:
            await read_models.close()
            await store.close()
        click.echo(
            f"{report.projection}: {report.events_read:,} events read, "
            f"{report.events_applied:,} applied in {report.seconds:.1f} s "
            f"({report.events_per_second:,.0f} events/s); swapped in"
        )

    run_or_exit(go)


@main.command("run")
@click.argument("topology", type=click.Path(dir_okay=False, exists=True), default="topology.yaml")
def run(topology: str) -> None:
    """Start the supervisor on TOPOLOGY (exit 0 after a clean stop, 70 on escalation)."""
    from pathlib import Path  # noqa: PLC0415

    from runtime.app import serve  # noqa: PLC0415

    importable_cwd()
    loaded = load_or_exit(topology, check_handlers=True)
    sys.exit(run_or_exit(serve, Path(topology), loaded))


@main.command("check")
@click.argument("topology", type=click.Path(dir_okay=False), default="topology.yaml")
def check(topology: str) -> None:
    """Validate TOPOLOGY (handlers imported, nothing connected) and print its plan."""
    from runtime.errors import TopologyError  # noqa: PLC0415
    from runtime.topology import load_topology  # noqa: PLC0415

    importable_cwd()
    try:
        plan = load_topology(topology).plan_text()
    except TopologyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(plan)


# --- talking to a running runtime over HTTP --------------------------------------------------

HTTP_PORT_ENV = "MAGASIN_HTTP_PORT"
HTTP_TIMEOUT = 5.0
EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 2


def _default_url() -> str:
    return f"http://127.0.0.1:{os.environ.get(HTTP_PORT_ENV) or 8080}"


def _url_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--url",
        default=_default_url,
        show_default=f"http://127.0.0.1:${{{HTTP_PORT_ENV}:-8080}}",
        help="Base URL of the runtime's HTTP gateway.",
    )(fn)


def _unreachable(url: str, exc: Exception) -> NoReturn:
    click.echo(
        f"error: cannot reach the magasin runtime at {url} ({exc}); start it with "
        "`magasin run`, or point --url (or MAGASIN_HTTP_PORT) at it",
        err=True,
    )
    sys.exit(EXIT_UNREACHABLE)


def _fetch(client: httpx.Client, url: str, path: str) -> httpx.Response:
    """GET ``path``; a runtime that does not answer ends the command (exit 2)."""
    import httpx  # noqa: PLC0415

    try:
        return client.get(path)
    except httpx.TransportError as exc:
        _unreachable(url, exc)


def _fetch_actors(client: httpx.Client, url: str) -> list[dict[str, Any]]:
    response = _fetch(client, url, "/actors")
    if response.status_code != 200:
        click.echo(
            f"error: GET {url}/actors answered {response.status_code}; is this a magasin "
            "runtime's gateway?",
            err=True,
        )
        sys.exit(EXIT_UNREACHABLE)
    actors: list[dict[str, Any]] = response.json()
    return actors


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _shorten(text: str | None, limit: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@main.command("status")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw figures as JSON.")
def status(url: str, as_json: bool) -> None:
    """Show each actor of a running runtime and whether it is ready.

    Exits 0 when ready, 1 when not, 2 when the runtime cannot be reached.
    """
    import httpx  # noqa: PLC0415

    url = url.rstrip("/")
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        actors = _fetch_actors(client, url)
        health = _fetch(client, url, "/health/ready")
    ready = health.status_code == 200
    readiness: dict[str, Any] = health.json() if health.content else {}
    if as_json:
        click.echo(json.dumps({"url": url, "ready": ready, "health": readiness, "actors": actors}))
    else:
        header = ("ACTOR", "KIND", "STATE", "RESTARTS", "MAILBOX", "IN-FLIGHT", "CONSUMERS")
        rows = [
            (
                a["name"],
                a["kind"],
                a["state"],
                a["restarts"],
                a["mailbox_depth"],
                a["in_flight"],
                a["consumers"],
                _shorten(a["last_error"]),
            )
            for a in actors
        ]
        click.echo(_table((*header, "LAST ERROR"), rows))
        click.echo("")
        if ready:
            click.echo(f"runtime at {url}: ready")
        else:
            why = readiness.get("detail") or ", ".join(
                f"{a['name']} is {a['state']}" for a in readiness.get("actors", [])
            )
            click.echo(f"runtime at {url}: NOT ready ({why or f'HTTP {health.status_code}'})")
    sys.exit(0 if ready else EXIT_NOT_READY)


# --- chaos drills ----------------------------------------------------------------------------


def chaos_schedule(
    seed: int, duration: float, mean_interval: float, actors: Sequence[str]
) -> list[tuple[float, str]]:
    """When to crash which actor: ``(offset in seconds, actor)`` pairs within ``duration``.

    A pure function of its arguments (the actors' order does not matter), so a seed replays
    the same drill: Poisson arrivals (exponential gaps of mean ``mean_interval``), each
    picking one actor uniformly.
    """
    if mean_interval <= 0:
        raise ValueError(f"the mean interval must be greater than zero, got {mean_interval}")
    pool = sorted(set(actors))
    if not pool:
        return []
    rng = random.Random(seed)  # noqa: S311 - reproducible drills, not cryptography
    schedule: list[tuple[float, str]] = []
    offset = rng.expovariate(1 / mean_interval)
    while offset < duration:
        schedule.append((offset, rng.choice(pool)))
        offset += rng.expovariate(1 / mean_interval)
    return schedule


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    from runtime.topology import parse_duration  # noqa: PLC0415

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _chaos_targets(client: httpx.Client, url: str, named: list[str] | None) -> list[str]:
    """The actors to crash: those named (checked against the runtime), else every actor
    but the gateway, sorted by name."""
    actors = _fetch_actors(client, url)
    if named is None:
        return sorted(a["name"] for a in actors if a["kind"] != "gateway")
    known = {a["name"] for a in actors}
    if unknown := [name for name in named if name not in known]:
        click.echo(
            f"error: no actor named {', '.join(unknown)} in the runtime at {url} "
            f"(its actors: {', '.join(sorted(known))})",
            err=True,
        )
        sys.exit(EXIT_UNREACHABLE)
    return sorted(set(named))


def _crash(client: httpx.Client, url: str, actor: str) -> str:
    """Ask the runtime to crash ``actor``; what happened, in a few words."""
    import httpx  # noqa: PLC0415

    try:
        response = client.post(f"/actors/{actor}/crash")
    except httpx.TransportError as exc:
        return f"runtime unreachable ({exc})"
    if response.status_code == 202:
        return "crashed"
    if response.status_code == 403:
        click.echo(
            f"error: the runtime at {url} refuses to crash actors: its admin endpoints are "
            "off. Set `admin: true` in the topology and restart `magasin run`.",
            err=True,
        )
        sys.exit(EXIT_NOT_READY)
    detail = response.json().get("detail", "") if response.content else ""
    return f"skipped: HTTP {response.status_code} {detail}".rstrip()


@main.command("chaos")
@click.option("--seed", type=int, help="Seed of the drill (default: a random one, printed).")
@click.option("--duration", required=True, callback=_duration, help="How long to run: 30s, 5m, ...")
@click.option(
    "--mean-interval",
    default="2s",
    show_default=True,
    callback=_duration,
    help="Mean time between two crashes (exponentially distributed).",
)
@click.option("--actors", help="Comma-separated actors to crash (default: all but the gateway).")
@click.option("--dry-run", is_flag=True, help="Print the schedule; crash nothing.")
@_url_option
def chaos(
    *,
    seed: int | None,
    duration: float,
    mean_interval: float,
    actors: str | None,
    dry_run: bool,
    url: str,
) -> None:
    """Crash random actors of a running runtime at random moments (needs `admin: true`).

    The schedule depends only on the seed, the duration, the mean interval and the actors,
    so `--seed` replays a drill. With --dry-run and --actors nothing is asked of the runtime;
    with --dry-run alone it is only asked for its actors.
    """
    import httpx  # noqa: PLC0415

    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    click.echo(f"chaos seed {seed}")
    named = [name.strip() for name in actors.split(",") if name.strip()] if actors else None
    url = url.rstrip("/")
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        if dry_run and named is not None:
            targets = sorted(set(named))
        else:
            targets = _chaos_targets(client, url, named)
        if not targets:
            click.echo("error: there is no actor to crash; name some with --actors", err=True)
            sys.exit(EXIT_UNREACHABLE)
        schedule = chaos_schedule(seed, duration, mean_interval, targets)
        click.echo(
            f"{len(schedule)} crash(es) over {duration:g}s (mean interval {mean_interval:g}s) "
            f"among {', '.join(targets)}{' (dry run)' if dry_run else f' at {url}'}"
        )
        started = time.monotonic()
        for offset, actor in schedule:
            if dry_run:
                click.echo(f"+{offset:8.3f}s  crash {actor}")
                continue
            time.sleep(max(0.0, started + offset - time.monotonic()))
            click.echo(f"+{offset:8.3f}s  crash {actor}: {_crash(client, url, actor)}")
        if not dry_run:
            time.sleep(max(0.0, started + duration - time.monotonic()))
            click.echo(f"chaos over after {duration:g}s (seed {seed})")


# --- dead-letter queues ----------------------------------------------------------------------


def _dead_letter_url(topology_path: str, queue: str) -> str:
    """The broker URL of the topology (MAGASIN_AMQP_URL overrides); exits 2 when it is the
    embedded bus, whose dead letters die with the process that holds them."""
    topology = load_or_exit(topology_path, check_handlers=False)
    url = topology.amqp_url
    if not url or url.startswith("memory://"):
        click.echo(
            "error: the topology runs the embedded in-process bus (amqp_url is memory://), "
            "which keeps no dead letters across processes; set MAGASIN_AMQP_URL=amqp://... "
            "(or amqp_url in the topology) to manage RabbitMQ's dead-letter queues",
            err=True,
        )
        sys.exit(2)
    queues = sorted(spec.name for spec in topology.bus_plan().queues)
    if queue not in queues:
        click.echo(
            f"warning: {queue!r} is not a queue of {topology_path} (its queues: "
            f"{', '.join(queues) or 'none'}); trying the broker anyway",
            err=True,
        )
    return url


def _bus_call(topology_path: str, queue: str, call: Callable[[Bus], Awaitable[_T]]) -> _T:
    """Connect to the topology's broker, run ``call`` on it, close."""
    url = _dead_letter_url(topology_path, queue)

    async def go() -> _T:
        from runtime.bus.rabbitmq import RabbitMQBus  # noqa: PLC0415

        bus = await RabbitMQBus.connect(url, name=f"magasin-dlq-{os.getpid()}")
        try:
            return await call(bus)
        finally:
            await bus.close()

    result: _T = run_or_exit(go)
    return result


def _actors_of(topology: Topology, queue: str) -> list[str]:
    """The actors whose work queue (where their retries and dead letters return) is ``queue``."""
    return [name for name, spec in topology.actors.items() if spec.queue_names[:1] == (queue,)]


async def _parked_keys(
    topology: Topology, queue: str, *, lift: str | None = None
) -> list[ParkedKey] | None:
    """The aggregates the actors of ``queue`` hold back (None on the embedded store, whose
    blocks live in the running process); with ``lift``, only those held behind that
    blocker, and their blocks are lifted."""
    from runtime.store.factory import is_memory_url  # noqa: PLC0415
    from runtime.store.postgres import PostgresEventStore  # noqa: PLC0415

    url = topology.database_url
    if is_memory_url(url):
        return None
    store = await PostgresEventStore.connect(url)
    try:
        actors = _actors_of(topology, queue)
        rows = [row for row in await store.parked_keys() if row.actor in actors]
        if lift is not None:
            rows = [row for row in rows if row.blocker == lift]
            for row in rows:
                await store.unpark(row.actor, row.key, lift)
        return rows
    finally:
        await store.close()


_topology_option = click.option(
    "--topology",
    "topology_path",
    type=click.Path(dir_okay=False),
    default="topology.yaml",
    show_default=True,
    help="The topology naming the broker (amqp_url; MAGASIN_AMQP_URL overrides it).",
)


@main.group()
def dlq() -> None:
    """Dead-letter queues on RabbitMQ: list, replay, skip, purge (QUEUE is the work queue)."""


@dlq.command("list")
@click.argument("queue")
@_topology_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
def dlq_list(queue: str, topology_path: str, limit: int) -> None:
    """Show the dead letters of QUEUE without removing them."""
    from runtime.bus.protocol import X_FIRST_FAILED_AT  # noqa: PLC0415
    from runtime.naming import dead_letter_queue  # noqa: PLC0415

    letters = _bus_call(topology_path, queue, lambda bus: bus.list_dead_letters(queue, limit))
    topology = load_or_exit(topology_path, check_handlers=False)
    parked = run_or_exit(_parked_keys, topology, queue)
    if parked:
        click.echo(
            _table(
                ("ACTOR", "AGGREGATE", "HELD BEHIND", "BLOCKER IS", "SINCE", "WHY"),
                [
                    (
                        row.actor,
                        row.key,
                        row.blocker,
                        "dead-lettered" if row.dead else "retrying",
                        row.since.isoformat(timespec="seconds"),
                        _shorten(row.reason, 40),
                    )
                    for row in parked
                ],
            )
        )
        click.echo(
            f"\n{len(parked)} aggregate(s) held back: their later events wait behind the "
            "blocker (in memory while it retries, in the DLQ as ParkedError once it is dead); "
            f"replay in order with `magasin dlq replay {queue} --all`, or skip a blocker with "
            f"`magasin dlq skip {queue} --id ID`\n"
        )
    if not letters:
        click.echo(f"no dead letters in {dead_letter_queue(queue)}")
        return
    rows = [
        (
            letter.message_id,
            letter.error_type or "-",
            _shorten(letter.error),
            letter.attempts,
            letter.headers.get(X_FIRST_FAILED_AT) or "-",
        )
        for letter in letters
    ]
    header = ("MESSAGE ID", "ERROR TYPE", "ERROR", "ATTEMPTS", "FIRST FAILED AT")
    click.echo(_table(header, rows))
    more = f" (the first {limit}; raise --limit for more)" if len(letters) >= limit else ""
    click.echo(f"\n{len(letters)} dead letter(s) in {dead_letter_queue(queue)}{more}")


@dlq.command("replay")
@click.argument("queue")
@click.option("--id", "message_id", help="Replay the dead letter with this message id.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of QUEUE.")
@_topology_option
def dlq_replay(queue: str, message_id: str | None, replay_all: bool, topology_path: str) -> None:
    """Move dead letters of QUEUE back to QUEUE, to be handled again."""
    from runtime.naming import dead_letter_queue  # noqa: PLC0415

    if (message_id is None) == (not replay_all):
        raise click.UsageError("give exactly one of --id ID and --all")
    moved = _bus_call(topology_path, queue, lambda bus: bus.replay_dead_letters(queue, message_id))
    source = dead_letter_queue(queue)
    if message_id is not None and moved == 0:
        click.echo(f"error: no dead letter with id {message_id!r} in {source}", err=True)
        sys.exit(1)
    click.echo(f"replayed {moved} message(s) from {source} to {queue}")


@dlq.command("skip")
@click.argument("queue")
@click.option("--id", "message_id", required=True, help="The blocker to skip (its message id).")
@_topology_option
def dlq_skip(queue: str, message_id: str, topology_path: str) -> None:
    """Give up on one dead letter of QUEUE on purpose: delete it and let the later events of
    its aggregate, parked behind it, go on (replay them with `dlq replay QUEUE --all`)."""
    from runtime.naming import dead_letter_queue  # noqa: PLC0415

    topology = load_or_exit(topology_path, check_handlers=False)
    parked: list[ParkedKey] = run_or_exit(_parked_keys, topology, queue) or []
    rows = [row for row in parked if row.blocker == message_id]
    retrying = [row for row in rows if not row.dead]
    if retrying:
        click.echo(
            f"error: message {message_id} is still on the retry ladder of actor "
            f"{retrying[0].actor} (aggregate {retrying[0].key}), not dead-lettered: the block "
            "lifts itself when it succeeds; skip it once it is in the DLQ",
            err=True,
        )
        sys.exit(1)
    dropped = _bus_call(topology_path, queue, lambda bus: bus.purge_dead_letters(queue, message_id))
    # after the purge: a block lifted first would let its parked events overtake it
    lifted: list[ParkedKey] = (
        run_or_exit(partial(_parked_keys, topology, queue, lift=message_id)) if rows else []
    )
    if not dropped and not lifted:
        click.echo(
            f"error: no dead letter with id {message_id!r} in {dead_letter_queue(queue)}, and "
            "no aggregate held back behind it",
            err=True,
        )
        sys.exit(1)
    click.echo(f"deleted {dropped} message(s) with id {message_id} from {dead_letter_queue(queue)}")
    for row in lifted:
        click.echo(f"actor {row.actor}: aggregate {row.key} no longer waits behind it")
    if lifted:
        click.echo(f"its parked events are in the DLQ: `magasin dlq replay {queue} --all`")


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_topology_option
def dlq_purge(queue: str, yes: bool, topology_path: str) -> None:
    """Delete every dead letter of QUEUE, for good."""
    from runtime.naming import dead_letter_queue  # noqa: PLC0415

    source = dead_letter_queue(queue)
    if not yes:
        click.confirm(f"Delete every message in {source}? This cannot be undone", abort=True)
    purged = _bus_call(topology_path, queue, lambda bus: bus.purge_dead_letters(queue))
    click.echo(f"purged {purged} message(s) from {source}")


# --- the audit trail ---------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit trail in PostgreSQL: verify it, export it."""


def _audit_database(database_url: str | None) -> str:
    if not database_url or database_url.startswith("memory://"):
        click.echo(
            f"error: set {DATABASE_URL_ENV} (or --database-url) to the PostgreSQL database of "
            "the runtime; the embedded trail lives in the running process (GET /audit shows it)",
            err=True,
        )
        sys.exit(2)
    return database_url


_database_option = click.option("--database-url", envvar=DATABASE_URL_ENV, help="PostgreSQL URL.")
_schema_option = click.option("--schema", default="public", show_default=True)


@audit.command("verify")
@_database_option
@_schema_option
@click.option("--sample", type=click.IntRange(min=0), default=20, show_default=True)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to let events still in flight reach the trail before calling them missing.",
)
def audit_verify(database_url: str | None, schema: str, sample: int, wait: float) -> None:
    """Check that every stored event is audited and that the hash chain is intact.
    Prints the coverage as a percentage; exit 0 only when both hold, 1 otherwise."""
    url = _audit_database(database_url)

    async def go() -> bool:
        from runtime.store.audit import open_audit_log, verify  # noqa: PLC0415
        from runtime.store.postgres import PostgresEventStore  # noqa: PLC0415

        store = await PostgresEventStore.connect(url, schema=schema)
        try:
            async with open_audit_log(url, schema=schema) as log:
                deadline = anyio.current_time() + wait
                result = await verify(log, store, sample=sample)
                if not result.ok and not result.breaks and anyio.current_time() < deadline:
                    # Events the relay or the audit actor have not carried yet: wait on the
                    # coverage alone (the chain walk is the costly part), then verify again.
                    while anyio.current_time() < deadline:
                        await anyio.sleep(0.5)
                        coverage = await log.coverage(store, 0)
                        if coverage.audited == coverage.stored:
                            break
                    result = await verify(log, store, sample=sample)
        finally:
            await store.close()
        coverage = result.coverage
        click.echo(
            f"coverage: {coverage.percent:.2f} % ({coverage.audited} of {coverage.stored} stored "
            "events audited)"
        )
        for event_id in coverage.missing:
            click.echo(f"  missing: {event_id}")
        if coverage.stored > coverage.audited > 0 and coverage.missing:
            shown = len(coverage.missing)
            if coverage.stored - coverage.audited > shown:
                click.echo(f"  ... and {coverage.stored - coverage.audited - shown} more")
        if result.breaks:
            click.echo(f"chain: BROKEN ({result.records} records)")
            for broken in result.breaks:
                click.echo(f"  record {broken.seq}: {broken.reason}")
        else:
            click.echo(f"chain: intact ({result.records} records)")
        return result.ok

    sys.exit(0 if run_or_exit(go) else 1)


@audit.command("export")
@_database_option
@_schema_option
@click.option("--from", "since", type=click.DateTime(), help="Occurred at or after (UTC).")
@click.option("--to", "until", type=click.DateTime(), help="Occurred before (UTC).")
@click.option("--correlation-id")
@click.option("--aggregate-id")
@click.option("--user")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file instead of standard output.",
)
def audit_export(
    *,
    database_url: str | None,
    schema: str,
    since: Any,
    until: Any,
    correlation_id: str | None,
    aggregate_id: str | None,
    user: str | None,
    output: str | None,
) -> None:
    """Write the trail (or the part the filters select) as JSON lines, in recorded order."""
    from datetime import UTC  # noqa: PLC0415

    url = _audit_database(database_url)

    def utc(value: Any) -> Any:
        return None if value is None else value.replace(tzinfo=value.tzinfo or UTC)

    async def go(sink: Any) -> int:
        import msgspec  # noqa: PLC0415

        from runtime.store.audit import AuditQuery, open_audit_log, records  # noqa: PLC0415

        query = AuditQuery(
            correlation_id=correlation_id,
            aggregate_id=aggregate_id,
            user=user,
            since=utc(since),
            until=utc(until),
        )
        encoder = msgspec.json.Encoder()
        written = 0
        async with open_audit_log(url, schema=schema) as log:
            async for record in records(log, query):
                sink.write(encoder.encode(record) + b"\n")
                written += 1
        sink.flush()
        return written

    if output:
        with open(output, "wb") as sink:
            written = run_or_exit(go, sink)
    else:
        written = run_or_exit(go, sys.stdout.buffer)
    if output:
        click.echo(f"{written} records written to {output}", err=True)


# --- commands of the application ---------------------------------------------------------------

if __name__ == "__main__":  # pragma: no cover
    main()
