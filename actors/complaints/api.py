"""The complaint HTTP API, served by the gateway actor (``handler:
actors.complaints.api:ComplaintGateway``).

Commands: the route builds the command, sends it over RabbitMQ request/reply to
``complaint.commands`` and answers what the aggregate actor answered. Queries read the
``complaints`` and ``store-stats`` read models, and the event store for a history.

Headers: ``Idempotency-Key`` (the command id: a retry returns the first answer and writes
nothing), ``If-Match: <version>`` (409 with the current version when stale),
``X-Correlation-ID`` (accepted or generated, echoed, stored in every event's metadata),
``X-User`` (recorded as the events' user). A query's ``min_position`` (a command answer's
``position``) waits, bounded, until the read model has reached it (read-your-writes).

Gateway options: ``command_timeout`` (seconds, default 5), ``read_timeout`` (seconds a
``min_position`` query may wait, default 3), ``schema`` (the read models' PostgreSQL schema,
default ``public``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Self, TypeVar

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send
from loguru import logger

from actors.audit.api import audit_routes
from actors.complaints.domain import CODEC as COMPLAINT_CODEC
from actors.complaints.domain import (
    AssignComplaint,
    CloseComplaint,
    Command,
    CommentComplaint,
    CreateComplaint,
    Customer,
    EscalateComplaint,
    Priority,
    ReopenComplaint,
    Resolution,
    ResolveComplaint,
    StartInvestigation,
    Status,
    WithdrawComplaint,
)
from actors.complaints.handler import COMMAND_QUEUE
from actors.complaints.projections import (
    COMPLAINTS,
    RESOLUTION_BUCKETS,
    p90_seconds,
    position_key,
    timestamp,
)
from actors.resolution_saga.api import saga_routes
from runtime.actor import ActorContext
from runtime.commands import CommandReply, CommandRequest, command_id_for, send_command
from runtime.errors import ActorError, BusError, StoreUnavailableError
from runtime.http import Gateway, problem, problem_responses
from runtime.messages import (
    X_AGGREGATE_ID,
    X_AGGREGATE_TYPE,
    X_CORRELATION_ID,
    X_EVENT_TYPE,
    X_OCCURRED_AT,
    X_USER,
)
from runtime.projection import ReadModelOwner
from runtime.store.audit import AuditLog, open_audit_log
from runtime.store.protocol import StreamId
from runtime.store.readmodel import Document, ReadModelStore

T = TypeVar("T")
NoteCommand = StartInvestigation | CloseComplaint | ReopenComplaint | WithdrawComplaint
CORRELATION_HEADER = "x-correlation-id"
AUDIT_EXCHANGE = "audit.events"
IDEMPOTENCY_NAMESPACE = uuid.UUID("0b5f8a52-2a53-4f3e-8d0c-43a4c7b9e6d1")
#: Pauses between read-model checks of a min_position query: short first (a projection usually
#: catches up within milliseconds), then longer, so waiting readers cost little.
POLL_FIRST, POLL_MAX = 0.005, 0.05


def pauses() -> Iterator[float]:
    pause = POLL_FIRST
    while True:
        yield pause
        pause = min(POLL_MAX, pause * 2)


MAX_LIMIT = 200

# --- request and response bodies --------------------------------------------------------------


class CustomerBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=254)]
    phone: Annotated[str, msgspec.Meta(max_length=32)] | None = None


class CreateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    store_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    customer: CustomerBody
    category: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    description: Annotated[str, msgspec.Meta(min_length=1, max_length=5000)]
    priority: Priority = "normal"
    order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    product_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None


Note = Annotated[str, msgspec.Meta(max_length=5000)]


class NoteBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    note: Note | None = None


class AssignBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    assignee: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    note: Note | None = None


class ResolveBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    resolution: Resolution
    note: Note | None = None
    reason: Note | None = None


class EscalateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=5000)]
    manager: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None


class CommentBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=5000)]
    author: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None


class CommandOutcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """A command's outcome as the gateway publishes it to ``audit.events``."""

    command_id: uuid.UUID
    command: str
    aggregate_id: str
    outcome: str  # accepted, replayed, rejected or unanswered
    at: datetime
    status: int = 200
    version: int | None = None
    position: int | None = None
    events: tuple[str, ...] = ()
    detail: str | None = None


