"""Cross-cutting behaviour hangs off these no-op hooks, not off flags in the hot path.

The default stack (``default_hooks``) is logging then metrics. A hook that raises is
logged and ignored: observability never takes an actor down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from loguru import logger

from runtime.bus.protocol import Delivery
from runtime.observability.metrics import Metrics

Outcome = Literal["ack", "retry", "dead_letter", "requeue"]


class Hooks:
    """Override what you need; every method is a no-op here."""

    def on_actor_started(self, actor: str) -> None: ...

    def on_actor_stopped(self, actor: str) -> None: ...

    def on_actor_crashed(self, actor: str, error: BaseException) -> None: ...

    def on_actor_restarting(self, actor: str, restart: int, delay: float) -> None: ...

    def on_escalation(self, actor: str, reason: str) -> None: ...

    def before_handle(self, actor: str, delivery: Delivery) -> None: ...

    def after_handle(
        self,
        actor: str,
        delivery: Delivery,
        outcome: Outcome,
        seconds: float,
        error: BaseException | None,
    ) -> None: ...

    def after_batch(self, actor: str, deliveries: Sequence[Delivery], seconds: float) -> None:
        """A batch was handled and acked as a whole (``after_handle`` with ``ack`` for each,
        unless overridden with something cheaper)."""
        for delivery in deliveries:
            self.after_handle(actor, delivery, "ack", seconds, None)


class HookChain(Hooks):
    """Calls each hook in order; a failing hook is logged, never fatal."""

    def __init__(self, hooks: Sequence[Hooks]) -> None:
        self.hooks = list(hooks)

    def _each(self, method: str, *args: object) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, method)(*args)
            except Exception:  # noqa: BLE001 - by design: hooks must not break handling
                logger.exception(
                    "hook {hook}.{method} failed", hook=type(hook).__name__, method=method
                )

    def on_actor_started(self, actor: str) -> None:
        self._each("on_actor_started", actor)

    def on_actor_stopped(self, actor: str) -> None:
        self._each("on_actor_stopped", actor)

    def on_actor_crashed(self, actor: str, error: BaseException) -> None:
        self._each("on_actor_crashed", actor, error)

    def on_actor_restarting(self, actor: str, restart: int, delay: float) -> None:
        self._each("on_actor_restarting", actor, restart, delay)

    def on_escalation(self, actor: str, reason: str) -> None:
        self._each("on_escalation", actor, reason)

    def before_handle(self, actor: str, delivery: Delivery) -> None:
        self._each("before_handle", actor, delivery)

    def after_handle(
        self,
        actor: str,
        delivery: Delivery,
        outcome: Outcome,
        seconds: float,
        error: BaseException | None,
    ) -> None:
        self._each("after_handle", actor, delivery, outcome, seconds, error)

    def after_batch(self, actor: str, deliveries: Sequence[Delivery], seconds: float) -> None:
        for hook in self.hooks:
            try:
                if hasattr(hook, "after_batch"):
                    hook.after_batch(actor, deliveries, seconds)
                else:  # a hook that only knows after_handle
                    for delivery in deliveries:
                        hook.after_handle(actor, delivery, "ack", seconds, None)
            except Exception:  # noqa: BLE001 - by design: hooks must not break handling
                logger.exception("hook {hook}.after_batch failed", hook=type(hook).__name__)


class LoggingHooks(Hooks):
    def after_batch(self, actor: str, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Acks are not logged."""

    def on_actor_started(self, actor: str) -> None:
        logger.info("actor {actor} started", actor=actor)

    def on_actor_stopped(self, actor: str) -> None:
        logger.info("actor {actor} stopped", actor=actor)

    def on_actor_crashed(self, actor: str, error: BaseException) -> None:
        logger.opt(exception=error).error(
            "actor {actor} crashed: {error!r}", actor=actor, error=error
        )

    def on_actor_restarting(self, actor: str, restart: int, delay: float) -> None:
        logger.warning(
            "actor {actor} restarts in {delay:.2f}s (restart {restart})",
            actor=actor,
            delay=delay,
            restart=restart,
        )

    def on_escalation(self, actor: str, reason: str) -> None:
        logger.critical("actor {actor} escalates: {reason}", actor=actor, reason=reason)

    def after_handle(
        self,
        actor: str,
        delivery: Delivery,
        outcome: Outcome,
        seconds: float,
        error: BaseException | None,
    ) -> None:
        if outcome == "ack":
            return
        logger.bind(message_id=delivery.message_id, queue=delivery.queue).warning(
            "actor {actor}: message {outcome} after {error!r} (attempts so far {attempts})",
            actor=actor,
            outcome=outcome,
            error=error,
            attempts=delivery.attempts,
        )


class MetricsHooks(Hooks):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_actor_restarting(self, actor: str, restart: int, delay: float) -> None:
        self.metrics.actor_restarts_total.inc({"actor": actor})

    def after_handle(
        self,
        actor: str,
        delivery: Delivery,
        outcome: Outcome,
        seconds: float,
        error: BaseException | None,
    ) -> None:
        labels = {"actor": actor, "queue": delivery.queue}
        m = self.metrics
        m.events_consumed_total.inc({**labels, "outcome": outcome})
        m.event_consumption_duration_seconds.observe(labels, seconds)
        if outcome == "retry":
            m.message_retries_total.inc(labels)
        elif outcome == "dead_letter":
            reason = type(error).__name__ if error is not None else "unknown"
            m.dead_letters_total.inc({**labels, "reason": reason})

    def after_batch(self, actor: str, deliveries: Sequence[Delivery], seconds: float) -> None:
        """The same figures as ``after_handle`` for each, with the labels built once per
        queue (a batch is one queue's, or a few: a stream's and its retry copies')."""
        m = self.metrics
        by_queue: dict[str, int] = {}
        for delivery in deliveries:
            by_queue[delivery.queue] = by_queue.get(delivery.queue, 0) + 1
        for queue, count in by_queue.items():
            labels = {"actor": actor, "queue": queue}
            m.events_consumed_total.add({**labels, "outcome": "ack"}, count)
            histogram = m.event_consumption_duration_seconds
            histogram.observe(labels, seconds)
            if count > 1:
                values = histogram.get_value(labels)
                for _ in range(count - 1):
                    values.observe(seconds)  # type: ignore[union-attr]


def default_hooks(metrics: Metrics) -> HookChain:
    return HookChain([LoggingHooks(), MetricsHooks(metrics)])
