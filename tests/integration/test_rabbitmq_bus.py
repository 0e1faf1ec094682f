"""The bus contract on RabbitMQ, plus what only a real broker can show: the queue
arguments it holds, the delivery-limit backstop, dropped connections (consumers and
requests), an answer to a requester that is gone, a wrong address."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import TaskStatus

from runtime.bus.protocol import BusPlan, QueueSpec
from runtime.bus.rabbitmq import RabbitMQBus
from runtime.errors import BusUnavailableError, RequestTimeoutError
from runtime.naming import DEAD_LETTER_EXCHANGE, dead_letter_queue, retry_queue
from tests.contracts.bus import (
    BusContract,
    assert_nothing_more,
    drain_ids,
    eventually,
    publish_ids,
    receive,
    serve,
    unique,
)
from tests.support.rabbitmq import close_connections, connection_names, queue_arguments

pytestmark = pytest.mark.integration


@pytest.fixture
async def rabbitmq_bus(amqp_url: str) -> AsyncIterator[RabbitMQBus]:
    bus = await RabbitMQBus.connect(
        amqp_url, name=f"magasin-test-{uuid.uuid4().hex[:8]}", reconnect_interval=0.2
    )
    yield bus
    await bus.close()


class TestRabbitMQBus(BusContract):
    @pytest.fixture
    def bus(self, rabbitmq_bus: RabbitMQBus) -> RabbitMQBus:
        return rabbitmq_bus


async def test_queues_carry_the_arguments_we_declared(
    rabbitmq_bus: RabbitMQBus,
    rabbitmq_vhost: str,
) -> None:
    quorum = QueueSpec(unique("q"), retry_delays=(0.2, 1.5), delivery_limit=7)
    classic = QueueSpec(unique("q"), retry_delays=(3.0,), queue_type="classic")
    await rabbitmq_bus.declare(BusPlan(queues=(quorum, classic)))
    arguments = await anyio.to_thread.run_sync(queue_arguments, rabbitmq_vhost, quorum.name)
    assert arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": dead_letter_queue(quorum.name),
        "x-delivery-limit": 7,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    retry = await anyio.to_thread.run_sync(
        queue_arguments, rabbitmq_vhost, retry_queue(quorum.name, 2)
    )
    assert retry == {
        "x-queue-type": "classic",
        "x-message-ttl": 1500,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": quorum.name,
    }
    dlq = await anyio.to_thread.run_sync(
        queue_arguments, rabbitmq_vhost, dead_letter_queue(quorum.name)
    )
    assert dlq == {"x-queue-type": "quorum"}
    assert await anyio.to_thread.run_sync(queue_arguments, rabbitmq_vhost, classic.name) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": dead_letter_queue(classic.name),
    }


async def test_the_delivery_limit_parks_a_message_that_keeps_coming_back(
    rabbitmq_bus: RabbitMQBus,
) -> None:
    """A message whose consumer keeps dying (here: nack with requeue) is dead-lettered by
    the broker once it exceeds ``delivery_limit``; the message behind it keeps flowing."""
    spec = QueueSpec(unique("q"), retry_delays=(0.2,), delivery_limit=2)
    await rabbitmq_bus.declare(BusPlan(queues=(spec,)))
    await publish_ids(rabbitmq_bus, spec.name, "poison", "next")
    poison_deliveries = 0
    async with rabbitmq_bus.consume(spec.name, prefetch=1) as deliveries:
        while True:
            [delivery] = await receive(deliveries)
            if delivery.message_id == "next":
                await rabbitmq_bus.ack(delivery)
                break
            poison_deliveries += 1
            await rabbitmq_bus.nack(delivery, requeue=True)
        await assert_nothing_more(deliveries, 0.2)
    assert poison_deliveries == 3  # the first delivery, then two redeliveries
    [dead] = await eventually(lambda: rabbitmq_bus.list_dead_letters(spec.name))
    assert (dead.message_id, dead.error_type) == ("poison", "delivery_limit")


async def test_the_bus_recovers_when_the_broker_drops_every_connection(
    amqp_url: str,
    rabbitmq_vhost: str,
) -> None:
    name = f"magasin-test-{uuid.uuid4().hex[:8]}"
    bus = await RabbitMQBus.connect(amqp_url, name=name, reconnect_interval=0.2)
    try:
        queue = unique("q")
        await bus.declare(BusPlan(queues=(QueueSpec(queue, retry_delays=(0.2,)),)))
        assert name in await anyio.to_thread.run_sync(connection_names, rabbitmq_vhost)
        await publish_ids(bus, queue, "before-1", "before-2")
        acked: list[str] = []
        async with bus.consume(queue, prefetch=10) as deliveries:
            first, in_flight = await receive(deliveries, 2)
            await bus.ack(first)
            acked.append(first.message_id)

            states = await _drop_connections(bus, rabbitmq_vhost)
            assert states[:3] == [True, False, True]
            await bus.ack(in_flight)  # stale: logged, and the broker redelivers it
            await publish_ids(bus, queue, "after")

            with anyio.fail_after(15):
                while sorted(acked) != ["after", "before-1", "before-2"]:
                    [delivery] = await receive(deliveries)
                    await bus.ack(delivery)
                    acked.append(delivery.message_id)
            await assert_nothing_more(deliveries, 0.3)
        assert await drain_ids(bus, queue) == []
    finally:
        await bus.close()
    assert not bus.connected


async def test_requests_work_again_after_the_broker_drops_every_connection(
    amqp_url: str,
    rabbitmq_vhost: str,
) -> None:
    """A request waiting when the connection drops fails at once (its answer can no longer
    arrive); one sent during the outage waits it out; afterwards requests are answered."""
    bus = await RabbitMQBus.connect(
        amqp_url, name=f"magasin-test-{uuid.uuid4().hex[:8]}", reconnect_interval=0.2
    )
    try:
        served, silent = unique("q"), unique("q")
        await bus.declare(
            BusPlan(queues=(QueueSpec(served, retry_delays=()), QueueSpec(silent, retry_delays=())))
        )
        async with anyio.create_task_group() as tg:
            await tg.start(serve, bus, served)
            before = await bus.request(served, b"before", message_id="r-before", timeout=5)

            async def wait_in_vain(*, task_status: TaskStatus[None]) -> None:
                task_status.started()
                with anyio.fail_after(10), pytest.raises(BusUnavailableError, match="lost"):
                    await bus.request(silent, b"", message_id="r-lost", timeout=60)

            async with anyio.create_task_group() as outage:
                await outage.start(wait_in_vain)
                await anyio.sleep(0.2)  # published, and waiting for its answer
                outage.start_soon(anyio.to_thread.run_sync, close_connections, rabbitmq_vhost)
                await _wait_disconnected(bus)
                during = await bus.request(served, b"during", message_id="r-during", timeout=15)

            after = await bus.request(served, b"after", message_id="r-after", timeout=15)
            tg.cancel_scope.cancel()
    finally:
        await bus.close()
    assert [before.body, during.body, after.body] == [b"re:before", b"re:during", b"re:after"]


async def test_an_answer_to_a_requester_that_is_gone_is_dropped_without_error(
    rabbitmq_bus: RabbitMQBus,
    amqp_url: str,
) -> None:
    queue = unique("q")
    await rabbitmq_bus.declare(BusPlan(queues=(QueueSpec(queue, retry_delays=()),)))
    requester = await RabbitMQBus.connect(amqp_url, name=f"magasin-test-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(RequestTimeoutError):
            await requester.request(queue, b"q", message_id="r-gone", timeout=0.3)
    finally:
        await requester.close()
    async with rabbitmq_bus.consume(queue, prefetch=1) as deliveries:
        [request] = await receive(deliveries)
        assert request.reply_to
        assert request.reply_to.startswith("amq.rabbitmq.reply-to.")
        await rabbitmq_bus.reply(request, b"nobody listens")  # its channel is gone: dropped
        await rabbitmq_bus.ack(request)
    async with anyio.create_task_group() as tg:
        await tg.start(serve, rabbitmq_bus, queue)
        reply = await rabbitmq_bus.request(queue, b"still", message_id="r-2", timeout=5)
        tg.cancel_scope.cancel()
    assert reply.body == b"re:still"


async def _wait_disconnected(bus: RabbitMQBus) -> None:
    with anyio.fail_after(15):
        while True:
            if not bus.connected:
                return
            await anyio.sleep(0.002)


async def _drop_connections(bus: RabbitMQBus, vhost: str) -> list[bool]:
    """Close every connection of ``vhost``, wait for the bus to come back, and return the
    successive values of ``bus.connected`` (the outage may be shorter than rabbitmqctl)."""
    states = [bus.connected]
    back = anyio.Event()

    async def watch() -> None:
        while len(states) < 3:
            if bus.connected != states[-1]:
                states.append(bus.connected)
            await anyio.sleep(0.002)
        back.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.to_thread.run_sync(close_connections, vhost)
        with anyio.fail_after(15):
            await back.wait()
    return states


async def test_an_unreachable_broker_raises_bus_unavailable_without_the_password() -> None:
    with pytest.raises(BusUnavailableError) as caught:
        await RabbitMQBus.connect("amqp://guest:s3cret-pw@127.0.0.1:1/somewhere", name="t")
    assert "127.0.0.1:1" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert "s3cret-pw" not in repr(caught.value.cause)


async def test_a_wrong_password_raises_bus_unavailable_without_the_password(
    rabbitmq_vhost: str,
) -> None:
    url = f"amqp://guest:not-the-pw@127.0.0.1:5672/{rabbitmq_vhost}"
    with pytest.raises(BusUnavailableError) as caught:
        await RabbitMQBus.connect(url, name="t")
    assert "127.0.0.1:5672" in str(caught.value)
    assert "not-the-pw" not in str(caught.value)
