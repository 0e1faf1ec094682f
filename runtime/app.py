"""``magasin run``: wire the store, the bus and the supervisor, and handle signals.

SIGTERM / SIGINT: drain (stop consuming, finish in-flight within the grace period, settle
everything), close connections, exit 0; a second signal exits at once (130).
SIGHUP: reload the topology file; actors whose spec changed restart, others keep running.
Escalation (an actor restarting too often): unready, then exit 70, never 0.
"""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
from loguru import logger

from runtime.bus.protocol import Bus
from runtime.errors import EscalationError, MagasinError
from runtime.observability.logging import configure_logging
from runtime.observability.metrics import Metrics
from runtime.store.factory import open_store
from runtime.supervisor import Supervisor
from runtime.topology import Topology, load_topology

EXIT_OK = 0
EXIT_ESCALATED = 70  # EX_SOFTWARE
EXIT_FORCED = 130


async def open_bus(url: str, stack: AsyncExitStack, *, stream_url: str | None = None) -> Bus:
    """The bus of ``url`` (``memory://``: the in-process one); ``stream_url``: the stream
    protocol's address, when not the AMQP URL's host on port 5552."""
    if not url or url.startswith("memory://"):
        from runtime.bus.memory import MemoryBus  # noqa: PLC0415

        logger.warning(
            "EMBEDDED MODE: no broker URL is set, so messages travel in-process and are lost "
            "when the process stops. Set MAGASIN_AMQP_URL=amqp://... for RabbitMQ."
        )
        return await stack.enter_async_context(MemoryBus())
    from runtime.bus.rabbitmq import RabbitMQBus  # noqa: PLC0415

    bus = await RabbitMQBus.connect(
        url, name=f"magasin-{os.getpid()}", stream_url=stream_url or None
    )
    stack.push_async_callback(bus.close)
    return bus


async def serve(path: Path, topology: Topology | None = None) -> int:
    """Run the runtime until a signal or an escalation; returns the exit code."""
    topology = topology or load_topology(path)
    configure_logging(topology.log.level, topology.log.format)
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        store = await open_store(topology.database_url, metrics=metrics)
        stack.push_async_callback(store.close)
        bus = await open_bus(topology.amqp_url, stack, stream_url=topology.stream_url)
        await bus.declare(topology.bus_plan())
        supervisor = Supervisor(topology, store=store, bus=bus, metrics=metrics)
        escalated: list[BaseException] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_signals, supervisor, path)
                await supervisor.run()
                tg.cancel_scope.cancel()
        except* EscalationError as group:
            escalated.extend(group.exceptions)
        if escalated:
            logger.critical("runtime unready and exiting: {exc}", exc=escalated[0])
            return EXIT_ESCALATED
    logger.info("runtime stopped cleanly")
    return EXIT_OK


async def _signals(supervisor: Supervisor, path: Path) -> None:
    stopping = False
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await _reload(supervisor, path)
            elif stopping:
                logger.warning("second signal: exiting now")
                os._exit(EXIT_FORCED)
            else:
                stopping = True
                logger.info("{sig}: draining actors", sig=signal.Signals(signum).name)
                supervisor.stop()


async def _reload(supervisor: Supervisor, path: Path) -> None:
    try:
        topology = load_topology(path)
    except MagasinError as exc:
        logger.error("SIGHUP: topology not reloaded, the running one stays: {exc}", exc=exc)
        return
    try:
        await supervisor.reload(topology)
    except MagasinError as exc:
        # e.g. a queue whose arguments changed cannot be redeclared: nothing was touched
        logger.error("SIGHUP: topology not applied, the running one stays: {exc}", exc=exc)
