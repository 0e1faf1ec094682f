"""Real-PostgreSQL fixtures: one throw-away database per test session, a schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql

ADMIN_DSN = os.environ.get(
    "MAGASIN_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _dsn_for(dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in parts.items()})


def create_database() -> Iterator[str]:
    """Create ``magasin_test_<random>`` and drop it afterwards. Fails loudly if PG is absent."""
    name = f"magasin_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"the integration tests need PostgreSQL at {ADMIN_DSN} ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect 15 main start`"
        ) from exc
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _dsn_for(name)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def terminate_backends(dsn: str, application_name: str = "magasin") -> int:
    """``pg_terminate_backend`` every connection of the runtime (by application name)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE application_name = %s AND pid <> pg_backend_pid()
                  AND datname = current_database()""",
            (application_name,),
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0
