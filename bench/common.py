"""What the benchmarks share: the report table, DSNs, progress lines."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import psycopg


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
