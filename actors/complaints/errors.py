"""The complaint domain's errors: what a command got wrong, in words a caller can act on.

Each carries its context as attributes; the HTTP edge maps them to status codes:
``InvalidField`` → 422 (with ``field``), ``ComplaintNotFound`` → 404, ``ComplaintAlreadyExists``
and ``InvalidTransition`` (``ReopenWindowClosed`` included) → 409.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from runtime.errors import MagasinError

#: How an action reads after "it cannot be ...", by the command's short name.
_PARTICIPLES = {
    "create": "created",
    "assign": "assigned",
    "start_investigation": "put under investigation",
    "resolve": "resolved",
    "close": "closed",
    "reopen": "reopened",
    "escalate": "escalated",
    "withdraw": "withdrawn",
    "comment": "commented on",
}


class ComplaintError(MagasinError):
    """Base of the complaint domain's errors: the command was refused, nothing was written."""


class InvalidField(ComplaintError):
    """A command field holds a value that can never be accepted (HTTP 422).

    ``field`` names it (dotted for nested values: ``customer.email``), ``reason`` says what a
    valid value looks like.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


class ComplaintNotFound(ComplaintError):
    """A command other than create names a complaint that does not exist (HTTP 404)."""

    def __init__(self, complaint_id: str) -> None:
        self.complaint_id = complaint_id
        super().__init__(
            f"complaint {complaint_id} does not exist; check the id, or create the complaint first"
        )


class ComplaintAlreadyExists(ComplaintError):
    """A create names a complaint that already exists (HTTP 409)."""

    def __init__(self, complaint_id: str) -> None:
        self.complaint_id = complaint_id
        super().__init__(
            f"complaint {complaint_id} already exists; create the new complaint under another "
            "id, or send a command that changes the existing one"
        )


class InvalidTransition(ComplaintError):
    """The complaint's status does not allow the action (HTTP 409).

    ``allowed`` lists the statuses in which the action is accepted; ``detail``, when given,
    replaces that list in the message with a more precise reason.
    """

    def __init__(
        self,
        complaint_id: str,
        status: str,
        action: str,
        allowed: Iterable[str] = (),
        *,
        detail: str | None = None,
    ) -> None:
        self.complaint_id = complaint_id
        self.status = status
        self.action = action
        self.allowed = tuple(allowed)
        if detail is None:
            where = ", ".join(self.allowed) if self.allowed else "never"
            detail = f"{action} is allowed when {where}"
        participle = _PARTICIPLES.get(action, f"the target of {action}")
        super().__init__(
            f"complaint {complaint_id} is {status}: it cannot be {participle} ({detail})"
        )


class ReopenWindowClosed(InvalidTransition):
    """A reopen came more than ``window`` after the complaint was resolved (HTTP 409)."""

    def __init__(
        self,
        complaint_id: str,
        resolved_at: datetime,
        window: timedelta,
        *,
        status: str = "resolved",
    ) -> None:
        self.resolved_at = resolved_at
        self.window = window
        super().__init__(
            complaint_id,
            status,
            "reopen",
            ("resolved", "closed"),
            detail=(
                f"it was resolved at {resolved_at.isoformat()} and may be reopened only within "
                f"{describe_duration(window)} of that; open a new complaint instead"
            ),
        )


def describe_duration(duration: timedelta) -> str:
    """``14 days``, ``36 hours``, ``90 seconds``: the largest unit that divides it exactly."""
    seconds = int(duration.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
