"""The audit-log contract on PostgreSQL, plus what only the database enforces."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

from runtime.store.audit_postgres import PostgresAuditLog
from runtime.store.postgres import PostgresEventStore
from tests.contracts.audit import AuditLogContract, Cut, Tamper, entry

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_audit(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresAuditLog]:
    log = await PostgresAuditLog.connect(pg_dsn, schema=pg_schema, max_size=4)
    yield log
    await log.close()


def _behind_the_back(
    dsn: str, schema: str, statement: sql.Composable, params: tuple[object, ...]
) -> None:
    """Run ``statement`` as a superuser who switched the append-only triggers off."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute("SET session_replication_role = replica")
        conn.execute(statement, params)


class TestPostgresAuditLog(AuditLogContract):
    @pytest.fixture
    def audit_log(self, pg_audit: PostgresAuditLog) -> PostgresAuditLog:
        return pg_audit

    @pytest.fixture
    def event_store(self, pg_store: PostgresEventStore) -> PostgresEventStore:
        return pg_store

    @pytest.fixture
    def tamper(self, pg_dsn: str, pg_schema: str) -> Tamper:
        columns = {"user": "user_id"}

        async def edit(seq: int, column: str, value: object) -> None:
            statement = sql.SQL("UPDATE audit_log SET {} = %s WHERE seq = %s").format(
                sql.Identifier(columns.get(column, column))
            )
            _behind_the_back(pg_dsn, pg_schema, statement, (value, seq))

        return edit

    @pytest.fixture
    def cut(self, pg_dsn: str, pg_schema: str) -> Cut:
        async def delete(seq: int) -> None:
            _behind_the_back(
                pg_dsn, pg_schema, sql.SQL("DELETE FROM audit_log WHERE seq = %s"), (seq,)
            )

        return delete


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET user_id = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
)
async def test_the_application_cannot_change_the_trail(
    pg_audit: PostgresAuditLog, pg_dsn: str, pg_schema: str, statement: str
) -> None:
    await pg_audit.append([entry()])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_schema)))
        with pytest.raises(psycopg.DatabaseError, match="append-only"):
            conn.execute(statement)
