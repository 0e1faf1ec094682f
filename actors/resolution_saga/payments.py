"""A simulated payments/vouchers participant (``kind: subscriber``, bound to
``saga.events`` ``payment.requested``).

It "pays" a refund or issues a voucher, trying ``attempts`` times with ``backoff`` seconds
between tries, then publishes ``payment.completed`` or ``payment.failed`` to ``saga.events``.
Each request is paid once: its result is recorded by request id (namespace ``payments``) and
a redelivered request answers the recorded result again.

Told to fail by its options: ``fail`` (a list of kinds, e.g. ``[refund]``, or ``true`` for
all), to exercise the saga's compensations; ``delay`` (kind → seconds the provider takes,
a slow provider). Options: ``attempts`` (default 3), ``backoff`` (seconds, default 0.2),
``schema``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import msgspec
from loguru import logger

from actors.complaints.projections import timestamp
from actors.resolution_saga.messages import (
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    SAGA_EXCHANGE,
    PaymentRequested,
    PaymentResult,
)
from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import X_ORDERING_KEY, Delivery
from runtime.messages import (
    X_AGGREGATE_ID,
    X_AGGREGATE_TYPE,
    X_CAUSATION_ID,
    X_CORRELATION_ID,
    X_EVENT_TYPE,
)
from runtime.projection import ReadModelOwner
from runtime.store.readmodel import ReadModelTx
from runtime.topology import parse_duration

NAMESPACE = "payments"
REQUESTS = "requests"


class PaymentDeclinedError(Exception):
    """The simulated provider refused (the actor was told to fail)."""


class Payments(ReadModelOwner):
    def __init__(self, context: ActorContext) -> None:
        self.context = context
        options = context.options
        fail = options.get("fail", [])
        self.fail_all = fail is True
        self.fail_kinds = frozenset() if isinstance(fail, bool) else frozenset(map(str, fail))
        self.attempts = max(1, int(options.get("attempts", 3)))
        self.backoff = parse_duration(options.get("backoff", 0.2))
        self.delay = {
            str(kind): parse_duration(value)
            for kind, value in dict(options.get("delay") or {}).items()
        }

    async def handle(self, delivery: Delivery) -> None:
        request = decode_body(delivery, PaymentRequested)
        recorded = await self.read_models.get(NAMESPACE, REQUESTS, request.request_id)
        if recorded is not None:
            result = msgspec.convert(recorded, PaymentResult)
        else:
            paid = await self._pay(request)

            async def record(tx: ReadModelTx) -> PaymentResult:
                """The first result recorded for the request wins (a concurrent copy of it
                may have paid and recorded first): it is the one answered."""
                first = await tx.get(REQUESTS, request.request_id, for_update=True)
                if first is not None:
                    return msgspec.convert(first, PaymentResult)
                document = msgspec.to_builtins(paid)
                document["at"] = timestamp(datetime.now(UTC))
                await tx.put(REQUESTS, request.request_id, document)
                return paid

            result = await self.read_models.run(NAMESPACE, record)
        await self.context.bus.publish(
            SAGA_EXCHANGE,
            PAYMENT_COMPLETED if result.ok else PAYMENT_FAILED,
            msgspec.json.encode(result),
            message_id=f"{request.request_id}:result",
            headers={
                X_CAUSATION_ID: request.request_id,
                X_AGGREGATE_ID: request.saga_id,
                X_ORDERING_KEY: request.saga_id,  # with the complaint's events
                X_AGGREGATE_TYPE: "payment",
                X_EVENT_TYPE: "PaymentCompleted" if result.ok else "PaymentFailed",
                X_CORRELATION_ID: delivery.headers.get(X_CORRELATION_ID),
            },
        )

    async def _pay(self, request: PaymentRequested) -> PaymentResult:
        detail = ""
        await anyio.sleep(self.delay.get(request.kind, 0.0))
        for attempt in range(1, self.attempts + 1):
            try:
                self._provider(request)
            except PaymentDeclinedError as exc:
                detail = str(exc)
                logger.warning(
                    "{kind} for complaint {complaint_id} declined (attempt {attempt}/{attempts})",
                    kind=request.kind,
                    complaint_id=request.complaint_id,
                    attempt=attempt,
                    attempts=self.attempts,
                )
                if attempt < self.attempts:
                    await anyio.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            return PaymentResult(
                request_id=request.request_id,
                saga_id=request.saga_id,
                ok=True,
                attempts=attempt,
                detail=f"{request.kind} issued",
            )
        return PaymentResult(
            request_id=request.request_id,
            saga_id=request.saga_id,
            ok=False,
            attempts=self.attempts,
            detail=detail,
        )

    def _provider(self, request: PaymentRequested) -> None:
        if self.fail_all or request.kind in self.fail_kinds:
            raise PaymentDeclinedError(f"the payment provider declined the {request.kind}")
