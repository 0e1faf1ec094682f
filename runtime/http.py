"""The HTTP gateway: health, actor introspection, metrics, and the admin crash endpoint.

``build_app(context)`` is the Litestar application (later issues add their routes through
``extra_handlers``); ``Gateway`` is the built-in ``gateway`` actor that serves it with
uvicorn. The runtime owns the process signals, so uvicorn never installs handlers: the
supervisor stops the gateway through ``drain()`` like any other actor.

Errors are RFC 9457 problem details (``application/problem+json``).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Generator, Sequence
from http import HTTPStatus
from typing import Any

import anyio
import msgspec
import uvicorn
from anyio.abc import TaskStatus
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ControllerRouterHandler, Middleware
from loguru import logger

from runtime.actor import ActorContext, ActorStatistics
from runtime.errors import ConfigurationError, UnknownActorError

PROBLEM_UNKNOWN_ACTOR = "urn:magasin:problem:unknown-actor"
PROBLEM_ADMIN_DISABLED = "urn:magasin:problem:admin-disabled"
PROBLEM_ACTOR_NOT_RUNNING = "urn:magasin:problem:actor-not-running"
SHUTDOWN_POLL = 0.05  # seconds between checks while an aborted server lets go of requests
ABORT_TIMEOUT = 1.0  # how long a cancelled gateway lets in-flight responses finish


# --- response bodies -------------------------------------------------------------------------


class UnreadyActor(msgspec.Struct, frozen=True):
    name: str
    state: str
    last_error: str | None


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str
    actors: tuple[UnreadyActor, ...] | None = None
    detail: str | None = None


class CrashRequested(msgspec.Struct, frozen=True):
    actor: str
    status: str = "crash requested"


# --- problem details -------------------------------------------------------------------------


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """An RFC 9457 problem, as the OpenAPI document describes error responses."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    field: str | None = None  # 422: the request field at fault
    current_version: int | None = None  # 409 on a stale If-Match
    errors: list[dict[str, Any]] | None = None  # 400: what the framework could not parse


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem-details errors a route answers."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=HTTPStatus(status).phrase,
            media_type="application/problem+json",
        )
        for status in statuses
    }


def problem(
    status: int, detail: str, *, type_: str = "about:blank", title: str | None = None
) -> ProblemDetailsException:
    """A problem to raise from a handler; rendered as ``application/problem+json``."""
    return ProblemDetailsException(
        status_code=status,
        detail=detail,
        type_=type_,
        title=title or HTTPStatus(status).phrase,
    )


def _problem_response(
    request: Request[Any, Any, Any], exc: ProblemDetailsException
) -> Response[Any]:
    return exc.to_response(request)


