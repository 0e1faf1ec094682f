"""Every error magasin raises on purpose derives from :class:`MagasinError`.

The tree is shallow and each error carries its context as attributes, so callers can
branch on the type and users can act on the message: it names the thing and the fix.
Driver errors (psycopg, aio-pika) are translated into these at the adapter edge.
"""

from __future__ import annotations

from uuid import UUID


class MagasinError(Exception):
    """Base of every error raised by magasin."""


# --- configuration -----------------------------------------------------------------------


class ConfigurationError(MagasinError):
    """A setting is missing or malformed (environment, DSN, command-line option)."""


# --- event store ---------------------------------------------------------------------------


class StoreError(MagasinError):
    """Base of the event store errors."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or refused the connection."""

    def __init__(self, target: str, cause: BaseException | str) -> None:
        self.target = target
        self.cause = cause
        super().__init__(
            f"cannot reach the event store at {target}: {cause}. Check that PostgreSQL is "
            "running and that MAGASIN_DATABASE_URL (host, port, database, user) is right."
        )


class ConcurrencyError(StoreError):
    """The stream moved on since the caller read it: nothing was written."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r} is at version {actual}, not at the expected version {expected}; "
            "nothing was written. Reload the stream and decide again."
        )


class InvalidRequestError(StoreError):
    """A request that can never succeed as written (bad limit, bad version, bad ids)."""


class RebuildInProgressError(StoreError):
    """Another rebuild of the same projection is running (``ReadModelStore.rebuild``)."""

    def __init__(self, projection: str) -> None:
        self.projection = projection
        super().__init__(
            f"projection {projection!r} is already being rebuilt (another `magasin replay`?); "
            "wait for it to finish, or stop it, then try again"
        )


class RebuildLockLostError(StoreError):
    """A rebuild's lock ended with its connection: another rebuild may have started since."""

    def __init__(self, projection: str) -> None:
        self.projection = projection
        super().__init__(
            f"the rebuild of {projection!r} lost its lock (the connection holding it ended); "
            "nothing of it was swapped in; run the replay again"
        )


class InvalidAppendError(InvalidRequestError):
    """An append request that can never succeed (empty, negative version, bad ids)."""


class StreamIdTooLongError(InvalidAppendError):
    """An identifier does not fit its column."""

    def __init__(self, field: str, value: str, limit: int) -> None:
        self.field = field
        self.value = value
        self.limit = limit
        super().__init__(
            f"{field} is {len(value)} characters long, the limit is {limit}: "
            f"{value[:40]!r}{'...' if len(value) > 40 else ''}"
        )


class EventEncodeError(StoreError):
    """A payload or metadata that msgspec cannot turn into JSON."""

    def __init__(self, event_type: str, cause: BaseException) -> None:
        self.event_type = event_type
        self.cause = cause
        super().__init__(
            f"cannot encode event {event_type!r} as JSON: {cause}. Event payloads must be "
            "msgspec Structs made of JSON-encodable fields."
        )


class EventDecodeError(StoreError):
    """A stored event cannot be turned back into its type."""

    def __init__(self, event_id: UUID | str, event_type: str, reason: str) -> None:
        self.event_id = event_id
        self.event_type = event_type
        self.reason = reason
        super().__init__(f"cannot decode stored event {event_id} ({event_type}): {reason}")


class UnknownEventTypeError(EventDecodeError):
    """A stored event whose type no registered aggregate declares."""

    def __init__(self, event_id: UUID | str, event_type: str, known: list[str]) -> None:
        self.known = known
        super().__init__(
            event_id,
            event_type,
            f"no event type {event_type!r} is registered (known: {', '.join(known) or 'none'}); "
            "register the type, or an upcaster that renames it",
        )


class UpcastError(EventDecodeError):
    """An upcaster raised or returned something that is not a JSON object."""


class LeaseLostError(StoreError):
    """A leader lease was lost: another process may hold it now."""

    def __init__(self, name: str, cause: BaseException | str) -> None:
        self.name = name
        super().__init__(f"lost the lease {name!r} ({cause}); another process may lead now")


class MigrationError(StoreError):
    """A schema migration failed; the database is left at the previous version."""


# --- bus -----------------------------------------------------------------------------------


class BusError(MagasinError):
    """Base of the message bus errors."""


class BusUnavailableError(BusError):
    """The broker cannot be reached."""

    def __init__(self, target: str, cause: BaseException | str) -> None:
        self.target = target
        self.cause = cause
        super().__init__(
            f"cannot reach the message broker at {target}: {cause}. Check that RabbitMQ is "
            "running and that MAGASIN_AMQP_URL (host, port, vhost, user) is right."
        )


