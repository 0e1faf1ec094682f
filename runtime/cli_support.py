"""What every ``magasin`` command shares, the runtime's own and those the application adds
through the ``magasin.commands`` entry point: run a coroutine with errors as exit codes, load
the topology or exit, make the working directory importable."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import click

from runtime.errors import MagasinError

if TYPE_CHECKING:
    from runtime.topology import Topology


def run_or_exit(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``anyio.run(fn, *args)``; a ``MagasinError`` is printed and exits 1."""
    try:
        return anyio.run(fn, *args)
    except MagasinError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def importable_cwd() -> None:
    """Handlers are dotted paths from where magasin runs, as with ``python -m``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_or_exit(path: str, *, check_handlers: bool) -> Topology:
    """The topology at ``path``, or its error on stderr and exit 2."""
    from runtime.topology import load_topology  # noqa: PLC0415

    try:
        return load_topology(path, check_handlers=check_handlers)
    except MagasinError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
