"""What a failed message carries, and how a bus parks it: written once for both buses.

A retry or a dead letter is a copy the application publishes (confirmed) to the retry rung
or the DLQ with the failure headers, then the original delivery is acked: the broker's own
dead-lettering is used only for the TTL hop back to the work queue (PITFALLS: a
dead-letter cycle without a ``rejected`` step would be dropped by the broker).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from runtime.bus.protocol import (
    X_ACTOR,
    X_ATTEMPTS,
    X_ERROR,
    X_ERROR_TYPE,
    X_FIRST_FAILED_AT,
    X_ORIGINAL_EXCHANGE,
    X_ORIGINAL_ROUTING_KEY,
    DeadLetter,
    Delivery,
    Headers,
    HeaderValue,
)
from runtime.naming import dead_letter_queue, retry_queue

MAX_ERROR_LENGTH = 1000
ERROR_HEADERS = (X_ERROR, X_ERROR_TYPE, X_ACTOR, X_FIRST_FAILED_AT)
# Headers the broker writes when it dead-letters or redelivers. They describe one hop
# through one queue; a copy we publish ourselves starts without them (a re-published
# ``x-death`` arrives stringified and the broker would only reset it with a warning).
BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def failure_headers(
    delivery: Delivery, *, error: BaseException, actor: str, now: datetime | None = None
) -> dict[str, HeaderValue]:
    """The headers of a failed message's copy (retry or dead letter): attempts + 1, the
    error, the actor, and the first failure time and original address kept from before."""
    headers = _without_broker_headers(delivery.headers)
    headers[X_ATTEMPTS] = delivery.attempts + 1
    if not headers.get(X_FIRST_FAILED_AT):
        headers[X_FIRST_FAILED_AT] = (now or datetime.now(UTC)).isoformat()
    message = str(error) or type(error).__name__
    if len(message) > MAX_ERROR_LENGTH:
        message = message[: MAX_ERROR_LENGTH - 3] + "..."
    headers[X_ERROR] = message
    headers[X_ERROR_TYPE] = type(error).__name__
    headers[X_ACTOR] = actor
    headers.setdefault(X_ORIGINAL_EXCHANGE, delivery.exchange)
    headers.setdefault(X_ORIGINAL_ROUTING_KEY, delivery.routing_key)
    return headers


def replay_headers(headers: Mapping[str, HeaderValue]) -> dict[str, HeaderValue]:
    """A replayed dead letter starts over: no error headers, ``x-attempts`` 0."""
    result = _without_broker_headers(headers)
    for key in ERROR_HEADERS:
        result.pop(key, None)
    result[X_ATTEMPTS] = 0
    return result


def dead_letter_record(
    message_id: str, headers: dict[str, HeaderValue], body: bytes, broker_reason: str
) -> DeadLetter:
    """A DLQ message as the CLI lists it. A message the broker dead-lettered (rejected,
    delivery limit) has no ``x-error``: its reason stands in for the error."""
    error = headers.get(X_ERROR)
    attempts = headers.get(X_ATTEMPTS, 0)
    return DeadLetter(
        message_id=message_id,
        headers=headers,
        body=body,
        error=str(error) if error is not None else f"dead-lettered by the broker ({broker_reason})",
        error_type=str(headers.get(X_ERROR_TYPE) or broker_reason),
        attempts=int(attempts) if isinstance(attempts, int | float) else 0,
    )


def _without_broker_headers(headers: Mapping[str, HeaderValue]) -> dict[str, HeaderValue]:
    return {k: v for k, v in headers.items() if not k.startswith(BROKER_HEADER_PREFIXES)}


class RepublishingSettlement:
    """``retry`` and ``dead_letter`` for a bus that has ``publish`` and ``ack``."""

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        mandatory: bool = True,
    ) -> None:
        raise NotImplementedError

    async def ack(self, delivery: Delivery) -> None:
        raise NotImplementedError

    async def retry(
        self, delivery: Delivery, *, rung: int, error: BaseException, actor: str
    ) -> None:
        await self._park(delivery, retry_queue(delivery.queue, rung), error, actor)

    async def dead_letter(self, delivery: Delivery, *, error: BaseException, actor: str) -> None:
        await self._park(delivery, dead_letter_queue(delivery.queue), error, actor)

    async def _park(self, delivery: Delivery, queue: str, error: BaseException, actor: str) -> None:
        headers = failure_headers(delivery, error=error, actor=actor)
        await self.publish(
            "", queue, delivery.body, message_id=delivery.message_id, headers=headers
        )
        await self.ack(delivery)  # only once the copy is confirmed
