"""Open the event store a URL names: ``memory://`` (or nothing) or a PostgreSQL URL."""

from __future__ import annotations

from loguru import logger

from runtime.errors import ConfigurationError
from runtime.observability.metrics import Metrics
from runtime.store.memory import MemoryEventStore
from runtime.store.protocol import EventStore

EMBEDDED_WARNING = (
    "EMBEDDED MODE: no database URL is set, so events live in memory and vanish when the "
    "process stops. Set MAGASIN_DATABASE_URL=postgresql://... for durable storage."
)


def is_memory_url(url: str | None) -> bool:
    return not url or url.startswith("memory://")


async def open_store(
    url: str | None, *, schema: str = "public", metrics: Metrics | None = None
) -> EventStore:
    if is_memory_url(url):
        logger.warning(EMBEDDED_WARNING)
        return MemoryEventStore()
    assert url is not None
    libpq_keywords = "://" not in url and "=" in url  # host=... dbname=... user=...
    if not (url.startswith(("postgresql://", "postgres://")) or libpq_keywords):
        raise ConfigurationError(
            f"unsupported database URL scheme in {url.split('@')[-1]!r}: use postgresql://... "
            "or memory://"
        )
    from runtime.store.postgres import PostgresEventStore  # noqa: PLC0415 - optional driver

    return await PostgresEventStore.connect(url, schema=schema, metrics=metrics)
