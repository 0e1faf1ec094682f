from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from runtime.observability.metrics import Metrics
from runtime.store.postgres import PostgresEventStore
from tests.support.postgres import create_database, drop_schema
from tests.support.rabbitmq import amqp_url, rabbitmq_vhost  # noqa: F401 - session fixtures


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, dropped at the end."""
    yield from create_database()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(pg_dsn, schema)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def pg_store(
    pg_dsn: str, pg_schema: str, metrics: Metrics
) -> AsyncIterator[PostgresEventStore]:
    store = await PostgresEventStore.connect(
        pg_dsn, schema=pg_schema, metrics=metrics, poll_interval=0.5, max_size=24
    )
    yield store
    await store.close()


@pytest.fixture
async def pg_dsn_schema_store(
    pg_dsn: str, pg_schema: str, pg_store: PostgresEventStore
) -> AsyncIterator[PostgresEventStore]:
    """A second store on the same schema: what another runtime process would hold."""
    store = await PostgresEventStore.connect(pg_dsn, schema=pg_schema, poll_interval=0.5)
    yield store
    await store.close()
