"""The audit trail actor (``handler: actors.audit:AuditTrail``, queue ``audit.all.events``).

Bound to every exchange with ``#``, it records each message it receives in the hash-chained,
append-only trail (``runtime.store.audit``): the events the relay publishes from the store
(their own event id, aggregate, correlation and causation ids, user), the saga's and the
notifier's messages, and the command outcomes the gateway publishes to ``audit.events``.
A batch of deliveries is recorded in one transaction that skips the ids already recorded, then
acked: a redelivery is recorded once. ``magasin audit verify`` checks coverage and the chain.

Options: ``schema`` (PostgreSQL schema of the trail, default ``public``).
"""

from __future__ import annotations

from actors.audit.trail import AuditTrail, entry_of_delivery

__all__ = ["AuditTrail", "entry_of_delivery"]