def command_outcome(
    request: CommandRequest, name: str, reply: CommandReply | None
) -> CommandOutcome:
    outcome = CommandOutcome(
        command_id=request.command_id,
        command=name,
        aggregate_id=request.aggregate_id,
        outcome="unanswered",
        at=datetime.now(UTC),
        status=503,
    )
    if reply is None:
        return outcome
    if reply.error is not None:
        return msgspec.structs.replace(
            outcome, outcome="rejected", status=reply.error.status, detail=reply.error.detail
        )
    return msgspec.structs.replace(
        outcome,
        outcome="replayed" if reply.replayed else "accepted",
        status=200,
        version=reply.version,
        position=reply.position,
        events=reply.events,
    )


def outcome_message_id(command_id: uuid.UUID, outcome: str) -> str:
    """An accepted command's outcome is recorded under the command id, which its events name
    as their causation: the audit trail links them. Other outcomes get ids of their own."""
    if outcome == "accepted":
        return str(command_id)
    return str(uuid.uuid5(command_id, outcome))


class Accepted(msgspec.Struct, frozen=True):
    """A command's answer: the complaint's version after it, and the store position of its
    last event (pass it as ``min_position`` to read your own write)."""

    id: str
    version: int
    position: int | None
    replayed: bool
    correlation_id: str


class CustomerView(msgspec.Struct, frozen=True):
    id: str
    name: str
    email: str
    phone: str | None = None


class Comment(msgspec.Struct, frozen=True):
    author: str
    text: str
    at: str


class ComplaintView(msgspec.Struct, frozen=True):
    id: str
    status: Status
    version: int
    position: int
    store_id: str
    customer: CustomerView
    category: str
    description: str
    priority: Priority
    assignee: str | None
    order_id: str | None
    product_id: str | None
    resolution: Resolution | None
    resolution_reason: str | None
    resolution_note: str | None
    escalations: int
    reopen_count: int
    comments: list[Comment]
    created_at: str
    updated_at: str
    resolved_at: str | None
    closed_at: str | None
    withdrawn_at: str | None


class ComplaintPage(msgspec.Struct, frozen=True):
    items: list[ComplaintView]
    next_cursor: str | None


class HistoryEvent(msgspec.Struct, frozen=True):
    event_id: str
    type: str
    version: int
    position: int
    recorded_at: str
    correlation_id: str | None
    causation_id: str | None
    user: str | None
    payload: dict[str, Any]


class History(msgspec.Struct, frozen=True):
    id: str
    events: list[HistoryEvent]


class StoreStats(msgspec.Struct, frozen=True):
    store_id: str
    by_status: dict[str, int]
    resolved: int
    mean_resolution_seconds: float | None
    p90_resolution_seconds: float | None
    sla_breaches: int


class Stats(msgspec.Struct, frozen=True):
    by_status: dict[str, int]
    resolved: int
    mean_resolution_seconds: float | None
    p90_resolution_seconds: float | None
    sla_breaches: int
    stores: list[StoreStats]


# --- the correlation id: accepted or generated, echoed on every response ------------------------


