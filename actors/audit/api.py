"""``GET /audit``: the trail, filtered, in the order it was recorded, with causation links.

Each item's ``causation_id`` is the ``event_id`` of what caused it (for an event, the command
that wrote it: the gateway records a command's outcome under the command id), so a client can
draw the tree of one request from ``GET /audit?correlation_id=...``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import get
from litestar.params import Parameter
from litestar.types import ControllerRouterHandler

from runtime.http import problem, problem_responses
from runtime.store.audit import AuditLog, AuditQuery, AuditRecord
from runtime.store.protocol import as_utc

MAX_LIMIT = 1000


class AuditItem(msgspec.Struct, frozen=True):
    seq: int
    event_id: str
    kind: str
    type: str
    aggregate_type: str | None
    aggregate_id: str | None
    correlation_id: str | None
    causation_id: str | None
    user: str | None
    occurred_at: datetime
    recorded_at: datetime
    payload_digest: str
    hash: str


class AuditPage(msgspec.Struct, frozen=True):
    items: list[AuditItem]
    next_cursor: str | None


def item(record: AuditRecord) -> AuditItem:
    fields = msgspec.structs.asdict(record)
    return AuditItem(
        **{n: fields[n] for n in AuditItem.__struct_fields__ if n in fields and n != "event_id"},
        event_id=str(record.event_id),
        type=record.event_type,
    )


Filter = Annotated[str | None, Parameter(min_length=1, max_length=255)]


def audit_routes(log: Callable[[], AuditLog]) -> list[ControllerRouterHandler]:
    @get(
        "/audit",
        summary="The audit trail, in recorded order (keyset pagination)",
        responses=problem_responses(400, 503),
    )
    async def audit(
        *,
        correlation_id: Filter = None,
        aggregate_id: Filter = None,
        user: Filter = None,
        from_: Annotated[datetime | None, Parameter(query="from")] = None,
        to: datetime | None = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 100,
        cursor: Annotated[str | None, Parameter(min_length=1, max_length=20)] = None,
    ) -> AuditPage:
        if cursor is not None and not cursor.isdigit():
            raise problem(400, f"cursor must be a next_cursor this route returned, got {cursor!r}")
        query = AuditQuery(
            correlation_id=correlation_id,
            aggregate_id=aggregate_id,
            user=user,
            since=None if from_ is None else as_utc(from_),
            until=None if to is None else as_utc(to),
            after_seq=int(cursor or 0),
            limit=limit,
        )
        found = await log().query(query)
        next_cursor = str(found[-1].seq) if len(found) == limit else None
        return AuditPage(items=[item(r) for r in found], next_cursor=next_cursor)

    return [audit]
