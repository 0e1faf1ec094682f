"""The ``magasin`` command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import click
from loguru import logger

from runtime.errors import MagasinError
from runtime.observability.logging import configure_logging

DATABASE_URL_ENV = "MAGASIN_DATABASE_URL"


def _run_async(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    try:
        return anyio.run(fn, *args)
    except MagasinError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.group()
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

    _run_async(go)


@main.command("run")
@click.argument("topology", type=click.Path(dir_okay=False), default="topology.yaml")
def run(topology: str) -> None:
    """Start the supervisor on TOPOLOGY."""
    from runtime.store.factory import open_store  # noqa: PLC0415

    async def go() -> None:
        store = await open_store(os.environ.get(DATABASE_URL_ENV))
        try:
            logger.info("event store ready: {store}", store=store)
            logger.warning(
                "the actor supervisor is not built yet (issue 3): {topology} is not started",
                topology=topology,
            )
        finally:
            await store.close()

    _run_async(go)


@main.command("check")
@click.argument("topology", type=click.Path(dir_okay=False), default="topology.yaml")
def check(topology: str) -> None:
    """Validate TOPOLOGY (handlers imported, nothing connected) and print its plan."""
    from runtime.errors import TopologyError  # noqa: PLC0415
    from runtime.topology import load_topology  # noqa: PLC0415

    # handlers are dotted paths from where magasin runs, as with `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        plan = load_topology(topology).plan_text()
    except TopologyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(plan)


if __name__ == "__main__":  # pragma: no cover
    main()
