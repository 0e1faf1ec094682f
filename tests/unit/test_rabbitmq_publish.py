"""How the RabbitMQ bus reads aiormq's publish outcomes: every way a confirm can fail to come
is a ``PublishNotConfirmedError`` (the caller publishes again), never a silent success.

aiormq is driven through a scripted channel here, because these outcomes (a confirmation
rejected with ``CancelledError`` when aiormq drops a stuck connection, the bare ``Exception``
it rejects pending confirms with when a channel closes) cannot be produced on demand against
a live broker. The happy paths and unroutable messages are covered on the real broker by the
bus contract (tests/contracts/bus.py).
"""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from runtime.bus.protocol import Outgoing
from runtime.bus.rabbitmq import RabbitMQBus
from runtime.errors import PublishNotConfirmedError, UnroutableError


class ScriptedChannel:
    """``basic_publish`` behaves as the message id says: ok, dropped (the confirmation
    rejected with CancelledError), closed (rejected with a bare Exception), nack, returned,
    hang."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def basic_publish(self, body: bytes, **kw: Any) -> object:
        assert kw["wait"] is False
        message_id = kw["properties"].message_id
        self.published.append(message_id)
        outcome = message_id.split("-")[0]
        await asyncio.sleep(0)
        if outcome == "dropped":
            confirmation = asyncio.get_running_loop().create_future()
            confirmation.set_exception(asyncio.CancelledError())
            return await confirmation
        if outcome == "closed":
            raise Exception("channel closed")  # noqa: TRY002 - what aiormq really raises
        if outcome == "nack":
            raise DeliveryError(None, Basic.Nack(delivery_tag=1))
        if outcome == "returned":
            returned: Any = SimpleNamespace(delivery=Basic.Return(routing_key="q"))
            raise PublishError(returned, Basic.Return())
        if outcome == "hang":
            await asyncio.Event().wait()
        return Basic.Ack(delivery_tag=1)


class ScriptedPublisher:
    def __init__(self, *, ready_hangs: bool = False) -> None:
        self.channel = ScriptedChannel()
        self.default_exchange = object()
        self.ready_hangs = ready_hangs

    async def ready(self) -> None:
        if self.ready_hangs:
            await asyncio.Event().wait()

    async def get_underlay_channel(self) -> ScriptedChannel:
        return self.channel


def scripted_bus(**kw: Any) -> RabbitMQBus:
    publisher: Any = ScriptedPublisher(**kw)
    return RabbitMQBus(object(), publisher, where="scripted broker", publish_timeout=0.5)  # type: ignore[arg-type]


def messages(*ids: str) -> list[Outgoing]:
    return [Outgoing("", "q", b"x", message_id) for message_id in ids]


async def test_every_message_confirmed_returns() -> None:
    bus = scripted_bus()
    await bus.publish_many(messages("ok-1", "ok-2", "ok-3"))
    await bus.publish("", "q", b"x", message_id="ok-4")


@pytest.mark.parametrize(
    ("failing", "says"),
    [
        ("dropped-2", "was lost before message dropped-2"),
        ("closed-2", "was lost before message closed-2"),
        ("nack-2", "the broker refused message nack-2"),
    ],
)
async def test_an_unconfirmed_message_raises_not_confirmed(failing: str, says: str) -> None:
    bus = scripted_bus()
    with pytest.raises(PublishNotConfirmedError, match=says):
        await bus.publish_many(messages("ok-1", failing, "ok-3"))
    with pytest.raises(PublishNotConfirmedError):
        await bus.publish("", "q", b"x", message_id=failing)


async def test_a_returned_message_is_unroutable() -> None:
    with pytest.raises(UnroutableError):
        await scripted_bus().publish_many(messages("ok-1", "returned-2"))


async def test_a_timeout_names_the_first_unconfirmed_message() -> None:
    with pytest.raises(
        PublishNotConfirmedError, match=r"hang-2 to .* was not confirmed within 0\.5s"
    ):
        await scripted_bus().publish_many(messages("ok-1", "hang-2", "hang-3"))


async def test_a_timeout_while_waiting_out_a_reconnection_is_not_confirmed() -> None:
    with pytest.raises(
        PublishNotConfirmedError, match=r"ok-1 to .* was not confirmed within 0\.5s"
    ):
        await scripted_bus(ready_hangs=True).publish_many(messages("ok-1", "ok-2"))


async def test_a_batch_failing_at_once_leaves_no_unretrieved_task_exceptions() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with pytest.raises(PublishNotConfirmedError):
            await scripted_bus().publish_many(messages(*(f"closed-{i}" for i in range(50))))
        await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
