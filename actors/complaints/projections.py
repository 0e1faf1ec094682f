"""The complaint read models, each its own projection actor and queue.

- ``ComplaintList`` (projection ``complaints``): one document per complaint, the query model
  of ``GET /complaints/{id}`` and ``GET /complaints``.
- ``AssigneeWorkload`` (projection ``workload``): per assignee, open complaints by status.
- ``StoreStatistics`` (projection ``store-stats``): per store, counts by status, time to
  resolution (sum, count and a histogram for the p90) and SLA breaches.

Each is a ``ProjectionHandler``: effect and dedup record in one transaction, gap healing
from the store, so a read model is always the fold of its streams. Timestamps are stored as
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always with microseconds) so that text order is time order.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from actors.complaints.domain import (
    CODEC,
    ComplaintAssigned,
    ComplaintClosed,
    ComplaintCommented,
    ComplaintCreated,
    ComplaintEscalated,
    ComplaintInvestigationStarted,
    ComplaintReopened,
    ComplaintResolved,
    ComplaintWithdrawn,
)
from runtime.projection import ProjectionHandler
from runtime.store.codec import Envelope
from runtime.store.protocol import RecordedEvent
from runtime.store.readmodel import Document, ReadModelTx

COMPLAINTS: Final = "complaints"  # the collection of ComplaintList's documents
OPEN: Final = ("opened", "assigned", "investigating")
#: Time to resolution allowed by priority; a later resolution is an SLA breach.
SLA: Final = {
    "urgent": timedelta(hours=4),
    "high": timedelta(hours=24),
    "normal": timedelta(hours=72),
    "low": timedelta(days=7),
}
#: Upper bounds (seconds) of the time-to-resolution histogram; the last bucket is open.
RESOLUTION_BUCKETS: Final = (
    60,
    300,
    900,
    3600,
    4 * 3600,
    12 * 3600,
    86400,
    2 * 86400,
    3 * 86400,
    7 * 86400,
    14 * 86400,
    30 * 86400,
)


def timestamp(moment: datetime) -> str:
    """A UTC timestamp whose text order is its time order."""
    if moment.tzinfo is not None and moment.tzinfo is not UTC:  # naive: UTC already
        offset = moment.utcoffset()
        if offset:
            moment = moment - offset
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


def position_key(position: int) -> str:
    """A store position as text whose order is the numbers' (for range queries)."""
    return f"{position:020d}"


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class ComplaintList(ProjectionHandler):
    """One document per complaint: what ``GET /complaints/{id}`` answers."""

    codec = CODEC
    projection_name = "complaints"

    def prefetch(self, record: RecordedEvent) -> Iterable[tuple[str, str]]:
        return [(COMPLAINTS, record.aggregate_id)]

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        payload = event.payload
        if isinstance(payload, ComplaintCreated):
            doc: Document = {
                "id": event.aggregate_id,
                "store_id": payload.store_id,
                "customer": msgspec.to_builtins(payload.customer),
                "customer_id": payload.customer.id,
                "order_id": payload.order_id,
                "product_id": payload.product_id,
                "category": payload.category,
                "description": payload.description,
                "priority": payload.priority,
                "status": "opened",
                "assignee": None,
                "resolution": None,
                "resolution_reason": None,
                "resolution_note": None,
                "escalations": 0,
                "comments": [],
                "reopen_count": 0,
                "created_at": timestamp(payload.created_at),
                "resolved_at": None,
                "closed_at": None,
                "withdrawn_at": None,
            }
        else:
            found = await tx.get(COMPLAINTS, event.aggregate_id)
            if found is None:  # an event of a complaint this projection never saw created
                return
            doc = found
            _apply(doc, payload)
        doc["version"] = event.version
        doc["position"] = event.position
        doc["position_key"] = position_key(event.position)
        doc["correlation_id"] = event.metadata.correlation_id
        doc["updated_at"] = timestamp(event.created_at)
        await tx.put(COMPLAINTS, event.aggregate_id, doc)


def _apply(doc: Document, payload: Any) -> None:
    if isinstance(payload, ComplaintAssigned):
        doc["assignee"] = payload.assignee
        if doc["status"] == "opened":
            doc["status"] = "assigned"
    elif isinstance(payload, ComplaintInvestigationStarted):
        doc["status"] = "investigating"
    elif isinstance(payload, ComplaintResolved):
        doc["status"] = "resolved"
        doc["resolution"] = payload.resolution
        doc["resolution_reason"] = payload.reason
        doc["resolution_note"] = payload.note
        doc["resolved_at"] = timestamp(payload.resolved_at)
    elif isinstance(payload, ComplaintClosed):
        doc["status"] = "closed"
        doc["closed_at"] = timestamp(payload.closed_at)
    elif isinstance(payload, ComplaintReopened):
        doc["status"] = "assigned" if doc.get("assignee") else "opened"
        doc["resolution"] = doc["resolution_reason"] = doc["resolution_note"] = None
        doc["resolved_at"] = doc["closed_at"] = None
        doc["reopen_count"] = doc.get("reopen_count", 0) + 1
    elif isinstance(payload, ComplaintEscalated):
        doc["priority"] = payload.priority
        doc["escalations"] = doc.get("escalations", 0) + 1
        doc["escalated_to"] = payload.manager
    elif isinstance(payload, ComplaintWithdrawn):
        doc["status"] = "withdrawn"
        doc["withdrawn_at"] = timestamp(payload.withdrawn_at)
    elif isinstance(payload, ComplaintCommented):
        doc.setdefault("comments", []).append(
            {"author": payload.author, "text": payload.text, "at": timestamp(payload.commented_at)}
        )


