"""Commands over the bus: request/reply between the gateway (or a saga) and aggregate actors.

A client sends a ``CommandRequest`` to an aggregate type's command queue with
``Bus.request`` and waits (bounded) for the ``CommandReply``. The aggregate actor
(``AggregateHandler``, ``kind: aggregate``) loads the aggregate (snapshot + tail), decides,
appends with the version it loaded, answers, and only then acks: a crash in between
redelivers the command, and its command id makes the second execution answer the first
result without writing anything (guarantee 2 for commands).

- ``command_id``: the idempotency key. The same id is answered with the first result.
- ``expected_version`` (HTTP ``If-Match``): refused with a ``conflict`` error naming the
  current version when the aggregate is elsewhere.
- Without an expected version, a concurrent writer's conflict is resolved by loading again
  and deciding again (a few times), since the command did not ask for a particular version.

A refusal is an answer, not a failure of the message: the reply carries a ``CommandError``
(an HTTP-like status, a problem type and a plain message) and the request is acked. Only
infrastructure errors (store or broker down) leave the request unanswered, held by the
runtime and retried in place; the client's timeout then tells its user to retry, which the
command id makes safe.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
from loguru import logger

from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import X_ORDERING_KEY, Bus, Delivery
from runtime.errors import ConcurrencyError, MagasinError
from runtime.messages import X_CORRELATION_ID
from runtime.store.aggregate import AggregateRepository, Decider, Decision
from runtime.store.codec import EventCodec
from runtime.store.protocol import Metadata

C = TypeVar("C")
E = TypeVar("E", bound=msgspec.Struct)
S = TypeVar("S")

#: Namespace of command ids derived from an idempotency key that is not a UUID.
COMMAND_ID_NAMESPACE = uuid.UUID("6f1b7f5e-4f7a-4a65-9c55-0e5b8c1f3a10")
#: Decisions tried again after a concurrent writer moved the stream (no expected version).
CONFLICT_RETRIES = 5
#: Message ids an aggregate instance remembers having started (see ``_first_run``).
SEEN_DELIVERIES = 10_000

PROBLEM_BASE = "urn:magasin:problem:"


class CommandRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a client sends: the command (the aggregate's own JSON) and why it is sent."""

    aggregate_id: str
    command: msgspec.Raw
    command_id: uuid.UUID
    correlation_id: str
    causation_id: str | None = None
    user: str | None = None
    expected_version: int | None = None
    #: The sender made ``command_id`` up for this send (no idempotency key): a first delivery
    #: of it cannot have run before, so the aggregate skips the command-result lookup.
    new_id: bool = False


