"""Helpers for tests that run magasin as a separate process."""

from __future__ import annotations

import os
import socket


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