#: What ``_Tracked`` projections keep per complaint.
TRACKED: Final = ("store_id", "status", "assignee", "priority", "created_at")


class _Tracked(ProjectionHandler):
    """A projection that keeps, per complaint, the little it needs to compute deltas."""

    codec = CODEC

    def prefetch(self, record: RecordedEvent) -> Iterable[tuple[str, str]]:
        return [(COMPLAINTS, record.aggregate_id)]

    async def _before_after(
        self, tx: ReadModelTx, event: Envelope[Any]
    ) -> tuple[Document | None, Document | None]:
        """The complaint's tracked fields before and after ``event`` (None: unknown)."""
        payload = event.payload
        before = await tx.get(COMPLAINTS, event.aggregate_id)
        if isinstance(payload, ComplaintCreated):
            after: Document = {
                "store_id": payload.store_id,
                "status": "opened",
                "assignee": None,
                "priority": payload.priority,
                "created_at": timestamp(payload.created_at),
            }
            before = None
        elif before is None:
            return None, None
        else:
            changed = dict(before)
            _apply(changed, payload)
            after = {field: changed.get(field) for field in TRACKED}
        await tx.put(COMPLAINTS, event.aggregate_id, after)
        return before, after


class AssigneeWorkload(_Tracked):
    """Per assignee: open complaints, by status and in all (``collection`` ``assignees``)."""

    projection_name = "workload"

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        before, after = await self._before_after(tx, event)
        if after is None:
            return
        old = _load(before)
        new = _load(after)
        if old == new:
            return
        for assignee, status, delta in ((*old, -1), (*new, +1)):
            if assignee is None or status not in OPEN:
                continue
            doc = await tx.get("assignees", assignee, for_update=True) or {
                "assignee": assignee,
                "open": 0,
                "by_status": {},
            }
            doc["open"] += delta
            doc["by_status"][status] = doc["by_status"].get(status, 0) + delta
            await tx.put("assignees", assignee, doc)


def _load(tracked: Document | None) -> tuple[str | None, str | None]:
    if tracked is None:
        return None, None
    return tracked.get("assignee"), tracked.get("status")


class StoreStatistics(_Tracked):
    """Per store (``collection`` ``stores``): counts by status, resolutions, SLA breaches."""

    projection_name = "store-stats"

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        before, after = await self._before_after(tx, event)
        if after is None:
            return
        store_id = str(after["store_id"])
        doc = await tx.get("stores", store_id, for_update=True) or new_store_document(store_id)
        old_status = None if before is None else before.get("status")
        new_status = after.get("status")
        if old_status != new_status:
            if old_status is not None:
                doc["by_status"][old_status] = doc["by_status"].get(old_status, 0) - 1
            if new_status is not None:
                doc["by_status"][new_status] = doc["by_status"].get(new_status, 0) + 1
        if isinstance(event.payload, ComplaintResolved):
            created = parse_timestamp(str(after["created_at"]))
            seconds = max(0.0, (event.payload.resolved_at - created).total_seconds())
            doc["resolved"] += 1
            doc["resolution_seconds_total"] += seconds
            index = next(
                (i for i, bound in enumerate(RESOLUTION_BUCKETS) if seconds <= bound),
                len(RESOLUTION_BUCKETS),
            )
            doc["resolution_histogram"][index] += 1
            sla = SLA.get(str(after.get("priority")), SLA["normal"])
            if seconds > sla.total_seconds():
                doc["sla_breaches"] += 1
        await tx.put("stores", store_id, doc)


def new_store_document(store_id: str) -> Document:
    return {
        "store_id": store_id,
        "by_status": {},
        "resolved": 0,
        "resolution_seconds_total": 0.0,
        "resolution_histogram": [0] * (len(RESOLUTION_BUCKETS) + 1),
        "sla_breaches": 0,
    }


def p90_seconds(histogram: list[int]) -> float | None:
    """The upper bound of the bucket holding the 90th percentile (None: no resolution;
    infinity: beyond the last bound)."""
    total = sum(histogram)
    if not total:
        return None
    running = 0
    for index, count in enumerate(histogram):
        running += count
        if running >= 0.9 * total:
            return float(RESOLUTION_BUCKETS[index]) if index < len(RESOLUTION_BUCKETS) else None
    return None
