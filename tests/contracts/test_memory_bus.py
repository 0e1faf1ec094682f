"""The bus contract on the in-process bus (the embedded default)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runtime.bus.memory import MemoryBus
from runtime.bus.streams import topic_matches
from runtime.errors import BusUnavailableError
from tests.contracts.bus import BusContract


class TestMemoryBus(BusContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MemoryBus]:
        async with MemoryBus() as bus:
            yield bus

    async def test_a_closed_bus_is_not_connected_and_refuses_to_publish(
        self, bus: MemoryBus
    ) -> None:
        await bus.close()
        assert not bus.connected
        with pytest.raises(BusUnavailableError):
            await bus.publish("", "q", b"", message_id="m-1")


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#", "a.b", True),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("#.c", "a.b.cd", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("*.#.c", "c", False),
        ("*", "", False),
        ("a.b", "a.b", True),
        ("a.b", "a.bb", False),
        ("", "", True),
    ],
)
def test_topic_matching_follows_amqp(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
