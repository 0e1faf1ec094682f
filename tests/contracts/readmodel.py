"""The read-model store contract, run against both backends.

A backend's test module subclasses ``ReadModelStoreContract`` and provides a ``read_models``
fixture (a fresh, empty store).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from runtime.errors import InvalidRequestError, RebuildInProgressError
from runtime.store.readmodel import MAX_PAGE, ReadModelStore, ReadModelTx, encode_document

P = "balances"


class Boom(Exception):
    pass


async def put(
    store: ReadModelStore, projection: str, collection: str, key: str, **doc: Any
) -> None:
    async with store.transaction(projection) as tx:
        await tx.put(collection, key, doc)


async def in_transaction(
    store: ReadModelStore, work: Callable[[ReadModelTx], Awaitable[None]], projection: str = P
) -> None:
    """``work`` in a plain ``transaction()`` block (``run`` would retry it)."""
    async with store.transaction(projection) as tx:
        await work(tx)


class ReadModelStoreContract:
    # --- documents ------------------------------------------------------------------------

    async def test_a_committed_document_reads_back(self, read_models: ReadModelStore) -> None:
        doc = {"owner": "ana", "balance": 10, "tags": ["a", "é"], "nested": {"x": None}}
        async with read_models.transaction(P) as tx:
            await tx.put("accounts", "acc-1", doc)
        assert await read_models.get(P, "accounts", "acc-1") == doc
        async with read_models.transaction(P) as tx:
            assert await tx.get("accounts", "acc-1") == doc

    async def test_an_unknown_document_is_none(self, read_models: ReadModelStore) -> None:
        assert await read_models.get(P, "accounts", "nobody") is None
        async with read_models.transaction(P) as tx:
            assert await tx.get("accounts", "nobody") is None

    async def test_put_replaces_and_delete_removes(self, read_models: ReadModelStore) -> None:
        await put(read_models, P, "accounts", "a", balance=1)
        await put(read_models, P, "accounts", "a", balance=2)
        assert await read_models.get(P, "accounts", "a") == {"balance": 2}
        async with read_models.transaction(P) as tx:
            await tx.delete("accounts", "a")
            await tx.delete("accounts", "never-there")
        assert await read_models.get(P, "accounts", "a") is None

    async def test_a_transaction_reads_its_own_writes_and_others_do_not_before_commit(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "accounts", "gone", balance=0)
        async with read_models.transaction(P) as tx:
            await tx.put("accounts", "new", {"balance": 5})
            await tx.delete("accounts", "gone")
            assert await tx.get("accounts", "new") == {"balance": 5}
            assert await tx.get("accounts", "gone") is None
            assert await read_models.get(P, "accounts", "new") is None
            assert await read_models.get(P, "accounts", "gone") == {"balance": 0}
        assert await read_models.get(P, "accounts", "new") == {"balance": 5}
        assert await read_models.get(P, "accounts", "gone") is None

    async def test_documents_are_values_not_shared_objects(
        self, read_models: ReadModelStore
    ) -> None:
        doc: dict[str, Any] = {"items": [1]}
        async with read_models.transaction(P) as tx:
            await tx.put("c", "k", doc)
            doc["items"].append(2)
            read = await tx.get("c", "k")
            assert read == {"items": [1]}
            read["items"].append(3)
        assert await read_models.get(P, "c", "k") == {"items": [1]}

    # --- atomicity --------------------------------------------------------------------------

    async def test_an_exception_inside_the_transaction_leaves_nothing(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "accounts", "kept", balance=1)
        async with read_models.transaction(P) as tx:
            await tx.set_last_version("acc-1", 3)

        async def fails_at_the_end(tx: ReadModelTx) -> None:
            await tx.put("accounts", "new", {"balance": 1})
            await tx.put("accounts", "kept", {"balance": 99})
            await tx.delete("accounts", "kept")
            assert await tx.last_version("acc-1") == 3
            await tx.set_last_version("acc-1", 4)
            await tx.set_last_version("acc-2", 1)
            raise Boom

        with pytest.raises(Boom):
            await in_transaction(read_models, fails_at_the_end)
        assert await read_models.get(P, "accounts", "new") is None
        assert await read_models.get(P, "accounts", "kept") == {"balance": 1}
        async with read_models.transaction(P) as tx:
            assert await tx.last_version("acc-1") == 3
            assert await tx.last_version("acc-2") == 0

    async def test_run_commits_what_its_work_did_and_returns_its_result(
        self, read_models: ReadModelStore
    ) -> None:
        async def work(tx: ReadModelTx) -> int:
            await tx.put("c", "k", {"n": 1})
            await tx.set_last_version("agg", 1)
            return 7

        assert await read_models.run(P, work) == 7
        assert await read_models.get(P, "c", "k") == {"n": 1}

        async def failing(tx: ReadModelTx) -> int:
            await tx.put("c", "k", {"n": 2})
            raise Boom

        with pytest.raises(Boom):
            await read_models.run(P, failing)
        assert await read_models.get(P, "c", "k") == {"n": 1}

    async def test_a_transaction_cannot_be_used_after_it_ended(
        self, read_models: ReadModelStore
    ) -> None:
        async with read_models.transaction(P) as tx:
            pass
        with pytest.raises(InvalidRequestError, match="ended"):
            await tx.put("c", "k", {})
        with pytest.raises(InvalidRequestError, match="ended"):
            await tx.last_version("agg")

    # --- isolation ---------------------------------------------------------------------------

    async def test_projections_and_collections_are_separate_namespaces(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, "one", "accounts", "k", v=1)
        await put(read_models, "two", "accounts", "k", v=2)
        await put(read_models, "one", "owners", "k", v=3)
        assert await read_models.get("one", "accounts", "k") == {"v": 1}
        assert await read_models.get("two", "accounts", "k") == {"v": 2}
        assert await read_models.get("one", "owners", "k") == {"v": 3}
        assert await read_models.list("two", "owners") == []
        async with read_models.transaction("one") as tx:
            await tx.set_last_version("agg", 5)
        async with read_models.transaction("two") as tx:
            assert await tx.last_version("agg") == 0

    # --- listing -----------------------------------------------------------------------------

    async def test_list_pages_by_key_in_code_point_order(self, read_models: ReadModelStore) -> None:
        keys = ["b", "B", "a", "a0", "é", "中", "Z", "10", "9", "a b"]
        async with read_models.transaction(P) as tx:
            for n, key in enumerate(keys):
                await tx.put("items", key, {"n": n})
            await tx.put("other", "a", {"n": -1})
        expected = sorted(keys)
        assert expected[:3] == ["10", "9", "B"]  # code points, not a locale's order
        pages: list[str] = []
        after: str | None = None
        while page := await read_models.list(P, "items", limit=3, after_key=after):
            assert len(page) <= 3
            pages.extend(key for key, _ in page)
            after = page[-1][0]
        assert pages == expected
        first = await read_models.list(P, "items", limit=2)
        assert first == [("10", {"n": 7}), ("9", {"n": 8})]
        assert await read_models.list(P, "items", after_key="中") == []

    async def test_list_inside_a_transaction_sees_its_own_writes(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "items", "a", n=1)
        await put(read_models, P, "items", "c", n=3)
        async with read_models.transaction(P) as tx:
            await tx.put("items", "b", {"n": 2})
            await tx.delete("items", "c")
            await tx.put("items", "a", {"n": 10})
            assert await tx.list("items") == [("a", {"n": 10}), ("b", {"n": 2})]
            assert await tx.list("items", after_key="a", limit=1) == [("b", {"n": 2})]

    @pytest.mark.parametrize("limit", [0, -1, MAX_PAGE + 1])
    async def test_a_page_size_out_of_range_is_refused(
        self, read_models: ReadModelStore, limit: int
    ) -> None:
        with pytest.raises(InvalidRequestError, match="limit"):
            await read_models.list(P, "items", limit=limit)

    # --- versions ----------------------------------------------------------------------------

    async def test_versions_start_at_zero_and_never_go_back(
        self, read_models: ReadModelStore
    ) -> None:
        async with read_models.transaction(P) as tx:
            assert await tx.last_version("agg") == 0
            await tx.set_last_version("agg", 2)
            assert await tx.last_version("agg") == 2
        async with read_models.transaction(P) as tx:
            assert await tx.last_version("agg") == 2
            await tx.set_last_version("agg", 1)
            assert await tx.last_version("agg") == 2
        async with read_models.transaction(P) as tx:
            assert await tx.last_version("agg") == 2

    async def test_get_many_reads_committed_and_staged_documents_and_omits_missing(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "accounts", "a", balance=1)
        await put(read_models, P, "accounts", "b", balance=2)
        async with read_models.transaction(P) as tx:
            await tx.put("accounts", "c", {"balance": 3})
            await tx.delete("accounts", "b")
            found = await tx.get_many("accounts", ["a", "b", "c", "nobody", "a"])
            assert found == {"a": {"balance": 1}, "c": {"balance": 3}}
            assert await tx.get_many("accounts", []) == {}
            assert await tx.get_many("other", ["a"]) == {}

    async def test_prefetched_documents_read_back_as_gets_do_and_writes_still_win(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "accounts", "a", balance=1)
        await put(read_models, P, "accounts", "b", balance=2)
        async with read_models.transaction(P) as tx:
            await tx.prefetch("accounts", ["a", "b", "nobody", "a"])
            await tx.prefetch("accounts", [])
            assert await tx.get("accounts", "a") == {"balance": 1}
            assert await tx.get("accounts", "nobody") is None
            await tx.put("accounts", "b", {"balance": 5})
            assert await tx.get("accounts", "b") == {"balance": 5}
            await tx.delete("accounts", "a")
            assert await tx.get("accounts", "a") is None
            assert await tx.get_many("accounts", ["a", "b"]) == {"b": {"balance": 5}}
            with pytest.raises(InvalidRequestError, match="key"):
                await tx.prefetch("accounts", [""])

    async def test_last_versions_locks_several_and_sees_staged_versions(
        self, read_models: ReadModelStore
    ) -> None:
        async with read_models.transaction(P) as tx:
            await tx.set_last_version("b", 4)
        async with read_models.transaction(P) as tx:
            assert await tx.last_versions(["c", "b", "a"]) == {"a": 0, "b": 4, "c": 0}
            await tx.set_last_version("a", 2)
            assert await tx.last_versions(["a", "b"]) == {"a": 2, "b": 4}
            assert await tx.last_version("c") == 0
        async with read_models.transaction(P) as tx:
            assert await tx.last_versions(["a", "b", "c"]) == {"a": 2, "b": 4, "c": 0}

    async def test_batches_locking_overlapping_aggregates_in_any_order_all_commit(
        self, read_models: ReadModelStore
    ) -> None:
        """Each batch names the same aggregates in its own order; the locks are taken in
        key order, so no two wait on each other in a cycle and every batch commits."""
        ids = [f"agg-{n}" for n in range(6)]

        async def batch(n: int) -> None:
            order = ids[n % 6 :] + ids[: n % 6]
            if n % 2:
                order.reverse()
            async with read_models.transaction(P) as tx:
                last = await tx.last_versions(order)
                await anyio.sleep(0.01)
                for aggregate_id in order:
                    await tx.set_last_version(aggregate_id, last[aggregate_id] + 1)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(batch, n)
        async with read_models.transaction(P) as tx:
            assert await tx.last_versions(ids) == dict.fromkeys(ids, 8)

    async def test_a_second_transaction_on_the_same_aggregate_waits_for_the_first(
        self, read_models: ReadModelStore
    ) -> None:
        """The first holds the aggregate's version from its read to its commit; the second
        reads the version only after the first committed, so it sees the event applied."""
        first_read = anyio.Event()
        seen: dict[str, int] = {}

        async def apply_version_one(name: str) -> None:
            async with read_models.transaction(P) as tx:
                last = await tx.last_version("agg")
                seen[name] = last
                if name == "first":
                    first_read.set()
                    await anyio.sleep(0.2)  # the second is waiting now
                if last == 0:
                    doc = await tx.get("counts", "agg") or {"n": 0}
                    await tx.put("counts", "agg", {"n": doc["n"] + 1})
                    await tx.set_last_version("agg", 1)

        async def second() -> None:
            await first_read.wait()
            await apply_version_one("second")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(apply_version_one, "first")
                tg.start_soon(second)
        assert seen == {"first": 0, "second": 1}
        assert await read_models.get(P, "counts", "agg") == {"n": 1}

    async def test_of_many_racers_on_one_version_exactly_one_applies(
        self, read_models: ReadModelStore
    ) -> None:
        applied: list[int] = []

        async def racer(n: int) -> None:
            async with read_models.transaction(P) as tx:
                if await tx.last_version("agg") >= 1:
                    return
                await anyio.sleep(0.01)
                await tx.put("counts", "agg", {"by": n})
                await tx.set_last_version("agg", 1)
                applied.append(n)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(12):
                    tg.start_soon(racer, n)
        assert len(applied) == 1
        assert await read_models.get(P, "counts", "agg") == {"by": applied[0]}

    async def test_a_rolled_back_transaction_releases_its_locks(
        self, read_models: ReadModelStore
    ) -> None:

        async def locks_then_fails(tx: ReadModelTx) -> None:
            await tx.last_version("agg")
            await tx.get("totals", "all", for_update=True)
            raise Boom

        with pytest.raises(Boom):
            await in_transaction(read_models, locks_then_fails)
        with anyio.fail_after(5):
            async with read_models.transaction(P) as tx:
                assert await tx.last_version("agg") == 0
                assert await tx.get("totals", "all", for_update=True) is None

    async def test_a_shared_document_read_for_update_loses_no_increment(
        self, read_models: ReadModelStore
    ) -> None:
        """Transactions of different aggregates update one total: each waits for the last."""

        async def add(n: int) -> None:
            async with read_models.transaction(P) as tx:
                await tx.last_version(f"agg-{n}")
                total = await tx.get("totals", "all", for_update=True) or {"sum": 0}
                await anyio.sleep(0.005)
                await tx.put("totals", "all", {"sum": total["sum"] + n})
                await tx.set_last_version(f"agg-{n}", 1)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for n in range(1, 11):
                    tg.start_soon(add, n)
        assert await read_models.get(P, "totals", "all") == {"sum": 55}

    # --- bad input ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("collection", "key", "doc", "match"),
        [
            ("c", "", {}, "key"),
            ("", "k", {}, "collection"),
            ("c", "k" * 256, {}, "limit is 255"),
            ("c", "k\x00", {}, "NUL"),
            ("c", "k", {"text": "a\x00b"}, "NUL"),
            ("c", "k", {"nested": ["\x00"]}, "NUL"),
            ("c", "k", ["not", "a", "dict"], "dict"),
            ("c", "k", {"value": object()}, "not JSON"),
        ],
    )
    async def test_a_bad_document_is_refused_and_nothing_is_written(
        self, read_models: ReadModelStore, collection: str, key: str, doc: Any, match: str
    ) -> None:

        async def puts(tx: ReadModelTx) -> None:
            await tx.put("c", "good", {"ok": True})
            await tx.put(collection, key, doc)

        with pytest.raises(InvalidRequestError, match=match):
            await in_transaction(read_models, puts)
        assert await read_models.get(P, "c", "good") is None

    @pytest.mark.parametrize("version", [-1, 2**31, True, 1.5])
    async def test_a_bad_version_is_refused(
        self, read_models: ReadModelStore, version: Any
    ) -> None:

        async def sets(tx: ReadModelTx) -> None:
            await tx.set_last_version("agg", version)

        with pytest.raises(InvalidRequestError, match="version"):
            await in_transaction(read_models, sets)

    async def test_a_bad_projection_name_is_refused(self, read_models: ReadModelStore) -> None:
        with pytest.raises(InvalidRequestError, match="projection"):
            async with read_models.transaction(""):
                pass

    # --- rebuilds (magasin replay) -----------------------------------------------------------

    async def test_a_rebuild_is_invisible_until_swapped_then_replaces_the_live_one(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "accounts", "old", balance=1)
        await in_transaction(read_models, lambda tx: tx.set_last_version("old", 4))
        await put(read_models, "other", "accounts", "kept", balance=9)
        async with read_models.rebuild(P) as rebuild:
            assert rebuild.projection == P
            await rebuild.write(
                {("accounts", "a"): encode_document("accounts", "a", {"balance": 2})},
                {"a": 3},
            )
            await rebuild.write(
                {
                    ("accounts", "b"): encode_document("accounts", "b", {"balance": 5}),
                    ("accounts", "a"): encode_document("accounts", "a", {"balance": 7}),
                },
                {"a": 6, "b": 1},
            )
            assert await rebuild.load("accounts", ["a", "b", "zz"]) == {
                "a": {"balance": 7},
                "b": {"balance": 5},
            }
            assert await rebuild.load_versions(["a", "b", "zz"]) == {"a": 6, "b": 1, "zz": 0}
            assert [k for k, _ in await rebuild.list("accounts")] == ["a", "b"]
            # Readers still see the live read model.
            assert await read_models.get(P, "accounts", "old") == {"balance": 1}
            assert await read_models.get(P, "accounts", "a") is None

            async def finish(tx: ReadModelTx) -> None:
                assert await tx.get("accounts", "a") == {"balance": 7}
                assert await tx.last_version("b") == 1
                await tx.put("accounts", "c", {"balance": 8})
                await tx.delete("accounts", "b")
                await tx.set_last_version("c", 2)

            await rebuild.swap(finish)
        assert [k for k, _ in await read_models.list(P, "accounts")] == ["a", "c"]
        assert await read_models.get(P, "accounts", "a") == {"balance": 7}
        assert await read_models.get("other", "accounts", "kept") == {"balance": 9}
        async with read_models.transaction(P) as tx:
            assert await tx.last_versions(["a", "c", "old"]) == {"a": 6, "c": 2, "old": 0}
        # The swapped-in read model is live: its projection writes as before.
        await put(read_models, P, "accounts", "d", balance=10)
        assert await read_models.get(P, "accounts", "d") == {"balance": 10}

    async def test_a_live_transaction_open_across_the_swap_is_not_written_over_it(
        self, read_models: ReadModelStore
    ) -> None:
        """The swap waits for an open transaction of the projection (which, as a
        projection's does, locks its aggregate's version first), then replaces what it wrote."""
        await put(read_models, P, "c", "k", shape="old")
        live_open, swapping = anyio.Event(), anyio.Event()

        async def live() -> None:
            async with read_models.transaction(P) as tx:
                await tx.last_version("agg")
                await tx.put("c", "k", {"shape": "live"})
                live_open.set()
                await swapping.wait()
                await anyio.sleep(0.2)  # the swap has started and must wait for this commit

        async with anyio.create_task_group() as tg:
            tg.start_soon(live)
            await live_open.wait()
            async with read_models.rebuild(P) as rebuild:
                await rebuild.write({("c", "k"): encode_document("c", "k", {"shape": "new"})}, {})
                swapping.set()
                with anyio.fail_after(10):
                    await rebuild.swap(_nothing)
        assert await read_models.get(P, "c", "k") == {"shape": "new"}

    async def test_a_second_rebuild_replaces_the_first_and_deletes_reach_the_rebuild(
        self, read_models: ReadModelStore
    ) -> None:
        for round_ in (1, 2):
            async with read_models.rebuild(P) as rebuild:
                await rebuild.write(
                    {("c", f"k{round_}"): encode_document("c", "k", {"round": round_})}, {}
                )
                await rebuild.write({("c", f"k{round_}"): None}, {})
                await rebuild.write(
                    {("c", f"r{round_}"): encode_document("c", "r", {"round": round_})}, {}
                )
                await rebuild.swap(_nothing)
            assert await read_models.list(P, "c") == [(f"r{round_}", {"round": round_})]

    async def test_a_rebuild_left_without_swap_changes_nothing_and_can_start_again(
        self, read_models: ReadModelStore
    ) -> None:
        await put(read_models, P, "c", "live", v=1)

        async def abandoned() -> None:
            async with read_models.rebuild(P) as rebuild:
                await rebuild.write({("c", "new"): encode_document("c", "new", {"v": 2})}, {})
                raise Boom

        with pytest.raises(Boom):
            await abandoned()
        assert await read_models.list(P, "c") == [("live", {"v": 1})]
        async with read_models.rebuild(P) as rebuild:
            assert await rebuild.load("c", ["new"]) == {}, "a rebuild starts empty"

    async def test_a_projection_is_rebuilt_by_one_rebuild_at_a_time(
        self, read_models: ReadModelStore
    ) -> None:
        async with read_models.rebuild(P):
            with pytest.raises(RebuildInProgressError, match=P):
                async with read_models.rebuild(P):
                    pass
            async with read_models.rebuild("another"):
                pass
        async with read_models.rebuild(P):
            pass

    async def test_a_rebuild_refuses_bad_names(self, read_models: ReadModelStore) -> None:
        with pytest.raises(InvalidRequestError, match="projection"):
            async with read_models.rebuild(""):
                pass
        async with read_models.rebuild(P) as rebuild:
            with pytest.raises(InvalidRequestError, match="key"):
                await rebuild.write({("c", ""): b"{}"}, {})
            with pytest.raises(InvalidRequestError, match="version"):
                await rebuild.write({}, {"a": -1})


async def _nothing(tx: ReadModelTx) -> None:
    return None
