"""Read models: the documents projections keep, one protocol for both backends.

A projection writes JSON documents, addressed by ``(collection, key)`` inside its own
namespace (the projection's name), and remembers per aggregate the last version it applied.
Both go through one ``ReadModelTx``: the effect and the dedup record commit together or not
at all, so a redelivered event changes nothing twice (guarantee 2).

``last_version`` locks the aggregate's version record until the transaction ends: of two
transactions handling the same aggregate at once (competing consumers, duplicates), the
second waits and then sees what the first applied. ``get(..., for_update=True)`` does the
same for a document shared by several aggregates (a total, a counter).

Both backends pass ``tests/contracts/readmodel.py``. The embedded one is a process-wide
instance per ``memory://`` URL (:func:`read_model_store_for`), so a query elsewhere in the
process reads what the projection actor wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import msgspec

from runtime.errors import ConfigurationError, InvalidRequestError
from runtime.store.factory import is_memory_url
from runtime.store.protocol import MAX_ID_LENGTH

if TYPE_CHECKING:
    from runtime.store.readmodel_memory import MemoryReadModelStore

T = TypeVar("T")

#: A read-model document: a JSON object.
Document = dict[str, Any]
#: One entry of a ``list`` page: the key and its document.
Entry = tuple[str, Document]

#: The most entries one ``list`` call returns.
MAX_PAGE = 1000
#: Versions are PostgreSQL integers, as in the event store.
MAX_VERSION = 2**31 - 1


@runtime_checkable
class ReadModelTx(Protocol):
    """One projection's view inside one transaction. Reads see the transaction's own writes;
    nothing is visible to others before the transaction commits."""

    async def get(self, collection: str, key: str, *, for_update: bool = False) -> Document | None:
        """The document, or None. ``for_update`` locks ``(collection, key)`` until the
        transaction ends, also when the document does not exist yet."""
        ...

    async def get_many(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        """The documents of ``keys`` that exist, by key, in one read (no lock). A later
        ``get`` of one of them without ``for_update`` may answer from this read (a batch
        prefetches what its events touch); ``for_update`` always reads afresh."""
        ...

    async def prefetch(self, collection: str, keys: Sequence[str]) -> None:
        """Read the documents of ``keys`` in one read (no lock), so that a later ``get`` of
        one of them without ``for_update`` answers from it; nothing is decoded yet (a batch
        prefetches what its events touch)."""
        ...

    async def put(self, collection: str, key: str, doc: Document) -> None:
        """Create or replace the document."""
        ...

    async def delete(self, collection: str, key: str) -> None:
        """Remove the document; nothing happens if there is none."""
        ...

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        """Up to ``limit`` entries with a key above ``after_key``, in key (code point) order."""
        ...

    async def last_version(self, aggregate_id: str) -> int:
        """The last version of the aggregate this projection applied (0: none), locked
        until the transaction ends."""
        ...

    async def last_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        """``last_version`` of several aggregates at once, locked in key order (so that two
        transactions locking overlapping sets never deadlock)."""
        ...

    async def set_last_version(self, aggregate_id: str, version: int) -> None:
        """Record ``version`` as applied. A version never goes back: a lower one is ignored."""
        ...


@runtime_checkable
class Rebuild(Protocol):
    """A projection's read model under construction (``ReadModelStore.rebuild``), written in
    bulk by its one writer: documents are given already encoded (``encode_document``)."""

    #: The live projection this one will replace.
    projection: str

    async def load(self, collection: str, keys: Sequence[str]) -> dict[str, Document]:
        """The documents of ``keys`` that ``write`` wrote, by key."""
        ...

    async def load_versions(self, aggregate_ids: Sequence[str]) -> dict[str, int]:
        """The versions ``write`` recorded for these aggregates (0: none)."""
        ...

    async def list(
        self, collection: str, *, limit: int = 100, after_key: str | None = None
    ) -> list[Entry]:
        """A page of what ``write`` wrote, as ``ReadModelTx.list``."""
        ...

    async def write(
        self,
        documents: Mapping[tuple[str, str], bytes | None],
        versions: Mapping[str, int],
        *,
        new: bool = False,
    ) -> None:
        """Create or replace the documents at ``(collection, key)`` (None: delete them) and
        record the aggregates' versions, in one transaction. ``new``: the caller knows none
        of them was written before, so they are inserted in bulk, replacing nothing."""
        ...

    async def swap(self, finish: Callable[[ReadModelTx], Awaitable[object]]) -> None:
        """Make this read model the live one, atomically: readers see the old one until the
        commit, then this one. ``finish`` runs first, in the same transaction, on this read
        model (to apply what the live projection applied meanwhile). The swap waits for the
        projection's open transactions, and new ones wait for the swap (PostgreSQL holds
        back every projection's writes, and queries for the swap's last statements)."""
        ...


@runtime_checkable
class ReadModelStore(Protocol):
    """Where projections keep their documents. Reads outside a transaction are for queries."""

    def transaction(self, projection: str) -> AbstractAsyncContextManager[ReadModelTx]:
        """One transaction in ``projection``'s namespace: committed when the block exits
        normally, rolled back (nothing kept) when it raises. Connection loss raises
        ``StoreUnavailableError``."""
        ...

    async def run(self, projection: str, work: Callable[[ReadModelTx], Awaitable[T]]) -> T:
        """``work`` in one transaction, retried once in a fresh one if the connection died.

        ``work`` may therefore run twice; it is safe when its effect is deduplicated inside
        the same transaction (as a projection's is, by aggregate version).
        """
        ...

    async def get(self, projection: str, collection: str, key: str) -> Document | None: ...

    async def find(
        self,
        projection: str,
        collection: str,
        *,
        equals: dict[str, str | int | bool] | None = None,
        ranges: dict[str, tuple[str | None, str | None]] | None = None,
        limit: int = 100,
        after_key: str | None = None,
    ) -> list[Entry]:
        """Up to ``limit`` documents whose top-level fields equal ``equals`` and whose string
        fields fall in ``ranges`` (``(low, high)``, inclusive low, exclusive high, None: open;
        compared as text, so ISO 8601 UTC timestamps compare in time order), in key order
        above ``after_key`` (keyset pagination)."""
        ...

    async def list(
        self,
        projection: str,
        collection: str,
        *,
        limit: int = 100,
        after_key: str | None = None,
    ) -> list[Entry]: ...

    async def drop(self, projection: str) -> None:
        """Delete every document and version record of ``projection``."""
        ...

    def rebuild(self, projection: str) -> AbstractAsyncContextManager[Rebuild]:
        """An empty read model built beside ``projection``'s live one, for a single writer
        (``magasin replay``): readers keep seeing the live one until ``Rebuild.swap``. What is
        not swapped in when the block exits is discarded. A second rebuild of the same
        projection at the same time is refused (``RebuildInProgressError``)."""
        ...

    async def close(self) -> None: ...


# --- validation shared by both backends, so they fail identically -----------------------------

_encoder = msgspec.json.Encoder()


def check_name(field: str, value: str) -> None:
    """A projection, collection, key or aggregate id: non-empty text that fits the column."""
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{field} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequestError(
            f"{field} is {len(value)} characters long, the limit is {MAX_ID_LENGTH}: "
            f"{value[:40]!r}..."
        )
    if "\x00" in value:
        raise InvalidRequestError(f"{field} contains a NUL (U+0000) character: {value!r}")


def check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise InvalidRequestError(f"a version is an int from 0 to {MAX_VERSION}, got {version!r}")


def check_rebuild_write(
    documents: Mapping[tuple[str, str], bytes | None], versions: Mapping[str, int]
) -> None:
    """Refuse a ``Rebuild.write`` naming a bad collection, key or aggregate, or a bad
    version, before anything of it is written."""
    for collection, key in documents:
        check_name("collection", collection)
        check_name("key", key)
    for aggregate_id, version in versions.items():
        check_name("aggregate_id", aggregate_id)
        check_version(version)


def check_page(limit: int, after_key: str | None) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be an int from 1 to {MAX_PAGE}, got {limit!r}")
    if after_key is not None and (not isinstance(after_key, str) or "\x00" in after_key):
        raise InvalidRequestError(
            f"after_key must be a string without NUL or None, got {after_key!r}"
        )


def encode_document(collection: str, key: str, doc: Document) -> bytes:
    """``doc`` as JSON; refused (``InvalidRequestError``) if it is not a JSON object or holds a
    NUL character, which PostgreSQL's jsonb cannot store."""
    check_name("collection", collection)
    check_name("key", key)
    if not isinstance(doc, dict):
        raise InvalidRequestError(
            f"a read-model document is a dict (a JSON object), got {type(doc).__name__} "
            f"for {collection}/{key}"
        )
    try:
        encoded = _encoder.encode(doc)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"document {collection}/{key} is not JSON: {exc}") from exc
    if b"\\u0000" in encoded and _holds_nul(msgspec.json.decode(encoded)):
        raise InvalidRequestError(
            f"document {collection}/{key} contains a NUL (U+0000) character, which "
            "PostgreSQL's jsonb cannot store"
        )
    return encoded