def correlation_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-correlation-id"), ""
        ).strip()
        correlation = given[:200] if given and given.isprintable() else str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = correlation

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-correlation-id"]
                headers.append((b"x-correlation-id", correlation.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with logger.contextualize(correlation_id=correlation):
            await app(scope, receive, send_with_id)

    return middleware


def correlation_of(request: Request[Any, Any, State]) -> str:
    return str(request.scope.get("state", {}).get("correlation_id") or uuid.uuid4())


# --- the routes -----------------------------------------------------------------------------


class ComplaintApi:
    """The routes, bound to a runtime's bus, store and read models."""

    def __init__(self, context: ActorContext, read_models: Callable[[], ReadModelStore]) -> None:
        self.context = context
        self._read_models = read_models
        options = context.options
        self.command_timeout = float(options.get("command_timeout", 5.0))
        self.read_timeout = float(options.get("read_timeout", 3.0))

    # commands

    async def command(
        self,
        request: Request[Any, Any, State],
        complaint_id: str,
        build: Callable[[str, datetime], Command],
        *,
        creating: bool = False,
    ) -> Response[Accepted]:
        headers = request.headers
        correlation = correlation_of(request)
        command_id = command_id_for(headers.get("idempotency-key"))
        if creating and headers.get("idempotency-key"):
            # The same key names the same complaint: a retried create answers the first.
            complaint_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, str(command_id)))
        expected = _if_match(headers.get("if-match"))
        command = build(complaint_id, datetime.now(UTC))
        payload = msgspec.json.encode(command)
        req = CommandRequest(
            aggregate_id=complaint_id,
            command=msgspec.Raw(payload),
            command_id=command_id,
            correlation_id=correlation,
            user=headers.get("x-user") or None,
            expected_version=expected,
            new_id=not headers.get("idempotency-key"),
        )
        try:
            reply = await send_command(
                self.context.bus, COMMAND_QUEUE, req, timeout=self.command_timeout
            )
        except (BusError, StoreUnavailableError) as exc:
            await self.audit_outcome(req, type(command).__name__, None)
            raise _unavailable(
                f"the command was not answered: {exc}. Retry with the same Idempotency-Key "
                "header to be safe",
                retry_after=1,
            ) from exc
        await self.audit_outcome(req, type(command).__name__, reply)
        return _accepted(reply, correlation, created=creating)

    async def audit_outcome(
        self, request: CommandRequest, name: str, reply: CommandReply | None
    ) -> None:
        """Publish the command's outcome to ``audit.events`` for the audit trail. Not
        mandatory (a topology without an audit actor is fine) and never fails the request:
        the command's events are audited from the store whatever happens here."""
        outcome = command_outcome(request, name, reply)
        try:
            await self.context.bus.publish(
                AUDIT_EXCHANGE,
                f"command.{name}.{outcome.outcome}",
                msgspec.json.encode(outcome),
                message_id=outcome_message_id(request.command_id, outcome.outcome),
                headers={
                    X_CORRELATION_ID: request.correlation_id,
                    X_AGGREGATE_ID: request.aggregate_id,
                    X_AGGREGATE_TYPE: "complaint",
                    X_EVENT_TYPE: f"{name}.{outcome.outcome}",
                    X_USER: request.user,
                    X_OCCURRED_AT: outcome.at.isoformat(),
                },
                mandatory=False,
            )
        except BusError as exc:
            logger.warning(
                "the outcome of command {command_id} was not published for the audit trail: {exc}",
                command_id=request.command_id,
                exc=exc,
            )

    # queries

    async def timed(self, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await work
        except ProblemDetailsException as exc:
            outcome = str(exc.status_code)
            raise
        else:
            outcome = "ok"
            return result
        finally:
            metrics = self.context.metrics
            metrics.query_executions_total.inc({"query": name, "outcome": outcome})
            metrics.query_duration_seconds.observe({"query": name}, time.perf_counter() - started)

    async def _check_position(self, position: int) -> None:
        """A position no event has yet cannot come from a command's answer: refuse it rather
        than wait for it."""
        head = (await self.context.store.statistics()).head_position
        if position > head:
            raise problem(
                400,
                f"min_position {position} is beyond the last event stored ({head}); pass the "
                "`position` a command answered",
            )

    async def complaint(self, complaint_id: str, min_position: int | None) -> ComplaintView:
        store = self._read_models()
        deadline = anyio.current_time() + self.read_timeout
        checked = False
        backoff = pauses()
        while True:
            doc = await store.get("complaints", COMPLAINTS, complaint_id)
            if doc is not None and (min_position is None or doc["position"] >= min_position):
                return msgspec.convert(doc, ComplaintView)
            if min_position is None or anyio.current_time() >= deadline:
                break
            if not checked:
                await self._check_position(min_position)
                checked = True
            await anyio.sleep(next(backoff))
        if min_position is not None and await self._exists(complaint_id):
            raise _unavailable(
                f"complaint {complaint_id} is not projected up to position {min_position} "
                f"yet (waited {self.read_timeout:g}s); retry shortly",
                retry_after=1,
            )
        raise problem(404, f"no complaint {complaint_id!r}", title="No such complaint")

    async def _exists(self, complaint_id: str) -> bool:
        stream = StreamId("complaint", complaint_id)
        return await self.context.store.stream_version(stream) > 0

    async def complaints(
        self,
        *,
        equals: dict[str, str | int | bool],
        ranges: dict[str, tuple[str | None, str | None]],
        limit: int,
        cursor: str | None,
        min_position: int | None,
    ) -> ComplaintPage:
        store = self._read_models()
        if min_position:  # 0: nothing to wait for
            await self._check_position(min_position)
            await self._wait_for_position(store, min_position)
        entries = await store.find(
            "complaints",
            COMPLAINTS,
            equals=equals,
            ranges=ranges,
            limit=limit + 1,
            after_key=cursor,
        )
        items = [msgspec.convert(doc, ComplaintView) for _, doc in entries[:limit]]
        next_cursor = entries[limit - 1][0] if len(entries) > limit else None
        return ComplaintPage(items=items, next_cursor=next_cursor)

    async def _wait_for_position(self, store: ReadModelStore, position: int) -> None:
        """Until the list holds a complaint whose last projected event is at or after
        ``position``. (Events of other complaints may be projected out of position order by
        competing workers: this is read-your-writes for a single writer, not a snapshot.)"""
        backoff = pauses()
        with anyio.move_on_after(self.read_timeout):
            while True:
                found = await store.find(
                    "complaints",
                    COMPLAINTS,
                    ranges={"position_key": (position_key(position), None)},
                    limit=1,
                )
                if found:
                    return
                await anyio.sleep(next(backoff))
        raise _unavailable(
            f"the complaint list has not reached position {position} yet "
            f"(waited {self.read_timeout:g}s); retry shortly",
            retry_after=1,
        )

    async def history(self, complaint_id: str) -> History:
        records = await self.context.store.read_stream(StreamId("complaint", complaint_id))
        if not records:
            raise problem(404, f"no complaint {complaint_id!r}", title="No such complaint")
        events = []
        for record in records:
            envelope = COMPLAINT_CODEC.decode(record)
            meta = record.metadata
            events.append(
                HistoryEvent(
                    event_id=str(record.event_id),
                    type=record.event_type,
                    version=record.version,
                    position=record.position,
                    recorded_at=timestamp(record.created_at),
                    correlation_id=meta.correlation_id,
                    causation_id=meta.causation_id,
                    user=meta.user,
                    payload=msgspec.to_builtins(envelope.payload),
                )
            )
        return History(id=complaint_id, events=events)

    async def stats(self, store_id: str | None) -> Stats:
        store = self._read_models()
        if store_id is not None:
            doc = await store.get("store-stats", "stores", store_id)
            documents = [doc] if doc is not None else []
        else:
            documents = []
            cursor: str | None = None
            while True:
                page = await store.list("store-stats", "stores", limit=1000, after_key=cursor)
                documents += [doc for _, doc in page]
                if len(page) < 1000:
                    break
                cursor = page[-1][0]
        stores = [_store_stats(doc) for doc in documents]
        total: dict[str, int] = {}
        histogram = [0] * (len(RESOLUTION_BUCKETS) + 1)
        seconds = 0.0
        for doc in documents:
            for status, count in doc["by_status"].items():
                total[status] = total.get(status, 0) + count
            histogram = [a + b for a, b in zip(histogram, doc["resolution_histogram"], strict=True)]
            seconds += doc["resolution_seconds_total"]
        resolved = sum(s.resolved for s in stores)
        return Stats(
            by_status=total,
            resolved=resolved,
            mean_resolution_seconds=seconds / resolved if resolved else None,
            p90_resolution_seconds=p90_seconds(histogram),
            sla_breaches=sum(s.sla_breaches for s in stores),
            stores=stores,
        )


def _store_stats(doc: Document) -> StoreStats:
    resolved = int(doc["resolved"])
    return StoreStats(
        store_id=str(doc["store_id"]),
        by_status=dict(doc["by_status"]),
        resolved=resolved,
        mean_resolution_seconds=doc["resolution_seconds_total"] / resolved if resolved else None,
        p90_resolution_seconds=p90_seconds(list(doc["resolution_histogram"])),
        sla_breaches=int(doc["sla_breaches"]),
    )


def _if_match(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise problem(400, f"If-Match must be a version number (as in the ETag), got {value!r}")
    return int(text)


def _unavailable(detail: str, *, retry_after: int) -> ProblemDetailsException:
    error = problem(503, detail)
    error.headers = {"Retry-After": str(retry_after)}
    return error


def _accepted(reply: CommandReply, correlation: str, *, created: bool) -> Response[Accepted]:
    error = reply.error
    if error is not None:
        exc = problem(error.status, error.detail, type_=error.type, title=error.title)
        extra: dict[str, Any] = {}
        if error.field is not None:
            extra["field"] = error.field
        if error.current_version is not None:
            extra["current_version"] = error.current_version
            exc.headers = {"ETag": f'"{error.current_version}"'}
        exc.extra = extra or None
        raise exc
    body = Accepted(
        id=reply.aggregate_id,
        version=reply.version,
        position=reply.position,
        replayed=reply.replayed,
        correlation_id=correlation,
    )
    headers = {"ETag": f'"{reply.version}"'}
    if created:
        headers["Location"] = f"/complaints/{reply.aggregate_id}"
    return Response(body, status_code=201 if created else 200, headers=headers)


# --- route handlers -------------------------------------------------------------------------

#: What a command route may answer besides success.
COMMAND_ERRORS = problem_responses(404, 409, 422, 503)

ComplaintId = Annotated[str, Parameter(min_length=1, max_length=255)]
MinPosition = Annotated[int | None, Parameter(ge=0, required=False)]


def complaint_routes(api: ComplaintApi) -> list[ControllerRouterHandler]:
    """The complaint routes, closed over ``api``."""

    @post(
        "/complaints",
        status_code=201,
        summary="Open a complaint",
        responses=problem_responses(409, 422, 503),
    )
    async def create(request: Request[Any, Any, State], data: CreateBody) -> Response[Accepted]:
        def build(complaint_id: str, at: datetime) -> Command:
            c = data.customer
            return CreateComplaint(
                complaint_id=complaint_id,
                store_id=data.store_id,
                customer=Customer(id=c.id, name=c.name, email=c.email, phone=c.phone),
                category=data.category,
                description=data.description,
                at=at,
                priority=data.priority,
                order_id=data.order_id,
                product_id=data.product_id,
            )

        return await api.command(request, str(uuid.uuid4()), build, creating=True)

    @post(
        "/complaints/{complaint_id:str}/assign",
        status_code=200,
        summary="Assign it",
        responses=COMMAND_ERRORS,
    )
    async def assign(
        request: Request[Any, Any, State], complaint_id: ComplaintId, data: AssignBody
    ) -> Response[Accepted]:
        return await api.command(
            request,
            complaint_id,
            lambda cid, at: AssignComplaint(cid, data.assignee, at, data.note),
        )

    @post("/complaints/{complaint_id:str}/resolve", status_code=200, responses=COMMAND_ERRORS)
    async def resolve(
        request: Request[Any, Any, State], complaint_id: ComplaintId, data: ResolveBody
    ) -> Response[Accepted]:
        return await api.command(
            request,
            complaint_id,
            lambda cid, at: ResolveComplaint(cid, data.resolution, at, data.note, data.reason),
        )

    @post("/complaints/{complaint_id:str}/escalate", status_code=200, responses=COMMAND_ERRORS)
    async def escalate(
        request: Request[Any, Any, State], complaint_id: ComplaintId, data: EscalateBody
    ) -> Response[Accepted]:
        return await api.command(
            request,
            complaint_id,
            lambda cid, at: EscalateComplaint(cid, data.reason, at, data.manager),
        )

    @post("/complaints/{complaint_id:str}/comments", status_code=200, responses=COMMAND_ERRORS)
    async def comment(
        request: Request[Any, Any, State], complaint_id: ComplaintId, data: CommentBody
    ) -> Response[Accepted]:
        author = data.author or request.headers.get("x-user") or "anonymous"
        return await api.command(
            request, complaint_id, lambda cid, at: CommentComplaint(cid, author, data.text, at)
        )

    @get(
        "/complaints/{complaint_id:str}",
        summary="One complaint, from the read model",
        responses=problem_responses(404, 503),
    )
    async def read_one(
        complaint_id: ComplaintId, min_position: MinPosition = None
    ) -> ComplaintView:
        return await api.timed("complaint", api.complaint(complaint_id, min_position))

    @get(
        "/complaints",
        summary="Complaints by filter, in id order (keyset pagination)",
        responses=problem_responses(503),
    )
    async def read_many(
        *,
        status: Status | None = None,
        store_id: Annotated[str | None, Parameter(min_length=1, max_length=255)] = None,
        assignee: Annotated[str | None, Parameter(min_length=1, max_length=255)] = None,
        customer_id: Annotated[str | None, Parameter(min_length=1, max_length=255)] = None,
        priority: Priority | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 50,
        cursor: Annotated[str | None, Parameter(min_length=1, max_length=255)] = None,
        min_position: MinPosition = None,
    ) -> ComplaintPage:
        equals: dict[str, str | int | bool] = {
            field: value
            for field, value in (
                ("status", status),
                ("store_id", store_id),
                ("assignee", assignee),
                ("customer_id", customer_id),
                ("priority", priority),
            )
            if value is not None
        }
        ranges: dict[str, tuple[str | None, str | None]] = {}
        if created_after is not None or created_before is not None:
            ranges["created_at"] = (
                None if created_after is None else timestamp(created_after),
                None if created_before is None else timestamp(created_before),
            )
        return await api.timed(
            "complaints",
            api.complaints(
                equals=equals,
                ranges=ranges,
                limit=limit,
                cursor=cursor,
                min_position=min_position,
            ),
        )

    @get(
        "/complaints/{complaint_id:str}/history",
        summary="Its events, from the event store",
        responses=problem_responses(404),
    )
    async def history(complaint_id: ComplaintId) -> History:
        return await api.timed("history", api.history(complaint_id))

    @get("/stats", summary="Counts by status and store, time to resolution, SLA breaches")
    async def stats(
        store_id: Annotated[str | None, Parameter(min_length=1, max_length=255)] = None,
    ) -> Stats:
        return await api.timed("stats", api.stats(store_id))

    return [
        create,
        assign,
        *(note_route(api, step, command) for step, command in NOTE_STEPS.items()),
        resolve,
        escalate,
        comment,
        read_one,
        read_many,
        history,
        stats,
    ]


#: The steps whose body is only an optional note: route -> command.
NOTE_STEPS: dict[str, type[NoteCommand]] = {
    "start-investigation": StartInvestigation,
    "close": CloseComplaint,
    "reopen": ReopenComplaint,
    "withdraw": WithdrawComplaint,
}


def note_route(api: ComplaintApi, step: str, command: type[NoteCommand]) -> ControllerRouterHandler:
    """``POST /complaints/{id}/<step>`` with ``{}`` or ``{"note": ...}``."""

    async def handler(
        request: Request[Any, Any, State], complaint_id: ComplaintId, data: NoteBody
    ) -> Response[Accepted]:
        return await api.command(
            request, complaint_id, lambda cid, at: command(complaint_id=cid, at=at, note=data.note)
        )

    handler.__name__ = step.replace("-", "_")
    return post(
        f"/complaints/{{complaint_id:str}}/{step}", status_code=200, responses=COMMAND_ERRORS
    )(handler)


class ComplaintGateway(ReadModelOwner, Gateway):
    """The gateway with the complaint API and the audit trail's: ``kind: gateway`` with this
    ``handler``."""

    _audit: AuditLog | None = None

    def __init__(self, context: ActorContext) -> None:
        self.api = ComplaintApi(context, lambda: self.read_models)
        routes = [
            *complaint_routes(self.api),
            *saga_routes(lambda: self.read_models),
            *audit_routes(lambda: self.audit),
        ]
        super().__init__(context, routes, middleware=[correlation_middleware])

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self._audit = await self._stack.enter_async_context(
            open_audit_log(
                self.context.topology.database_url,
                schema=str(self.context.options.get("schema", "public")),
            )
        )
        return self

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            raise ActorError("the gateway's audit trail is not open: use `async with gateway:`")
        return self._audit

    def _pool_size(self) -> int:
        return 8
