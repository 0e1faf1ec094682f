"""``GET /complaints/{id}/saga``: the resolution saga of a complaint, its steps, timers and
compensations (timers as the timer service last left them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import msgspec
from litestar import get
from litestar.params import Parameter
from litestar.types import ControllerRouterHandler

from actors.resolution_saga.state import INSTANCES, NAMESPACE, TIMERS, Saga, Timer, decode_saga
from runtime.http import problem, problem_responses
from runtime.store.readmodel import ReadModelStore


async def load_saga(store: ReadModelStore, saga_id: str) -> Saga | None:
    document = await store.get(NAMESPACE, INSTANCES, saga_id)
    if document is None:
        return None
    saga = decode_saga(document)
    timers = await store.find(NAMESPACE, TIMERS, equals={"saga_id": saga_id}, limit=100)
    if timers:
        saga.timers = [msgspec.convert(doc, Timer) for _, doc in timers]
    return saga


def saga_routes(read_models: Callable[[], ReadModelStore]) -> list[ControllerRouterHandler]:
    @get(
        "/complaints/{complaint_id:str}/saga",
        summary="The complaint's resolution saga: state, steps, timers, compensations",
        responses=problem_responses(404),
    )
    async def complaint_saga(
        complaint_id: Annotated[str, Parameter(min_length=1, max_length=255)],
    ) -> Saga:
        saga = await load_saga(read_models(), complaint_id)
        if saga is None:
            raise problem(
                404,
                f"no saga for complaint {complaint_id!r} (yet: it starts when the saga "
                "handles the complaint's creation)",
                title="No such saga",
            )
        return saga

    return [complaint_saga]
