"""Queue-name derivation, written once: retry rungs and dead-letter queues."""

from __future__ import annotations

#: The direct exchange every work queue dead-letters into (routing key = the DLQ's name).
DEAD_LETTER_EXCHANGE = "magasin.dlx"


def retry_queue(queue: str, rung: int) -> str:
    """The queue a message waits in before its ``rung``-th retry (rungs count from 1)."""
    if rung < 1:
        raise ValueError(f"retry rungs count from 1, got {rung}")
    return f"{queue}.retry.{rung}"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def work_queue_of(derived: str) -> str:
    """The work queue a retry or dead-letter queue belongs to."""
    if derived.endswith(".dlq"):
        return derived[: -len(".dlq")]
    head, sep, rung = derived.rpartition(".retry.")
    if sep and rung.isdigit():
        return head
    return derived
