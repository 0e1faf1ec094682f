"""Small actor handlers for tests that run a real supervisor (topologies name them by path)."""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus

from runtime.actor import ActorContext
from runtime.bus.protocol import Delivery


class Recorder:
    """A subscriber that remembers the message ids it handled."""

    def __init__(self, context: ActorContext) -> None:
        self.context = context
        self.seen: list[str] = []

    async def handle(self, delivery: Delivery) -> None:
        self.seen.append(delivery.message_id)


class Idle:
    """A service that does nothing until it is cancelled (or crashed on purpose)."""

    def __init__(self, context: ActorContext) -> None:
        self.context = context

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()


class Stubborn:
    """A service that ignores ``drain()``: stopping the runtime waits for it forever, so only
    a second signal (or a grace-period cut) ends the process."""

    def __init__(self, context: ActorContext) -> None:
        self.context = context

    def drain(self) -> None:
        """Asked to stop; does not."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()


class Mute:
    """Consumes requests and never answers them: an aggregate actor that is stuck."""

    def __init__(self, context: ActorContext) -> None:
        self.context = context

    async def handle(self, delivery: Delivery) -> None:
        await anyio.sleep_forever()
