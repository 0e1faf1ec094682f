"""`magasin db migrate` as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.postgres import drop_schema

pytestmark = pytest.mark.integration


def magasin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_migrate_applies_once_then_has_nothing_to_do(pg_dsn: str) -> None:
    schema = "cli_migrate_test"
    env = {"MAGASIN_DATABASE_URL": pg_dsn}
    try:
        first = magasin("db", "migrate", "--schema", schema, env=env)
        assert first.returncode == 0, first.stderr
        assert "applied 0001_event_store.sql" in first.stdout
        second = magasin("db", "migrate", "--schema", schema, env=env)
        assert second.returncode == 0, second.stderr
        assert "nothing to apply" in second.stdout
    finally:
        drop_schema(pg_dsn, schema)


def test_migrate_without_a_url_says_what_to_set() -> None:
    result = magasin("db", "migrate")
    assert result.returncode == 2
    assert "MAGASIN_DATABASE_URL" in result.stderr


def test_migrate_against_a_dead_server_fails_with_the_address() -> None:
    result = magasin(
        "db", "migrate", env={"MAGASIN_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}
    )
    assert result.returncode == 1
    assert "cannot reach the event store at 127.0.0.1:1/x" in result.stderr
    assert "Traceback" not in result.stderr
