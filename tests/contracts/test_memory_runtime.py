"""The runtime's message path on the in-process bus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runtime.bus.memory import MemoryBus
from tests.contracts.runtime import RuntimeContract, StreamRuntimeContract


class TestRuntimeOnMemoryBus(RuntimeContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MemoryBus]:
        async with MemoryBus() as bus:
            yield bus


class TestStreamRuntimeOnMemoryBus(StreamRuntimeContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MemoryBus]:
        async with MemoryBus() as bus:
            yield bus
