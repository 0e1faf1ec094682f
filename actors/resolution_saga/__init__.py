"""The complaint resolution saga: the orchestrator, its timer service and the simulated
payments participant (see ``saga``, ``timers`` and ``payments``)."""

from __future__ import annotations

from actors.resolution_saga.payments import Payments
from actors.resolution_saga.saga import ComplaintResolutionSaga
from actors.resolution_saga.timers import SagaTimers

__all__ = ["ComplaintResolutionSaga", "Payments", "SagaTimers"]
