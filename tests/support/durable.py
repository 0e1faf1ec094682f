"""Handlers whose effects outlive the process, for the chaos drills (tests/chaos/).

``DurableRecorder`` appends one line per handled message to a file and fsyncs it before
``handle`` returns, i.e. before the runtime acks: the file is the drill's ground truth after a
crash, a SIGKILL or a rescale. A line is ``key seq pid redelivered unix_time``.

Options (the actor's ``options`` in the topology):

- ``path`` (required): the file to append to;
- ``heal``: a marker file; while it does not exist, a message whose body says
  ``"do": "poison"`` fails (a RuntimeError: the retry ladder, then the DLQ);
- ``delay``: seconds to sleep before recording each message (a slow handler).

Body: JSON ``{"key": str, "seq": int, "do": "ok" | "poison"}``.

``CrashLooper`` never finishes a message: it overruns the actor's ``handler_timeout``, which
the runtime treats as a crash (a stuck handler's state cannot be trusted): the message takes a
retry rung and the actor restarts, then the message comes back, over and over. (The store or
the broker unavailable is no crash: the runtime holds the message and retries it in place.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import msgspec

from runtime.actor import ActorContext, decode_body
from runtime.bus.protocol import Delivery


class Task(msgspec.Struct, frozen=True):
    key: str
    seq: int
    do: str = "ok"


class Record(msgspec.Struct, frozen=True):
    """One line of a recorder's file."""

    key: str
    seq: int
    pid: int
    redelivered: bool
    at: float


def task(key: str, seq: int, do: str = "ok") -> bytes:
    return msgspec.json.encode(Task(key, seq, do))


def append_durably(path: Path, line: str) -> None:
    """Append ``line`` and fsync: once this returns, the line survives a SIGKILL."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[Record]:
    """Every complete line of a recorder's file, in the order written."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 5:
            key, seq, pid, redelivered, at = fields
            records.append(Record(key, int(seq), int(pid), redelivered == "1", float(at)))
    return records


class DurableRecorder:
    def __init__(self, context: ActorContext) -> None:
        options = context.options
        self.path = Path(str(options["path"]))
        heal = options.get("heal")
        self.heal = Path(str(heal)) if heal else None
        self.delay = float(options.get("delay", 0.0))

    async def handle(self, delivery: Delivery) -> None:
        job = decode_body(delivery, Task)
        if job.do == "poison" and not (self.heal is not None and self.heal.exists()):
            raise RuntimeError(f"poison message {job.key}/{job.seq}: the handler cannot take it")
        if self.delay:
            await anyio.sleep(self.delay)
        line = f"{job.key} {job.seq} {os.getpid()} {int(delivery.redelivered)} {time.time():.6f}\n"
        await anyio.to_thread.run_sync(append_durably, self.path, line)


class CrashLooper:
    def __init__(self, context: ActorContext) -> None:
        self.context = context

    async def handle(self, delivery: Delivery) -> None:
        await anyio.sleep(3600)  # stuck: the handler timeout cuts it short
