"""Parking: an aggregate's later events wait behind one of its events that failed.

When an event read from a domain stream fails and takes the retry ladder, its aggregate is
*blocked*: the actor holds the aggregate's later events (in memory, in order, not settled, so
the stream offset does not move past them) while the other aggregates keep flowing. Then:

- the failed event (the *blocker*) comes back from its retry queue and succeeds: the block
  is lifted and the held events are handled, in order (one may fail and block again);
- the blocker is dead-lettered: the held events follow it into the dead-letter queue, in
  order, with a ``ParkedError`` naming it, and so does every later event of the aggregate
  until the blocker is replayed (``magasin dlq replay QUEUE --all`` replays it first, then
  them) and succeeds, or is skipped on purpose (``magasin dlq skip QUEUE --id ID``, which
  lifts the block; replay the parked events after it).

Blocks are recorded in the event store (``park``/``unpark``) before the blocker is retried
or dead-lettered, so a restart, a second process handling the blocker's retried copy and the
CLI all see them. The actor polls its blocks while it has any (``poll_interval``): a block
lifted elsewhere releases the held events; a blocker dead-lettered elsewhere sends them to
the dead-letter queue; a retrying block older than the whole retry ladder (its copy lost)
turns dead, so a lost retry cannot hold a stream back forever.

Only events read from a domain stream (or retried copies of them) are parked: other queue
messages have no aggregate order to keep.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from runtime.bus.protocol import Delivery
from runtime.errors import ParkedError
from runtime.observability.metrics import Metrics
from runtime.store.protocol import EventStore, ParkedKey, utcnow

#: Sends a held delivery to the dead-letter queue (and accounts for it).
DeadLetter = Callable[[Delivery, BaseException], Awaitable[None]]


@dataclass
class Block:
    blocker: str  # the failed event's message id
    dead: bool  # the blocker is in the dead-letter queue
    since: float  # time.monotonic() when it was blocked (or loaded)
    held: list[Delivery] = field(default_factory=list)
    lifted: bool = False  # lifted elsewhere: release ``held`` at the worker's next turn


@dataclass
class Parking:
    actor: str
    store: EventStore
    streams: frozenset[str]  # the domain streams the actor reads
    dead_letter: DeadLetter
    metrics: Metrics | None = None
    stale_after: float = 600.0  # a retrying block older than this has lost its blocker
    blocks: dict[str, Block] = field(default_factory=dict)

    def applies(self, delivery: Delivery) -> bool:
        return delivery.original_exchange in self.streams

    async def load(self) -> None:
        """The actor's blocks recorded in the store (a restart, or another process's)."""
        if not self.streams:
            return
        now = time.monotonic()
        self.blocks = {
            row.key: Block(row.blocker, row.dead, now)
            for row in await self.store.parked_keys(self.actor)
        }
        self._measure()

    async def intercept(self, delivery: Delivery) -> bool:
        """True if ``delivery`` waits behind its aggregate's blocker (held, or sent to the
        dead-letter queue behind it): the worker must not handle it."""
        if not self.blocks or not self.applies(delivery):
            return False
        key = delivery.ordering_key
        block = self.blocks.get(key)
        if block is None or block.blocker == delivery.message_id:
            return False
        if block.dead and not block.lifted:
            await self.dead_letter(delivery, ParkedError(self.actor, key, block.blocker))
            return True
        block.held.append(delivery)  # lifted elsewhere: released, in order, at the wake-up
        self._measure()
        return True

    async def failed(self, delivery: Delivery, *, dead: bool, reason: str) -> None:
        """``delivery`` is about to take the retry ladder (``dead`` false) or the DLQ:
        record its aggregate's block first, so later events wait behind it."""
        if not self.applies(delivery):
            return
        key = delivery.ordering_key
        block = self.blocks.get(key)
        if block is not None and block.blocker != delivery.message_id:
            return  # a held event released and failing is the new blocker only once popped
        if block is None:
            block = self.blocks[key] = Block(delivery.message_id, dead, time.monotonic())
        block.dead = dead
        await self.store.park(
            ParkedKey(self.actor, key, delivery.message_id, dead, reason[:1000], utcnow())
        )
        self._measure()

    async def dead_lettered(self, delivery: Delivery) -> None:
        """The blocker is in the DLQ now: its held events follow it there, in order."""
        block = self.blocks.get(delivery.ordering_key) if self.blocks else None
        if block is None or block.blocker != delivery.message_id:
            return
        await self._dead_letter_held(delivery.ordering_key, block)

    async def succeeded(self, delivery: Delivery) -> list[Delivery]:
        """``delivery`` was handled: if it was its aggregate's blocker, lift the block and
        return the held events, to handle in order."""
        block = self.blocks.get(delivery.ordering_key) if self.blocks else None
        if block is None or block.blocker != delivery.message_id:
            return []
        del self.blocks[delivery.ordering_key]
        await self.store.unpark(self.actor, delivery.ordering_key, delivery.message_id)
        self._measure()
        return block.held

    async def poll(self) -> set[str]:
        """Compare the blocks with the store's; return the keys that changed (lifted, or
        dead-lettered elsewhere, or stale), for their worker's ``take_changes``."""
        if not self.blocks:
            return set()
        rows = {row.key: row for row in await self.store.parked_keys(self.actor)}
        now = time.monotonic()
        changed: set[str] = set()
        for key, block in self.blocks.items():
            row = rows.get(key)
            if row is None or row.blocker != block.blocker:
                block.lifted = True
                changed.add(key)
            elif row.dead and not block.dead:
                block.dead = True
                changed.add(key)
            elif not block.dead and now - block.since > self.stale_after:
                block.dead = True
                changed.add(key)
                await self.store.park(
                    ParkedKey(
                        self.actor,
                        key,
                        block.blocker,
                        True,
                        f"its retry did not come back within {self.stale_after:g}s",
                        utcnow(),
                    )
                )
        return changed

    async def take_changes(self, keys: set[str]) -> list[Delivery]:
        """At the worker's turn: dead-letter what waits behind a blocker now dead; return
        what a lifted block held, to handle in order."""
        released: list[Delivery] = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None:
                continue
            if block.lifted:
                del self.blocks[key]
                released.extend(block.held)
            elif block.dead:
                await self._dead_letter_held(key, block)
        self._measure()
        return released

    async def _dead_letter_held(self, key: str, block: Block) -> None:
        held, block.held = block.held, []
        for waiting in held:
            await self.dead_letter(waiting, ParkedError(self.actor, key, block.blocker))
        self._measure()

    def _measure(self) -> None:
        if self.metrics is None:
            return
        labels = {"actor": self.actor}
        self.metrics.parked_aggregates.set(labels, len(self.blocks))
        self.metrics.parked_events.set(labels, sum(len(b.held) for b in self.blocks.values()))
