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


class MigrationError(StoreError):
    """A schema migration failed; the database is left at the previous version."""
