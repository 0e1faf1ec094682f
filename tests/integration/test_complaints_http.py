"""The complaint API end to end: `magasin run topology.yaml` (the default topology, every
actor of it) on real PostgreSQL and RabbitMQ, and on the embedded default, driven over HTTP.

One runtime per backend for the module, on a database of its own (the default topology keeps
everything in the `public` schema, where other tests' relays keep theirs); each test uses
complaints and stores of its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.postgres import create_database
from tests.support.process import magasin_running
from tests.support.rabbitmq import amqp_url, rabbitmq_vhost  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0

pytestmark = pytest.mark.integration


#: A store without agents in the default topology: the resolution saga leaves its complaints
#: alone, so these tests drive every step themselves. (store-042 has agents: see below.)
MANUAL_STORE = "store-manual"


def body(store_id: str = MANUAL_STORE, **overrides: Any) -> dict[str, Any]:
    return {
        "store_id": store_id,
        "customer": {
            "id": "c-1",
            "name": "Ana Silva",
            "email": "ana@example.com",
            "phone": "+33 6 12 34 56 78",
        },
        "order_id": "o-981",
        "category": "damaged_product",
        "description": "Box arrived crushed",
        "priority": "normal",
        **overrides,
    }


@pytest.fixture(scope="module", params=["postgres+rabbitmq", "embedded"])
def api(
    request: pytest.FixtureRequest,
    amqp_url: str,  # noqa: F811 - the fixture imported above
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    env: dict[str, str] = {}
    database = None
    if request.param != "embedded":
        database = create_database()
        env |= {"MAGASIN_DATABASE_URL": next(database), "MAGASIN_AMQP_URL": amqp_url}
    log = tmp_path_factory.mktemp("complaints") / "magasin.log"
    try:
        with magasin_running(env, log) as url, httpx.Client(base_url=url, timeout=15) as client:
            yield client
    finally:
        if database is not None:
            database.close()  # drops it


def create(api: httpx.Client, **overrides: Any) -> dict[str, Any]:
    response = api.post("/complaints", json=body(**overrides))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def view(api: httpx.Client, complaint_id: str, position: int) -> dict[str, Any]:
    response = api.get(f"/complaints/{complaint_id}", params={"min_position": position})
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def test_the_whole_lifecycle_and_its_history(api: httpx.Client) -> None:
    correlation = f"test-{uuid.uuid4()}"
    response = api.post("/complaints", json=body(), headers={"X-Correlation-ID": correlation})
    assert response.status_code == 201, response.text
    assert response.headers["x-correlation-id"] == correlation
    created = response.json()
    cid = created["id"]
    assert response.headers["location"] == f"/complaints/{cid}"
    assert created["version"] == 1
    assert created["position"] >= 1

    steps: list[tuple[str, dict[str, Any], str]] = [
        ("assign", {"assignee": "agent-7"}, "assigned"),
        ("start-investigation", {}, "investigating"),
        ("comments", {"text": "called the customer", "author": "agent-7"}, "investigating"),
        ("resolve", {"resolution": "refund", "note": "refunded 12 EUR"}, "resolved"),
        ("close", {"note": "done"}, "closed"),
        ("reopen", {}, "assigned"),
        ("escalate", {"reason": "customer unhappy"}, "assigned"),
        ("withdraw", {"note": "customer gave up"}, "withdrawn"),
    ]
    version = 1
    for route, payload, status in steps:
        answer = api.post(f"/complaints/{cid}/{route}", json=payload)
        assert answer.status_code == 200, (route, answer.text)
        assert answer.json()["version"] == version + 1
        version += 1
        seen = view(api, cid, answer.json()["position"])
        assert seen["status"] == status, route
        assert seen["version"] == version
    final = view(api, cid, 0)
    assert final["assignee"] == "agent-7"
    assert final["priority"] == "high"
    assert final["store_id"] == MANUAL_STORE
    assert final["customer"]["email"] == "ana@example.com"
    assert final["comments"][0]["text"] == "called the customer"

    history = api.get(f"/complaints/{cid}/history").json()["events"]
    assert [e["type"] for e in history] == [
        "ComplaintCreated",
        "ComplaintAssigned",
        "ComplaintInvestigationStarted",
        "ComplaintCommented",
        "ComplaintResolved",
        "ComplaintClosed",
        "ComplaintReopened",
        "ComplaintEscalated",
        "ComplaintWithdrawn",
    ]
    assert history[0]["correlation_id"] == correlation
    assert all(e["correlation_id"] for e in history)


def test_a_stale_if_match_is_409_with_the_current_version(api: httpx.Client) -> None:
    created = create(api)
    cid = created["id"]
    ok = api.post(f"/complaints/{cid}/assign", json={"assignee": "a"}, headers={"If-Match": "1"})
    assert ok.status_code == 200, ok.text
    stale = api.post(f"/complaints/{cid}/assign", json={"assignee": "b"}, headers={"If-Match": "1"})
    assert stale.status_code == 409, stale.text
    assert stale.headers["content-type"].startswith("application/problem+json")
    assert stale.json()["current_version"] == 2
    assert view(api, cid, ok.json()["position"])["assignee"] == "a"


def test_unknown_ids_are_404(api: httpx.Client) -> None:
    missing = f"nobody-{uuid.uuid4()}"
    assert api.get(f"/complaints/{missing}").status_code == 404
    assert api.get(f"/complaints/{missing}/history").status_code == 404
    answer = api.post(f"/complaints/{missing}/assign", json={"assignee": "x"})
    assert answer.status_code == 404, answer.text


def test_a_retried_command_with_its_idempotency_key_writes_nothing_more(
    api: httpx.Client,
) -> None:
    key = str(uuid.uuid4())
    first = api.post("/complaints", json=body(), headers={"Idempotency-Key": key})
    again = api.post("/complaints", json=body(), headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["version"] == 1
    assert again.json()["replayed"] is True
    cid = first.json()["id"]
    assign_key = f"assign-{uuid.uuid4()}"
    for _ in range(2):
        answer = api.post(
            f"/complaints/{cid}/assign",
            json={"assignee": "agent-1"},
            headers={"Idempotency-Key": assign_key},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 2
    events = api.get(f"/complaints/{cid}/history").json()["events"]
    assert [e["type"] for e in events] == ["ComplaintCreated", "ComplaintAssigned"]


def test_a_store_042_complaint_is_assigned_by_the_saga_and_audited(api: httpx.Client) -> None:
    """The default topology's saga assigns store-042's complaints on its own, shows its
    state, and the audit trail holds every event of the request."""
    correlation = f"saga-{uuid.uuid4()}"
    response = api.post(
        "/complaints", json=body("store-042"), headers={"X-Correlation-ID": correlation}
    )
    assert response.status_code == 201, response.text
    cid = response.json()["id"]
    deadline = time.monotonic() + 20
    while (seen := api.get(f"/complaints/{cid}").json()).get("status") != "assigned":
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    assert seen["assignee"] in {"agent-7", "agent-12", "agent-31"}
    # The saga commits its state once the assignment is answered; the complaint's read
    # model may show the assignment first (both read the stream on their own).
    while (saga := api.get(f"/complaints/{cid}/saga")).status_code == 404:
        assert time.monotonic() < deadline, saga.text
        time.sleep(0.1)
    assert saga.status_code == 200, saga.text
    assert saga.json()["state"] == "running"
    assert saga.json()["assignee"] == seen["assignee"]
    history = {e["event_id"] for e in api.get(f"/complaints/{cid}/history").json()["events"]}
    while True:
        trail = api.get("/audit", params={"correlation_id": correlation}).json()["items"]
        if history <= {item["event_id"] for item in trail}:
            break
        assert time.monotonic() < deadline, trail
        time.sleep(0.1)
    assert "CreateComplaint.accepted" in {item["type"] for item in trail}


def test_bad_input_names_the_field(api: httpx.Client) -> None:
    bad_email = api.post(
        "/complaints", json=body(customer={"id": "c", "name": "n", "email": "x@y"})
    )
    assert bad_email.status_code == 422, bad_email.text
    assert bad_email.json()["field"] == "customer.email"
    missing = api.post("/complaints", json={"store_id": "s"})
    assert missing.status_code == 400, missing.text
    assert "customer" in missing.text
    created = create(api)
    cid = created["id"]
    api.post(f"/complaints/{cid}/assign", json={"assignee": "a"})
    rejected = api.post(f"/complaints/{cid}/resolve", json={"resolution": "rejected"})
    assert rejected.status_code == 422, rejected.text
    assert rejected.json()["field"] == "reason"
    wrong = api.post(f"/complaints/{cid}/close", json={})
    assert wrong.status_code == 409, wrong.text
    assert "assigned" in wrong.json()["detail"]


def test_filters_and_keyset_pagination(api: httpx.Client) -> None:
    store = f"store-{uuid.uuid4().hex[:8]}"
    ids = []
    last = 0
    for n in range(5):
        created = create(api, store_id=store, priority="urgent" if n % 2 else "low")
        ids.append(created["id"])
        last = created["position"]
    answer = api.post(f"/complaints/{ids[0]}/assign", json={"assignee": "agent-9"})
    last = answer.json()["position"]

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"store_id": store, "limit": 2, "min_position": last}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/complaints", params=params)
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert seen == sorted(seen)  # key order, no duplicate across pages

    urgent = api.get("/complaints", params={"store_id": store, "priority": "urgent"}).json()
    assert {item["id"] for item in urgent["items"]} == {ids[1], ids[3]}
    assigned = api.get("/complaints", params={"store_id": store, "status": "assigned"}).json()
    assert [item["id"] for item in assigned["items"]] == [ids[0]]
    by_assignee = api.get("/complaints", params={"assignee": "agent-9", "store_id": store}).json()
    assert [item["id"] for item in by_assignee["items"]] == [ids[0]]
    none_yet = api.get(
        "/complaints", params={"store_id": store, "created_before": "2000-01-01T00:00:00Z"}
    ).json()
    assert none_yet["items"] == []
    assert api.get("/complaints", params={"status": "lost"}).status_code == 400


def test_stats_count_by_status_and_store(api: httpx.Client) -> None:
    store = f"store-{uuid.uuid4().hex[:8]}"
    first = create(api, store_id=store)
    create(api, store_id=store)
    cid = first["id"]
    api.post(f"/complaints/{cid}/assign", json={"assignee": "a"})
    resolved = api.post(f"/complaints/{cid}/resolve", json={"resolution": "voucher"})
    assert resolved.status_code == 200, resolved.text
    deadline = time.monotonic() + 10
    while True:
        stats = api.get("/stats", params={"store_id": store}).json()
        if stats["resolved"] == 1 and stats["by_status"].get("opened") == 1:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["stores"][0]["store_id"] == store
    assert stats["by_status"]["resolved"] == 1
    assert stats["mean_resolution_seconds"] is not None
    assert stats["sla_breaches"] == 0
    metrics = api.get("/metrics").text
    assert 'command_executions_total{command="resolve",outcome="ok"}' in metrics
    assert 'command_duration_seconds_count{command="create"}' in metrics
    assert 'projection_updates_total{projection="store-stats"}' in metrics
    assert 'query_executions_total{outcome="ok",query="stats"}' in metrics


def test_the_openapi_schema_is_served(api: httpx.Client) -> None:
    schema = api.get("/schema/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/complaints" in paths
    assert "/complaints/{complaint_id}/resolve" in paths


def test_min_position_beyond_the_store_is_refused_and_zero_waits_for_nothing(
    api: httpx.Client,
) -> None:
    created = create(api)
    beyond = created["position"] + 1_000_000
    one = api.get(f"/complaints/{created['id']}", params={"min_position": beyond})
    assert one.status_code == 400, one.text
    assert "beyond the last event" in one.json()["detail"]
    many = api.get("/complaints", params={"min_position": beyond})
    assert many.status_code == 400, many.text
    store = f"store-{uuid.uuid4().hex[:8]}"
    empty = api.get("/complaints", params={"store_id": store, "min_position": 0})
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"items": [], "next_cursor": None}


def test_a_command_nobody_answers_is_503_with_retry_after_and_metrics_count_the_rest(
    tmp_path: Path,
) -> None:
    """The aggregate actor stuck (here: a consumer of complaint.commands that never answers):
    the gateway waits ``command_timeout``, then says 503 with Retry-After, and that retrying
    with the same Idempotency-Key is safe."""
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        """
grace_period: 1s
actors:
  complaints:
    kind: aggregate
    handler: tests.support.handlers:Mute
    queue: complaint.commands
    retry: {handler_timeout: 1h}
  gateway:
    kind: gateway
    handler: actors.complaints.api:ComplaintGateway
    options: {command_timeout: 0.5}
""",
        encoding="utf-8",
    )
    with magasin_running({}, tmp_path / "magasin.log", topology=str(topology)) as url:
        answer = httpx.post(f"{url}/complaints", json=body(), timeout=10)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        missing = httpx.get(f"{url}/complaints/nobody", timeout=10)
        metrics_after = httpx.get(f"{url}/metrics", timeout=10).text
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert "Idempotency-Key" in answer.json()["detail"]
    assert "command_executions_total{" not in metrics  # HELP and TYPE only: nothing executed
    assert missing.status_code == 404
    assert 'query_executions_total{outcome="404",query="complaint"} 1' in metrics_after
