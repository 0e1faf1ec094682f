"""Logging with loguru: human-readable by default, JSON lines on request.

Context (``correlation_id``, ``actor``, ...) is bound with ``logger.contextualize`` and shows
on every line written inside that context.
"""

from __future__ import annotations

import sys

from loguru import logger

_TEXT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {message} <dim>{extra}</dim>"
)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send logs to stderr at ``level``, as ``text`` or ``json`` (one object per line)."""
    if fmt not in {"text", "json"}:
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level.upper(), serialize=True, backtrace=False)
    else:
        logger.add(sys.stderr, level=level.upper(), format=_TEXT, backtrace=False)