class CommandError(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a command was refused. ``status`` follows HTTP (404, 409, 422)."""

    status: int
    type: str
    title: str
    detail: str
    field: str | None = None
    current_version: int | None = None


class CommandReply(msgspec.Struct, frozen=True, omit_defaults=True):
    aggregate_id: str
    version: int = 0  # the aggregate's version after the command
    position: int | None = None  # the store position of its last event (read-your-writes)
    replayed: bool = False  # the command id was executed before: its first result
    events: tuple[str, ...] = ()
    error: CommandError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def command_id_for(key: str | None) -> uuid.UUID:
    """The command id of an idempotency key: the key itself if it is a UUID, else a UUID
    derived from it (the same key always gives the same id); a fresh one without a key."""
    if not key:
        return uuid.uuid4()
    try:
        return uuid.UUID(key)
    except ValueError:
        return uuid.uuid5(COMMAND_ID_NAMESPACE, key)


async def send_command(
    bus: Bus,
    queue: str,
    request: CommandRequest,
    *,
    timeout: float,  # noqa: ASYNC109 - the bus's request timeout, not a cancel scope
) -> CommandReply:
    """Send ``request`` to ``queue`` and wait for the answer; ``RequestTimeoutError`` if none
    came within ``timeout`` (retrying with the same command id is safe)."""
    reply = await bus.request(
        queue,
        msgspec.json.encode(request),
        message_id=str(request.command_id),
        headers={X_CORRELATION_ID: request.correlation_id, X_ORDERING_KEY: request.aggregate_id},
        timeout=timeout,
    )
    return msgspec.json.decode(reply.body, type=CommandReply)


class AggregateHandler(Generic[C, E, S]):
    """Base of ``kind: aggregate`` handlers. A subclass sets ``codec``, ``command_type`` (the
    union of its commands) and implements ``make_decider`` and ``describe``; options:
    ``snapshot_every`` (default 100)."""

    codec: ClassVar[EventCodec]
    command_type: ClassVar[Any]

    def __init__(self, context: ActorContext) -> None:
        self.context = context
        options = context.options
        snapshot_every = options.get("snapshot_every", 100)
        self.repository: AggregateRepository[C, E, S] = AggregateRepository(
            context.store,
            self.codec,
            self.make_decider(options),
            snapshot_every=None if snapshot_every in (None, 0) else int(snapshot_every),
        )
        self._decode_command: Callable[[bytes], C] = msgspec.json.Decoder(self.command_type).decode
        #: Deliveries this instance began handling: a second call for one (an in-place retry
        #: after an outage) may follow a first that appended, so it looks the command up.
        self._started: OrderedDict[str, None] = OrderedDict()

    def make_decider(self, options: dict[str, Any]) -> Decider[C, E, S]:
        raise NotImplementedError

    def describe(self, error: MagasinError) -> CommandError | None:
        """The refusal to answer for a domain error; None: not a refusal (re-raised)."""
        return None

    def command_name(self, command: C) -> str:
        return type(command).__name__

    async def handle(self, delivery: Delivery) -> None:
        request = decode_body(delivery, CommandRequest)
        started = time.perf_counter()
        name = "unknown"
        try:
            command = self._decode_command(request.command)
            name = self.command_name(command)
            reply = await self._execute(request, command, first=self._first_run(delivery))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = self._refused(request, _invalid(str(exc)))
        except MagasinError as exc:
            refusal = self.describe(exc)
            if refusal is None:
                raise
            reply = self._refused(request, refusal)
        outcome = "rejected" if reply.error is not None else "replayed" if reply.replayed else "ok"
        metrics = self.context.metrics
        metrics.command_executions_total.inc({"command": name, "outcome": outcome})
        metrics.command_duration_seconds.observe({"command": name}, time.perf_counter() - started)
        await self.context.bus.reply(delivery, msgspec.json.encode(reply))

    def _refused(self, request: CommandRequest, error: CommandError) -> CommandReply:
        logger.info(
            "command {command_id} on {aggregate} refused: {detail}",
            command_id=request.command_id,
            aggregate=request.aggregate_id,
            detail=error.detail,
        )
        return CommandReply(aggregate_id=request.aggregate_id, error=error)

    def _first_run(self, delivery: Delivery) -> bool:
        """True when this delivery has surely not been handled before, anywhere: not a
        redelivery, not a retry, not seen by this instance."""
        seen = delivery.message_id in self._started
        self._started[delivery.message_id] = None
        if len(self._started) > SEEN_DELIVERIES:
            self._started.popitem(last=False)
        return not (seen or delivery.redelivered or delivery.attempts)

    async def _execute(self, request: CommandRequest, command: C, *, first: bool) -> CommandReply:
        metadata = Metadata(
            correlation_id=request.correlation_id,
            causation_id=request.causation_id or str(request.command_id),
            command_id=request.command_id,
            user=request.user,
        )
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                decision = await self.repository.execute(
                    request.aggregate_id,
                    command,
                    metadata,
                    expected_version=request.expected_version,
                    new_command=request.new_id and first and attempt == 1,
                )
            except ConcurrencyError as exc:
                if request.expected_version is not None or attempt == CONFLICT_RETRIES:
                    return self._refused(request, conflict(exc))
                continue
            return self._answer(request, decision)
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, request: CommandRequest, decision: Decision[E]) -> CommandReply:
        result = decision.result
        if result is None:  # nothing to do: the current version is the answer
            return CommandReply(aggregate_id=request.aggregate_id, version=decision.version)
        return CommandReply(
            aggregate_id=result.stream.aggregate_id,  # a replayed command's first target
            version=decision.version,
            position=result.last_position,
            replayed=result.replayed,
            events=tuple(type(e).__name__ for e in decision.events),
        )


def conflict(exc: ConcurrencyError) -> CommandError:
    return CommandError(
        status=409,
        type=f"{PROBLEM_BASE}version-conflict",
        title="Version conflict",
        detail=(
            f"the aggregate is at version {exc.actual}, not {exc.expected}: read it again, "
            "then send the command with If-Match set to the current version"
        ),
        current_version=exc.actual,
    )


def _invalid(detail: str, field: str | None = None) -> CommandError:
    return CommandError(
        status=422,
        type=f"{PROBLEM_BASE}invalid-command",
        title="Invalid command",
        detail=detail,
        field=field,
    )
