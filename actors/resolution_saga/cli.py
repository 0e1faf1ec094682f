"""``magasin saga list|show|retry``: look at resolution sagas, drive a parked one again.

``list`` and ``show`` read the saga documents in PostgreSQL; ``retry`` publishes a
``retry.requested`` message to ``saga.events`` on RabbitMQ, which the running saga actor
handles (it re-runs the compensations not done yet, with the same command ids, so nothing
that already applied applies twice).
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import click
import msgspec

from actors.resolution_saga.api import load_saga
from actors.resolution_saga.messages import RETRY_REQUESTED, SAGA_EXCHANGE, RetryRequested
from actors.resolution_saga.state import INSTANCES, NAMESPACE, SAGA_TYPE
from runtime.bus.protocol import X_ORDERING_KEY
from runtime.cli_support import importable_cwd, load_or_exit, run_or_exit
from runtime.messages import X_AGGREGATE_ID, X_AGGREGATE_TYPE, X_EVENT_TYPE
from runtime.store.readmodel import open_read_model_store
from runtime.topology import Topology

_topology_option = click.option(
    "--topology",
    "topology_path",
    type=click.Path(dir_okay=False),
    default="topology.yaml",
    show_default=True,
    help="The topology naming the database and broker (MAGASIN_* variables override).",
)


def _topology(path: str) -> Topology:
    importable_cwd()
    topology = load_or_exit(path, check_handlers=False)
    if topology.database_url.startswith("memory://") or not topology.database_url:
        click.echo(
            "error: the topology runs the embedded store (memory://), whose sagas live in the "
            "running process (GET /complaints/{id}/saga shows one); set MAGASIN_DATABASE_URL",
            err=True,
        )
        sys.exit(2)
    return topology


def _schema(topology: Topology) -> str:
    """The read-model schema of the topology's resolution saga (its ``schema`` option)."""
    for spec in topology.actors.values():
        if spec.kind == "saga" and (spec.handler or "").endswith(":ComplaintResolutionSaga"):
            return str(spec.options.get("schema", "public"))
    return "public"


@click.group()
def saga() -> None:
    """Resolution sagas: list, show, retry a parked one."""


@saga.command("list")
@_topology_option
@click.option("--state", help="Only sagas in this state (e.g. compensation_failed).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def saga_list(topology_path: str, state: str | None, limit: int) -> None:
    """Sagas, in complaint id order."""
    topology = _topology(topology_path)

    async def go() -> list[tuple[str, dict[str, Any]]]:
        async with open_read_model_store(topology.database_url, schema=_schema(topology)) as store:
            return await store.find(
                NAMESPACE, INSTANCES, equals={"state": state} if state else None, limit=limit
            )

    for key, doc in run_or_exit(go):
        click.echo(f"{key}  {doc['state']:<20} {doc['store_id']:<12} {doc.get('assignee') or '-'}")


@saga.command("show")
@click.argument("complaint_id")
@_topology_option
def saga_show(complaint_id: str, topology_path: str) -> None:
    """The saga of COMPLAINT_ID as JSON (exit 1 if there is none)."""
    topology = _topology(topology_path)

    async def go() -> Any:
        async with open_read_model_store(topology.database_url, schema=_schema(topology)) as store:
            return await load_saga(store, complaint_id)

    found = run_or_exit(go)
    if found is None:
        click.echo(f"error: no saga for complaint {complaint_id!r}", err=True)
        sys.exit(1)
    click.echo(msgspec.json.format(msgspec.json.encode(found)).decode())


@saga.command("retry")
@click.argument("complaint_id")
@_topology_option
def saga_retry(complaint_id: str, topology_path: str) -> None:
    """Drive the parked (compensation_failed) saga of COMPLAINT_ID again."""
    topology = _topology(topology_path)
    if topology.amqp_url.startswith("memory://"):
        click.echo("error: the topology runs the embedded bus; set MAGASIN_AMQP_URL", err=True)
        sys.exit(2)

    async def go() -> str | None:
        async with open_read_model_store(topology.database_url, schema=_schema(topology)) as store:
            found = await load_saga(store, complaint_id)
        if found is None:
            return None
        if found.state != "compensation_failed":
            return found.state
        from runtime.bus.rabbitmq import RabbitMQBus  # noqa: PLC0415

        bus = await RabbitMQBus.connect(topology.amqp_url, name=f"magasin-saga-{os.getpid()}")
        try:
            await bus.publish(
                SAGA_EXCHANGE,
                RETRY_REQUESTED,
                msgspec.json.encode(RetryRequested(saga_id=complaint_id)),
                message_id=str(uuid.uuid4()),
                headers={
                    X_AGGREGATE_ID: complaint_id,
                    X_ORDERING_KEY: complaint_id,  # with the complaint's events
                    X_AGGREGATE_TYPE: "saga",
                    X_EVENT_TYPE: f"{SAGA_TYPE}.retry.requested",
                },
            )
        finally:
            await bus.close()
        return "sent"

    outcome = run_or_exit(go)
    if outcome is None:
        click.echo(f"error: no saga for complaint {complaint_id!r}", err=True)
        sys.exit(1)
    if outcome != "sent":
        click.echo(
            f"error: the saga of {complaint_id} is {outcome}, not compensation_failed: "
            "nothing to retry",
            err=True,
        )
        sys.exit(1)
    click.echo(f"retry requested for the saga of {complaint_id}; `magasin saga show` follows it")
