"""The messages of the resolution saga on ``saga.events``.

Routing keys the saga consumes (queue ``saga.orchestration``): ``timer.fired``,
``payment.completed``, ``payment.failed``, ``retry.requested``; the payments participant
consumes ``payment.requested``. The saga's own events go out as ``saga.<what>``.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

SAGA_EXCHANGE = "saga.events"
TIMER_FIRED = "timer.fired"
PAYMENT_REQUESTED = "payment.requested"
PAYMENT_COMPLETED = "payment.completed"
PAYMENT_FAILED = "payment.failed"
RETRY_REQUESTED = "retry.requested"


class TimerFired(msgspec.Struct, frozen=True, kw_only=True):
    saga_id: str
    timer_id: str
    name: str
    due_at: datetime


class PaymentRequested(msgspec.Struct, frozen=True, kw_only=True):
    """Pay the customer back (``kind``: refund or voucher) for a resolved complaint."""

    request_id: str
    saga_id: str
    complaint_id: str
    kind: str
    customer_id: str | None = None


class PaymentResult(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    saga_id: str
    ok: bool
    attempts: int
    detail: str | None = None


class RetryRequested(msgspec.Struct, frozen=True, kw_only=True):
    """``magasin saga retry``: drive a saga parked in ``compensation_failed`` again."""

    saga_id: str
