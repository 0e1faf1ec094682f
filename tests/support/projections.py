"""A ledger projection for end-to-end tests: one document per account, plus one per
event counting how many times its effect was applied (committed with the effect)."""

from __future__ import annotations

from typing import Any

from runtime.projection import ProjectionHandler
from runtime.store.codec import Envelope, EventCodec
from runtime.store.readmodel import ReadModelTx
from tests.support.ledger import Deposited, LedgerEvent, Opened, Renamed, Withdrawn


class LedgerBalances(ProjectionHandler):
    codec = EventCodec().register(LedgerEvent)

    async def apply(self, tx: ReadModelTx, event: Envelope[Any]) -> None:
        account = await tx.get("accounts", event.aggregate_id) or {"balance": 0, "version": 0}
        if event.version != account["version"] + 1:
            raise AssertionError(
                f"{event.aggregate_id}: v{event.version} after v{account['version']}"
            )
        match event.payload:
            case Opened(owner=owner) | Renamed(owner=owner):
                account["owner"] = owner
            case Deposited(amount=amount):
                account["balance"] += amount
            case Withdrawn(amount=amount):
                account["balance"] -= amount
        account["version"] = event.version
        await tx.put("accounts", event.aggregate_id, account)
        applied = await tx.get("applied", str(event.event_id)) or {"count": 0}
        await tx.put("applied", str(event.event_id), {"count": applied["count"] + 1})
