"""The in-memory read-model store: the embedded default and the fast twin for unit tests.

A transaction stages its writes and applies them all at once when it exits normally (no
await between the first and the last write, so on one event loop the commit is atomic);
when it raises, they are dropped. Locks are per ``(projection, aggregate)`` version and per
document asked ``for_update``, held until the transaction ends, like PostgreSQL's row locks.
Unlike PostgreSQL, two transactions that take two locks in opposite orders wait for each
other forever: take the aggregate's version first, then documents in a fixed order.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from runtime.errors import InvalidRequestError, RebuildInProgressError
from runtime.store.readmodel import (
    Document,
    Entry,
    ReadModelTx,
    Rebuild,
    check_name,
    check_page,
    check_rebuild_write,
    check_version,
    decode_document,
    encode_document,
)

T = TypeVar("T")
_Collection = tuple[str, str]  # (projection, collection)


class _KeyedLocks:
    """One binary semaphore per key, created on demand and dropped when nobody holds it.
    (A semaphore, not a lock: a transaction may be ended by another task than the one that
    locked.)"""

    def __init__(self) -> None:
        self._held: dict[Hashable, anyio.Semaphore] = {}

    async def acquire(self, key: Hashable) -> None:
        semaphore = self._held.get(key)
        if semaphore is None:
            semaphore = self._held[key] = anyio.Semaphore(1)
        await semaphore.acquire()

    def release(self, key: Hashable) -> None:
        semaphore = self._held[key]
        semaphore.release()
        if semaphore.value == 1 and semaphore.statistics().tasks_waiting == 0:
            del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class MemoryReadModelStore:
    """A ``ReadModelStore`` held in dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._docs: dict[_Collection, dict[str, bytes]] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self._locks = _KeyedLocks()
        self._rebuilding: set[str] = set()
        self._open: dict[str, int] = {}  # projection -> transactions open
        self._swapping: dict[str, anyio.Event] = {}  # projection -> set once swapped
        self._drained: dict[str, anyio.Event] = {}  # projection -> set once none is open

    @asynccontextmanager
    async def transaction(self, projection: str) -> AsyncIterator[ReadModelTx]:
        check_name("projection", projection)
        while (swapped := self._swapping.get(projection)) is not None:
            await swapped.wait()  # a rebuild is being swapped in: write on what it gives
        self._open[projection] = self._open.get(projection, 0) + 1
        tx = MemoryReadModelTx(self, projection)
        try:
            try:
                yield tx
            except BaseException:
                tx.end(commit=False)
                raise
            tx.end(commit=True)
        finally:
            self._open[projection] -= 1
            if not self._open[projection]:
                del self._open[projection]
                drained = self._drained.pop(projection, None)
                if drained is not None:
                    drained.set()

    async def _swap_in(
        self, live: str, shadow: str, finish: Callable[[ReadModelTx], Awaitable[object]]
    ) -> None:
        """``MemoryRebuild.swap``: new transactions of ``live`` wait, open ones finish first."""
        swapped = self._swapping[live] = anyio.Event()
        try:
            while self._open.get(live):
                drained = self._drained[live] = anyio.Event()
                await drained.wait()
            async with self.transaction(shadow) as tx:
                await finish(tx)
            await self.drop(live)
            for projection, collection in [k for k in self._docs if k[0] == shadow]:
                self._docs[(live, collection)] = self._docs.pop((projection, collection))
            for projection, aggregate_id in [k for k in self._versions if k[0] == shadow]:
                self._versions[(live, aggregate_id)] = self._versions.pop(
                    (projection, aggregate_id)
                )
        finally:
            del self._swapping[live]
            swapped.set()

    async def run(self, projection: str, work: Callable[[ReadModelTx], Awaitable[T]]) -> T:
        async with self.transaction(projection) as tx:
            return await work(tx)

    async def get(self, projection: str, collection: str, key: str) -> Document | None:
        check_name("projection", projection)
        check_name("collection", collection)
        check_name("key", key)
        raw = self._docs.get((projection, collection), {}).get(key)
        return None if raw is None else decode_document(raw)

    async def list(
        self,
        projection: str,
        collection: str,
        *,
        limit: int = 100,
        after_key: str | None = None,
    ) -> list[Entry]:
        check_name("projection", projection)
        check_name("collection", collection)
        check_page(limit, after_key)
        docs = self._docs.get((projection, collection), {})
        return _page(docs, limit, after_key)

    async def find(
        self,
        projection: str,
        collection: str,
        *,
        equals: dict[str, str | int | bool] | None = None,
        ranges: dict[str, tuple[str | None, str | None]] | None = None,
        limit: int = 100,
        after_key: str | None = None,
    ) -> builtins.list[Entry]:
        check_name("projection", projection)
        check_name("collection", collection)
        check_page(limit, after_key)
        docs = self._docs.get((projection, collection), {})
        found: builtins.list[Entry] = []
        for key in sorted(k for k in docs if after_key is None or k > after_key):
            doc = decode_document(docs[key])
            if matches(doc, equals or {}, ranges or {}):
                found.append((key, doc))
                if len(found) == limit:
                    break
        return found

    async def drop(self, projection: str) -> None:
        check_name("projection", projection)
        for key in [k for k in self._docs if k[0] == projection]:
            del self._docs[key]
        for key in [k for k in self._versions if k[0] == projection]:
            del self._versions[key]

    @asynccontextmanager
    async def rebuild(self, projection: str) -> AsyncIterator[Rebuild]:
        check_name("projection", projection)
        if projection in self._rebuilding:
            raise RebuildInProgressError(projection)
        self._rebuilding.add(projection)
        rebuild = MemoryRebuild(self, projection)
        try:
            await self.drop(rebuild.shadow)
            yield rebuild
        finally:
            self._rebuilding.discard(projection)
            await self.drop(rebuild.shadow)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        count = sum(len(docs) for docs in self._docs.values())
        return f"MemoryReadModelStore(documents={count}, versions={len(self._versions)})"


