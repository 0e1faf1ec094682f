"""What the benchmarks share: the report table, DSNs, progress lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import psycopg
from psycopg import sql
from yarl import URL


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str] | None] = []

    def add(self, label: str, magasin: float, plain: float, digits: int = 0) -> None:
        ratio = magasin / plain if plain else float("nan")
        self.rows.append((label, f"{magasin:,.{digits}f}", f"{plain:,.{digits}f}", f"{ratio:.2f}"))

    def rule(self) -> None:
        self.rows.append(None)

    def render(self) -> str:
        header = ("figure", "magasin", "plain", "ratio")
        cells = [r for r in self.rows if r is not None] + [header]
        widths = [max(len(r[i]) for r in cells) for i in range(4)]

        def line(r: Sequence[str]) -> str:
            return "  ".join(
                r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(4)
            )

        sep = "-" * len(line(header))
        out = [line(header), sep]
        for r in self.rows:
            out.append(sep if r is None else line(r))
        return "\n".join(out)


def dsn_for(admin_dsn: str, dbname: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    parts["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in parts.items()})


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def raise_interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


@dataclass
class Database:
    admin_dsn: str
    name: str = field(default_factory=lambda: f"magasin_bench_{uuid.uuid4().hex[:12]}")

    def create(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        return dsn_for(self.admin_dsn, self.name)

    def drop(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def rabbitmqctl(*args: str) -> str:
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        raise RuntimeError("rabbitmqctl is not on PATH (it creates the bench's vhost)")
    result = subprocess.run(
        [executable, "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`rabbitmqctl {' '.join(args)}` failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


@dataclass
class Vhost:
    base_url: str
    name: str
    created: bool = False

    def create(self) -> str:
        rabbitmqctl("add_vhost", self.name)
        self.created = True
        user = URL(self.base_url).user or "guest"
        rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        return str(URL(self.base_url).with_path("/" + self.name))

    def delete(self) -> None:
        if self.created:
            rabbitmqctl("delete_vhost", self.name)
