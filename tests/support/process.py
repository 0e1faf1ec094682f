"""Helpers for tests that run magasin as a separate process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without MAGASIN_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(extra)
    return env


@contextmanager
def magasin_running(
    env: dict[str, str], log: Path, topology: str = "topology.yaml", startup: float = 60.0
) -> Iterator[str]:
    """`magasin run <topology>` from the project's folder with ``env`` (MAGASIN_* from the
    test's environment dropped, a free MAGASIN_HTTP_PORT unless given), ready; yields the
    gateway's URL and kills the process at the end whatever happened."""
    env = {"MAGASIN_HTTP_PORT": str(free_port()), **env}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", topology],
            cwd=ROOT,
            env=clean_env(**env),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{env['MAGASIN_HTTP_PORT']}"
    try:
        deadline = time.monotonic() + startup
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)
