"""A tiny migrator: numbered SQL files under ``sql/`` applied in order, once each.

All pending files run in one transaction under a transaction-scoped advisory lock, so two
processes starting at once serialise: the second waits, then finds nothing left to do. A
file that was edited after it was applied is refused (its checksum no longer matches).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import psycopg
from loguru import logger
from psycopg import sql

from runtime.errors import MigrationError

_LOCK_NAMESPACE = "magasin.migrate"


class Migration:
    __slots__ = ("checksum", "name", "text", "version")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.version = int(name.split("_", 1)[0])
        self.text = text
        self.checksum = hashlib.sha256(text.encode()).hexdigest()


def migrations() -> list[Migration]:
    folder = resources.files("runtime.store").joinpath("sql")
    found = [
        Migration(entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: psycopg.AsyncConnection[Any], schema: str) -> list[str]:
    """Bring ``schema`` to the latest version; returns the names of the files applied."""
    applied_now: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"{_LOCK_NAMESPACE}.{schema}",),
            )
            ident = sql.Identifier(schema)
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS magasin_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            cur = await conn.execute("SELECT version, name, checksum FROM magasin_migrations")
            done = {int(v): (str(n), str(c)) for v, n, c in await cur.fetchall()}
            for migration in migrations():
                if migration.version in done:
                    name, checksum = done[migration.version]
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} changed after it was applied to schema "
                            f"{schema!r} (as {name}); add a new numbered file instead of editing"
                        )
                    continue
                try:
                    await conn.execute(migration.text.encode())
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {migration.name} failed on schema {schema!r}: {exc}; "
                        "nothing of this run was applied"
                    ) from exc
                await conn.execute(
                    "INSERT INTO magasin_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                applied_now.append(migration.name)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"migrating schema {schema!r} failed: {exc}") from exc
    for name in applied_now:
        logger.info("applied migration {name} to schema {schema}", name=name, schema=schema)
    return applied_now