class UnroutableError(BusError):
    """A mandatory message matched no queue: a binding is missing."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            f"message to exchange {exchange!r} with routing key {routing_key!r} reached no "
            "queue; declare a queue bound to it (see `magasin check`)"
        )


class PublishNotConfirmedError(BusError):
    """The broker refused (nacked) or never confirmed a publish."""


class UnknownQueueError(BusError):
    """A queue the request names does not exist."""


class RequestTimeoutError(BusError):
    """Nobody answered a request in time; an answer arriving later is dropped."""

    def __init__(self, queue: str, message_id: str, timeout: float) -> None:
        self.queue = queue
        self.message_id = message_id
        self.timeout = timeout
        super().__init__(
            f"no answer from queue {queue!r} to request {message_id} within {timeout:g}s: is the "
            "actor consuming it running? Retrying with the same id is safe when the handler is "
            "idempotent"
        )


# --- actors and supervision ---------------------------------------------------------------


class ActorError(MagasinError):
    """Base of the errors about actors and their supervision."""


class Retry(ActorError):
    """Raised by a handler: handle this message again later (after ``delay`` seconds at
    least, rounded up to a rung of the retry ladder). Counts as an attempt."""

    def __init__(self, reason: str = "retry requested", delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(reason)


class Reject(ActorError):
    """Raised by a handler: this message can never succeed; send it to the DLQ now."""


class ParkedError(ActorError):
    """Why an event went to the dead-letter queue without being handled: an earlier event
    of its aggregate failed and is in the dead-letter queue; it waits behind that one."""

    def __init__(self, actor: str, key: str, blocker: str) -> None:
        self.actor = actor
        self.key = key
        self.blocker = blocker
        super().__init__(
            f"actor {actor!r} parked it behind message {blocker}, an earlier event of "
            f"aggregate {key} that is in the dead-letter queue: replay them in order "
            "(`magasin dlq replay QUEUE --all`), or skip that one on purpose "
            f"(`magasin dlq skip QUEUE --id {blocker}`) and replay"
        )


class MessageDecodeError(ActorError):
    """A message body that is not what the handler expects; it goes straight to the DLQ."""

    def __init__(self, message_id: str, body: bytes, cause: BaseException | str) -> None:
        self.message_id = message_id
        self.body = body
        self.cause = cause
        super().__init__(f"cannot decode message {message_id}: {cause}")


class HandlerTimeoutError(ActorError):
    """A handler overran its ``handler_timeout``; the actor is restarted."""

    def __init__(self, actor: str, timeout: float) -> None:
        self.actor = actor
        self.timeout = timeout
        super().__init__(
            f"actor {actor!r}: handler ran longer than handler_timeout={timeout}s; raise the "
            "timeout in the topology's retry section if the work is legitimately slow"
        )


class InjectedCrash(ActorError):
    """A crash asked for by a chaos drill (``POST /actors/{name}/crash``)."""


class EscalationError(ActorError):
    """An actor restarted more than ``max_restarts`` times within ``window``."""

    def __init__(self, actor: str, restarts: int, window: float, last_error: str | None) -> None:
        self.actor = actor
        self.restarts = restarts
        self.window = window
        self.last_error = last_error
        super().__init__(
            f"actor {actor!r} restarted {restarts} times within {window:g}s or in a row "
            f"(last error: {last_error}); restarting is not helping, so the runtime stops. "
            "Fix the cause, or raise restart.max_restarts / restart.window in the topology"
        )


class UnknownActorError(ActorError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"no actor named {name!r}; running actors: {', '.join(known)}")


class UnknownExchangeError(BusError):
    """A publish or a binding names an exchange that was never declared."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        super().__init__(
            f"exchange {exchange!r} does not exist; declare it in the bus plan (see `magasin "
            "check`)"
        )


# --- topology ------------------------------------------------------------------------------


class TopologyError(ConfigurationError):
    """The topology file is invalid. ``path`` names the YAML key (``actors.audit.bind``),
    ``source`` the file and ``line`` its line when known; ``reason`` is the plain sentence."""

    def __init__(
        self, reason: str, *, path: str = "", source: str | None = None, line: int | None = None
    ) -> None:
        self.reason = reason
        self.path = path
        self.source = source
        self.line = line
        where = source or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(": ".join(part for part in (where, path, reason) if part))
