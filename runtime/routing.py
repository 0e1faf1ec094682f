"""Which worker of an actor takes a delivery: by the hash of its ordering key (the aggregate
id), the same on every process, so one aggregate's messages stay in order."""

from __future__ import annotations

import zlib


def mailbox_index(key: str, workers: int) -> int:
    """Stable routing of an ordering key to a worker (the same on every process)."""
    return zlib.crc32(key.encode()) % workers
