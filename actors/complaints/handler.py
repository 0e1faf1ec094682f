"""The complaint aggregate actor (``kind: aggregate``, queue ``complaint.commands``).

Commands arrive over RabbitMQ request/reply from the gateway (or the saga); the runtime's
``AggregateHandler`` loads, decides with ``domain.decide``, appends and answers. This module
only says which decider and how the domain's refusals read as answers.
Options: ``snapshot_every`` (default 100), ``reopen_window`` (seconds, default 14 days).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from actors.complaints.domain import (
    CODEC,
    COMMAND_NAMES,
    DEFAULT_REOPEN_WINDOW,
    Command,
    ComplaintEvent,
    ComplaintState,
    complaint_decider,
)
from actors.complaints.errors import (
    ComplaintAlreadyExists,
    ComplaintNotFound,
    InvalidField,
    InvalidTransition,
)
from runtime.commands import PROBLEM_BASE, AggregateHandler, CommandError
from runtime.errors import MagasinError
from runtime.store.aggregate import Decider

COMMAND_QUEUE = "complaint.commands"


class ComplaintActor(AggregateHandler[Command, ComplaintEvent, ComplaintState]):
    codec = CODEC
    command_type = Command

    def make_decider(
        self, options: dict[str, Any]
    ) -> Decider[Command, ComplaintEvent, ComplaintState]:
        window = options.get("reopen_window")
        reopen = DEFAULT_REOPEN_WINDOW if window is None else timedelta(seconds=float(window))
        return complaint_decider(reopen)

    def command_name(self, command: Command) -> str:
        return COMMAND_NAMES.get(type(command), type(command).__name__)

    def describe(self, error: MagasinError) -> CommandError | None:
        return describe(error)


#: The domain's refusals as answers: error class -> (HTTP status, problem type, title). The
#: first class the error is an instance of wins.
REFUSALS: dict[type[MagasinError], tuple[int, str, str]] = {
    InvalidField: (422, "invalid-field", "Invalid field"),
    ComplaintNotFound: (404, "not-found", "No such complaint"),
    ComplaintAlreadyExists: (409, "already-exists", "Complaint already exists"),
    InvalidTransition: (409, "invalid-transition", "Not allowed in this status"),
}


def describe(error: MagasinError) -> CommandError | None:
    """A domain refusal as the answer to send back (None: not the domain's refusal)."""
    for kind, (status, problem, title) in REFUSALS.items():
        if isinstance(error, kind):
            field = error.field if isinstance(error, InvalidField) else None
            return CommandError(
                status=status,
                type=f"{PROBLEM_BASE}{problem}",
                title=title,
                detail=str(error),
                field=field,
            )
    return None
