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
or dead-lettered, so a restart, a second process and the CLI all see them: whichever process
handles the blocker's copy lifts the block in the store, and every process polls its blocks
(``poll``), so a block lifted elsewhere releases the held events, one dead-lettered elsewhere
sends them to the dead-letter queue, and one recorded elsewhere holds this process's events
too. A block turns dead (everything of the aggregate to the dead-letter queue, in order,
the blocker's returning retry copy included) when its retry copy has not come back after
``stale_after`` (lost), or when it holds more queue copies than ``max_held_copies`` (queue
copies held unacknowledged use up the consumer's prefetch, and the blocker's own copy must
still get through) or more events than ``max_held`` (memory stays bounded).

Only events read from a domain stream (or copies of them from the retry queue or a replay)
are parked: other queue messages have no aggregate order to keep. Store calls wait out an
outage in place, like a handler's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from loguru import logger

from runtime.backoff import outage_pause
from runtime.bus.protocol import Delivery
from runtime.errors import ParkedError, StoreUnavailableError
from runtime.observability.metrics import Metrics
from runtime.routing import mailbox_index
from runtime.store.protocol import EventStore, ParkedKey, utcnow

T = TypeVar("T")
#: Sends a held delivery to the dead-letter queue (and accounts for it).
DeadLetter = Callable[[Delivery, BaseException], Awaitable[None]]


@dataclass
class Block:
    blocker: str  # the failed event's message id
    dead: bool  # the blocker is in the dead-letter queue (or lost, or overflowed)
    since: float  # time.monotonic() when it was blocked (or learnt)
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
    max_held_copies: int = 16  # queue copies held before the block turns dead
    max_held: int = 10_000  # events of one aggregate held before the block turns dead
    blocks: dict[str, Block] = field(default_factory=dict)

    def applies(self, delivery: Delivery) -> bool:
        return delivery.original_exchange in self.streams

    async def load(self) -> None:
        """Learn the blocks recorded in the store (at start, and when this process takes
        over a stream's reading: another process may have blocked aggregates meanwhile)."""
        if not self.streams:
            return
        rows = await self._store(lambda: self.store.parked_keys(self.actor))
        now = time.monotonic()
        for row in rows:
            block = self.blocks.get(row.key)
            if block is None or block.blocker != row.blocker:
                self.blocks[row.key] = Block(row.blocker, row.dead, now)
            elif row.dead:
                block.dead = True
        self._measure()

    def held_floor(self, worker: int, workers: int) -> dict[str, int]:
        """Per stream, the lowest offset this worker holds (a stream mark must stay below
        it: the entries it holds are not handled)."""
        floor: dict[str, int] = {}
        for key, block in self.blocks.items():
            if block.held and mailbox_index(key, workers) == worker:
                for delivery in block.held:
                    if delivery.consumer < 0 and delivery.delivery_tag >= 0:
                        stream = delivery.exchange
                        floor[stream] = min(delivery.delivery_tag, floor.get(stream, 1 << 62))
        return floor

    def is_blocker(self, delivery: Delivery) -> bool:
        block = self.blocks.get(delivery.ordering_key) if self.blocks else None
        return block is not None and block.blocker == delivery.message_id

    async def intercept(self, delivery: Delivery) -> bool:
        """True if ``delivery`` waits behind its aggregate's blocker (held, or sent to the
        dead-letter queue behind it): the worker must not handle it."""
        if not self.blocks or not self.applies(delivery):
            return False
        key = delivery.ordering_key
        block = self.blocks.get(key)
        if block is None:
            return False
        if block.blocker == delivery.message_id:
            if block.dead and not block.lifted and delivery.attempts > 0:
                # a retry copy coming back to a block that went dead without it (lost,
                # or overflowed): it joins its aggregate in the DLQ (a replay has 0 attempts)
                await self._dead_letter_held(key, block)
                await self.dead_letter(delivery, ParkedError(self.actor, key, block.blocker))
                return True
            return False
        if block.dead and not block.lifted:
            await self._dead_letter_held(key, block)  # what waited comes first
            await self.dead_letter(delivery, ParkedError(self.actor, key, block.blocker))
            return True
        block.held.append(delivery)  # lifted elsewhere: released, in order, at the wake-up
        copies = sum(1 for held in block.held if held.consumer >= 0)
        too_many = copies > self.max_held_copies or len(block.held) > self.max_held
        if too_many and not block.lifted:
            logger.warning(
                "actor {actor}: {count} events ({copies} of them queue copies) wait behind "
                "message {blocker} of aggregate {key}; sending the aggregate's events to the "
                "DLQ (queue copies use up the consumer's prefetch; memory is bounded)",
                actor=self.actor,
                count=len(block.held),
                copies=copies,
                blocker=block.blocker,
                key=key,
            )
            await self._turn_dead(key, block, "too many events held behind it")
            await self._dead_letter_held(key, block)
        self._measure()
        return True

    async def failed(self, delivery: Delivery, *, dead: bool, reason: str) -> None:
        """``delivery`` is about to take the retry ladder (``dead`` false) or the DLQ:
        record its aggregate's block first, so later events wait behind it."""
        if not self.applies(delivery):
            return
        key = delivery.ordering_key
        block = self.blocks.get(key)
        if block is not None and block.blocker != delivery.message_id and not block.lifted:
            return  # a held event released and failing is the new blocker only once popped
        parked = ParkedKey(self.actor, key, delivery.message_id, dead, reason[:1000], utcnow())
        await self._store(lambda: self.store.park(parked))
        if block is None or block.blocker != delivery.message_id:
            held = block.held if block is not None else []
            block = self.blocks[key] = Block(delivery.message_id, dead, time.monotonic(), held)
        block.dead = dead
        block.lifted = False
        self._measure()

    async def dead_lettered(self, delivery: Delivery) -> None:
        """The blocker is in the DLQ now: its held events follow it there, in order."""
        block = self.blocks.get(delivery.ordering_key) if self.blocks else None
        if block is None or block.blocker != delivery.message_id:
            return
        await self._dead_letter_held(delivery.ordering_key, block)

    async def succeeded(self, delivery: Delivery) -> list[Delivery]:
        """``delivery`` was handled: if it was its aggregate's blocker, lift the block (also
        in the store when the block is another process's) and return the held events, to
        handle in order."""
        if not self.applies(delivery):
            return []
        key = delivery.ordering_key
        block = self.blocks.get(key) if self.blocks else None
        mine = block is not None and block.blocker == delivery.message_id
        if not mine and delivery.consumer < 0:
            return []  # read from the stream, not blocking anything
        if mine or delivery.consumer >= 0:
            # a copy (retry, replay): it may be the blocker of a block recorded elsewhere
            await self._store(lambda: self.store.unpark(self.actor, key, delivery.message_id))
        if not mine:
            return []
        assert block is not None
        del self.blocks[key]
        self._measure()
        return block.held

    async def poll(self) -> set[str]:
        """Compare the blocks with the store's; return the keys that changed (lifted, or
        dead-lettered elsewhere, or stale), for their worker's ``take_changes``. Blocks
        recorded elsewhere are learnt (their aggregate's events are held from now on)."""
        if not self.streams:
            return set()
        seen = dict(self.blocks)  # what the store's answer is compared with
        rows = {row.key: row for row in await self.store.parked_keys(self.actor)}
        now = time.monotonic()
        changed: set[str] = set()
        stale: list[tuple[str, Block]] = []
        for key, block in seen.items():
            if self.blocks.get(key) is not block or block.lifted:
                continue  # changed by the worker meanwhile: its own call recorded it
            row = rows.get(key)
            if row is None or row.blocker != block.blocker:
                # (a block is in memory only once its row committed, so the row is gone)
                block.lifted = True
                changed.add(key)
            elif row.dead and not block.dead:
                block.dead = True
                changed.add(key)
            elif not block.dead and now - block.since > self.stale_after:
                stale.append((key, block))
        for key, row in rows.items():
            if key not in self.blocks:
                self.blocks[key] = Block(row.blocker, row.dead, now)
        for key, block in stale:
            await self._turn_dead(
                key, block, f"its retry did not come back within {self.stale_after:g}s"
            )
            changed.add(key)
        self._measure()
        return changed

    async def take_changes(self, keys: set[str]) -> list[Delivery]:
        """At the worker's turn: dead-letter what waits behind a blocker now dead; return
        what a lifted block held, to handle in order."""
        released: list[Delivery] = []
        for key in sorted(keys):
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

    async def _turn_dead(self, key: str, block: Block, reason: str) -> None:
        parked = ParkedKey(self.actor, key, block.blocker, True, reason, utcnow())
        await self._store(lambda: self.store.park(parked))
        block.dead = True

    async def _dead_letter_held(self, key: str, block: Block) -> None:
        held, block.held = block.held, []
        for waiting in held:
            await self.dead_letter(waiting, ParkedError(self.actor, key, block.blocker))
        self._measure()

    async def _store(self, call: Callable[[], Awaitable[T]]) -> T:
        """A store call that waits out an outage in place (the held events stay held)."""
        outage = 0
        while True:
            try:
                return await call()
            except StoreUnavailableError as exc:
                outage += 1
                pause = outage_pause(outage)
                logger.warning(
                    "actor {actor}: parking cannot reach the store ({error}); retry in {pause:g}s",
                    actor=self.actor,
                    error=exc,
                    pause=pause,
                )
                await anyio.sleep(pause)

    def _measure(self) -> None:
        if self.metrics is None:
            return
        labels = {"actor": self.actor}
        self.metrics.parked_aggregates.set(labels, len(self.blocks))
        self.metrics.parked_events.set(labels, sum(len(b.held) for b in self.blocks.values()))
