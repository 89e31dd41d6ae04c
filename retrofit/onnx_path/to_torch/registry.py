"""The op registry: which handler builds an ONNX op, keyed by ``(op_type, since_version)``.

An op version is the ``since_version`` of the op's schema at the model's opset. Each handler
lists the versions whose semantics it implements; a version it does not list has no entry, so
the builder refuses it up front and never runs it as an older version whose meaning differs.
The registry is complete once the package :mod:`retrofit.onnx_path.to_torch` is imported (it
imports every op-family module).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import onnx

from retrofit.onnx_path.to_torch.context import Builder

Handler = Callable[[Builder, onnx.NodeProto], Any]

HANDLERS: dict[tuple[str, int], Handler] = {}
"""``(op_type, op version)`` -> the handler that builds that version."""


def register(
    *op_types: str, since: Sequence[int] | Mapping[str, Sequence[int]]
) -> Callable[[Handler], Handler]:
    """Register the decorated handler for ``op_types`` at exactly the op versions ``since``
    lists; listing a version is the claim that the handler computes what that version says.
    ``since`` maps op type to versions where the op types have different histories. A key
    registered twice is a programming error (two modules claiming one op version)."""

    def add(handler: Handler) -> Handler:
        keys = [
            (op_type, version)
            for op_type in op_types
            for version in (since[op_type] if isinstance(since, Mapping) else since)
        ]
        taken = [f"{op}-{version}" for op, version in keys if (op, version) in HANDLERS]
        if taken:
            raise ValueError(f"op versions registered twice: {', '.join(taken)}")
        HANDLERS.update(dict.fromkeys(keys, handler))
        return handler

    return add


def op_types() -> frozenset[str]:
    """Every op type (default domain) some version of which has a handler."""
    return frozenset(op_type for op_type, _ in HANDLERS)


def op_version(op_type: str, opset: int) -> int | None:
    """The since_version of ``op_type``'s schema at ``opset``, None when it is not defined."""
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None
