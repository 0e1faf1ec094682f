"""The topology: what runs, read from ``topology.yaml`` into frozen, validated structs.

``load_topology(path)`` goes through these steps, each failure a :class:`TopologyError` that
names the YAML path (``actors.complaints.consumers``) and, when known, its line:

1. YAML nodes: syntax checked, duplicate keys refused (PyYAML would keep the last one);
   ``${VAR}`` / ``${VAR:-default}`` interpolated in scalars, and a plain scalar that is one
   whole ``${...}`` is typed again, so ``port: ${MAGASIN_HTTP_PORT:-8080}`` is the int 8080.
2. Environment overrides: MAGASIN_DATABASE_URL, MAGASIN_AMQP_URL, MAGASIN_HTTP_PORT.
3. Durations (``500ms``, ``2s``, ``1.5m``, ``1h`` or a number of seconds) become float seconds.
4. ``defaults`` are merged into every actor, so an :class:`ActorSpec` has no optional policy.
5. msgspec turns the data into the structs below; cross checks follow (exchanges, routing keys,
   queue names, handlers).

The structs compare by value, so a SIGHUP reload can tell which actors changed with ``==``.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import types
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
import yaml

from runtime.bus.protocol import Binding, BusPlan, ExchangeSpec, QueueSpec, StreamSpec
from runtime.errors import TopologyError
from runtime.naming import DEAD_LETTER_EXCHANGE, dead_letter_queue, retry_queue

ENV_DATABASE_URL = "MAGASIN_DATABASE_URL"
ENV_AMQP_URL = "MAGASIN_AMQP_URL"
ENV_HTTP_PORT = "MAGASIN_HTTP_PORT"
ENV_STREAM_URL = "MAGASIN_STREAM_URL"

DEFAULT_EXCHANGES = ("complaints.events", "audit.events", "saga.events", "notifications.events")

Kind = Literal["aggregate", "projection", "saga", "subscriber", "service", "relay", "gateway"]
KINDS: tuple[str, ...] = get_args(Kind)
#: Kinds that consume queues (their queue defaults to the actor's name).
CONSUMING_KINDS = frozenset({"aggregate", "projection", "saga", "subscriber"})
#: Kinds without a runtime built-in: the topology must name their handler.
HANDLER_REQUIRED_KINDS = CONSUMING_KINDS | {"service"}

QueueType = Literal["quorum", "classic"]
RestartType = Literal["permanent", "transient", "temporary"]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _DurationMarker:
    """Marks a field that accepts ``500ms``, ``2s``, ``1.5m``, ``1h`` or a number of seconds."""


_DURATION = _DurationMarker()
Duration = Annotated[float, msgspec.Meta(gt=0), _DURATION]


# --- the structs ---------------------------------------------------------------------------


class HttpSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080


class LogSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: LogLevel = "INFO"
    format: Literal["text", "json"] = "text"


class RestartSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the supervisor restarts a crashed actor (the types are OTP's)."""

    type: RestartType = "permanent"
    min_backoff: Duration = 0.5
    max_backoff: Duration = 30.0
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 10  # within `window`, then escalate
    window: Duration = 60.0
    reset_after: Duration = 30.0  # this long without a crash resets the backoff

    def __post_init__(self) -> None:
        if self.min_backoff > self.max_backoff:
            raise ValueError(
                f"min_backoff ({format_duration(self.min_backoff)}) must not exceed "
                f"max_backoff ({format_duration(self.max_backoff)})"
            )


class RetrySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The retry ladder of a failing handler: one retry queue per delay, then the DLQ."""

    delays: Annotated[tuple[Duration, ...], msgspec.Meta(min_length=1)] = (1.0, 5.0, 30.0)
    max_attempts: PositiveInt = 4  # handling attempts in all, the first one included
    handler_timeout: Duration = 30.0

    def rung_after(self, failures: int) -> int | None:
        """The retry rung (from 1) after ``failures`` failed attempts; None: dead-letter it."""
        if failures < 1:
            raise ValueError(f"failures count from 1, got {failures}")
        if failures >= self.max_attempts:
            return None
        return min(failures, len(self.delays))

    def delay_after(self, failures: int) -> float | None:
        """Seconds to wait after ``failures`` failed attempts; None: dead-letter it."""
        rung = self.rung_after(failures)
        return None if rung is None else self.delays[rung - 1]


class ActorQueue(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A queue an actor consumes, with its bindings (exchange → routing keys)."""

    name: str
    bind: dict[str, tuple[str, ...]] = {}
    type: QueueType = "quorum"
    delivery_limit: PositiveInt = 20

    @property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(
            Binding(exchange=exchange, routing_key=key)
            for exchange, keys in self.bind.items()
            for key in keys
        )


class StreamsSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Retention of the domains' streams: what is older than ``max_age`` or beyond
    ``max_length_bytes`` goes, a whole segment at a time."""

    max_age: Duration | None = 7 * 24 * 3600.0
    max_length_bytes: Annotated[int, msgspec.Meta(ge=1)] | None = 20 * 1024**3
    max_segment_size_bytes: Annotated[int, msgspec.Meta(ge=1, le=3 * 1024**3)] = 100 * 1024**2


class Defaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    restart: RestartSpec = RestartSpec()
    retry: RetrySpec = RetrySpec()
    prefetch: PositiveInt = 32
    queue_type: QueueType = "quorum"
    delivery_limit: PositiveInt = 20


class ActorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One actor, with the defaults already merged in (``name`` is its key under ``actors``)."""

    name: str
    kind: Kind
    handler: str | None = None  # "package.module:Attribute"; None: the runtime's built-in
    queue: str | None = None  # loaded consuming actors always have one (default: the name)
    bind: dict[str, tuple[str, ...]] = {}
    queues: tuple[ActorQueue, ...] = ()  # extra queues, after `queue`
    consumers: PositiveInt = 1
    prefetch: PositiveInt = 32
    # Deliveries a worker hands at once to a handler with ``handle_batch`` (one transaction).
    batch_size: PositiveInt = 64
    queue_type: QueueType = "quorum"
    delivery_limit: PositiveInt = 20
    retry: RetrySpec = RetrySpec()
    restart: RestartSpec = RestartSpec()
    options: dict[str, Any] = {}

    @property
    def consumes(self) -> bool:
        return self.kind in CONSUMING_KINDS

    @property
    def work_queues(self) -> tuple[ActorQueue, ...]:
        """Every queue the actor consumes, its own first. Its bindings to domain exchanges
        are not among the queue's: those events are read from the domain's stream."""
        if not self.consumes:
            return ()
        own = ActorQueue(
            name=self.queue or self.name,
            bind=self.bind,
            type=self.queue_type,
            delivery_limit=self.delivery_limit,
        )
        return (own, *self.queues)

    def stream_bindings(self, streams: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """The streams (of ``streams``: the domain exchanges) this actor reads, with the
        routing keys it keeps."""
        return {name: keys for name, keys in self.bind.items() if name in streams and keys}

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(queue.name for queue in self.work_queues)


class Topology(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    actors: dict[str, ActorSpec]  # in file order: the order actors start in
    database_url: str = "memory://"
    amqp_url: str = "memory://"
    http: HttpSpec = HttpSpec()
    log: LogSpec = LogSpec()
    admin: bool = False  # enables the crash endpoint
    grace_period: Duration = 10.0  # how long SIGTERM waits for in-flight messages
    exchanges: tuple[str, ...] = DEFAULT_EXCHANGES  # topic, durable
    domains: dict[str, str] = msgspec.field(
        default_factory=lambda: {"complaint": "complaints.events"}
    )  # aggregate type → the exchange the relay publishes its events to
    defaults: Defaults = Defaults()
    # Each domain exchange's events go to the stream of the same name, kept this long.
    streams: StreamsSpec = StreamsSpec()
    # The stream protocol's address; None: the AMQP URL's host, user and vhost on port 5552.
    stream_url: str | None = None

    @property
    def stream_names(self) -> tuple[str, ...]:
        """The domains' streams, one per domain exchange, named after it."""
        return tuple(dict.fromkeys(self.domains.values()))

    def bus_plan(self) -> BusPlan:
        streams = self.stream_names
        return BusPlan(
            exchanges=tuple(ExchangeSpec(name=name, type="topic") for name in self.exchanges),
            queues=tuple(
                QueueSpec(
                    name=queue.name,
                    bindings=tuple(b for b in queue.bindings if b.exchange not in streams),
                    retry_delays=actor.retry.delays,
                    queue_type=queue.type,
                    delivery_limit=queue.delivery_limit,
                )
                for actor in self.actors.values()
                for queue in actor.work_queues
            ),
            streams=tuple(
                StreamSpec(
                    name=name,
                    max_age=self.streams.max_age,
                    max_length_bytes=self.streams.max_length_bytes,
                    max_segment_size_bytes=self.streams.max_segment_size_bytes,
                )
                for name in streams
            ),
        )

    def plan_text(self) -> str:
        return "\n".join(_plan_lines(self))


# --- durations -----------------------------------------------------------------------------

_DURATION_TEXT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?", re.ASCII)
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``500ms``, ``2s``, ``1.5m``, ``1h``."""
    if isinstance(value, str) and (match := _DURATION_TEXT.fullmatch(value.strip())):
        number, unit = match.groups()
        seconds = (
            float(number) / 1000 if unit == "ms" else float(number) * _SECONDS_PER_UNIT[unit or "s"]
        )
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"expected a duration such as 500ms, 2s, 1.5m or 1h, got {_show(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {_show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


# --- loading -------------------------------------------------------------------------------

_Path = tuple[str | int, ...]
_T = TypeVar("_T")


def load_topology(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_handlers: bool = True,
) -> Topology:
    """Read and validate a topology file; ``env`` defaults to ``os.environ``."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(
            f"cannot read the topology file: {exc.strerror or exc}", source=source
        ) from exc
    except UnicodeDecodeError as exc:
        raise TopologyError(f"the file is not UTF-8 text: {exc}", source=source) from exc
    return parse_topology(text, source, env, check_handlers=check_handlers)


def parse_topology(
    text: str,
    source: str = "<string>",
    env: Mapping[str, str] | None = None,
    *,
    check_handlers: bool = True,
) -> Topology:
    """Validate a topology given as YAML text (``source`` names it in errors)."""
    env = os.environ if env is None else env
    context = _Context(source)
    data = _read_yaml(text, context, env)
    if not isinstance(data, dict):
        raise context.error(
            (), f"the topology must be a mapping of settings (actors, ...), got {_show(data)}"
        )
    # top-level `x-...` keys hold YAML anchors to reuse (`x-fast: &fast {delays: [1s]}`)
    data = {key: value for key, value in data.items() if not str(key).startswith("x-")}
    _apply_env_overrides(data, env, context)
    data = _normalize_durations(data, Topology, (), context)
    defaults = context.convert(data.get("defaults", {}), Defaults, ("defaults",))
    if isinstance(data.get("actors"), dict):
        data["actors"] = {
            name: _merge_defaults(name, raw, defaults, context) if isinstance(raw, dict) else raw
            for name, raw in data["actors"].items()
        }
    topology = context.convert(data, Topology, ())
    _check(topology, context)
    if check_handlers:
        for actor in topology.actors.values():
            try:
                resolve_handler(actor)
            except TopologyError as exc:
                raise context.error(("actors", actor.name, "handler"), exc.reason) from exc
    return topology


#: Kinds the runtime implements itself when the topology names no handler.
BUILTIN_HANDLERS = {
    "gateway": "runtime.http:Gateway",
    "relay": "runtime.relay:Relay",
}


def handler_path(spec: ActorSpec) -> str | None:
    """The dotted path of the actor's code: its ``handler``, or the kind's built-in."""
    return spec.handler or BUILTIN_HANDLERS.get(spec.kind)


def resolve_handler(spec: ActorSpec) -> Any:
    """Import the object the actor's handler path names (``package.module:Attribute``):
    the class (or factory) called with an ``ActorContext`` to make the actor's handler."""
    path = f"actors.{spec.name}.handler"
    handler = handler_path(spec)
    if handler is None:
        raise TopologyError(f"the {spec.kind} actor names no handler", path=path)
    module_name, _, attribute = handler.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TopologyError(f"cannot import {handler!r}: {exc}", path=path) from exc
    except Exception as exc:  # importing user code can raise anything
        raise TopologyError(
            f"cannot import {handler!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}",
            path=path,
        ) from exc
    for part in attribute.split(".") if attribute else ():
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TopologyError(
                f"cannot import {handler!r}: module {module_name!r} has no attribute {attribute!r}",
                path=path,
            ) from None
    return target


class _Context:
    """The file being read: its name and the line of every YAML path, to word errors."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[_Path, int] = {}

    def line(self, path: _Path) -> int | None:
        for end in range(len(path), -1, -1):
            if (line := self.lines.get(path[:end])) is not None:
                return line
        return None

    def error(self, path: _Path, reason: str, line: int | None = None) -> TopologyError:
        return TopologyError(
            reason, path=_render(path), source=self.source, line=line or self.line(path)
        )

    def convert(self, value: object, typ: type[_T], prefix: _Path) -> _T:
        try:
            return msgspec.convert(value, typ)
        except msgspec.ValidationError as exc:
            raise self._explain(str(exc), value, typ, prefix) from None

    def _explain(self, message: str, value: object, typ: Any, prefix: _Path) -> TopologyError:
        """Word msgspec's ``Expected `int`, got `str` - at `$.a[...].b``` for a user."""
        message, _, where = (
            message.rpartition(" - at ") if " - at " in message else (message, "", "$")
        )
        key_error = where.startswith("`key` in ")
        segments = _segments(where.removeprefix("`key` in ").strip("`"))
        if _ANY_KEY in segments:  # msgspec does not say which key of a dict: find it
            cut = segments.index(_ANY_KEY)
            mapping = _lookup(value, segments[:cut])
            value_type = get_args(_unwrap(_type_at(typ, segments[:cut])))[-1]
            if isinstance(mapping, dict):
                for key, item in mapping.items():
                    self.convert(item, value_type, (*prefix, *segments[:cut], key))
            segments = segments[:cut]
        path = (*prefix, *segments)
        if key_error:
            mapping = _lookup(value, segments)
            keys = (
                [key for key in mapping if not isinstance(key, str)]
                if isinstance(mapping, dict)
                else []
            )
            return self.error(
                path, f"keys must be strings, got {_show(keys[0]) if keys else 'another type'}"
            )
        if found := re.fullmatch(r"Object missing required field `(.+)`", message):
            field = found.group(1)
            choices = _choices(_type_at(typ, (*segments, field)))
            hint = f" (one of: {', '.join(choices)})" if choices else ""
            return self.error((*path, field), f"this key is required{hint}", self.line(path))
        if found := re.fullmatch(r"Object contains unknown field `(.+)`", message):
            field = found.group(1)
            struct = _unwrap(_type_at(typ, segments))
            known = [
                f.name
                for f in msgspec.structs.fields(struct)
                if not (struct is ActorSpec and f.name == "name")  # the key under actors
            ]
            close = difflib.get_close_matches(field, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return self.error(
                (*path, field), f"unknown key {field!r}; {hint}known keys: {', '.join(known)}"
            )
        got = _show(_lookup(value, segments))
        if message.startswith("Invalid enum value"):
            choices = _choices(_type_at(typ, segments))
            return self.error(path, f"expected one of {', '.join(choices)}; got {got}")
        if found := re.fullmatch(r"Expected `(\w+)`(?:, got `\w+`)?( .*)?", message):
            noun, bound = _NOUNS.get(found.group(1), found.group(1)), found.group(2) or ""
            return self.error(path, f"expected {noun}{_word_bound(bound)}, got {got}")
        return self.error(path, message)  # a __post_init__ check: already a sentence


_ANY_KEY = "[...]"
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _segments(where: str) -> list[str | int]:
    tokens = re.findall(r"\.([^.\[]+)|\[(\d+)\]|(\[\.\.\.\])", where.removeprefix("$"))
    return [name or (int(index) if index else _ANY_KEY) for name, index, _ in tokens]


def _word_bound(bound: str) -> str:
    """`` >= 1`` → `` ≥ 1``; `` of length >= 1`` → `` with at least 1 item``."""
    if found := re.fullmatch(r" of length >= (\d+)", bound):
        count = int(found.group(1))
        return f" with at least {count} item{'s' if count > 1 else ''}"
    if found := re.fullmatch(r" (>=|>|<=|<) (\S+)", bound):
        symbol = {">=": "≥", ">": ">", "<=": "≤", "<": "<"}[found.group(1)]
        number = float(found.group(2))
        return f" {symbol} {int(number) if number.is_integer() else number}"
    return bound


def _render(path: _Path) -> str:
    text = ""
    for segment in path:
        text += f"[{segment}]" if isinstance(segment, int) else f".{segment}"
    return text.removeprefix(".")


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list | tuple):
        return "a list" if value else "an empty list"
    return repr(value)


def _lookup(value: object, path: _Path | list[str | int]) -> object:
    for segment in path:
        found = (isinstance(value, dict) and segment in value) or (
            isinstance(value, list) and isinstance(segment, int) and segment < len(value)
        )
        if not found:
            return None
        value = value[segment]  # type: ignore[index]
    return value


def _unwrap(typ: Any) -> Any:
    """``Annotated[X, ...]`` → X; ``X | None`` → X."""
    while True:
        if get_origin(typ) is Annotated:
            typ = get_args(typ)[0]
        elif get_origin(typ) in (Union, types.UnionType):
            arms = [arm for arm in get_args(typ) if arm is not type(None)]
            if len(arms) != 1:
                return typ
            typ = arms[0]
        else:
            return typ


def _type_at(typ: Any, path: _Path | list[str | int]) -> Any:
    for segment in path:
        typ = _unwrap(typ)
        if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
            fields = {f.name: f.type for f in msgspec.structs.fields(typ)}
            typ = fields.get(str(segment), Any)
        elif get_origin(typ) in (dict, list, tuple):
            typ = get_args(typ)[-1 if get_origin(typ) is dict else 0]
        else:
            return Any
    return typ


def _choices(typ: Any) -> tuple[str, ...]:
    typ = _unwrap(typ)
    return tuple(map(str, get_args(typ))) if get_origin(typ) is Literal else ()


def _normalize_durations(value: Any, typ: Any, path: _Path, context: _Context) -> Any:
    """Turn every value at a :data:`Duration` place into float seconds."""
    if value is not None and get_origin(typ) in (Union, types.UnionType):
        durations = [t for t in get_args(typ) if get_origin(t) is Annotated]
        if len(durations) == 1 and _DURATION in durations[0].__metadata__:
            typ = durations[0]  # ``Duration | None``
    if get_origin(typ) is Annotated and _DURATION in typ.__metadata__:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise context.error(path, str(exc)) from None
    typ = _unwrap(typ)
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct) and isinstance(value, dict):
        fields = {f.name: f.type for f in msgspec.structs.fields(typ)}
        return {
            key: _normalize_durations(item, fields[key], (*path, key), context)
            if key in fields
            else item
            for key, item in value.items()
        }
    if get_origin(typ) is dict and isinstance(value, dict):
        item_type = get_args(typ)[1]
        return {
            key: _normalize_durations(item, item_type, (*path, key), context)
            for key, item in value.items()
        }
    if get_origin(typ) in (list, tuple) and isinstance(value, list):
        item_type = get_args(typ)[0]
        return [
            _normalize_durations(item, item_type, (*path, index), context)
            for index, item in enumerate(value)
        ]
    return value


