"""The resolution saga, the notifier and the audit trail end to end on PostgreSQL and
RabbitMQ: `magasin run` on the default topology with test settings (short SLA for `low`
complaints, a payments participant that declines refunds and vouchers, a short reopen window,
a webhook channel to a receiver in this test), driven over HTTP and killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.support.postgres import create_database, terminate_backends
from tests.support.process import ROOT, clean_env, free_port
from tests.support.rabbitmq import HOST, PORT, close_connections, create_vhost

pytestmark = pytest.mark.integration

AGENTS = ["agent-7", "agent-12", "agent-31"]
WAIT = 30.0
REFUSED = "refused@example.com"  # the webhook receiver answers 400 for this recipient


class Receiver:
    """A webhook endpoint: records every POST, answers 503 to the first ``fail_first``."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    if body.get("recipient") == REFUSED:
                        self.send_response(400)
                        self.end_headers()
                        return
                    if receiver.fail_first > 0:
                        receiver.fail_first -= 1
                        self.send_response(503)
                        self.end_headers()
                        return
                    receiver.posts.append((self.headers["Idempotency-Key"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def by_key(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            found: dict[str, list[dict[str, Any]]] = {}
            for key, body in self.posts:
                found.setdefault(key, []).append(body)
            return found


def write_test_topology(path: Path, webhook: str) -> Path:
    """topology.yaml with the test's settings."""
    topology = yaml.safe_load((ROOT / "topology.yaml").read_text())
    actors = topology["actors"]
    actors["complaints"]["options"]["reopen_window"] = 3
    saga = actors["resolution-saga"]["options"]
    saga["agents"] = {"store-042": AGENTS}
    saga["sla"] = {"urgent": "10m", "high": "10m", "normal": "10m", "low": "2s"}
    actors["saga-timers"]["options"]["poll_interval"] = 0.2
    actors["payments"]["options"] = {
        "fail": ["refund", "voucher"],
        "attempts": 2,
        "backoff": 0.05,
        "delay": {"voucher": 4},  # declined after the 3 s reopen window: reopening is refused
    }
    actors["notifications"]["retry"] = {"delays": ["100ms"], "max_attempts": 2}
    actors["notifications"]["options"]["channels"] = [
        {"type": "log"},
        {
            "type": "webhook",
            "name": "hook",
            "url": webhook,
            "timeout": "2s",
            "retries": 6,
            "backoff": "50ms",
        },
    ]
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


class Runtime:
    """`magasin run` on the test topology, that a test can SIGKILL and start again."""

    def __init__(self, topology: Path, env: dict[str, str], log: Path) -> None:
        self.topology = topology
        self.port = free_port()
        self.env = clean_env(**env, MAGASIN_HTTP_PORT=str(self.port))
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "run", str(self.topology)],
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log.read_text(errors="replace")[-5000:]
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text(errors="replace")[-5000:]
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


class Flow:
    def __init__(self, runtime: Runtime, receiver: Receiver, dsn: str, vhost: str) -> None:
        self.runtime = runtime
        self.receiver = receiver
        self.dsn = dsn
        self.vhost = vhost

    @property
    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.runtime.url, timeout=15)

    def create(
        self,
        priority: str = "normal",
        correlation: str | None = None,
        email: str = "ana@example.com",
    ) -> str:
        headers = {"X-Correlation-ID": correlation} if correlation else {}
        body = {
            "store_id": "store-042",
            "customer": {
                "id": "c-1",
                "name": "Ana Silva",
                "email": email,
                "phone": "+33 6 12 34 56 78",
            },
            "order_id": "o-981",
            "category": "damaged_product",
            "description": "Box arrived crushed",
            "priority": priority,
        }
        with self.api as api:
            response = api.post("/complaints", json=body, headers=headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def create_when_ready(self) -> str:
        """``create``, once the runtime answers again after a fault (503 until then)."""
        return str(until(self._try_create, "a create accepted", 60))

    def _try_create(self) -> str | None:
        try:
            return self.create()
        except AssertionError:
            return None

    def post(self, complaint_id: str, step: str, body: dict[str, Any]) -> httpx.Response:
        with self.api as api:
            return api.post(f"/complaints/{complaint_id}/{step}", json=body)

    def get(self, path: str, **params: Any) -> httpx.Response:
        with self.api as api:
            return api.get(path, params=params)

    def saga(self, complaint_id: str) -> dict[str, Any]:
        response = self.get(f"/complaints/{complaint_id}/saga")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def history(self, complaint_id: str) -> list[str]:
        events = self.get(f"/complaints/{complaint_id}/history").json()["events"]
        return [e["type"] for e in events]


def open_complaints(flow: Flow, agent: str) -> int:
    with psycopg.connect(flow.dsn) as conn:
        row = conn.execute(
            """SELECT (doc->>'open')::int FROM read_models
                WHERE projection = 'workload' AND collection = 'assignees' AND key = %s""",
            (agent,),
        ).fetchone()
    return int(row[0]) if row else 0


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (AssertionError, KeyError, httpx.TransportError):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    vhosts = create_vhost()  # its own: nothing left in a queue reaches another module's runtime
    vhost = next(vhosts)
    amqp_url = f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"
    receiver = Receiver(fail_first=3)
    folder = tmp_path_factory.mktemp("resolution")
    database = create_database()
    dsn = next(database)
    runtime = Runtime(
        write_test_topology(folder / "topology.yaml", receiver.url),
        {"MAGASIN_DATABASE_URL": dsn, "MAGASIN_AMQP_URL": amqp_url},
        folder / "magasin.log",
    )
    try:
        runtime.start()
        yield Flow(runtime, receiver, dsn, vhost)
    finally:
        runtime.kill()
        receiver.server.shutdown()
        receiver.server.server_close()
        database.close()
        vhosts.close()


# --- the saga -------------------------------------------------------------------------------


def test_a_complaint_is_assigned_to_the_least_loaded_agent_without_a_command(flow: Flow) -> None:
    first = flow.create()
    saga = until(lambda: flow.saga(first)["assignee"] and flow.saga(first), "auto-assignment")
    assert saga["state"] == "running"
    assert saga["assignee"] in AGENTS
    assert [s["name"] for s in saga["steps"]] == ["assign", "notify-customer", "arm-sla"]
    assert saga["timers"][0]["status"] == "armed"
    seen = until(
        lambda: (
            flow.get(f"/complaints/{first}").json()["status"] == "assigned"
            and flow.get(f"/complaints/{first}").json()
        ),
        "the assignment in the read model",
    )
    assert seen["assignee"] == saga["assignee"]
    assert flow.history(first) == ["ComplaintCreated", "ComplaintAssigned"]
    # The next one goes to another agent once the workload projection counts the first.
    until(lambda: open_complaints(flow, saga["assignee"]) >= 1, "the workload projection")
    second = flow.create()
    other = until(lambda: flow.saga(second)["assignee"], "the second assignment")
    assert other != saga["assignee"]


def test_an_unknown_complaint_has_no_saga(flow: Flow) -> None:
    response = flow.get(f"/complaints/{uuid.uuid4()}/saga")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


def test_a_passed_sla_escalates_the_complaint_once_also_across_a_restart(flow: Flow) -> None:
    complaint = flow.create(priority="low")  # SLA 2 s in this topology
    until(lambda: flow.saga(complaint)["timers"][0]["status"] == "armed", "the armed timer")
    flow.runtime.kill()  # the timer lives in PostgreSQL, not in the process
    time.sleep(2.5)
    flow.runtime.start()
    saga = until(
        lambda: (
            any(s["name"] == "sla-escalation" for s in flow.saga(complaint)["steps"])
            and flow.saga(complaint)
        ),
        "the SLA escalation",
    )
    step = next(s for s in saga["steps"] if s["name"] == "sla-escalation")
    assert step["status"] == "done", step
    assert saga["timers"][0]["status"] == "fired"
    assert until(lambda: flow.get(f"/complaints/{complaint}").json()["priority"] == "normal", "")
    time.sleep(1.0)  # a second firing would have happened by now
    assert flow.history(complaint).count("ComplaintEscalated") == 1


def test_a_resolution_cancels_the_sla_timer(flow: Flow) -> None:
    complaint = flow.create(priority="low")
    until(lambda: flow.saga(complaint)["assignee"], "auto-assignment")
    response = flow.post(complaint, "resolve", {"resolution": "repair"})
    assert response.status_code == 200, response.text
    saga = until(
        lambda: flow.saga(complaint)["state"] == "completed" and flow.saga(complaint), "completion"
    )
    assert saga["timers"][0]["status"] == "cancelled"
    time.sleep(2.5)  # past the 2 s deadline
    assert "ComplaintEscalated" not in flow.history(complaint)
    assert flow.saga(complaint)["state"] == "completed"


def test_late_and_strange_saga_messages_change_nothing(flow: Flow) -> None:
    complaint = flow.create()
    until(lambda: flow.saga(complaint)["assignee"], "auto-assignment")
    assert flow.post(complaint, "resolve", {"resolution": "repair"}).status_code == 200
    done = until(
        lambda: flow.saga(complaint)["state"] == "completed" and flow.saga(complaint),
        "completion",
    )
    timer = done["timers"][0]
    # The SLA timer firing after completion (as a slow timer service would send it)...
    fired = {
        "saga_id": complaint,
        "timer_id": timer["timer_id"],
        "name": "sla",
        "due_at": timer["due_at"],
    }
    publish(flow, "timer.fired", fired, message_id=timer["timer_id"])
    # ... and messages naming sagas that do not exist: none starts one.
    stranger = str(uuid.uuid4())
    publish(flow, "timer.fired", {**fired, "saga_id": stranger}, message_id=str(uuid.uuid4()))
    publish(
        flow,
        "payment.failed",
        {"request_id": "r", "saga_id": stranger, "ok": False, "attempts": 1},
        message_id=str(uuid.uuid4()),
    )
    time.sleep(1.5)
    assert flow.saga(complaint) == done
    assert "ComplaintEscalated" not in flow.history(complaint)
    assert flow.get(f"/complaints/{stranger}/saga").status_code == 404


def test_a_declined_refund_is_compensated_once(flow: Flow) -> None:
    complaint = flow.create()
    until(lambda: flow.saga(complaint)["assignee"], "auto-assignment")
    assert flow.post(complaint, "resolve", {"resolution": "refund"}).status_code == 200
    saga = until(
        lambda: flow.saga(complaint)["state"] == "compensated" and flow.saga(complaint),
        "the compensations",
    )
    assert [(c["name"], c["status"], c["attempts"]) for c in saga["compensations"]] == [
        ("reopen-complaint", "done", 1),
        ("notify-customer", "done", 1),
        ("flag-for-manager", "done", 1),
    ]
    payment = next(s for s in saga["steps"] if s["name"] == "payment")
    assert payment["status"] == "failed"
    assert "after 2 attempt(s)" in payment["detail"]
    history = flow.history(complaint)
    assert history[-3:] == ["ComplaintResolved", "ComplaintReopened", "ComplaintEscalated"]

    # The participant's answer delivered again, under its id and under a new one: nothing more.
    result = {
        "request_id": "x",
        "saga_id": complaint,
        "ok": False,
        "attempts": 2,
        "detail": "declined again",
    }
    publish(flow, "payment.failed", result, message_id=f"dup-{uuid.uuid4()}")
    time.sleep(1.0)
    assert flow.history(complaint) == history
    assert flow.saga(complaint)["version"] == saga["version"]

    metrics = flow.get("/metrics").text
    assert 'saga_executions_total{outcome="compensated",saga="ComplaintResolutionSaga"}' in metrics
    assert (
        'saga_compensations_total{outcome="done",saga="ComplaintResolutionSaga",step="reopen-complaint"}'
        in metrics
    )
    assert (
        'saga_step_executions_total{outcome="failed",saga="ComplaintResolutionSaga",step="payment"}'
        in metrics
    )
    assert "magasin_sagas_active{" in metrics
    assert 'magasin_audit_entries_total{outcome="recorded"}' in metrics
    assert 'magasin_notifications_total{channel="hook",outcome="sent"}' in metrics


def test_a_refused_compensation_parks_the_saga_until_retried(flow: Flow) -> None:
    complaint = flow.create()
    until(lambda: flow.saga(complaint)["assignee"], "auto-assignment")
    assert flow.post(complaint, "resolve", {"resolution": "voucher"}).status_code == 200
    parked = until(
        lambda: flow.saga(complaint)["state"] == "compensation_failed" and flow.saga(complaint),
        "the parked saga",
    )
    reopen = parked["compensations"][0]
    assert (reopen["name"], reopen["status"], reopen["attempts"]) == (
        "reopen-complaint",
        "failed",
        1,
    )
    assert "reopen" in reopen["detail"]
    assert [c["status"] for c in parked["compensations"][1:]] == ["pending", "pending"]

    listed = flow.runtime.cli(
        "saga", "list", "--state", "compensation_failed", "--topology", str(flow.runtime.topology)
    )
    assert listed.returncode == 0, listed.stderr
    assert complaint in listed.stdout

    retried = flow.runtime.cli("saga", "retry", complaint, "--topology", str(flow.runtime.topology))
    assert retried.returncode == 0, retried.stderr
    again = until(
        lambda: (
            flow.saga(complaint)["retries"] == 1
            and flow.saga(complaint)["state"] == "compensation_failed"
            and flow.saga(complaint)
        ),
        "the retried compensation",
    )
    assert again["compensations"][0]["attempts"] == 2  # driven again, refused again
    assert "ComplaintReopened" not in flow.history(complaint)

    completed = flow.create()
    until(lambda: flow.saga(completed)["assignee"], "auto-assignment")
    refused = flow.runtime.cli("saga", "retry", completed, "--topology", str(flow.runtime.topology))
    assert refused.returncode == 1
    assert "not compensation_failed" in refused.stderr


def test_sagas_finish_across_dropped_broker_and_database_connections(flow: Flow) -> None:
    first = [flow.create() for _ in range(4)]
    close_connections(flow.vhost)  # what a broker restart looks like to the runtime
    assert terminate_backends(flow.dsn) >= 1  # and a database failover
    second = [flow.create_when_ready() for _ in range(4)]
    for complaint in first + second:
        until(lambda c=complaint: flow.saga(c)["assignee"], f"the saga of {complaint}", 60)
        until(
            lambda c=complaint: (
                flow.post(c, "resolve", {"resolution": "repair"}).status_code in {200, 409}
            ),
            "the resolution",
        )
    for complaint in first + second:
        saga = until(
            lambda c=complaint: flow.saga(c)["state"] == "completed" and flow.saga(c),
            "completion",
            60,
        )
        assert [s["name"] for s in saga["steps"]][:3] == ["assign", "notify-customer", "arm-sla"]
        assert flow.history(complaint).count("ComplaintAssigned") == 1


# --- notifications --------------------------------------------------------------------------


def test_each_notification_reaches_the_webhook_once_across_a_sigkill(flow: Flow) -> None:
    created = [flow.create() for _ in range(8)]
    flow.runtime.kill()  # with notifications in flight
    flow.runtime.start()
    created += [flow.create() for _ in range(4)]

    def expected() -> set[tuple[str, str]]:
        return {
            (c, t)
            for c in created
            for t in ("complaint-opened", "complaint-received", "complaint-assigned")
        }

    def delivered() -> set[tuple[str, str]]:
        return {
            (bodies[0]["complaint_id"], bodies[0]["template"])
            for bodies in flow.receiver.by_key().values()
            if bodies[0]["complaint_id"] in created
        }

    until(lambda: delivered() >= expected(), "every notification", timeout=60)
    mine = {
        key: bodies
        for key, bodies in flow.receiver.by_key().items()
        if bodies[0]["complaint_id"] in created
    }
    assert len(mine) == len(expected())  # one idempotency key per notification
    for bodies in mine.values():  # a copy (after the SIGKILL) is the same notification
        assert all(body == bodies[0] for body in bodies)
    with psycopg.connect(flow.dsn) as conn:
        rows = conn.execute(
            """SELECT doc->>'status', count(*) FROM read_models
                WHERE projection = 'notifications' AND doc->>'channel' = 'hook'
                  AND doc->>'complaint_id' = ANY(%s) GROUP BY 1""",
            (created,),
        ).fetchall()
    assert dict(rows) == {"sent": len(expected())}


def test_a_notification_the_webhook_refuses_ends_in_the_dead_letter_queue(flow: Flow) -> None:
    complaint = flow.create(email=REFUSED)
    topology = str(flow.runtime.topology)

    def parked() -> str | None:
        listed = flow.runtime.cli("dlq", "list", "notifications", "--topology", topology)
        return listed.stdout if "NotificationFailedError" in listed.stdout else None

    listing = until(parked, "the dead letter")
    assert f"notify {REFUSED}" in listing
    with psycopg.connect(flow.dsn) as conn:
        row = conn.execute(
            """SELECT doc->>'status', doc->>'attempts', doc->>'error' FROM read_models
                WHERE projection = 'notifications' AND doc->>'recipient' = %s
                  AND doc->>'channel' = 'hook' AND doc->>'complaint_id' = %s""",
            (REFUSED, complaint),
        ).fetchone()
    assert row is not None
    assert row[:2] == ("failed", "2")  # the first try and the one retry of the ladder
    assert "HTTP 400" in row[2]
    assert REFUSED not in {body["recipient"] for _, body in flow.receiver.posts}


# --- the audit trail ------------------------------------------------------------------------


def test_the_audit_trail_of_one_request(flow: Flow) -> None:
    correlation = f"audit-{uuid.uuid4()}"
    complaint = flow.create(correlation=correlation)
    until(lambda: flow.saga(complaint)["assignee"], "auto-assignment")

    def trail() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = flow.get("/audit", correlation_id=correlation).json()["items"]
        return items

    with flow.api as api:
        stale = api.post(
            f"/complaints/{complaint}/escalate",
            json={"reason": "stale"},
            headers={"X-Correlation-ID": correlation, "If-Match": "1"},
        )
    assert stale.status_code == 409
    items = until(
        lambda: (
            {
                "EscalateComplaint.rejected",
                "ComplaintCreated",
                "ComplaintAssigned",
                "CreateComplaint.accepted",
                "ComplaintResolutionSaga.started",
                "NotificationRequested",
            }
            <= {i["type"] for i in trail()}
            and trail()
        ),
        "the request's trail",
    )
    events = {e["event_id"] for e in flow.get(f"/complaints/{complaint}/history").json()["events"]}
    assert events <= {i["event_id"] for i in items}
    by_id = {i["event_id"]: i for i in items}
    created = next(i for i in items if i["type"] == "ComplaintCreated")
    command = by_id[created["causation_id"]]  # the event points at the command that wrote it
    assert command["type"] == "CreateComplaint.accepted"
    assigned = next(i for i in items if i["type"] == "ComplaintAssigned")
    assert assigned["user"] == "resolution-saga"
    assert assigned["causation_id"] == created["event_id"]  # the saga reacted to the creation
    assert [i["seq"] for i in items] == sorted(i["seq"] for i in items)


def test_audit_verify_passes_and_finds_an_edited_record(flow: Flow) -> None:
    def verify() -> subprocess.CompletedProcess[str]:
        return flow.runtime.cli("audit", "verify")

    done = until(lambda: (r := verify()).returncode == 0 and r, "full coverage")
    assert "coverage: 100.00 %" in done.stdout
    assert "chain: intact" in done.stdout

    with psycopg.connect(flow.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # the triggers forbid it
        seq, user = conn.execute(
            "SELECT seq, user_id FROM audit_log ORDER BY seq LIMIT 1 OFFSET 2"
        ).fetchone()  # type: ignore[misc]
        conn.execute("UPDATE audit_log SET user_id = 'mallory' WHERE seq = %s", (seq,))
        try:
            broken = verify()
        finally:
            conn.execute("UPDATE audit_log SET user_id = %s WHERE seq = %s", (user, seq))
    assert broken.returncode == 1
    assert f"record {seq}: its content does not match its hash" in broken.stdout
    assert verify().returncode == 0

    exported = flow.runtime.cli("audit", "export", "--correlation-id", "nobody")
    assert exported.returncode == 0
    assert exported.stdout == ""
    everything = flow.runtime.cli("audit", "export")
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(lines) + 1))


def publish(flow: Flow, routing_key: str, body: dict[str, Any], *, message_id: str) -> None:
    """Publish to saga.events as a participant would (through the runtime's own bus code)."""
    import anyio  # noqa: PLC0415

    from runtime.bus.rabbitmq import RabbitMQBus  # noqa: PLC0415

    async def go() -> None:
        bus = await RabbitMQBus.connect(flow.runtime.env["MAGASIN_AMQP_URL"], name="test")
        try:
            await bus.publish(
                "saga.events", routing_key, json.dumps(body).encode(), message_id=message_id
            )
        finally:
            await bus.close()

    anyio.run(go)
