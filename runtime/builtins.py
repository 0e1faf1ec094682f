"""Where each actor's code comes from: its ``handler`` path, or the runtime's built-ins."""

from __future__ import annotations

from typing import Any

from runtime.errors import TopologyError
from runtime.topology import ActorSpec
from runtime.topology import resolve_handler as import_handler

#: Kinds the runtime implements itself when the topology names no handler.
BUILTIN_HANDLERS = {
    "gateway": "runtime.http:Gateway",
    "relay": "runtime.relay:Relay",
}


def resolve_handler(spec: ActorSpec) -> Any:
    """The class (or factory) to call with an ``ActorContext`` to make the actor's handler."""
    if spec.handler is None and spec.kind in BUILTIN_HANDLERS:
        import msgspec  # noqa: PLC0415

        spec = msgspec.structs.replace(spec, handler=BUILTIN_HANDLERS[spec.kind])
    if spec.handler is None:
        raise TopologyError(
            f"the {spec.kind} actor names no handler", path=f"actors.{spec.name}.handler"
        )
    return import_handler(spec)
