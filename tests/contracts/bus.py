"""The bus contract: the definition of the behaviour, run against both buses.

A bus's test module subclasses ``BusContract`` and provides a ``bus`` fixture (entered,
connected, closed afterwards). Every test declares its own queues and exchanges under
fresh names, so tests share nothing and rerun cleanly on a real broker.

Choices the contract pins down:
- settling a delivery whose consume context is gone (or settling twice) does not raise:
  it is logged, and the message is delivered again, so an actor's loop survives;
- ``list_dead_letters`` does not remove anything, but may change the DLQ's order;
- a message the broker dead-lettered (``nack(requeue=False)``) has no ``x-error``: its
  listing shows the broker's reason (``rejected``) as the error type;
- a request to a queue that does not exist is unroutable (``UnroutableError``), at once;
- an answer nobody waits for any more is dropped, and answering a message that is not a
  request does nothing: neither raises, so a responder's loop survives;
- a retried request is still a request: its answer after the retry reaches the requester.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import anyio
import pytest
from anyio.abc import TaskStatus

from runtime.bus.protocol import (
    X_ACTOR,
    X_ATTEMPTS,
    X_ERROR,
    X_ERROR_TYPE,
    X_FIRST_FAILED_AT,
    X_ORIGINAL_EXCHANGE,
    X_ORIGINAL_ROUTING_KEY,
    Binding,
    Bus,
    BusPlan,
    Delivery,
    ExchangeSpec,
    Outgoing,
    QueueSpec,
    Reply,
)
from runtime.errors import (
    BusError,
    BusUnavailableError,
    RequestTimeoutError,
    UnknownExchangeError,
    UnknownQueueError,
    UnroutableError,
)

T = TypeVar("T")
RETRY_DELAYS = (0.2, 0.4)


def unique(kind: str) -> str:
    return f"test.{kind}.{uuid.uuid4().hex[:10]}"


def work_queue(*bindings: Binding) -> QueueSpec:
    return QueueSpec(unique("q"), bindings=bindings, retry_delays=RETRY_DELAYS)


async def declared_queue(bus: Bus) -> str:
    """A fresh work queue fed only through the default exchange."""
    spec = work_queue()
    await bus.declare(BusPlan(queues=(spec,)))
    return spec.name


async def publish_ids(bus: Bus, queue: str, *ids: str) -> None:
    for message_id in ids:
        await bus.publish("", queue, message_id.encode(), message_id=message_id)


async def receive(deliveries: AsyncIterator[Delivery], count: int = 1) -> list[Delivery]:
    with anyio.fail_after(5):
        return [await anext(deliveries) for _ in range(count)]


async def assert_nothing_more(deliveries: AsyncIterator[Delivery], wait: float = 0.3) -> None:
    with anyio.move_on_after(wait):
        extra = await anext(deliveries)
        pytest.fail(f"unexpected delivery {extra.message_id} of {extra.queue}")


async def drain_ids(bus: Bus, queue: str) -> list[str]:
    """Every message id left in ``queue``, each acknowledged."""
    async with bus.consume(queue, prefetch=50) as deliveries:
        ids = []
        while True:
            with anyio.move_on_after(0.3) as idle:
                delivery = await anext(deliveries)
                await bus.ack(delivery)
                ids.append(delivery.message_id)
            if idle.cancelled_caught:
                return ids


async def serve(
    bus: Bus, queue: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer every request of ``queue`` with ``re:<its body>`` (and which request it
    answers, in a header), then ack it."""
    async with bus.consume(queue, prefetch=20) as deliveries:
        task_status.started()
        async for delivery in deliveries:
            await bus.reply(
                delivery, b"re:" + delivery.body, headers={"answers": delivery.message_id}
            )
            await bus.ack(delivery)


async def eventually(check: Callable[[], Awaitable[T]], within: float = 5) -> T:
    """``check()`` once it returns something truthy (broker dead-lettering is async)."""
    with anyio.fail_after(within):
        while True:
            if result := await check():
                return result
            await anyio.sleep(0.05)


