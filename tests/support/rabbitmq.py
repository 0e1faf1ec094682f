"""Real-RabbitMQ fixtures: one throw-away virtual host per test session, plus the
``rabbitmqctl`` calls the fault tests need (close connections, read queue arguments).

Import the fixtures into a conftest (or a test module) to use them::

    from tests.support.rabbitmq import amqp_url, rabbitmq_vhost  # noqa: F401
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

HOST = os.environ.get("MAGASIN_TEST_AMQP_HOST", "127.0.0.1")
PORT = int(os.environ.get("MAGASIN_TEST_AMQP_PORT", "5672"))
START_HINT = "start it with `rabbitmq-server -detached` (then `rabbitmqctl await_startup`)"


def rabbitmqctl(*args: str, timeout: float = 30) -> str:
    """Run ``rabbitmqctl`` and return its output; raise with its output when it fails."""
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        raise RuntimeError(f"the integration tests need rabbitmqctl on PATH; {START_HINT}")
    result = subprocess.run(
        [executable, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`rabbitmqctl {' '.join(args)}` failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}; {START_HINT} if it is not running"
        )
    return result.stdout


def _check_listening() -> None:
    try:
        socket.create_connection((HOST, PORT), timeout=3).close()
    except OSError as exc:
        raise RuntimeError(
            f"the integration tests need RabbitMQ at {HOST}:{PORT} ({exc}); {START_HINT}"
        ) from exc


def create_vhost() -> Iterator[str]:
    """Create ``magasin_test_<random>`` for guest and delete it afterwards (with every
    queue and exchange in it). Fails loudly, never skips, if RabbitMQ does not answer."""
    _check_listening()
    vhost = f"magasin_test_{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


def close_connections(vhost: str, reason: str = "test: dropping every connection") -> None:
    """What a broker restart or a network cut looks like to clients of ``vhost``."""
    rabbitmqctl("close_all_connections", "-p", vhost, reason)


def queue_arguments(vhost: str, queue: str) -> dict[str, Any]:
    """The arguments ``queue`` was declared with, as the broker reports them."""
    output = rabbitmqctl("list_queues", "-p", vhost, "name", "arguments", "--formatter", "json")
    for row in json.loads(output):
        if row["name"] == queue:
            # The JSON formatter renders the table as [key, AMQP type, value] triples.
            return {key: value for key, _type, value in row["arguments"]}
    raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")


def connection_names(vhost: str) -> list[str]:
    """The client-provided names of the connections open on ``vhost``."""
    output = rabbitmqctl(
        "list_connections", "-p", vhost, "client_properties", "--formatter", "json"
    )
    names = []
    for row in json.loads(output):
        for key, _type, value in row["client_properties"]:
            if key == "connection_name":
                names.append(value)
    return names


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of this test session's own, deleted at the end."""
    yield from create_vhost()


@pytest.fixture(scope="session")
def amqp_url(rabbitmq_vhost: str) -> str:
    return f"amqp://guest:guest@{HOST}:{PORT}/{rabbitmq_vhost}"
