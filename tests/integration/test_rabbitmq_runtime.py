"""The runtime's message path on the real RabbitMQ (same contract as on the memory bus)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from runtime.bus.rabbitmq import RabbitMQBus
from tests.contracts.runtime import RuntimeContract, StreamRuntimeContract

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(amqp_url: str) -> AsyncIterator[RabbitMQBus]:
    bus = await RabbitMQBus.connect(
        amqp_url, name=f"magasin-runtime-{uuid.uuid4().hex[:8]}", reconnect_interval=0.2
    )
    yield bus
    await bus.close()


class TestRuntimeOnRabbitMQ(RuntimeContract):
    """The queue path."""


class TestStreamRuntimeOnRabbitMQ(StreamRuntimeContract):
    """The stream path (actors bound to a domain exchange)."""