class BusContract:
    # --- publishing and consuming ------------------------------------------------------------

    async def test_a_message_arrives_with_its_id_headers_body_and_routing_key(
        self, bus: Bus
    ) -> None:
        exchange = unique("ex")
        spec = work_queue(Binding(exchange, "complaint.filed"))
        await bus.declare(BusPlan(exchanges=(ExchangeSpec(exchange),), queues=(spec,)))
        await bus.publish(
            exchange,
            "complaint.filed",
            b'{"id": 1}',
            message_id="m-1",
            headers={"x-ordering-key": "c-1", "n": 3, "ok": True},
        )
        async with bus.consume(spec.name, prefetch=1) as deliveries:
            [delivery] = await receive(deliveries)
            await bus.ack(delivery)
        assert delivery.queue == spec.name
        assert delivery.message_id == "m-1"
        assert delivery.body == b'{"id": 1}'
        assert (delivery.exchange, delivery.routing_key) == (exchange, "complaint.filed")
        assert delivery.headers["n"] == 3
        assert delivery.headers["ok"] is True
        assert delivery.ordering_key == "c-1"
        assert delivery.attempts == 0
        assert not delivery.redelivered

    async def test_topic_bindings_match_words_with_star_and_hash(self, bus: Bus) -> None:
        exchange = unique("ex")
        one_word = work_queue(Binding(exchange, "order.*"))
        any_words = work_queue(Binding(exchange, "order.#"))
        two_bindings = work_queue(Binding(exchange, "*.created"), Binding(exchange, "#.created"))
        await bus.declare(
            BusPlan(exchanges=(ExchangeSpec(exchange),), queues=(one_word, any_words, two_bindings))
        )
        for key in ("order.created", "order.created.eu", "order", "invoice.created", "order.x"):
            await bus.publish(exchange, key, b"", message_id=key)
        await bus.publish(exchange, "nothing.matches.this", b"", message_id="x", mandatory=False)

        assert sorted(await drain_ids(bus, one_word.name)) == ["order.created", "order.x"]
        assert sorted(await drain_ids(bus, any_words.name)) == [
            "order",
            "order.created",
            "order.created.eu",
            "order.x",
        ]
        # Matched by both of its bindings, a message still reaches a queue once.
        assert sorted(await drain_ids(bus, two_bindings.name)) == [
            "invoice.created",
            "order.created",
        ]

    async def test_prefetch_bounds_the_unsettled_deliveries(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, *(f"m-{i}" for i in range(10)))
        async with bus.consume(queue, prefetch=3) as deliveries:
            first = await receive(deliveries, 3)
            await assert_nothing_more(deliveries)
            await bus.ack(first[0])
            [fourth] = await receive(deliveries)
            await assert_nothing_more(deliveries, 0.2)
            seen = [*first, fourth]
            for delivery in seen[1:]:
                await bus.ack(delivery)
            rest = await receive(deliveries, 3)
            seen += rest
        assert len({d.message_id for d in seen}) == 7

    async def test_ack_many_settles_a_batch_and_only_it(self, bus: Bus) -> None:
        """The oldest unsettled ones in order (one multiple ack on RabbitMQ), then a batch
        with a gap (acked one by one): what was left out comes back, nothing else."""
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, *(f"m-{i}" for i in range(6)))
        async with bus.consume(queue, prefetch=10) as deliveries:
            got = await receive(deliveries, 6)
            await bus.ack_many(got[:3])  # m-0..m-2: contiguous
            await bus.ack_many([got[3], got[5]])  # m-4 is left out
            await bus.ack_many([])
        async with bus.consume(queue, prefetch=10) as deliveries:
            again = await receive(deliveries)
            await bus.ack_many(again)
            await assert_nothing_more(deliveries, 0.2)
        assert [d.message_id for d in again] == ["m-4"]

    async def test_nack_with_requeue_delivers_the_message_again_marked_redelivered(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [first] = await receive(deliveries)
            await bus.nack(first, requeue=True)
            [again] = await receive(deliveries)
            await bus.ack(again)
        assert again.message_id == "m-1"
        assert again.redelivered
        assert not first.redelivered

    async def test_leaving_consume_without_settling_requeues_the_deliveries(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1", "m-2")
        async with bus.consume(queue, prefetch=5) as deliveries:
            await receive(deliveries, 2)
        async with bus.consume(queue, prefetch=5) as deliveries:
            again = await receive(deliveries, 2)
            for delivery in again:
                await bus.ack(delivery)
            await assert_nothing_more(deliveries, 0.2)
        assert sorted(d.message_id for d in again) == ["m-1", "m-2"]
        assert all(d.redelivered for d in again)

    async def test_settling_a_stale_delivery_is_harmless_and_the_message_comes_again(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [stale] = await receive(deliveries)
        await bus.ack(stale)  # logged, not raised: the actor's loop survives
        await bus.nack(stale, requeue=False)
        async with bus.consume(queue, prefetch=1) as deliveries:
            [again] = await receive(deliveries)
            await bus.ack(again)
            await bus.ack(again)  # settling twice is stale too
        assert again.message_id == "m-1"
        assert again.redelivered
        assert await bus.list_dead_letters(queue) == []

    async def test_competing_consumers_split_the_work_without_loss_or_duplicates(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        received: dict[str, list[str]] = {"a": [], "b": []}
        done = anyio.Event()

        async def worker(name: str, *, task_status: TaskStatus[None]) -> None:
            async with bus.consume(queue, prefetch=2) as deliveries:
                task_status.started()
                async for delivery in deliveries:
                    await anyio.sleep(0.001)  # a little work, so both get a share
                    received[name].append(delivery.message_id)
                    await bus.ack(delivery)
                    if sum(map(len, received.values())) == 60:
                        done.set()

        async with anyio.create_task_group() as tg:
            await tg.start(worker, "a")
            await tg.start(worker, "b")
            await publish_ids(bus, queue, *(f"m-{i:02}" for i in range(60)))
            with anyio.fail_after(10):
                await done.wait()
            await anyio.sleep(0.2)  # time for a duplicate to show up
            tg.cancel_scope.cancel()
        everything = received["a"] + received["b"]
        assert sorted(everything) == [f"m-{i:02}" for i in range(60)]
        assert received["a"]
        assert received["b"]

    async def test_a_thousand_concurrent_publishes_all_arrive_exactly_once(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        ids = [f"m-{i:04}" for i in range(1000)]
        async with anyio.create_task_group() as tg:
            for message_id in ids:
                tg.start_soon(publish_ids, bus, queue, message_id)
        assert sorted(await drain_ids(bus, queue)) == ids

    # --- refusals --------------------------------------------------------------------------

    async def test_an_unroutable_mandatory_message_raises_unroutable(self, bus: Bus) -> None:
        exchange = unique("ex")
        await bus.declare(BusPlan(exchanges=(ExchangeSpec(exchange),)))
        with pytest.raises(UnroutableError) as caught:
            await bus.publish(exchange, "no.binding", b"", message_id="m-1")
        assert (caught.value.exchange, caught.value.routing_key) == (exchange, "no.binding")
        with pytest.raises(UnroutableError):
            await bus.publish("", unique("missing"), b"", message_id="m-2")
        await bus.publish(exchange, "no.binding", b"", message_id="m-3", mandatory=False)

    async def test_publish_many_delivers_every_message_in_order_with_its_headers(
        self, bus: Bus
    ) -> None:
        exchange = unique("ex")
        spec = work_queue(Binding(exchange, "order.*"))
        await bus.declare(BusPlan(exchanges=(ExchangeSpec(exchange),), queues=(spec,)))
        await bus.publish_many([])  # nothing to do
        ids = [f"m-{i}" for i in range(300)]
        await bus.publish_many(
            [
                Outgoing(exchange, "order.created", i.encode(), i, {"n": k, "x-ordering-key": "o"})
                for k, i in enumerate(ids)
            ]
        )
        async with bus.consume(spec.name, prefetch=300) as deliveries:
            got = await receive(deliveries, 300)
            for delivery in got:
                await bus.ack(delivery)
        assert [d.message_id for d in got] == ids
        assert [d.body for d in got] == [i.encode() for i in ids]
        assert [d.headers["n"] for d in got] == list(range(300))
        assert {(d.exchange, d.routing_key, d.ordering_key) for d in got} == {
            (exchange, "order.created", "o")
        }

    async def test_publish_many_raises_for_an_unroutable_mandatory_message(self, bus: Bus) -> None:
        exchange = unique("ex")
        spec = work_queue(Binding(exchange, "routed"))
        await bus.declare(BusPlan(exchanges=(ExchangeSpec(exchange),), queues=(spec,)))
        with pytest.raises(UnroutableError) as caught:
            await bus.publish_many(
                [
                    Outgoing(exchange, "routed", b"", "m-1"),
                    Outgoing(exchange, "no.binding", b"", "m-2"),
                    Outgoing(exchange, "routed", b"", "m-3"),
                ]
            )
        assert (caught.value.exchange, caught.value.routing_key) == (exchange, "no.binding")
        # Not mandatory: dropped without an error.
        await bus.publish_many(
            [
                Outgoing(exchange, "no.binding", b"", "m-4", mandatory=False),
                Outgoing(exchange, "routed", b"", "m-5"),
            ]
        )
        assert "m-5" in await drain_ids(bus, spec.name)
        with pytest.raises(BusError, match="does not exist"):
            await bus.publish_many([Outgoing(unique("nowhere"), "a.b", b"", "m-6")])

    async def test_publishing_to_an_undeclared_exchange_raises_a_bus_error(self, bus: Bus) -> None:
        with pytest.raises(BusError, match="does not exist"):
            await bus.publish(unique("nowhere"), "a.b", b"", message_id="m-1")
        # The bus still works afterwards.
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-2")
        assert await drain_ids(bus, queue) == ["m-2"]

    async def test_a_queue_that_does_not_exist_raises_unknown_queue(self, bus: Bus) -> None:
        missing = unique("missing")
        with pytest.raises(UnknownQueueError, match="does not exist"):
            async with bus.consume(missing, prefetch=1):
                pass
        with pytest.raises(UnknownQueueError):
            await bus.list_dead_letters(missing)
        with pytest.raises(UnknownQueueError):
            await bus.purge_dead_letters(missing)

    async def test_binding_to_an_undeclared_exchange_raises_unknown_exchange(
        self, bus: Bus
    ) -> None:
        exchange = unique("nowhere")
        with pytest.raises(UnknownExchangeError) as caught:
            await bus.declare(BusPlan(queues=(work_queue(Binding(exchange, "a.*")),)))
        assert caught.value.exchange == exchange

    async def test_declaring_the_same_plan_twice_is_fine(self, bus: Bus) -> None:
        exchange = unique("ex")
        plan = BusPlan(
            exchanges=(ExchangeSpec(exchange),),
            queues=(work_queue(Binding(exchange, "a.*")),),
        )
        await bus.declare(plan)
        await bus.declare(plan)
        await bus.publish(exchange, "a.b", b"", message_id="m-1")
        assert await drain_ids(bus, plan.queues[0].name) == ["m-1"]

    async def test_closing_the_bus_ends_consumption(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        assert bus.connected
        async with bus.consume(queue, prefetch=1) as deliveries, anyio.create_task_group() as tg:

            async def close_soon() -> None:
                await anyio.sleep(0.1)
                await bus.close()

            tg.start_soon(close_soon)
            with anyio.fail_after(5):
                async for delivery in deliveries:
                    pytest.fail(f"unexpected delivery {delivery.message_id}")
        assert not bus.connected

    # --- requests --------------------------------------------------------------------------

    async def test_a_request_is_answered_by_the_actor_consuming_its_queue(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        requests: list[Delivery] = []

        async def answer_one() -> None:
            async with bus.consume(queue, prefetch=1) as deliveries:
                [request] = await receive(deliveries)
                requests.append(request)
                await bus.reply(request, b'{"ok": true}', headers={"status": 200, "final": True})
                await bus.ack(request)

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_one)
            reply = await bus.request(
                queue, b'{"do": "it"}', message_id="r-1", headers={"n": 3}, timeout=5
            )
        assert reply == Reply(body=b'{"ok": true}', headers={"status": 200, "final": True})
        [request] = requests
        assert (request.message_id, request.correlation_id) == ("r-1", "r-1")
        assert request.reply_to
        assert (request.body, request.headers["n"]) == (b'{"do": "it"}', 3)
        assert (request.exchange, request.routing_key) == ("", queue)

    async def test_two_hundred_concurrent_requests_each_get_their_own_answer(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        replies: dict[str, Reply] = {}

        async def ask(number: int) -> None:
            request_id = f"r-{number:03}"
            replies[request_id] = await bus.request(
                queue, str(number).encode(), message_id=request_id, timeout=20
            )

        async with anyio.create_task_group() as tg:
            await tg.start(serve, bus, queue)
            async with anyio.create_task_group() as requesters:
                for number in range(200):
                    requesters.start_soon(ask, number)
            tg.cancel_scope.cancel()
        assert sorted(replies) == [f"r-{number:03}" for number in range(200)]
        for request_id, reply in replies.items():
            assert reply.body == f"re:{int(request_id[2:])}".encode()
            assert reply.headers["answers"] == request_id

    async def test_requests_in_flight_with_the_same_id_are_all_answered(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        bodies: list[bytes] = []

        async def ask() -> None:
            reply = await bus.request(queue, b"same", message_id="r-twice", timeout=5)
            bodies.append(reply.body)

        async with anyio.create_task_group() as tg:
            await tg.start(serve, bus, queue)
            async with anyio.create_task_group() as requesters:
                requesters.start_soon(ask)
                requesters.start_soon(ask)
            tg.cancel_scope.cancel()
        assert bodies == [b"re:same", b"re:same"]

    async def test_a_request_nobody_answers_times_out_and_its_late_answer_is_dropped(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        with anyio.fail_after(3), pytest.raises(RequestTimeoutError) as caught:
            await bus.request(queue, b"anyone?", message_id="r-late", timeout=0.3)
        assert (caught.value.queue, caught.value.message_id) == (queue, "r-late")
        assert caught.value.timeout == 0.3
        assert queue in str(caught.value)
        assert "r-late" in str(caught.value)
        async with bus.consume(queue, prefetch=1) as deliveries:
            [late] = await receive(deliveries)  # the request stayed in the queue
            await bus.reply(late, b"too late")  # nobody waits: dropped, not raised
            await bus.ack(late)
        async with anyio.create_task_group() as tg:
            await tg.start(serve, bus, queue)
            reply = await bus.request(queue, b"now", message_id="r-now", timeout=5)
            tg.cancel_scope.cancel()
        assert reply.body == b"re:now"

    async def test_a_request_to_a_queue_that_does_not_exist_is_unroutable_at_once(
        self, bus: Bus
    ) -> None:
        missing = unique("missing")
        with anyio.fail_after(3), pytest.raises(UnroutableError) as caught:
            await bus.request(missing, b"", message_id="r-1", timeout=30)
        assert (caught.value.exchange, caught.value.routing_key) == ("", missing)
        # The bus still answers requests afterwards.
        queue = await declared_queue(bus)
        async with anyio.create_task_group() as tg:
            await tg.start(serve, bus, queue)
            assert (await bus.request(queue, b"x", message_id="r-2", timeout=5)).body == b"re:x"
            tg.cancel_scope.cancel()

    async def test_answering_a_message_that_is_not_a_request_does_nothing(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [delivery] = await receive(deliveries)
            assert (delivery.reply_to, delivery.correlation_id) == (None, None)
            await bus.reply(delivery, b"to nobody")
            await bus.ack(delivery)
            await assert_nothing_more(deliveries, 0.2)
        assert await drain_ids(bus, queue) == []

    async def test_a_retried_request_is_still_answered(self, bus: Bus) -> None:
        queue = await declared_queue(bus)

        async def fail_once_then_answer() -> None:
            async with bus.consume(queue, prefetch=1) as deliveries:
                [first] = await receive(deliveries)
                await bus.retry(first, rung=1, error=RuntimeError("not yet"), actor="test")
                [again] = await receive(deliveries)
                await bus.reply(again, b"after a retry")
                await bus.ack(again)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fail_once_then_answer)
            reply = await bus.request(queue, b"q", message_id="r-1", timeout=5)
        assert reply.body == b"after a retry"

    async def test_closing_the_bus_ends_a_waiting_request(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        async with anyio.create_task_group() as tg:

            async def close_soon() -> None:
                await anyio.sleep(0.1)
                await bus.close()

            tg.start_soon(close_soon)
            with anyio.fail_after(5), pytest.raises(BusUnavailableError, match="closed"):
                await bus.request(queue, b"", message_id="r-1", timeout=30)

    # --- retries ---------------------------------------------------------------------------

    async def test_retry_brings_the_message_back_after_its_rung_with_the_error_headers(
        self, bus: Bus
    ) -> None:
        exchange = unique("ex")
        spec = work_queue(Binding(exchange, "order.*"))
        await bus.declare(BusPlan(exchanges=(ExchangeSpec(exchange),), queues=(spec,)))
        await bus.publish(exchange, "order.slow", b"slow", message_id="slow")
        await bus.publish(exchange, "order.fast", b"fast", message_id="fast")
        async with bus.consume(spec.name, prefetch=5) as deliveries:
            slow, fast = await receive(deliveries, 2)
            await bus.retry(slow, rung=2, error=TimeoutError("db slow"), actor="orders")
            await bus.retry(fast, rung=1, error=ValueError("x" * 5000), actor="orders")
            await assert_nothing_more(deliveries, 0.1)  # both parked, neither back yet
            # Retried at the same time, the lower rung comes back first.
            back_fast, back_slow = await receive(deliveries, 2)
            await bus.ack(back_slow)
        assert (back_fast.message_id, back_slow.message_id) == ("fast", "slow")
        assert back_slow.body == b"slow"
        assert back_slow.attempts == 1
        assert back_slow.headers[X_ERROR] == "db slow"
        assert back_slow.headers[X_ERROR_TYPE] == "TimeoutError"
        assert back_slow.headers[X_ACTOR] == "orders"
        assert back_slow.headers[X_ORIGINAL_EXCHANGE] == exchange
        assert back_slow.headers[X_ORIGINAL_ROUTING_KEY] == "order.slow"
        assert (back_slow.exchange, back_slow.routing_key) == ("", spec.name)
        assert len(str(back_fast.headers[X_ERROR])) <= 1000
        assert back_fast.headers[X_ERROR_TYPE] == "ValueError"

    async def test_retrying_again_counts_attempts_and_keeps_the_first_failure(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [first] = await receive(deliveries)
            await bus.retry(first, rung=1, error=RuntimeError("one"), actor="a")
            [second] = await receive(deliveries)
            await bus.retry(second, rung=1, error=KeyError("two"), actor="b")
            [third] = await receive(deliveries)
            await bus.ack(third)
        assert [d.attempts for d in (first, second, third)] == [0, 1, 2]
        assert third.headers[X_FIRST_FAILED_AT] == second.headers[X_FIRST_FAILED_AT]
        assert datetime.fromisoformat(str(third.headers[X_FIRST_FAILED_AT])).tzinfo is not None
        assert (third.headers[X_ERROR_TYPE], third.headers[X_ACTOR]) == ("KeyError", "b")
        assert third.headers[X_ORIGINAL_ROUTING_KEY] == queue

    async def test_a_consumer_already_waiting_gets_the_retried_message_back(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        back: list[Delivery] = []
        async with bus.consume(queue, prefetch=2) as deliveries:
            [first] = await receive(deliveries)

            async def wait_for_it() -> None:
                back.extend(await receive(deliveries))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_it)
                await anyio.sleep(0.05)  # waiting already, while nothing is parked yet
                await bus.retry(first, rung=1, error=RuntimeError("later"), actor="a")
            await bus.ack(back[0])
        assert (back[0].message_id, back[0].attempts) == ("m-1", 1)

    async def test_retrying_past_the_last_rung_raises_and_leaves_the_delivery_to_settle(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [delivery] = await receive(deliveries)
            with pytest.raises(UnroutableError):
                await bus.retry(delivery, rung=len(RETRY_DELAYS) + 1, error=OSError(), actor="a")
            await bus.dead_letter(delivery, error=OSError("gave up"), actor="a")
        [dead] = await bus.list_dead_letters(queue)
        assert (dead.message_id, dead.error) == ("m-1", "gave up")

    # --- dead letters ----------------------------------------------------------------------

    async def test_dead_letter_parks_the_message_in_the_dlq_with_the_error_headers(
        self, bus: Bus
    ) -> None:
        queue = await declared_queue(bus)
        await bus.publish("", queue, b"poison", message_id="m-1", headers={"x-ordering-key": "k"})
        async with bus.consume(queue, prefetch=1) as deliveries:
            [delivery] = await receive(deliveries)
            await bus.dead_letter(delivery, error=LookupError("no handler"), actor="audit")
            await assert_nothing_more(deliveries, 0.2)
        [dead] = await bus.list_dead_letters(queue)
        assert dead.message_id == "m-1"
        assert dead.body == b"poison"
        assert (dead.error, dead.error_type, dead.attempts) == ("no handler", "LookupError", 1)
        assert dead.headers[X_ACTOR] == "audit"
        assert dead.headers[X_ATTEMPTS] == 1
        assert dead.headers["x-ordering-key"] == "k"
        assert datetime.fromisoformat(str(dead.headers[X_FIRST_FAILED_AT])).tzinfo is not None

    async def test_nack_without_requeue_dead_letters_through_the_broker(self, bus: Bus) -> None:
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, "m-1")
        async with bus.consume(queue, prefetch=1) as deliveries:
            [delivery] = await receive(deliveries)
            await bus.nack(delivery, requeue=False)
            await assert_nothing_more(deliveries, 0.2)
        [dead] = await eventually(lambda: bus.list_dead_letters(queue))
        assert dead.message_id == "m-1"
        assert dead.error_type == "rejected"
        assert "rejected" in dead.error

    async def test_listing_dead_letters_leaves_them_in_place(self, bus: Bus) -> None:
        queue = await self._dead_letters(bus, "m-1", "m-2", "m-3")
        assert len(await bus.list_dead_letters(queue, limit=2)) == 2
        listed = await bus.list_dead_letters(queue)
        assert sorted(d.message_id for d in listed) == ["m-1", "m-2", "m-3"]
        assert len(await bus.list_dead_letters(queue)) == 3

    async def test_replaying_one_dead_letter_moves_only_it_back_with_a_clean_slate(
        self, bus: Bus
    ) -> None:
        queue = await self._dead_letters(bus, "m-1", "m-2")
        assert await bus.replay_dead_letters(queue, message_id="m-2") == 1
        async with bus.consume(queue, prefetch=1) as deliveries:
            [replayed] = await receive(deliveries)
            await bus.ack(replayed)
            await assert_nothing_more(deliveries, 0.2)
        assert (replayed.message_id, replayed.body, replayed.attempts) == ("m-2", b"m-2", 0)
        assert X_ERROR not in replayed.headers
        assert X_ERROR_TYPE not in replayed.headers
        assert replayed.headers[X_ORIGINAL_ROUTING_KEY] == queue
        assert [d.message_id for d in await bus.list_dead_letters(queue)] == ["m-1"]

    async def test_replaying_all_dead_letters_returns_how_many_moved(self, bus: Bus) -> None:
        queue = await self._dead_letters(bus, "m-1", "m-2", "m-3")
        assert await bus.replay_dead_letters(queue, message_id="unknown") == 0
        assert await bus.replay_dead_letters(queue) == 3
        assert await bus.list_dead_letters(queue) == []
        assert sorted(await drain_ids(bus, queue)) == ["m-1", "m-2", "m-3"]

    async def test_purging_dead_letters_returns_how_many_were_dropped(self, bus: Bus) -> None:
        queue = await self._dead_letters(bus, "m-1", "m-2")
        assert await bus.purge_dead_letters(queue) == 2
        assert await bus.list_dead_letters(queue) == []
        assert await bus.purge_dead_letters(queue) == 0

    @staticmethod
    async def _dead_letters(bus: Bus, *ids: str) -> str:
        """A fresh queue whose DLQ holds ``ids`` (dead-lettered by an actor)."""
        queue = await declared_queue(bus)
        await publish_ids(bus, queue, *ids)
        async with bus.consume(queue, prefetch=len(ids)) as deliveries:
            for delivery in await receive(deliveries, len(ids)):
                await bus.dead_letter(delivery, error=ValueError("bad"), actor="test")
        return queue
