"""The saga timer service (``kind: service``): fires the durable timers that are due.

Timers are documents in PostgreSQL (namespace ``sagas``, collection ``timers``), written by
the saga in the transaction that saves it, so they survive restarts. Every ``poll_interval``
this service reads the armed timers whose ``send_at`` passed (the deadline at first),
publishes ``timer.fired`` to ``saga.events`` for each (message id = the timer id,
publisher-confirmed), then moves ``send_at`` on by ``resend_after``. Only the saga settles a
timer (fired or cancelled, in the transaction that acts on it), so a message lost on the way
(dead-lettered after its retries, say) is sent again; the saga has recorded the timer's id as
handled, so the copies change nothing: a timer fires once. With several runtime processes
each polls; the same deduplication makes that harmless.

It also sets the ``magasin_sagas_active`` gauge. Options: ``poll_interval`` (seconds,
default 1), ``resend_after`` (seconds, default 60), ``schema``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from loguru import logger

from actors.complaints.projections import parse_timestamp, timestamp
from actors.resolution_saga.messages import SAGA_EXCHANGE, TIMER_FIRED, TimerFired
from actors.resolution_saga.state import INSTANCES, NAMESPACE, SAGA_TYPE, TIMERS
from runtime.actor import ActorContext
from runtime.bus.protocol import X_ORDERING_KEY
from runtime.errors import BusError, StoreError
from runtime.messages import X_AGGREGATE_ID, X_AGGREGATE_TYPE, X_EVENT_TYPE
from runtime.projection import ReadModelOwner
from runtime.store.readmodel import ReadModelTx
from runtime.topology import parse_duration

PAGE = 100
GAUGE_EVERY = 10  # polls between two counts of the active sagas


class SagaTimers(ReadModelOwner):
    def __init__(self, context: ActorContext) -> None:
        self.context = context
        self.poll_interval = parse_duration(context.options.get("poll_interval", 1.0))
        self.resend_after = parse_duration(context.options.get("resend_after", 60.0))
        self._stop = anyio.Event()

    def _pool_size(self) -> int:
        return 2

    def drain(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        polls = 0
        while not self._stop.is_set():
            try:
                fired = await self.fire_due()
                if polls % GAUGE_EVERY == 0:
                    await self.count_active()
            except (StoreError, BusError) as exc:
                logger.warning("saga timers: {exc}; trying again at the next poll", exc=exc)
                fired = 0
            polls += 1
            if fired < PAGE:
                with anyio.move_on_after(self.poll_interval):
                    await self._stop.wait()

    async def fire_due(self) -> int:
        """Fire the timers due now; how many were."""
        now = timestamp(datetime.now(UTC))
        due = await self.read_models.find(
            NAMESPACE,
            TIMERS,
            equals={"status": "armed"},
            ranges={"send_at": (None, now)},
            limit=PAGE,
        )
        for key, document in due:
            await self._fire(key, document)
        return len(due)

    async def _fire(self, key: str, document: dict[str, Any]) -> None:
        fired = TimerFired(
            saga_id=str(document["saga_id"]),
            timer_id=key,
            name=str(document["name"]),
            due_at=parse_timestamp(str(document["due_at"])),
        )
        await self.context.bus.publish(
            SAGA_EXCHANGE,
            TIMER_FIRED,
            msgspec.json.encode(fired),
            message_id=key,
            headers={
                X_AGGREGATE_ID: fired.saga_id,
                X_ORDERING_KEY: fired.saga_id,  # with the complaint's events
                X_AGGREGATE_TYPE: "saga",
                X_EVENT_TYPE: f"{SAGA_TYPE}.timer.fired",
            },
        )

        async def postpone(tx: ReadModelTx) -> None:
            current = await tx.get(TIMERS, key, for_update=True)
            if current is not None and current.get("status") == "armed":
                later = datetime.now(UTC) + timedelta(seconds=self.resend_after)
                current["send_at"] = timestamp(later)
                current["sent"] = int(current.get("sent", 0)) + 1
                await tx.put(TIMERS, key, current)

        await self.read_models.run(NAMESPACE, postpone)
        logger.info("timer {name} of saga {saga_id} fired", name=fired.name, saga_id=fired.saga_id)

    async def count_active(self) -> int:
        active = 0
        after: str | None = None
        while True:
            page = await self.read_models.find(
                NAMESPACE, INSTANCES, equals={"active": True}, limit=1000, after_key=after
            )
            active += len(page)
            if len(page) < 1000:
                break
            after = page[-1][0]
        self.context.metrics.sagas_active.set({"saga": SAGA_TYPE}, active)
        return active
