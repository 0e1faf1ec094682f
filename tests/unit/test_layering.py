"""The runtime's layers, read from its source: what may import what.

* ``runtime`` is generic: it never imports the application's ``actors``.
* Only the adapters talk to the drivers (psycopg, aio-pika): they translate driver errors into
  ``runtime.errors`` at that edge, so nothing else ever sees a driver type or exception.

Imports are found with ``ast`` wherever they are written (top level, inside functions, under
``if TYPE_CHECKING``); imports by string (``importlib``) are out of scope.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"

#: Top-level modules of the drivers: psycopg and its pool, aio-pika and the AMQP layers under it.
DRIVERS = frozenset(
    {"psycopg", "psycopg_pool", "psycopg_c", "psycopg_binary", "aio_pika", "aiormq", "pamqp"}
)

#: The adapter edge: the only runtime modules that may import a driver.
DRIVER_ADAPTERS = frozenset(
    {
        "runtime/store/postgres.py",
        "runtime/store/readmodel_postgres.py",
        "runtime/store/audit_postgres.py",
        "runtime/store/migrate.py",
        "runtime/cli.py",
    }
)
DRIVER_ADAPTER_PACKAGES = ("runtime/bus/",)


def imported_modules(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in ``source``, however deeply nested."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def top_level(module: str) -> str:
    return module.partition(".")[0]


def runtime_files() -> dict[str, str]:
    """Every ``.py`` file under ``runtime/``, by its path relative to the project root."""
    return {
        PurePosixPath(path.relative_to(ROOT)).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(RUNTIME.rglob("*.py"))
    }


def is_driver_adapter(name: str) -> bool:
    return name in DRIVER_ADAPTERS or name.startswith(DRIVER_ADAPTER_PACKAGES)


def offenders(
    forbidden: frozenset[str], exempt: Callable[[str], bool] = lambda name: False
) -> list[str]:
    """``file:line imports module`` for each import of a ``forbidden`` top-level module in a
    runtime file that is not ``exempt``."""
    lines = []
    for name, source in runtime_files().items():
        if exempt(name):
            continue
        for line, module in imported_modules(source, name):
            if top_level(module) in forbidden:
                lines.append(f"{name}:{line} imports {module}")
    return lines


def test_the_runtime_sources_are_found() -> None:
    files = runtime_files()
    assert "runtime/store/codec.py" in files
    assert "runtime/store/postgres.py" in files
    assert len(files) >= 10


def test_the_runtime_never_imports_the_actors() -> None:
    found = offenders(frozenset({"actors"}))
    assert not found, "runtime/ must stay generic; these files import actors:\n" + "\n".join(found)


def test_only_the_adapters_import_a_database_or_broker_driver() -> None:
    found = offenders(DRIVERS, exempt=is_driver_adapter)
    assert not found, (
        "driver errors are translated at the adapter edge (runtime/store/postgres.py, "
        "runtime/store/migrate.py, runtime/cli.py, runtime/bus/); these files import a "
        "driver:\n" + "\n".join(found)
    )


# --- the detector itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import actors", ["actors"]),
        ("import actors.shop as shop", ["actors"]),
        ("from actors import basket", ["actors"]),
        ("from actors.basket import Basket", ["actors"]),
        ("def f():\n    import psycopg\n", ["psycopg"]),
        (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from aio_pika import Channel\n",
            ["typing", "aio_pika"],
        ),
        ("import os, psycopg.sql", ["os", "psycopg"]),
        ("from psycopg_pool import AsyncConnectionPool", ["psycopg_pool"]),
        ("from runtime import actors_like", ["runtime"]),
        ("from . import actors", []),
        ("from .actors import x", []),
        ("import importlib\nimportlib.import_module('actors')", ["importlib"]),
    ],
)
def test_the_detector_finds_every_absolute_import(source: str, expected: list[str]) -> None:
    assert [top_level(module) for _, module in imported_modules(source)] == expected
