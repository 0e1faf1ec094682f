"""What a failed message carries, how a bus parks it, and how a bus matches answers to
its requests: written once for both buses.

A retry or a dead letter is a copy the application publishes (confirmed) to the retry rung
or the DLQ with the failure headers, then the original delivery is acked: the broker's own
dead-lettering is used only for the TTL hop back to the work queue (PITFALLS: a
dead-letter cycle without a ``rejected`` step would be dropped by the broker). A request
stays a request there: the copy keeps its reply address and correlation id, so an answer
after a retry still reaches a requester that is still waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from loguru import logger

from runtime.bus.protocol import (
    X_ACTOR,
    X_ATTEMPTS,
    X_ERROR,
    X_ERROR_TYPE,
    X_FIRST_FAILED_AT,
    X_ORDERING_KEY,
    X_ORIGINAL_EXCHANGE,
    X_ORIGINAL_ROUTING_KEY,
    X_VERSION,
    DeadLetter,
    Delivery,
    Headers,
    HeaderValue,
    Reply,
)
from runtime.errors import BusError, ParkedError, RequestTimeoutError
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
    error, the actor, and the first failure time and original address kept from before.
    A parked message was not tried: its attempts stay as they were."""
    headers = _without_broker_headers(delivery.headers)
    headers[X_ATTEMPTS] = delivery.attempts + (0 if isinstance(error, ParkedError) else 1)
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


def replay_order(headers: Mapping[str, HeaderValue]) -> tuple[str, int]:
    """Sort key of dead letters to replay: an aggregate's events by version, so a blocker
    goes back before the events parked behind it whatever order the queue holds them in
    (listing a RabbitMQ DLQ requeues its messages, which may reorder them). Sort stably."""
    version = headers.get(X_VERSION)
    number = int(version) if isinstance(version, int | float) else 0
    return str(headers.get(X_ORDERING_KEY) or ""), number


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

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self.ack(delivery)

    async def retry(
        self, delivery: Delivery, *, rung: int, error: BaseException, actor: str
    ) -> None:
        await self._park(delivery, retry_queue(delivery.queue, rung), error, actor)

    async def dead_letter(self, delivery: Delivery, *, error: BaseException, actor: str) -> None:
        await self._park(delivery, dead_letter_queue(delivery.queue), error, actor)

    async def _park(self, delivery: Delivery, queue: str, error: BaseException, actor: str) -> None:
        headers = failure_headers(delivery, error=error, actor=actor)
        await self._publish_copy(delivery, queue, headers)
        await self.ack(delivery)  # only once the copy is confirmed

    async def _publish_copy(
        self, delivery: Delivery, queue: str, headers: dict[str, HeaderValue]
    ) -> None:
        """Publish a copy of ``delivery`` to ``queue`` through the default exchange. A bus
        that can keep the copy a request (reply address, correlation id) overrides this."""
        await self.publish(
            "", queue, delivery.body, message_id=delivery.message_id, headers=headers
        )


# --- requests ------------------------------------------------------------------------------


@dataclass(eq=False)
class PendingRequest:
    """One request waiting for its answer: answered once, by a reply or by an error."""

    queue: str
    message_id: str
    route: object = None  # what the answer must come back through (the bus's own business)
    answered: anyio.Event = field(default_factory=anyio.Event)
    reply: Reply | None = None
    error: BusError | None = None

    def result(self, timeout: float) -> Reply:
        """The answer; the error that ended the wait; or, if neither came, a timeout."""
        if self.error is not None:
            raise self.error
        if self.reply is None:
            raise RequestTimeoutError(self.queue, self.message_id, timeout)
        return self.reply


class PendingRequests:
    """The requests of one bus waiting for their answer, by correlation id (the request's
    message id). Requests sent at once with the same id (a client retrying while the first
    try still waits) share their answers, the oldest waiter first: the same id is the same
    question, and an idempotent responder gives the same answer. An answer nobody waits for
    (any more) is dropped with a debug log."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[PendingRequest]] = {}

    @contextmanager
    def waiting(
        self, queue: str, message_id: str, route: object = None
    ) -> Iterator[PendingRequest]:
        """Register before publishing (the answer can beat the confirm), forget on exit."""
        pending = PendingRequest(queue, message_id, route)
        waiters = self._waiting.setdefault(message_id, [])
        waiters.append(pending)
        try:
            yield pending
        finally:
            waiters.remove(pending)
            if not waiters:
                del self._waiting[message_id]

    def answer(self, correlation_id: str | None, reply: Reply) -> None:
        for pending in self._waiting.get(correlation_id or "", ()):
            if not pending.answered.is_set():
                pending.reply = reply
                pending.answered.set()
                return
        logger.debug(
            "dropping an answer to request {id}: nobody waits for it (timed out, or not ours)",
            id=correlation_id,
        )

    def fail(self, error: Callable[[PendingRequest], BusError], route: object = None) -> None:
        """End the wait of every request (or of those sent through ``route``) with an error:
        their answer can no longer arrive."""
        for waiters in self._waiting.values():
            for pending in waiters:
                if (route is None or pending.route is route) and not pending.answered.is_set():
                    pending.error = error(pending)
                    pending.answered.set()