def _apply_env_overrides(data: dict[Any, Any], env: Mapping[str, str], context: _Context) -> None:
    for variable, key in (
        (ENV_DATABASE_URL, "database_url"),
        (ENV_AMQP_URL, "amqp_url"),
        (ENV_STREAM_URL, "stream_url"),
    ):
        if env.get(variable):
            data[key] = env[variable]
    port = env.get(ENV_HTTP_PORT, "").strip()
    if not port:
        return
    if not re.fullmatch(r"\d{1,5}", port, re.ASCII) or int(port) > 65535:
        raise context.error(
            ("http", "port"),
            f"{ENV_HTTP_PORT} must be a port number from 0 to 65535, got {port!r}",
        )
    http = data.setdefault("http", {})
    if isinstance(http, dict):
        http["port"] = int(port)


def _merge_defaults(
    name: str, raw: dict[Any, Any], defaults: Defaults, context: _Context
) -> dict[Any, Any]:
    """The actor's keys over ``defaults`` (retry and restart merged key by key)."""
    if "name" in raw:
        raise context.error(
            ("actors", name, "name"), "unknown key 'name': an actor's name is its key under actors"
        )
    merged: dict[Any, Any] = {"name": name, **raw}
    for key in ("retry", "restart"):
        given = raw.get(key, {})
        base = msgspec.structs.asdict(getattr(defaults, key))
        merged[key] = {**base, **given} if isinstance(given, dict) else given
    for key in ("prefetch", "queue_type", "delivery_limit"):
        merged.setdefault(key, getattr(defaults, key))
    if merged.get("kind") in CONSUMING_KINDS and merged.get("queue") is None:
        merged["queue"] = name
    if isinstance(extras := merged.get("queues"), list):
        # only sound values are inherited, so a bad one is reported where it is written
        inherited = {
            "type": merged["queue_type"]
            if merged["queue_type"] in get_args(QueueType)
            else defaults.queue_type,
            "delivery_limit": merged["delivery_limit"]
            if isinstance(merged["delivery_limit"], int) and merged["delivery_limit"] >= 1
            else defaults.delivery_limit,
        }
        merged["queues"] = [
            {**inherited, **extra} if isinstance(extra, dict) else extra for extra in extras
        ]
    return merged


