"""Writing events to a domain stream as the relay does, for tests that feed actors."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from runtime.bus.protocol import Bus
from runtime.messages import stream_entry
from runtime.store.protocol import RecordedEvent

_ids = itertools.count(1)


async def write_events(
    bus: Bus, stream: str, records: Iterable[RecordedEvent], *, producer: str = "tests"
) -> None:
    """Append ``records`` to ``stream`` in the given order (repeats allowed: each entry
    gets a fresh publishing id, so the stream keeps them all, as a replaying writer would
    if deduplication missed them)."""
    entries = [stream_entry(record, next(_ids)) for record in records]
    if entries:
        await bus.write_stream(stream, producer, entries)
