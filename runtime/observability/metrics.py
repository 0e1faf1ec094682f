"""The Prometheus metrics, with the exact names fixed by the design document.

One ``Metrics`` object owns one registry; it is created by whoever starts the runtime and
passed explicitly (no module-level registry, so tests and several stores never collide).
"""

from __future__ import annotations

from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every collector magasin exports. Names are part of the product's contract."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.event_store_operations_total = Counter(
            "event_store_operations_total",
            "Event store operations by operation and outcome.",
            registry=r,
        )
        self.event_store_operation_duration_seconds = Histogram(
            "event_store_operation_duration_seconds",
            "Event store operation latency by operation.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.event_store_event_count = Gauge(
            "event_store_event_count", "Events stored (PostgreSQL's live-row estimate).", registry=r
        )
        self.event_store_size_bytes = Gauge(
            "event_store_size_bytes", "Bytes used by the event store, indexes included.", registry=r
        )
        self.event_store_head_position = Gauge(
            "event_store_head_position", "Highest global position handed out.", registry=r
        )
        self.event_store_oldest_transaction_age_seconds = Gauge(
            "event_store_oldest_transaction_age_seconds",
            "Age of the oldest open writing transaction in the cluster (holds tailing readers).",
            registry=r,
        )

        # --- actors (labelled by actor and queue) ---
        self.events_consumed_total = Counter(
            "events_consumed_total",
            "Messages handled by actors, by actor, queue and outcome.",
            registry=r,
        )
        self.event_consumption_duration_seconds = Histogram(
            "event_consumption_duration_seconds",
            "Time from a message reaching a worker to its settlement.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.actor_restarts_total = Counter(
            "magasin_actor_restarts_total", "Actor restarts by actor.", registry=r
        )
        self.actor_up = Gauge(
            "magasin_actor_up",
            "1 for the state each actor is in (running, restarting, failed, ...).",
            registry=r,
        )
        self.mailbox_depth = Gauge(
            "magasin_mailbox_depth", "Messages waiting in an actor's mailboxes.", registry=r
        )
        self.in_flight = Gauge(
            "magasin_in_flight", "Messages an actor is handling right now.", registry=r
        )
        self.message_retries_total = Counter(
            "magasin_message_retries_total", "Messages sent to the retry ladder.", registry=r
        )
        self.dead_letters_total = Counter(
            "magasin_dead_letters_total",
            "Messages sent to a dead-letter queue, by reason.",
            registry=r,
        )
        self.parked_aggregates = Gauge(
            "magasin_parked_aggregates",
            "Aggregates whose events an actor holds back behind one that failed.",
            registry=r,
        )
        self.parked_events = Gauge(
            "magasin_parked_events",
            "Events an actor holds in memory behind a failed event of their aggregate.",
            registry=r,
        )
        # --- relay ---
        self.events_published_total = Counter(
            "events_published_total",
            "Events the relay published and the broker confirmed, by exchange and type.",
            registry=r,
        )
        self.event_publishing_duration_seconds = Histogram(
            "event_publishing_duration_seconds",
            "From the event's commit to the broker's publish confirm.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.relay_lag_events = Gauge(
            "magasin_relay_lag_events",
            "Store head position minus the relay's checkpoint position.",
            registry=r,
        )
        self.projection_updates_total = Counter(
            "projection_updates_total", "Events applied to read models, by projection.", registry=r
        )
        # --- CQRS ---
        self.command_executions_total = Counter(
            "command_executions_total",
            "Commands executed by aggregate actors, by command and outcome "
            "(ok, replayed, rejected).",
            registry=r,
        )
        self.command_duration_seconds = Histogram(
            "command_duration_seconds",
            "Time an aggregate actor took to load, decide, append and answer, by command.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.query_executions_total = Counter(
            "query_executions_total", "Queries served, by query and outcome.", registry=r
        )
        self.query_duration_seconds = Histogram(
            "query_duration_seconds",
            "Time a query took to answer, by query.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        # --- audit, sagas, notifications ---
        self.audit_entries_total = Counter(
            "magasin_audit_entries_total",
            "Messages the audit actor saw, by kind and outcome (recorded, duplicate).",
            registry=r,
        )
        self.saga_executions_total = Counter(
            "saga_executions_total",
            "Sagas by saga type and outcome (started, completed, compensated, "
            "compensation_failed).",
            registry=r,
        )
        self.saga_step_executions_total = Counter(
            "saga_step_executions_total", "Saga steps run, by saga, step and outcome.", registry=r
        )
        self.saga_compensations_total = Counter(
            "saga_compensations_total",
            "Compensating steps run, by saga, step and outcome.",
            registry=r,
        )
        self.sagas_active = Gauge(
            "magasin_sagas_active", "Sagas started and not finished, by saga type.", registry=r
        )
        self.notifications_total = Counter(
            "magasin_notifications_total",
            "Notifications by channel and outcome (sent, duplicate, failed).",
            registry=r,
        )
        self.runtime_ready = Gauge(
            "magasin_runtime_ready", "1 when every actor consumes, else 0.", registry=r
        )

    def count_store_operation(self, operation: str, outcome: str, seconds: float) -> None:
        self.event_store_operations_total.inc({"operation": operation, "outcome": outcome})
        self.event_store_operation_duration_seconds.observe({"operation": operation}, seconds)

    def render(self, accept: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
        body, headers = render(self.registry, accept or [])
        return body, dict(headers)
