"""Handlers for runtime tests. Each test names a registry in the actor's options, and the
handler records there what it did (so tests can assert exactly-once and order).

Body commands (JSON ``{"key": ..., "seq": ..., "do": ...}``):
``ok`` handles; ``fail`` raises; ``flaky`` raises until ``fails`` attempts failed;
``broken`` raises until ``registry/key`` is in ``FIXED`` (the code was fixed);
``reject`` raises Reject; ``retry`` raises Retry;
``sleep`` sleeps ``seconds`` before handling; ``down`` raises StoreUnavailableError once;
``unroutable`` publishes a mandatory message no queue is bound for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec

from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import Delivery
from runtime.errors import Reject, Retry, StoreUnavailableError

#: registry name -> what was handled (completed only), as (key, seq, attempts)
HANDLED: defaultdict[str, list[tuple[str, int, int]]] = defaultdict(list)
#: registry name -> every attempt started, as (key, seq, attempts)
ATTEMPTS: defaultdict[str, list[tuple[str, int, int]]] = defaultdict(list)
DOWN_ONCE: set[str] = set()
#: ``registry/key`` of the ``broken`` jobs that succeed now
FIXED: set[str] = set()
#: registry name -> the size of each batch a BatchRecorder committed
BATCHES: defaultdict[str, list[int]] = defaultdict(list)
#: registry name -> (key, seq) of messages that arrived redelivered at least once
REDELIVERED: defaultdict[str, set[tuple[str, int]]] = defaultdict(set)


class Job(msgspec.Struct, frozen=True):
    key: str
    seq: int
    do: str = "ok"
    seconds: float = 0.0
    fails: int = 0


class Recorder:
    def __init__(self, context: ActorContext) -> None:
        self.registry = str(context.options.get("registry", context.name))
        self.bus = context.bus

    async def handle(self, delivery: Delivery) -> None:
        job = decode_body(delivery, Job)
        entry = (job.key, job.seq, delivery.attempts)
        ATTEMPTS[self.registry].append(entry)
        if delivery.redelivered:
            REDELIVERED[self.registry].add((job.key, job.seq))
        if job.do == "sleep":
            await anyio.sleep(job.seconds)
        elif job.do == "fail":
            raise RuntimeError(f"job {job.key}/{job.seq} always fails")
        elif job.do == "broken" and f"{self.registry}/{job.key}" not in FIXED:
            raise RuntimeError(f"job {job.key}/{job.seq} fails until fixed")
        elif job.do == "flaky" and delivery.attempts < job.fails:
            raise RuntimeError(f"job {job.key}/{job.seq} fails {job.fails} time(s)")
        elif job.do == "reject":
            raise Reject(f"job {job.key}/{job.seq} can never succeed")
        elif job.do == "retry":
            raise Retry("asked for a retry")
        elif job.do == "unroutable":
            await self.bus.publish(
                "complaints.events", "nowhere.bound", b"{}", message_id=delivery.message_id
            )
        elif job.do == "down":
            marker = f"{self.registry}/{job.key}/{job.seq}"
            if marker not in DOWN_ONCE:
                DOWN_ONCE.add(marker)
                raise StoreUnavailableError("test-db", "connection refused")
        HANDLED[self.registry].append(entry)


class BatchRecorder(Recorder):
    """Takes batches all or nothing: a batch holding anything but ``ok`` (or ``sleep``)
    fails as a whole, as a transaction would, and the runtime hands its messages to
    ``handle`` one by one."""

    async def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        jobs = [decode_body(delivery, Job) for delivery in deliveries]
        if any(job.do not in ("ok", "sleep") for job in jobs):
            raise RuntimeError("the batch holds a job that fails: rolled back")
        for job, delivery in zip(jobs, deliveries, strict=True):
            ATTEMPTS[self.registry].append((job.key, job.seq, delivery.attempts))
            HANDLED[self.registry].append((job.key, job.seq, delivery.attempts))
        BATCHES[self.registry].append(len(jobs))


def job(
    key: str, seq: int, do: str = "ok", seconds: float = 0.0, fails: float = 0, **extra: Any
) -> bytes:
    return msgspec.json.encode(Job(key, seq, do, seconds, int(fails)))
