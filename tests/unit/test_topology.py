"""The topology file: what loads, what it means, and how every mistake in it is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.bus.protocol import Binding
from runtime.errors import MagasinError, TopologyError
from runtime.naming import dead_letter_queue, retry_queue
from runtime.topology import (
    DEFAULT_EXCHANGES,
    ActorSpec,
    RetrySpec,
    Topology,
    format_duration,
    load_topology,
    parse_duration,
    parse_topology,
    resolve_handler,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = ROOT / "topology.yaml"
FULL_FILE = ROOT / "tests" / "fixtures" / "topology-full.yaml"
RELAY_ONLY = "actors:\n  relay:\n    kind: relay\n"


def parse(text: str, env: dict[str, str] | None = None) -> Topology:
    return parse_topology(text, "t.yaml", env or {}, check_handlers=False)


def projection(extra: str = "") -> str:
    return f"actors:\n  list:\n    kind: projection\n    handler: m:List\n{extra}"


# --- the files shipped -----------------------------------------------------------------------


def test_the_default_topology_yaml_loads_with_its_handlers_checked() -> None:
    topology = load_topology(DEFAULT_FILE, env={})

    assert list(topology.actors) == [
        "relay",
        "complaints",
        "complaint-list",
        "complaint-workload",
        "complaint-store-stats",
        "resolution-saga",
        "saga-timers",
        "payments",
        "notifications",
        "audit",
        "gateway",
    ]
    assert topology.actors["complaints"].queue == "complaint.commands"
    assert topology.actors["audit"].queue == "audit.all.events"
    assert topology.actors["resolution-saga"].queue == "saga.orchestration"
    assert topology.actors["gateway"].handler == "actors.complaints.api:ComplaintGateway"
    assert topology.database_url == "memory://"
    assert topology.amqp_url == "memory://"
    assert topology.http.port == 8080
    assert topology.exchanges == DEFAULT_EXCHANGES


def test_the_full_topology_plans_the_queues_of_the_design_document() -> None:
    topology = load_topology(FULL_FILE, env={}, check_handlers=False)
    plan = topology.bus_plan()
    queues = {queue.name: queue for queue in plan.queues}

    assert [exchange.name for exchange in plan.exchanges] == list(DEFAULT_EXCHANGES)
    assert {exchange.type for exchange in plan.exchanges} == {"topic"}
    assert {"complaint.commands", "audit.all.events", "saga.orchestration"} <= set(queues)
    assert queues["complaint.commands"].bindings == ()
    # The domain's events are read from its stream, the other exchanges through queues.
    assert [stream.name for stream in plan.streams] == ["complaints.events"]
    assert queues["audit.all.events"].bindings == tuple(
        Binding(exchange=name, routing_key="#")
        for name in ("saga.events", "notifications.events", "audit.events")
    )
    assert queues["saga.orchestration"].bindings == ()
    audit = topology.actors["audit"]
    assert audit.stream_bindings(topology.stream_names) == {"complaints.events": ("#",)}
    assert queues["complaint.commands"].retry_delays == (1.0, 5.0, 30.0)
    assert queues["audit.all.events"].retry_delays == (1.0, 5.0, 30.0, 120.0)
    assert queues["saga.orchestration"].queue_type == "quorum"
    assert queues["saga.orchestration"].delivery_limit == 20


def test_the_plan_text_names_every_retry_queue_and_dead_letter_queue() -> None:
    topology = load_topology(FULL_FILE, env={}, check_handlers=False)
    text = topology.plan_text()

    for queue in ("complaint.commands", "audit.all.events", "saga.orchestration"):
        assert f"queue {queue}" in text
        assert f"{retry_queue(queue, 1)} (1s)" in text
        assert f"{retry_queue(queue, 3)} (30s)" in text
        assert dead_letter_queue(queue) in text
    assert f"{retry_queue('audit.all.events', 4)} (2m)" in text
    assert "actors.complaints.handler:ComplaintActor" in text


def test_actors_keep_the_order_of_the_file() -> None:
    topology = load_topology(FULL_FILE, env={}, check_handlers=False)

    assert list(topology.actors) == [
        "relay",
        "complaints",
        "complaint-list",
        "audit",
        "resolution-saga",
        "notifications",
        "gateway",
    ]


def test_the_plan_hides_the_password_of_a_url() -> None:
    topology = parse(RELAY_ONLY, {"MAGASIN_DATABASE_URL": "postgresql://app:s3cret@db/magasin"})

    assert topology.database_url == "postgresql://app:s3cret@db/magasin"
    assert "s3cret" not in topology.plan_text()
    assert "postgresql://app:***@db/magasin" in topology.plan_text()


# --- interpolation and the environment -------------------------------------------------------


def test_a_set_variable_is_interpolated() -> None:
    topology = parse("amqp_url: amqp://${HOST}:5672/\n" + RELAY_ONLY, {"HOST": "rabbit"})

    assert topology.amqp_url == "amqp://rabbit:5672/"


@pytest.mark.parametrize("env", [{}, {"HOST": ""}], ids=["unset", "empty"])
def test_an_unset_or_empty_variable_takes_its_default(env: dict[str, str]) -> None:
    topology = parse("amqp_url: amqp://${HOST:-localhost}/\n" + RELAY_ONLY, env)

    assert topology.amqp_url == "amqp://localhost/"


def test_an_unset_variable_without_default_is_an_error_naming_it() -> None:
    with pytest.raises(TopologyError) as caught:
        parse(RELAY_ONLY + "amqp_url: ${BROKER}\n")

    assert caught.value.path == "amqp_url"
    assert caught.value.line == 4
    assert "environment variable BROKER is not set" in str(caught.value)


def test_a_whole_reference_to_a_number_is_a_number_even_in_a_flow_mapping() -> None:
    topology = parse("http: {host: 0.0.0.0, port: ${PORT:-8081}}\n" + RELAY_ONLY)

    assert topology.http.port == 8081
    assert topology.http.host == "0.0.0.0"


def test_a_whole_reference_to_a_boolean_is_a_boolean() -> None:
    assert parse("admin: ${ADMIN:-true}\n" + RELAY_ONLY).admin is True


def test_a_quoted_or_tagged_reference_stays_a_string() -> None:
    quoted = parse('database_url: "${DB:-5432}"\n' + RELAY_ONLY)
    tagged = parse("database_url: !!str ${DB:-5432}\n" + RELAY_ONLY)

    assert quoted.database_url == tagged.database_url == "5432"


def test_a_doubled_dollar_writes_a_literal_reference() -> None:
    assert parse("database_url: $${NOT_READ}\n" + RELAY_ONLY).database_url == "${NOT_READ}"


def test_references_in_comments_are_ignored() -> None:
    assert parse("# see ${UNSET_IN_COMMENT} and ${broken\n" + RELAY_ONLY).actors


def test_a_malformed_reference_is_an_error() -> None:
    with pytest.raises(TopologyError, match=r"invalid reference '\$\{DB:5432\}'"):
        parse("database_url: ${DB:5432}\n" + RELAY_ONLY)


@pytest.mark.parametrize(
    ("variable", "key"),
    [("MAGASIN_DATABASE_URL", "database_url"), ("MAGASIN_AMQP_URL", "amqp_url")],
)
def test_an_environment_url_overrides_the_file(variable: str, key: str) -> None:
    text = "database_url: postgresql://file/db\namqp_url: amqp://file/\n" + RELAY_ONLY

    topology = parse(text, {variable: "from-env://x"})

    assert getattr(topology, key) == "from-env://x"


def test_magasin_http_port_overrides_the_file() -> None:
    topology = parse("http: {port: 9000}\n" + RELAY_ONLY, {"MAGASIN_HTTP_PORT": "9100"})

    assert topology.http.port == 9100


def test_an_empty_environment_variable_overrides_nothing() -> None:
    topology = parse("http: {port: 9000}\n" + RELAY_ONLY, {"MAGASIN_HTTP_PORT": ""})

    assert topology.http.port == 9000


@pytest.mark.parametrize("port", ["eighty", "80.5", "70000", "-1"])
def test_a_bad_magasin_http_port_is_an_error_naming_the_variable(port: str) -> None:
    with pytest.raises(TopologyError) as caught:
        parse(RELAY_ONLY, {"MAGASIN_HTTP_PORT": port})

    assert caught.value.path == "http.port"
    assert "MAGASIN_HTTP_PORT must be a port number" in str(caught.value)


# --- defaults ----------------------------------------------------------------------------------


def test_an_actor_without_policies_gets_the_defaults() -> None:
    text = (
        "defaults:\n"
        "  retry: {delays: [2s], max_attempts: 2}\n"
        "  restart: {max_restarts: 3}\n"
        "  prefetch: 8\n"
        "  queue_type: classic\n"
        "  delivery_limit: 5\n" + projection()
    )

    actor = parse(text).actors["list"]

    assert actor.retry == RetrySpec(delays=(2.0,), max_attempts=2)
    assert actor.restart.max_restarts == 3
    assert actor.restart.min_backoff == 0.5
    assert (actor.prefetch, actor.queue_type, actor.delivery_limit) == (8, "classic", 5)


def test_an_actors_partial_retry_overrides_only_the_keys_it_gives() -> None:
    text = "defaults:\n  retry: {delays: [2s, 4s], handler_timeout: 9s}\n" + projection(
        "    retry: {max_attempts: 7}\n    restart: {max_backoff: 5s}\n"
    )

    actor = parse(text).actors["list"]

    assert actor.retry == RetrySpec(delays=(2.0, 4.0), max_attempts=7, handler_timeout=9.0)
    assert (actor.restart.min_backoff, actor.restart.max_backoff) == (0.5, 5.0)


def test_a_consuming_actor_consumes_its_own_name_unless_it_names_a_queue() -> None:
    text = projection("    queues:\n      - {name: list.extra, type: classic}\n")

    actor = parse(text).actors["list"]

    assert actor.queue == "list"
    assert actor.queue_names == ("list", "list.extra")
    assert actor.work_queues[1].type == "classic"
    assert actor.work_queues[1].delivery_limit == 20


def test_extra_queues_inherit_the_actors_queue_type_and_delivery_limit() -> None:
    text = projection(
        "    queue_type: classic\n    delivery_limit: 3\n    queues: [{name: list.extra}]\n"
    )

    extra = parse(text).actors["list"].work_queues[1]

    assert (extra.type, extra.delivery_limit) == ("classic", 3)


def test_top_level_x_keys_hold_anchors_to_reuse() -> None:
    text = "x-fast: &fast {delays: [1s], max_attempts: 2}\n" + projection("    retry: *fast\n")

    assert parse(text).actors["list"].retry == RetrySpec(delays=(1.0,), max_attempts=2)


def test_actors_that_consume_nothing_have_no_queue() -> None:
    actor = parse(RELAY_ONLY).actors["relay"]

    assert (actor.queue, actor.queue_names, actor.handler) == (None, (), None)


def test_a_reload_sees_which_actors_changed_by_comparing_specs() -> None:
    before = parse(projection("    consumers: 2\n") + "  relay: {kind: relay}\n")
    after = parse(projection("    consumers: 3\n") + "  relay: {kind: relay}\n")

    assert before.actors["relay"] == after.actors["relay"]
    assert before.actors["list"] != after.actors["list"]
    assert parse(RELAY_ONLY) == parse(RELAY_ONLY)


@pytest.mark.parametrize(
    ("failures", "rung", "delay"),
    [(1, 1, 1.0), (2, 2, 5.0), (3, 3, 30.0), (4, 3, 30.0), (5, None, None)],
)
def test_the_retry_ladder_reuses_its_last_rung_then_dead_letters(
    failures: int, rung: int | None, delay: float | None
) -> None:
    retry = RetrySpec(delays=(1.0, 5.0, 30.0), max_attempts=5)

    assert retry.rung_after(failures) == rung
    assert retry.delay_after(failures) == delay


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("0.5s", 0.5),
        ("2s", 2.0),
        ("2m", 120.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        (" 10 s ", 10.0),
        ("7", 7.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations_are_read_in_every_unit(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "s", "-1s", "0s", "1d", "1e3s", 0, -2, True, None, [1]])
def test_a_bad_duration_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_durations_in_the_file_become_seconds() -> None:
    text = "grace_period: 1500ms\n" + projection("    retry: {delays: [100ms, 2s, 1m]}\n")

    topology = parse(text)

    assert topology.grace_period == 1.5
    assert topology.actors["list"].retry.delays == (0.1, 2.0, 60.0)


@given(
    number=st.integers(min_value=1, max_value=10**9),
    unit=st.sampled_from(["ms", "s", "m", "h"]),
)
def test_a_formatted_duration_parses_back_to_its_seconds(number: int, unit: str) -> None:
    expected = {"ms": number / 1000, "s": float(number), "m": number * 60.0, "h": number * 3600.0}

    assert parse_duration(f"{number}{unit}") == expected[unit]


@given(seconds=st.integers(min_value=1, max_value=10**6).map(lambda n: n / 1000))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


# --- every mistake names its path ---------------------------------------------------------------


ERRORS = [
    pytest.param(
        projection("    consumers: four\n"),
        "actors.list.consumers",
        "expected an integer, got 'four'",
        id="wrong type",
    ),
    pytest.param(
        projection("    consumers: 0\n"),
        "actors.list.consumers",
        "expected an integer ≥ 1, got 0",
        id="out of range",
    ),
    pytest.param(
        projection("    consumer: 2\n"),
        "actors.list.consumer",
        "unknown key 'consumer'; did you mean 'consumers'?",
        id="unknown key",
    ),
    pytest.param(
        "actorz: {}\n" + RELAY_ONLY, "actorz", "unknown key 'actorz'", id="unknown top key"
    ),
    pytest.param(
        "actors:\n  a:\n    handler: m:A\n",
        "actors.a.kind",
        "this key is required (one of: aggregate,",
        id="missing kind",
    ),
    pytest.param("exchanges: []\n", "actors", "this key is required", id="missing actors"),
    pytest.param("actors: {}\n", "actors", "declare at least one actor", id="no actor"),
    pytest.param(
        "actors:\n  a:\n    kind: worker\n",
        "actors.a.kind",
        "expected one of aggregate, projection, saga, subscriber, service, relay, gateway",
        id="unknown kind",
    ),
    pytest.param(
        "actors:\n  a:\n    kind: relay\n  a:\n    kind: gateway\n",
        "actors.a",
        "duplicate key 'a' (first at line 2)",
        id="duplicate actor",
    ),
    pytest.param(
        projection("    consumers: 1\n    consumers: 2\n"),
        "actors.list.consumers",
        "duplicate key 'consumers'",
        id="duplicate key",
    ),
    pytest.param(
        projection("    queue: q\n") + "  other:\n    kind: saga\n    handler: m:S\n    queue: q\n",
        "actors.other.queue",
        "queue 'q' is already consumed by actor 'list'",
        id="duplicate queue across actors",
    ),
    pytest.param(
        projection("    queues: [{name: list}]\n"),
        "actors.list.queues[0].name",
        "queue 'list' is already consumed by this actor",
        id="duplicate queue in one actor",
    ),
    pytest.param(
        projection("    queue: other.dlq\n"),
        "actors.list.queue",
        "clashes with the derived queues",
        id="queue named like a dead-letter queue",
    ),
    pytest.param(
        projection("    queue: other.retry.2\n"),
        "actors.list.queue",
        "are the retry queues of another queue",
        id="queue named like a retry queue",
    ),
    pytest.param(
        projection("    queue: amq.mine\n"),
        "actors.list.queue",
        "belong to RabbitMQ",
        id="reserved queue name",
    ),
    pytest.param(
        projection("    bind: {orders.events: ['#']}\n"),
        "actors.list.bind.orders.events",
        "exchange 'orders.events' is not declared in exchanges",
        id="undeclared exchange",
    ),
    pytest.param(
        projection("    queues: [{name: x, bind: {orders.events: ['#']}}]\n"),
        "actors.list.queues[0].bind.orders.events",
        "exchange 'orders.events' is not declared",
        id="undeclared exchange of an extra queue",
    ),
    pytest.param(
        "domains: {order: orders.events}\n" + RELAY_ONLY,
        "domains.order",
        "exchange 'orders.events' is not declared",
        id="undeclared domain exchange",
    ),
    pytest.param(
        "exchanges: [a.events, a.events]\n" + RELAY_ONLY,
        "exchanges[1]",
        "listed twice",
        id="duplicate exchange",
    ),
    pytest.param(
        projection("    bind: {complaints.events: ['complaint..x']}\n"),
        "actors.list.bind.complaints.events[0]",
        "invalid routing key 'complaint..x'",
        id="empty routing key word",
    ),
    pytest.param(
        projection("    bind: {complaints.events: ['complaint.#x']}\n"),
        "actors.list.bind.complaints.events[0]",
        "invalid routing key 'complaint.#x'",
        id="wildcard inside a word",
    ),
    pytest.param(
        projection("    bind: {complaints.events: 'complaint.#'}\n"),
        "actors.list.bind.complaints.events",
        "expected a list, got 'complaint.#'",
        id="routing keys not a list",
    ),
    pytest.param(
        "actors:\n  s:\n    kind: saga\n",
        "actors.s.handler",
        "this key is required for a saga actor",
        id="handler missing",
    ),
    pytest.param(
        "actors:\n  s:\n    kind: service\n    handler: just_a_module\n",
        "actors.s.handler",
        "expected a dotted path such as package.module:Attribute",
        id="handler malformed",
    ),
    pytest.param(
        "actors:\n  r:\n    kind: relay\n    queue: r\n",
        "actors.r.queue",
        "a relay actor consumes no queue",
        id="queue on a relay",
    ),
    pytest.param(
        "actors:\n  g:\n    kind: gateway\n    name: gw\n",
        "actors.g.name",
        "an actor's name is its key under actors",
        id="name key",
    ),
    pytest.param(
        "actors:\n  bad name:\n    kind: relay\n",
        "actors.bad name",
        "an actor name is letters, digits",
        id="actor name with a space",
    ),
    pytest.param(
        "actors:\n  1: {kind: relay}\n", "actors", "keys must be strings, got 1", id="int key"
    ),
    pytest.param(
        "grace_period: soon\n" + RELAY_ONLY,
        "grace_period",
        "expected a duration such as 500ms, 2s, 1.5m or 1h, got 'soon'",
        id="bad duration",
    ),
    pytest.param(
        projection("    retry: {delays: [1s, -5s]}\n"),
        "actors.list.retry.delays[1]",
        "got '-5s'",
        id="negative delay",
    ),
    pytest.param(
        projection("    retry: {delays: []}\n"),
        "actors.list.retry.delays",
        "expected a list with at least 1 item, got an empty list",
        id="no delay",
    ),
    pytest.param(
        projection("    retry: {max_attempts: 0}\n"),
        "actors.list.retry.max_attempts",
        "expected an integer ≥ 1, got 0",
        id="no attempt",
    ),
    pytest.param(
        projection("    restart: {min_backoff: 40s}\n"),
        "actors.list.restart",
        "min_backoff (40s) must not exceed max_backoff (30s)",
        id="backoff bounds",
    ),
    pytest.param(
        "defaults:\n  restart: {jitter: 1}\n" + RELAY_ONLY,
        "defaults.restart.jitter",
        "expected a number < 1, got 1",
        id="jitter",
    ),
    pytest.param(
        "defaults:\n  restart: {type: forever}\n" + RELAY_ONLY,
        "defaults.restart.type",
        "expected one of permanent, transient, temporary",
        id="restart type",
    ),
    pytest.param(
        "log: {format: xml}\n" + RELAY_ONLY, "log.format", "expected one of text, json", id="log"
    ),
    pytest.param(
        "http: 8080\n" + RELAY_ONLY, "http", "expected a mapping, got 8080", id="not a mapping"
    ),
    pytest.param(
        "http: {port: ${PORT:-http}}\n" + RELAY_ONLY,
        "http.port",
        "expected an integer, got 'http'",
        id="interpolated port not a number",
    ),
    pytest.param("", "", "the file is empty", id="empty file"),
    pytest.param("# only a comment\n", "", "the file is empty", id="only comments"),
    pytest.param("- relay\n- gateway\n", "", "must be a mapping of settings", id="a list"),
    pytest.param("just text\n", "", "must be a mapping of settings", id="a string"),
    pytest.param("actors:\n  a: [\n", "", "invalid YAML", id="syntax error"),
    pytest.param("actors:\n\ta: 1\n", "", "invalid YAML", id="tab"),
    pytest.param("a: 1\n---\nb: 2\n", "", "invalid YAML", id="two documents"),
]


@pytest.mark.parametrize(("text", "path", "phrase"), ERRORS)
def test_every_mistake_names_its_path_in_a_plain_sentence(
    text: str, path: str, phrase: str
) -> None:
    with pytest.raises(TopologyError) as caught:
        parse(text)

    error = caught.value
    assert error.path == path
    assert phrase in error.reason
    assert str(error).startswith("t.yaml")
    assert f": {path}: " in str(error) if path else True
    assert isinstance(error, MagasinError)


def test_an_error_carries_the_file_and_the_line() -> None:
    with pytest.raises(TopologyError) as caught:
        parse(projection("    prefetch: 16\n    consumers: four\n"))

    error = caught.value
    assert (error.source, error.line, error.path) == ("t.yaml", 6, "actors.list.consumers")
    assert str(error) == "t.yaml:6: actors.list.consumers: expected an integer, got 'four'"


def test_a_yaml_syntax_error_reports_its_line() -> None:
    with pytest.raises(TopologyError) as caught:
        parse("actors:\n  a:\n    kind: relay\n   bad: 1\n")

    assert caught.value.line == 4


def test_a_missing_file_is_a_topology_error() -> None:
    with pytest.raises(TopologyError, match="cannot read the topology file"):
        load_topology(ROOT / "no-such-topology.yaml")


# --- handlers ----------------------------------------------------------------------------------


def test_a_handler_that_does_not_import_names_the_module_error() -> None:
    text = "actors:\n  c:\n    kind: aggregate\n    handler: magasin_absent.handler:Actor\n"

    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "t.yaml", {})

    assert caught.value.path == "actors.c.handler"
    assert caught.value.line == 4
    assert caught.value.reason == (
        "cannot import 'magasin_absent.handler:Actor': No module named 'magasin_absent'"
    )


def test_a_handler_missing_from_its_module_is_named() -> None:
    text = "actors:\n  c:\n    kind: service\n    handler: runtime.naming:NoSuchThing\n"

    with pytest.raises(TopologyError, match=r"module 'runtime\.naming' has no attribute"):
        parse_topology(text, "t.yaml", {})


def test_handler_checks_can_be_turned_off() -> None:
    text = "actors:\n  c:\n    kind: service\n    handler: magasin_absent:Actor\n"

    assert parse_topology(text, env={}, check_handlers=False).actors["c"].handler


def test_resolve_handler_imports_the_named_object() -> None:
    spec = ActorSpec(name="c", kind="service", handler="runtime.naming:retry_queue")

    assert resolve_handler(spec) is retry_queue


# --- magasin check -----------------------------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_magasin_check_prints_the_plan_of_a_valid_topology() -> None:
    result = run_check("topology.yaml")

    assert result.returncode == 0, result.stderr
    assert "relay (relay)" in result.stdout
    assert "relay (relay)" in result.stdout
    assert "complaints.events" in result.stdout


def test_magasin_check_of_a_broken_file_exits_2_with_the_path_and_no_traceback(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "topology.yaml"
    broken.write_text(projection("    consumers: four\n"), encoding="utf-8")

    result = run_check(str(broken))

    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "actors.list.consumers: expected an integer, got 'four'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