def _http_problem(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (no route, bad parameters, ...) as problem details."""
    status = exc.status_code
    detail = exc.detail
    if status == HTTPStatus.NOT_FOUND and detail == HTTPStatus.NOT_FOUND.phrase:
        detail = f"no route matches {request.method} {request.url.path}"
    result = problem(status, detail)
    if exc.extra:
        result.extra = {"errors": exc.extra}
    result.headers = exc.headers
    return result.to_response(request)


def _unknown_actor(request: Request[Any, Any, Any], exc: UnknownActorError) -> Response[Any]:
    return problem(404, str(exc), type_=PROBLEM_UNKNOWN_ACTOR, title="Unknown actor").to_response(
        request
    )


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.opt(exception=exc).error(
        "HTTP {method} {path} failed", method=request.method, path=request.url.path
    )
    detail = "the request failed on the server; the runtime's log has the traceback"
    return problem(500, detail).to_response(request)


# --- the application -------------------------------------------------------------------------


def build_app(
    context: ActorContext,
    extra_handlers: Sequence[ControllerRouterHandler] = (),
    middleware: Sequence[Middleware] = (),
) -> Litestar:
    """The gateway's Litestar app, reading the runtime through ``context.supervisor``."""
    return Litestar(
        route_handlers=[*_runtime_handlers(context), *extra_handlers],
        middleware=list(middleware),
        exception_handlers={
            ProblemDetailsException: _problem_response,
            HTTPException: _http_problem,
            UnknownActorError: _unknown_actor,
            Exception: _internal_error,
        },
        openapi_config=OpenAPIConfig(
            title="magasin",
            version="0.1.0",
            description="Health, actor introspection and metrics of a magasin runtime.",
            path="/schema",
        ),
        logging_config=None,  # our logs are loguru's
    )


def _runtime_handlers(context: ActorContext) -> list[ControllerRouterHandler]:
    supervisor = context.supervisor

    def find(name: str) -> ActorStatistics:
        for actor in supervisor.statistics():
            if actor.name == name:
                return actor
        known = [actor.name for actor in supervisor.statistics()]
        raise UnknownActorError(name, known)

    @get(
        "/health/live",
        tags=["health"],
        sync_to_thread=False,
        responses={503: ResponseSpec(data_container=Health, description="escalated")},
    )
    def live() -> Response[Health]:
        """200 while the supervisor is alive (no escalation), else 503."""
        if supervisor.live:
            return Response(Health("live"))
        return Response(
            Health("down", detail="an actor escalated; the runtime is exiting"), status_code=503
        )

    @get(
        "/health/ready",
        tags=["health"],
        sync_to_thread=False,
        responses={503: ResponseSpec(data_container=Health, description="not ready")},
    )
    def ready() -> Response[Health]:
        """200 when every actor is running and the bus is connected; else 503 and why."""
        if supervisor.ready:
            return Response(Health("ready"))
        waiting = tuple(
            UnreadyActor(actor.name, actor.state, actor.waiting_on or actor.last_error)
            for actor in supervisor.statistics()
            if actor.state != "running" or actor.waiting_on
        )
        detail = None
        if not context.bus.connected:
            detail = "the message bus is not connected"
        elif not waiting:
            detail = "the runtime is starting or stopping"
        return Response(Health("unready", actors=waiting, detail=detail), status_code=503)

    @get("/actors", tags=["actors"], sync_to_thread=False)
    def actors() -> list[ActorStatistics]:
        """Every actor of the topology, in start order, with its figures."""
        return supervisor.statistics()

    @get(
        "/actors/{name:str}",
        tags=["actors"],
        sync_to_thread=False,
        responses=problem_responses(404),
    )
    def actor(name: FromPath[str]) -> ActorStatistics:
        return find(name)

    @post(
        "/actors/{name:str}/crash",
        tags=["admin"],
        status_code=202,
        sync_to_thread=False,
        responses=problem_responses(403, 404, 409),
    )
    def crash(name: FromPath[str]) -> CrashRequested:
        """Make the actor fail as if its handler had raised (chaos drills; admin only)."""
        target = find(name)
        if not context.topology.admin:
            raise problem(
                403,
                "the admin endpoints are off: set `admin: true` in the topology and restart "
                "the runtime to crash actors on purpose",
                type_=PROBLEM_ADMIN_DISABLED,
                title="Admin endpoints disabled",
            )
        if target.state != "running":
            raise problem(
                409,
                f"actor {name!r} is {target.state}, not running; there is nothing to crash",
                type_=PROBLEM_ACTOR_NOT_RUNNING,
                title="Actor not running",
            )
        supervisor.crash(name)
        return CrashRequested(name)

    @get("/metrics", tags=["observability"], sync_to_thread=False)
    def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The Prometheus exposition (text, or protobuf if the scraper asks for it)."""
        gauges = context.metrics
        for stats in supervisor.statistics():
            labels = {"actor": stats.name}
            gauges.mailbox_depth.set(labels, stats.mailbox_depth)
            gauges.in_flight.set(labels, stats.in_flight)
        gauges.runtime_ready.set({}, int(supervisor.ready))
        body, headers = gauges.render(request.headers.getall("accept", []))
        media_type = headers.pop("Content-Type", "text/plain; version=0.0.4")
        if media_type.startswith("text/"):  # Litestar appends the charset itself
            media_type = media_type.replace("; charset=utf-8", "")
        return Response(body, media_type=media_type, headers=headers)

    return [live, ready, actors, actor, crash, metrics]


# --- the gateway actor -----------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers, telling us when it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self.finished = False  # shut down completely, lifespan included

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the runtime owns SIGTERM/SIGINT/SIGHUP (runtime/app.py)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's way of saying the ASGI lifespan startup failed
            raise ConfigurationError(
                "the HTTP gateway's application failed to start; see the errors above"
            ) from None
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        self.finished = True

    async def abort(self) -> None:
        """After a cancellation (a crash, or a drain cut short): stop listening, let
        in-flight responses finish briefly, cancel what is left, end the ASGI lifespan."""
        self.should_exit = True
        for server in getattr(self, "servers", []):
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        with anyio.move_on_after(ABORT_TIMEOUT):
            while self.server_state.tasks:  # noqa: ASYNC110 - uvicorn's set has no event
                await anyio.sleep(SHUTDOWN_POLL)
        for task in self.server_state.tasks:
            task.cancel()
        with anyio.move_on_after(ABORT_TIMEOUT):
            await self.lifespan.shutdown()


class Gateway:
    """The built-in ``gateway`` actor: serves ``build_app`` on the topology's host and port."""

    def __init__(
        self,
        context: ActorContext,
        extra_handlers: Sequence[ControllerRouterHandler] = (),
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.context = context
        self.app = build_app(context, extra_handlers, middleware)
        self._server: _Server | None = None
        self._port: int | None = None
        self._draining = False

    @property
    def port(self) -> int:
        """The port the gateway listens on (the bound one when the topology says 0)."""
        if self._port is None:
            raise RuntimeError("the gateway is not listening yet; await its start first")
        return self._port

    def drain(self) -> None:
        """Stop accepting connections and finish the requests in progress, then return."""
        self._draining = True
        if self._server is not None:
            self._server.should_exit = True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        http = self.context.topology.http
        sock = await _listen(http.host, http.port)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave logging alone: ours is loguru
            log_level="warning",
            access_log=False,
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(self.context.topology.grace_period),
        )

        def started() -> None:
            logger.info(
                "HTTP gateway listening on http://{host}:{port}", host=http.host, port=self._port
            )
            task_status.started()

        server = self._server = _Server(config, started)
        server.should_exit = self._draining
        try:
            await server.serve(sockets=[sock])
        finally:
            if server.started and not server.finished:
                with anyio.CancelScope(shield=True):
                    await server.abort()
            sock.close()


async def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port)."""
    try:
        family, *_ = (await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigurationError(
            f"the HTTP gateway cannot listen on {host}:{port}: {exc.strerror or exc}; free "
            "the port, or set http.port in the topology (or MAGASIN_HTTP_PORT)"
        ) from exc
    # Accepted sockets inherit it: without it Nagle holds each response's body until the
    # client's delayed ACK (~40 ms per request on a keep-alive connection).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