# --- YAML with lines, duplicate keys and interpolation -------------------------------------

_RETYPED_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REFERENCE = re.compile(r"\$(\$?)\{([^}\n]*)(\}?)")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?")


class _Loader(yaml.SafeLoader):
    """A SafeLoader that remembers which scalars carry an explicit tag (``!!str``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.tagged: set[int] = set()

    def compose_scalar_node(self, anchor: dict[Any, yaml.Node]) -> yaml.ScalarNode:
        explicit = self.peek_event().tag not in (None, "!")  # type: ignore[no-untyped-call]
        node = super().compose_scalar_node(anchor)
        if explicit:
            self.tagged.add(id(node))
        return node


class _References:
    """``${...}`` swapped for plain words before YAML reads the text (its braces would end a
    flow mapping such as ``{port: ${PORT:-8080}}``), swapped back scalar by scalar after, when
    the YAML path and line of each one are known. References in comments vanish with them."""

    def __init__(self, text: str) -> None:
        marker = f"magasinref{uuid.uuid4().hex[:8]}n"
        self.found: list[re.Match[str]] = []
        self.placeholder = re.compile(re.escape(marker) + r"(\d+)n")
        self.text = _REFERENCE.sub(lambda match: f"{marker}{self._keep(match)}n", text)

    def _keep(self, match: re.Match[str]) -> int:
        self.found.append(match)
        return len(self.found) - 1


def _read_yaml(text: str, context: _Context, env: Mapping[str, str]) -> object:
    references = _References(text)
    loader = _Loader(references.text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise context.error((), "the file is empty; a topology declares at least `actors`")
        _walk(node, (), _Walk(loader, references, context, env))
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        problem = exc.problem or "syntax error"
        where = f" ({exc.context})" if exc.context else ""
        raise context.error((), f"invalid YAML{where}: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise context.error((), f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


class _Walk:
    def __init__(
        self,
        loader: _Loader,
        references: _References,
        context: _Context,
        env: Mapping[str, str],
    ) -> None:
        self.loader = loader
        self.references = references
        self.context = context
        self.env = env
        self.seen: set[int] = set()  # nodes already visited (aliases share nodes)


def _walk(node: yaml.Node, path: _Path, walk: _Walk) -> None:
    """Record lines, refuse duplicate keys and interpolate scalars, depth first."""
    walk.context.lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in walk.seen:
        return
    walk.seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        _interpolate(node, path, walk)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), walk)
    elif isinstance(node, yaml.MappingNode):
        first_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor` merges, it does not duplicate
                _walk(value_node, path, walk)
                continue
            _walk(key_node, path, walk)
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise walk.context.error(
                    (*path, key),
                    f"duplicate key {key!r} (first at line {first_lines[key]}); YAML would "
                    "silently keep only the last one: remove or rename one",
                    line,
                )
            first_lines[key] = line
            walk.context.lines.setdefault((*path, key), line)
            _walk(value_node, (*path, key), walk)


def _interpolate(node: yaml.ScalarNode, path: _Path, walk: _Walk) -> None:
    placeholder = walk.references.placeholder
    whole = placeholder.fullmatch(node.value)
    node.value = placeholder.sub(
        lambda match: _substitute(walk.references.found[int(match.group(1))], path, walk),
        node.value,
    )
    # a plain scalar that is one whole ${...} is typed again: `port: ${PORT:-8080}` is an int
    escaped = whole and walk.references.found[int(whole.group(1))].group(1)
    if whole and not escaped and node.style is None and id(node) not in walk.loader.tagged:
        retyped = walk.loader.resolve(  # type: ignore[no-untyped-call]
            yaml.ScalarNode, node.value, (True, False)
        )
        if retyped in _RETYPED_TAGS:
            node.tag = retyped


def _substitute(match: re.Match[str], path: _Path, walk: _Walk) -> str:
    escaped, body, closed = match.groups()
    if escaped:
        return match.group(0)[1:]  # `$${X}` is the literal `${X}`
    variable = _VARIABLE.fullmatch(body)
    if not closed or not variable:
        raise walk.context.error(
            path, f"invalid reference {match.group(0)!r}: write ${{NAME}} or ${{NAME:-default}}"
        )
    name, default = variable.groups()
    value = walk.env.get(name)
    if value is None or (value == "" and default is not None):
        if default is None:
            raise walk.context.error(
                path,
                f"environment variable {name} is not set and ${{{name}}} has no default; "
                f"set it or write ${{{name}:-default}}",
            )
        return default
    return value


# --- cross checks --------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", re.ASCII)
_HANDLER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_DERIVED_SUFFIX = re.compile(r"\.(dlq|retry\.\d+)$")
_WORD = re.compile(r"[*#]|[^\s*#]+")


def _check(topology: Topology, context: _Context) -> None:
    for index, exchange in enumerate(topology.exchanges):
        if problem := _name_problem(exchange, "exchange"):
            raise context.error(("exchanges", index), problem)
        if exchange == DEAD_LETTER_EXCHANGE:
            raise context.error(
                ("exchanges", index), f"{exchange!r} is the runtime's dead-letter exchange"
            )
        if exchange in topology.exchanges[:index]:
            raise context.error(("exchanges", index), f"exchange {exchange!r} is listed twice")
    for aggregate_type, exchange in topology.domains.items():
        if exchange not in topology.exchanges:
            raise context.error(("domains", aggregate_type), _undeclared(exchange, topology))
    if not topology.actors:
        raise context.error(("actors",), "declare at least one actor")
    owners: dict[str, str] = {}
    for actor in topology.actors.values():
        _check_actor(actor, topology, context)
        for path, queue in _queue_paths(actor):
            if queue.name in owners:
                owner = owners[queue.name]
                other = "this actor" if owner == actor.name else f"actor {owner!r}"
                raise context.error(
                    path,
                    f"queue {queue.name!r} is already consumed by {other}; a queue "
                    "belongs to one place in the topology (give one of them another name)",
                )
            owners[queue.name] = actor.name
            _check_queue(queue, path, topology, context)


def _check_actor(actor: ActorSpec, topology: Topology, context: _Context) -> None:
    path: _Path = ("actors", actor.name)
    if not _NAME.fullmatch(actor.name):
        raise context.error(
            path,
            "an actor name is letters, digits, '_', '.', ':' and '-', not starting with "
            "a punctuation mark",
        )
    if actor.handler is None and actor.kind in HANDLER_REQUIRED_KINDS:
        raise context.error(
            (*path, "handler"),
            f"this key is required for a {actor.kind} actor: name the object that handles "
            "its messages as package.module:Attribute",
        )
    if actor.handler is not None and not _HANDLER.fullmatch(actor.handler):
        raise context.error(
            (*path, "handler"),
            f"expected a dotted path such as package.module:Attribute, got {actor.handler!r}",
        )
    if not actor.consumes:
        for key, value in (("queue", actor.queue), ("bind", actor.bind), ("queues", actor.queues)):
            if value:
                raise context.error(
                    (*path, key), f"a {actor.kind} actor consumes no queue; remove this key"
                )


def _queue_paths(actor: ActorSpec) -> Iterator[tuple[_Path, ActorQueue]]:
    queues = actor.work_queues
    if queues:
        yield ("actors", actor.name, "queue"), queues[0]
    for index, extra in enumerate(queues[1:]):
        yield ("actors", actor.name, "queues", index, "name"), extra


def _check_queue(queue: ActorQueue, path: _Path, topology: Topology, context: _Context) -> None:
    if problem := _name_problem(queue.name, "queue"):
        raise context.error(path, problem)
    if suffix := _DERIVED_SUFFIX.search(queue.name):
        kind = "dead-letter" if suffix.group(1) == "dlq" else "retry"
        raise context.error(
            path,
            f"queue {queue.name!r} clashes with the derived queues: names ending in "
            f"{suffix.group(0)!r} are the {kind} queues of another queue; rename it",
        )
    bind_path: _Path = (*path[:-1], "bind")
    for exchange, keys in queue.bind.items():
        if exchange not in topology.exchanges:
            raise context.error((*bind_path, exchange), _undeclared(exchange, topology))
        for index, key in enumerate(keys):
            if not _valid_routing_key(key):
                raise context.error(
                    (*bind_path, exchange, index),
                    f"invalid routing key {key!r}: a binding key is words separated by dots, "
                    "each word a name, '*' (exactly one word) or '#' (zero or more words)",
                )


def _name_problem(name: str, what: str) -> str | None:
    if not _NAME.fullmatch(name):
        return (
            f"invalid {what} name {name!r}: use letters, digits, '_', '.', ':' and '-', "
            "not starting with a punctuation mark"
        )
    if name.startswith("amq."):
        return f"invalid {what} name {name!r}: names starting with 'amq.' belong to RabbitMQ"
    if len(name.encode()) > 255:
        return f"invalid {what} name {name[:40]!r}...: at most 255 bytes"
    return None


def _valid_routing_key(key: str) -> bool:
    return len(key.encode()) <= 255 and all(_WORD.fullmatch(word) for word in key.split("."))


def _undeclared(exchange: str, topology: Topology) -> str:
    declared = ", ".join(topology.exchanges) or "none"
    return (
        f"exchange {exchange!r} is not declared in exchanges (declared: {declared}); add it there"
    )


# --- the plan, as `magasin check` prints it ------------------------------------------------


def _plan_lines(topology: Topology) -> Iterator[str]:
    yield f"database:  {_redact(topology.database_url)}"
    yield f"broker:    {_redact(topology.amqp_url)}"
    yield (
        f"http:      {topology.http.host}:{topology.http.port}"
        f" (admin endpoints {'on' if topology.admin else 'off'})"
    )
    yield f"log:       {topology.log.level}, {topology.log.format}"
    yield f"shutdown:  drain for {format_duration(topology.grace_period)} on SIGTERM"
    yield f"exchanges: {', '.join(topology.exchanges)} (topic, durable)"
    domains = ", ".join(f"{kind} -> {exchange}" for kind, exchange in topology.domains.items())
    yield f"domains:   {domains or 'none'}"
    retention = topology.streams
    yield (
        f"streams:   {', '.join(topology.stream_names) or 'none'} (kept "
        f"{format_duration(retention.max_age) if retention.max_age else 'forever'}, at most "
        f"{retention.max_length_bytes or 'unlimited'} bytes)"
    )
    yield ""
    yield f"actors ({len(topology.actors)}, started in this order):"
    for actor in topology.actors.values():
        yield from _actor_lines(actor, topology.stream_names)


def _actor_lines(actor: ActorSpec, streams: tuple[str, ...]) -> Iterator[str]:
    restart, retry = actor.restart, actor.retry
    yield f"  {actor.name} ({actor.kind})"
    yield f"    handler:  {actor.handler or f'built-in ({handler_path(actor)})'}"
    if not actor.consumes:
        yield f"    restart:  {_restart_text(restart)}"
        return
    yield (
        f"    workers:  {actor.consumers} consumer(s), prefetch {actor.prefetch}, "
        f"batches of up to {actor.batch_size}"
    )
    yield f"    restart:  {_restart_text(restart)}"
    waits = [retry.delay_after(failures) for failures in range(1, retry.max_attempts)]
    yield (
        f"    retry:    {retry.max_attempts} attempt(s), waiting "
        f"{', '.join(format_duration(wait) for wait in waits if wait) or 'never'} between them, "
        f"then the dead-letter queue; handler timeout {format_duration(retry.handler_timeout)}"
    )
    for stream, keys in actor.stream_bindings(streams).items():
        yield f"    stream {stream}: keeps {', '.join(keys)}"
    for queue in actor.work_queues:
        yield f"    queue {queue.name} ({queue.type}, delivery limit {queue.delivery_limit})"
        bindings = [
            f"{b.exchange} {b.routing_key}" for b in queue.bindings if b.exchange not in streams
        ]
        yield f"      bound to: {'; '.join(bindings) or 'nothing (sent to directly)'}"
        for rung, delay in enumerate(retry.delays, start=1):
            yield f"      retry {rung}:  {retry_queue(queue.name, rung)} ({format_duration(delay)})"
        yield f"      dead:     {dead_letter_queue(queue.name)}"


def _restart_text(restart: RestartSpec) -> str:
    return (
        f"{restart.type}, backoff {format_duration(restart.min_backoff)} to "
        f"{format_duration(restart.max_backoff)} (jitter {restart.jitter:g}), at most "
        f"{restart.max_restarts} restarts in {format_duration(restart.window)}, reset after "
        f"{format_duration(restart.reset_after)}"
    )


def _redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