def decode_document(raw: bytes | str) -> Document:
    doc: Document = msgspec.json.decode(raw)
    return doc


def _holds_nul(item: object) -> bool:
    stack = [item]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# --- opening a store from a URL ------------------------------------------------------------------

_embedded: dict[str, MemoryReadModelStore] = {}


def read_model_store_for(url: str) -> MemoryReadModelStore:
    """The process-wide embedded store named by a ``memory://`` URL (created on first use):
    the projection actors and the queries of one process share it."""
    if not is_memory_url(url):
        where = url.rsplit("@", maxsplit=1)[-1]
        raise ConfigurationError(
            f"read_model_store_for() only names embedded (memory://) stores, not {where!r}; "
            "open a PostgreSQL one with open_read_model_store()"
        )
    from runtime.store.readmodel_memory import MemoryReadModelStore  # noqa: PLC0415

    name = url or "memory://"
    store = _embedded.get(name)
    if store is None:
        store = _embedded[name] = MemoryReadModelStore()
    return store


@asynccontextmanager
async def open_read_model_store(
    url: str, *, schema: str = "public", max_size: int = 4
) -> AsyncIterator[ReadModelStore]:
    """The read-model store ``url`` names, for the life of the block: the shared embedded one
    for ``memory://`` (left open), a PostgreSQL pool of its own otherwise (closed on exit)."""
    if is_memory_url(url):
        yield read_model_store_for(url)
        return
    from runtime.store.readmodel_postgres import PostgresReadModelStore  # noqa: PLC0415

    store = await PostgresReadModelStore.connect(url, schema=schema, max_size=max_size)
    try:
        yield store
    finally:
        await store.close()