class MemoryReadModelTx:
    """Staged writes over the committed state; see the module docstring."""

    def __init__(self, store: MemoryReadModelStore, projection: str) -> None:
        self._store = store
        self._projection = projection
        self._writes: dict[tuple[str, str], bytes | None] = {}  # None: deleted
        self._versions: dict[str, int] = {}
        self._locked: set[Hashable] = set()
        self._open = True

    async def _lock(self, key: Hashable) -> None:
        self._check_open()
        if key not in self._locked:
            await self._store._locks.acquire(key)
            self._locked.add(key)

    def _check_open(self) -> None:
        if not self._open:
            raise InvalidRequestError(
                f"this read-model transaction of {self._projection!r} has ended; "
                "open a new one with transaction()"
            )

    async def get(self, collection: str, key: str, *, for_update: bool = False) -> Document | None:
        self._check_open()
        check_name("collection", collection)
        check_name("key", key)
        if for_update:
            await self._lock(("doc", self._projection, collection, key))
        if (collection, key) in self._writes:
            raw = self._writes[(collection, key)]
        else:
            raw = self._store._docs.get((self._projection, collection), {}).get(key)
        return None if raw is None else decode_document(raw)

    async def get_many(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        found: dict[str, Document] = {}
        for key in keys:
            doc = await self.get(collection, key)
            if doc is not None:
                found[key] = doc
        return found

    async def prefetch(self, collection: str, keys: Sequence[str]) -> None:
        self._check_open()  # everything is at hand already
        check_name("collection", collection)
        for key in keys:
            check_name("key", key)

    async def put(self, collection: str, key: str, doc: Document) -> None:
        self._check_open()
        self._writes[(collection, key)] = encode_document(collection, key, doc)

    async def delete(self, collection: str, key: str) -> None:
        self._check_open()
        check_name("collection", collection)
        check_name("key", key)
        self._writes[(collection, key)] = None

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        self._check_open()
        check_name("collection", collection)
        check_page(limit, after_key)
        docs = dict(self._store._docs.get((self._projection, collection), {}))
        for (staged_collection, key), raw in self._writes.items():
            if staged_collection != collection:
                continue
            if raw is None:
                docs.pop(key, None)
            else:
                docs[key] = raw
        return _page(docs, limit, after_key)

    async def last_version(self, aggregate_id: str) -> int:
        check_name("aggregate_id", aggregate_id)
        await self._lock(("version", self._projection, aggregate_id))
        return self._version(aggregate_id)

    async def last_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        for aggregate_id in aggregate_ids:
            check_name("aggregate_id", aggregate_id)
        return {a: await self.last_version(a) for a in sorted(set(aggregate_ids))}

    async def set_last_version(self, aggregate_id: str, version: int) -> None:
        check_name("aggregate_id", aggregate_id)
        check_version(version)
        await self._lock(("version", self._projection, aggregate_id))
        self._versions[aggregate_id] = max(self._version(aggregate_id), version)

    def _version(self, aggregate_id: str) -> int:
        staged = self._versions.get(aggregate_id)
        if staged is not None:
            return staged
        return self._store._versions.get((self._projection, aggregate_id), 0)

    def end(self, *, commit: bool) -> None:
        """Apply the staged writes (``commit``) or drop them; release every lock. Called by
        the store's ``transaction()`` on the way out, never awaits."""
        if not self._open:
            return
        self._open = False
        try:
            if commit:
                self._apply()
        finally:
            for key in self._locked:
                self._store._locks.release(key)
            self._locked.clear()

    def _apply(self) -> None:
        store = self._store
        for (collection, key), raw in self._writes.items():
            docs = store._docs.setdefault((self._projection, collection), {})
            if raw is None:
                docs.pop(key, None)
            else:
                docs[key] = raw
        for aggregate_id, version in self._versions.items():
            store._versions[(self._projection, aggregate_id)] = version


class MemoryRebuild:
    """A rebuild in the embedded store: a namespace of its own, renamed by ``swap``."""

    def __init__(self, store: MemoryReadModelStore, projection: str) -> None:
        self._store = store
        self.projection = projection
        self.shadow = projection + "~rebuild"

    async def load(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        docs = self._store._docs.get((self.shadow, collection), {})
        return {key: decode_document(docs[key]) for key in keys if key in docs}

    async def load_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        versions = self._store._versions
        return {a: versions.get((self.shadow, a), 0) for a in aggregate_ids}

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> builtins.list[Entry]:
        return await self._store.list(self.shadow, collection, limit=limit, after_key=after_key)

    async def write(
        self,
        documents: Mapping[tuple[str, str], bytes | None],
        versions: Mapping[str, int],
        *,
        new: bool = False,
    ) -> None:
        check_rebuild_write(documents, versions)
        for (collection, key), raw in documents.items():
            docs = self._store._docs.setdefault((self.shadow, collection), {})
            if raw is None:
                docs.pop(key, None)
            else:
                docs[key] = bytes(raw)
        for aggregate_id, version in versions.items():
            self._store._versions[(self.shadow, aggregate_id)] = version

    async def swap(self, finish: Callable[[ReadModelTx], Awaitable[object]]) -> None:
        await self._store._swap_in(self.projection, self.shadow, finish)


def matches(
    doc: Document,
    equals: dict[str, str | int | bool],
    ranges: dict[str, tuple[str | None, str | None]],
) -> bool:
    for field, value in equals.items():
        if field not in doc or doc[field] != value or type(doc[field]) is not type(value):
            return False
    for field, (low, high) in ranges.items():
        text = doc.get(field)
        if not isinstance(text, str):
            return False
        if (low is not None and text < low) or (high is not None and text >= high):
            return False
    return True


def _page(docs: dict[str, bytes], limit: int, after_key: str | None) -> list[Entry]:
    keys = sorted(k for k in docs if after_key is None or k > after_key)[:limit]
    return [(key, decode_document(docs[key])) for key in keys]
