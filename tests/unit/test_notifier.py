"""The notifier's channels and configuration; the webhook channel against a real local
HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from actors.notifications.notifier import (
    LogChannel,
    Notification,
    NotificationFailedError,
    WebhookChannel,
    make_channels,
)
from runtime.errors import ConfigurationError

NOTE = Notification(
    notification_id="n-1",
    event_id="e-1",
    event_type="ComplaintAssigned",
    template="complaint-assigned",
    recipient="agent-7",
    subject="Complaint c-1 is yours",
    body="...",
    complaint_id="c-1",
)


class Server:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen: list[tuple[str, dict[str, object]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.headers["Idempotency-Key"], body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    running = Server(list(getattr(request, "param", [])))
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.mark.parametrize("server", [[503, 429]], indirect=True)
async def test_a_webhook_retries_unavailable_answers_with_one_idempotency_key(
    server: Server,
) -> None:
    await WebhookChannel("hook", server.url, retries=3, backoff=0.01).send(NOTE)
    assert [key for key, _ in server.seen] == ["n-1", "n-1", "n-1"]
    assert server.seen[-1][1]["recipient"] == "agent-7"


@pytest.mark.parametrize("server", [[400]], indirect=True)
async def test_a_webhook_refusal_is_not_retried(server: Server) -> None:
    with pytest.raises(NotificationFailedError, match="HTTP 400"):
        await WebhookChannel("hook", server.url, retries=3, backoff=0.01).send(NOTE)
    assert len(server.seen) == 1


@pytest.mark.parametrize("server", [[500, 500, 500]], indirect=True)
async def test_a_webhook_gives_up_after_its_retries(server: Server) -> None:
    with pytest.raises(NotificationFailedError, match="could not notify agent-7: HTTP 500"):
        await WebhookChannel("hook", server.url, retries=2, backoff=0.01).send(NOTE)
    assert len(server.seen) == 3


async def test_an_unreachable_webhook_fails_with_the_reason() -> None:
    channel = WebhookChannel("hook", "http://127.0.0.1:1/hook", timeout=1, retries=1, backoff=0)
    with pytest.raises(NotificationFailedError, match="ConnectError"):
        await channel.send(NOTE)


async def test_the_log_channel_appends_json_lines(tmp_path: Path) -> None:
    sink = tmp_path / "notifications.jsonl"
    channel = LogChannel(path=sink)
    await channel.send(NOTE)
    await channel.send(NOTE)
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [line["notification_id"] for line in lines] == ["n-1", "n-1"]


def test_channels_default_to_the_log() -> None:
    [channel] = make_channels(None, "notifications")
    assert isinstance(channel, LogChannel)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([], "non-empty list"),
        (["log"], r"channels\[0\]: expected a mapping"),
        ([{"type": "sms"}], r"channels\[0\]\.type: 'sms' is not a channel"),
        ([{"type": "webhook"}], "needs a url"),
        ([{"type": "log"}, {"type": "log"}], "channel names repeat"),
    ],
)
def test_bad_channels_are_named(specs: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_channels(specs, "notifications")


async def test_a_webhook_that_never_answers_fails_within_its_budget() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        channel = WebhookChannel("hook", url, timeout=10, retries=3, backoff=0, budget=0.3)
        # The budget, not the 10 s per try, ends it:
        with pytest.raises(NotificationFailedError, match=r"no success within 0\.3s"):
            await channel.send(NOTE)
