"""Complaint histories written through the real decider, for projection and replay tests."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from actors.complaints.domain import (
    CODEC,
    AssignComplaint,
    CloseComplaint,
    Command,
    CommentComplaint,
    CreateComplaint,
    Customer,
    EscalateComplaint,
    ResolveComplaint,
    StartInvestigation,
    complaint_decider,
)
from runtime.store.aggregate import AggregateRepository
from runtime.store.protocol import EventStore, Metadata

START = datetime(2026, 11, 1, tzinfo=UTC)


def lifecycle(complaint_id: str, rng: random.Random) -> list[Command]:
    """A plausible history: created, then some of assign, investigate, comment, escalate,
    resolve, close, in order."""
    at = START + timedelta(minutes=rng.randrange(10_000))
    store = f"store-{rng.randrange(5):03d}"
    commands: list[Command] = [
        CreateComplaint(
            complaint_id=complaint_id,
            store_id=store,
            customer=Customer(id=f"c-{rng.randrange(50)}", name="Ana", email="ana@example.com"),
            category=rng.choice(["damaged_product", "late_delivery", "billing"]),
            description="Box arrived crushed",
            at=at,
            priority=rng.choice(["low", "normal", "high", "urgent"]),
        )
    ]
    steps = rng.randrange(7)
    for step in range(steps):
        at += timedelta(hours=rng.randrange(1, 48))
        if step == 0:
            commands.append(AssignComplaint(complaint_id, f"agent-{rng.randrange(4)}", at))
        elif step == 1:
            commands.append(StartInvestigation(complaint_id, at))
        elif step == 2:
            commands.append(CommentComplaint(complaint_id, "agent", f"note {rng.random()}", at))
        elif step == 3:
            commands.append(EscalateComplaint(complaint_id, "slow", at))
        elif step == 4:
            commands.append(ResolveComplaint(complaint_id, rng.choice(["refund", "repair"]), at))
        elif step == 5:
            commands.append(CloseComplaint(complaint_id, at))
    return commands


async def write_complaints(store: EventStore, count: int, seed: int = 1) -> list[str]:
    """``count`` complaints with random histories; returns their ids."""
    rng = random.Random(seed)
    repository = AggregateRepository(store, CODEC, complaint_decider(), snapshot_every=None)
    ids = []
    for _ in range(count):
        complaint_id = str(uuid.UUID(int=rng.getrandbits(128)))
        for command in lifecycle(complaint_id, rng):
            await repository.execute(
                complaint_id, command, Metadata(correlation_id=f"corr-{complaint_id}")
            )
        ids.append(complaint_id)
    return ids
