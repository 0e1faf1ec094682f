"""The HTTP gateway against a real supervisor on the memory bus and store.

Requests go through ``httpx.ASGITransport`` (same event loop as the supervisor); the tests
named ``the_gateway_...`` run the real uvicorn server on a port of its own.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import msgspec
import pytest

from runtime.actor import ActorContext
from runtime.bus.memory import MemoryBus
from runtime.errors import ConfigurationError, EscalationError
from runtime.http import Gateway, build_app
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.supervisor import Supervisor
from runtime.topology import Topology, parse_topology

TOPOLOGY = """
admin: {admin}
http: {{host: 127.0.0.1, port: 0}}
grace_period: 2s
defaults:
  restart: {{max_restarts: {max_restarts}}}
actors:
  recorder:
    kind: subscriber
    handler: tests.support.handlers:Recorder
  idler:
    kind: service
    handler: tests.support.handlers:Idle
  gateway:
    kind: gateway
"""

PROBLEM = "application/problem+json"
ACTOR_FIELDS = {
    "name",
    "kind",
    "state",
    "restarts",
    "last_error",
    "mailbox_depth",
    "in_flight",
    "consumers",
    "handled",
    "failed",
    "queues",
    "waiting_on",
}


def topology(*, admin: bool = False, max_restarts: int = 10) -> Topology:
    text = TOPOLOGY.format(admin=str(admin).lower(), max_restarts=max_restarts)
    return parse_topology(text, source="test", env={})


@dataclass
class Runtime:
    supervisor: Supervisor
    context: ActorContext
    client: httpx.AsyncClient
    restarts_may_proceed: anyio.Event  # restart backoffs wait for it


def gateway_context(supervisor: Supervisor, topology: Topology | None = None) -> ActorContext:
    topology = topology or supervisor.topology
    return ActorContext(
        name="gateway",
        spec=topology.actors["gateway"],
        topology=topology,
        store=supervisor.store,
        bus=supervisor.bus,
        metrics=supervisor.metrics,
        supervisor=supervisor,
    )


@asynccontextmanager
async def client_for(context: ActorContext) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(context))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


@asynccontextmanager
async def running(topology: Topology) -> AsyncIterator[Runtime]:
    """The topology under a real supervisor; restarts wait until the test allows them."""
    gate = anyio.Event()

    async def restart_backoff(_delay: float) -> None:
        await gate.wait()

    async with MemoryBus() as bus:
        await bus.declare(topology.bus_plan())
        supervisor = Supervisor(
            topology,
            store=MemoryEventStore(),
            bus=bus,
            metrics=Metrics(),
            rng=random.Random(1),
            sleep=restart_backoff,
        )
        context = gateway_context(supervisor)
        async with client_for(context) as client, anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            try:
                yield Runtime(supervisor, context, client, gate)
            finally:
                gate.set()
                supervisor.stop()


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"condition not met within {seconds}s")


def state_of(supervisor: Supervisor, name: str) -> str:
    return next(a.state for a in supervisor.statistics() if a.name == name)


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, object] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


# --- health ------------------------------------------------------------------------------------


async def test_a_running_runtime_is_live_and_ready() -> None:
    async with running(topology()) as rt:
        live = await rt.client.get("/health/live")
        ready = await rt.client.get("/health/ready")

    assert (live.status_code, live.json()) == (200, {"status": "live"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_a_crashed_actor_is_unready_while_it_restarts_then_ready_again() -> None:
    async with running(topology(admin=True)) as rt:
        crash = await rt.client.post("/actors/idler/crash")
        await wait_until(lambda: state_of(rt.supervisor, "idler") == "restarting")
        ready = await rt.client.get("/health/ready")
        idler = (await rt.client.get("/actors/idler")).json()
        live = await rt.client.get("/health/live")

        rt.restarts_may_proceed.set()
        await wait_until(lambda: rt.supervisor.ready)
        ready_again = await rt.client.get("/health/ready")

    assert crash.status_code == 202
    assert crash.json() == {"actor": "idler", "status": "crash requested"}
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unready",
        "actors": [
            {
                "name": "idler",
                "state": "restarting",
                "last_error": "InjectedCrash: crash of actor 'idler' requested",
            }
        ],
    }
    assert (idler["state"], idler["restarts"]) == ("restarting", 1)
    assert live.status_code == 200
    assert ready_again.status_code == 200


async def test_crashing_an_actor_that_is_not_running_is_a_409_problem() -> None:
    async with running(topology(admin=True)) as rt:
        await rt.client.post("/actors/idler/crash")
        await wait_until(lambda: state_of(rt.supervisor, "idler") == "restarting")

        again = await rt.client.post("/actors/idler/crash")
        restarts = (await rt.client.get("/actors/idler")).json()["restarts"]

    body = assert_problem(again, 409)
    assert "restarting" in str(body["detail"])
    assert restarts == 1


async def test_liveness_fails_once_an_actor_escalated() -> None:
    with pytest.RaisesGroup(EscalationError):
        async with running(topology(admin=True, max_restarts=0)) as rt:
            assert (await rt.client.post("/actors/idler/crash")).status_code == 202
            await anyio.sleep_forever()  # the escalation ends the supervisor, and us

    async with client_for(rt.context) as client:
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")

    assert live.status_code == 503
    assert live.json()["status"] == "down"
    assert ready.status_code == 503


# --- actors ------------------------------------------------------------------------------------


async def test_actors_lists_every_actor_in_start_order_with_its_figures() -> None:
    async with running(topology()) as rt:
        response = await rt.client.get("/actors")

    actors = response.json()
    assert response.status_code == 200
    assert [(a["name"], a["kind"], a["state"]) for a in actors] == [
        ("recorder", "subscriber", "running"),
        ("idler", "service", "running"),
        ("gateway", "gateway", "running"),
    ]
    assert all(set(a) == ACTOR_FIELDS for a in actors)
    assert (actors[0]["consumers"], actors[0]["queues"]) == (1, ["recorder"])


async def test_one_actor_is_found_by_name() -> None:
    async with running(topology()) as rt:
        response = await rt.client.get("/actors/gateway")

    assert response.status_code == 200
    assert response.json()["kind"] == "gateway"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/actors/nope"), ("POST", "/actors/nope/crash")]
)
async def test_an_unknown_actor_is_a_404_problem(method: str, path: str) -> None:
    async with running(topology(admin=True)) as rt:
        response = await rt.client.request(method, path)

    body = assert_problem(response, 404)
    assert "'nope'" in str(body["detail"])
    assert "recorder, idler, gateway" in str(body["detail"])


async def test_an_unknown_route_is_a_404_problem() -> None:
    async with running(topology()) as rt:
        response = await rt.client.get("/nowhere")

    body = assert_problem(response, 404)
    assert body["detail"] == "no route matches GET /nowhere"


async def test_crashing_needs_admin_true_in_the_topology() -> None:
    async with running(topology()) as rt:
        response = await rt.client.post("/actors/idler/crash")
        actors = rt.supervisor.statistics()

    body = assert_problem(response, 403)
    assert "`admin: true`" in str(body["detail"])
    assert {(a.state, a.restarts) for a in actors} == {("running", 0)}


# --- metrics and schema ------------------------------------------------------------------------


async def test_metrics_are_prometheus_text_with_fresh_actor_gauges() -> None:
    async with running(topology()) as rt:
        await rt.supervisor.bus.publish("", "recorder", b"{}", message_id="m-1")
        await wait_until(lambda: rt.supervisor.statistics()[0].handled == 1)
        response = await rt.client.get("/metrics")

    text = response.text
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE events_consumed_total counter" in text
    assert 'events_consumed_total{actor="recorder",outcome="ack",queue="recorder"} 1' in text
    assert "# TYPE magasin_mailbox_depth gauge" in text
    assert 'magasin_mailbox_depth{actor="recorder"} 0' in text
    assert 'magasin_in_flight{actor="gateway"} 0' in text
    assert "magasin_runtime_ready 1" in text


async def test_the_openapi_schema_lists_the_routes() -> None:
    async with running(topology()) as rt:
        response = await rt.client.get("/schema/openapi.json")

    schema = json.loads(response.content)
    assert response.status_code == 200
    assert {
        "/health/live",
        "/health/ready",
        "/actors",
        "/actors/{name}",
        "/actors/{name}/crash",
        "/metrics",
    } <= set(schema["paths"])


# --- the real server ---------------------------------------------------------------------------


def on_port(context: ActorContext, port: int) -> ActorContext:
    http = msgspec.structs.replace(context.topology.http, port=port)
    topology = msgspec.structs.replace(context.topology, http=http)
    return dataclasses.replace(context, topology=topology)


async def test_the_gateway_serves_on_the_bound_port_until_drained() -> None:
    sigint = signal.getsignal(signal.SIGINT)
    async with running(topology()) as rt:
        gateway = Gateway(rt.context)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(gateway.run)
                async with httpx.AsyncClient() as client:
                    ready = await client.get(f"http://127.0.0.1:{gateway.port}/health/ready")
                handler_while_serving = signal.getsignal(signal.SIGINT)
                gateway.drain()

    assert gateway.port > 0
    assert ready.status_code == 200
    assert handler_while_serving is sigint  # uvicorn left the signals to the runtime


async def test_a_cancelled_gateway_lets_go_of_its_port() -> None:
    async with running(topology()) as rt:
        first = Gateway(rt.context)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(first.run)
                tg.cancel_scope.cancel()  # what a crash does to the actor's scope

            second = Gateway(on_port(rt.context, first.port))
            async with anyio.create_task_group() as tg:
                await tg.start(second.run)
                async with httpx.AsyncClient() as client:
                    live = await client.get(f"http://127.0.0.1:{first.port}/health/live")
                second.drain()

    assert live.status_code == 200


async def test_the_gateway_names_the_port_it_cannot_listen_on() -> None:
    async with running(topology()) as rt:
        first = Gateway(rt.context)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(first.run)
                second = Gateway(on_port(rt.context, first.port))
                with pytest.raises(ConfigurationError, match=rf"127\.0\.0\.1:{first.port}"):
                    await second.run()
                first.drain()
