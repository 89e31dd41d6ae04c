"""ONNX model I/O: load with clear errors, save atomically, check, make inputs, run.

Parity of outputs is :func:`retrofit.verify.compare_outputs`, shared with the torch path.

Everything a caller needs around an ONNX rewrite, with the project's error contract: a file that
is not a usable ONNX model raises :class:`BadInputError` with a one-line message; a rewritten
model that fails the checker raises :class:`ParityError`; nothing is ever written half-way or
over an input. Its runs take their onnxruntime session from :mod:`retrofit.onnx_path.session`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from retrofit.atomic import atomic_output, check_output_path
from retrofit.errors import (
    BadInputError,
    OutputError,
    ParityError,
    UsageError,
)
from retrofit.inputs import affordable

_SAFE_PROTO_SIZE = 2**31 - 2**26
"""A serialized protobuf cannot exceed 2 GiB: this is the limit less 64 MiB of headroom."""

_SKELETON_BYTES = 4096
"""Initializers up to this size stay in :func:`shape_inference_view` (shapes, axes, scalars)."""

# Inputs of these element types get small non-negative integers (indices stay in range).
_INTEGER_TYPES = {
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}  # fmt: skip


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    """A multi-line library message squeezed into one line a user can read."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines) if lines else type(error).__name__
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Walking a model


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The graphs a node holds (If branches, Loop and Scan bodies), each with the name of its
    attribute, ``name[k]`` for the k-th of a list of graphs."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend((f"{attr.name}[{k}]", sub) for k, sub in enumerate(attr.graphs))
    return found


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in it (If/Loop/Scan bodies), parents first."""
    yield graph
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from iter_graphs(sub)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs, and model-local function bodies."""
    for graph in iter_graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        for node in function.node:
            yield node
            for _, sub in subgraphs(node):
                for inner in iter_graphs(sub):
                    yield from inner.node


def _initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for graph in iter_graphs(model.graph):
        yield from graph.initializer


def fits_one_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes as one protobuf (with headroom); above, it is saved with
    external data and checked or run through a light copy or a file."""
    return model.ByteSize() <= _SAFE_PROTO_SIZE


def _uses_external_data(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


# Files load_onnx read, with the external data files each referred to (saves a re-parse when
# save_onnx asks about its source).
_EXTERNAL_FILES: dict[Path, tuple[_Stamp, tuple[Path, ...]]] = {}


def _stamp(path: Path) -> _Stamp:
    stat = path.stat()
    return _Stamp(stat.st_size, stat.st_mtime_ns)


def _parse(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path} is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path} is empty (0 bytes); it is not an ONNX model")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except OSError as error:
        raise BadInputError(f"cannot read {path}: {error.strerror or error}") from error
    except Exception as error:  # protobuf's DecodeError and friends: the bytes are not a model
        raise BadInputError(
            f"{path} is not a readable ONNX model (truncated or corrupt: {_one_line(error, 120)})"
        ) from error
    missing = [
        what
        for what, ok in (
            ("IR version", model.ir_version > 0),
            ("graph", model.HasField("graph") and len(model.graph.output) > 0),
            ("opset imports", model.ir_version < 3 or len(model.opset_import) > 0),
        )
        if not ok
    ]
    if missing:
        raise BadInputError(
            f"{path} is not a complete ONNX model (no {', '.join(missing)}); "
            "the file is truncated or is not ONNX"
        )
    damaged = _undecodable_text(model)
    if damaged is not None:
        raise BadInputError(f"{path}: its {damaged} is not UTF-8 text; the file is damaged")
    return model


def _undecodable_text(message: Any) -> str | None:
    """The first string field (name, op type...) whose bytes are not UTF-8, which protobuf
    hands over as ``bytes`` instead of ``str``; None when every one decodes."""
    for field, value in message.ListFields():
        values = [value] if isinstance(value, (str, bytes, Message)) else value  # repeated
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return field.full_name
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                found = _undecodable_text(item)
                if found is not None:
                    return found
    return None


def _external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in _initializers(model):
        if _uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in locations:
                locations.append(location)
    return locations


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX file refers to (empty when its data is inside it)."""
    path = Path(path)
    cached = _EXTERNAL_FILES.get(path.resolve())
    if cached is not None and path.exists() and cached[0] == _stamp(path):
        return list(cached[1])
    model = _parse(path)
    files = tuple(path.parent / location for location in _external_locations(model))
    _EXTERNAL_FILES[path.resolve()] = (_stamp(path), files)
    return list(files)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise a one-line project error.

    Raises :class:`BadInputError` for a missing, empty, truncated or non-ONNX file and for
    missing or short external data. What the rewrite cannot handle (a quantized graph, say) is
    the rewrite's to refuse: such a model still loads, so it can be scored.
    The returned model holds all tensor data in memory; :func:`save_onnx` with ``source=path``
    keeps the data external when this file had it external.
    """
    path = Path(path)
    model = _parse(path)
    locations = _external_locations(model)
    if locations:
        for location in locations:
            if not (path.parent / location).is_file():
                raise BadInputError(
                    f"{path} keeps its weights in {location!r}, which is missing next to it"
                )
        try:
            load_external_data_for_model(model, os.fspath(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise BadInputError(
                f"cannot read the external data of {path}: {_one_line(error, 160)}"
            ) from error
        _check_tensor_sizes(model, path)
        for tensor in _initializers(model):  # loaded: now as if the data had always been inline
            if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
                tensor.ClearField("data_location")
    _EXTERNAL_FILES[path.resolve()] = (
        _stamp(path),
        tuple(path.parent / location for location in locations),
    )
    return model


# Types whose raw size is not elements x itemsize (strings; sub-byte types packed in bytes).
_UNSIZED_TYPES = {
    getattr(TensorProto, name)
    for name in ("STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, name)
}


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """External data shorter than its tensor (a truncated .data file) is a bad input."""
    for tensor in _initializers(model):
        if not tensor.raw_data or tensor.data_type in _UNSIZED_TYPES:
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError):
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if len(tensor.raw_data) != expected:
            raise BadInputError(
                f"{path}: external data of tensor {tensor.name!r} has {len(tensor.raw_data)} "
                f"bytes, {expected} expected; the data file is truncated or does not belong to it"
            )


# --------------------------------------------------------------------------------------------
# Saving


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    force: bool = True,
) -> Path:
    """Write ``model`` to ``path`` atomically; a reader sees the old file or the whole new one.

    ``source`` is the file the model came from: the output may not be it nor one of its external
    data files, and with ``external_data=None`` the output keeps its data external exactly when
    the source did (or when the model is too large for one protobuf, > 2 GiB). External data goes
    to ``<path name>.data`` beside the output, written to a temporary file and renamed before the
    model file itself; tensors smaller than ``size_threshold`` bytes stay inline. The caller's
    model is not modified. An existing ``path`` is replaced: refusing it is the caller's policy
    (:func:`retrofit.atomic.check_output_path`); an existing data file only with ``force``, which
    the caller passes on from the user (it may not have known the data would be external).
    """
    path = Path(path)
    protected: list[Path] = []
    if source is not None:
        try:
            source_data = external_data_files(source)
        except BadInputError:  # the source is not an ONNX file (a torch model being exported)
            source_data = []
        protected = [Path(source), *source_data]
    check_output_path(path, inputs=protected, force=True)
    if any(_uses_external_data(tensor) for tensor in _initializers(model)):
        raise UsageError(
            "the model still refers to external data that is not loaded; read it with load_onnx"
        )
    if external_data is None:
        external_data = len(protected) > 1 or not fits_one_protobuf(model)
    if not external_data:
        with atomic_output(path) as temp:
            temp.write_bytes(model.SerializeToString())
        return path
    data_path = external_data_path(path)
    if data_path.resolve() in {p.resolve() for p in protected}:
        raise OutputError(
            f"cannot write {path}: its data file {data_path.name} is the input's data file"
        )
    check_output_path(data_path, inputs=protected, force=force)
    _save_with_external_data(model, path, data_path, size_threshold)
    return path


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_onnx` puts the external data of an ONNX file written to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


_ALIGN_THRESHOLD = 1 << 20  # tensors from 1 MiB start at a multiple of _ALIGNMENT (mmap)
_ALIGNMENT = 1 << 16


def _save_with_external_data(
    model: onnx.ModelProto, path: Path, data_path: Path, size_threshold: int
) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tensors = [
        tensor
        for tensor in _initializers(copy)
        if tensor.data_type != TensorProto.STRING and _tensor_nbytes(tensor) >= size_threshold
    ]
    with atomic_output(path) as temp_model:
        if tensors:
            with atomic_output(data_path) as temp_data, open(temp_data, "wb") as data:
                for tensor in tensors:
                    raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
                    offset = data.tell()
                    if len(raw) >= _ALIGN_THRESHOLD and offset % _ALIGNMENT:
                        offset += _ALIGNMENT - offset % _ALIGNMENT
                        data.seek(offset)
                    data.write(raw)
                    _clear_data(tensor)
                    del tensor.external_data[:]
                    for key, value in (
                        ("location", data_path.name), ("offset", str(offset)),
                        ("length", str(len(raw))),
                    ):  # fmt: skip
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    tensor.data_location = TensorProto.EXTERNAL
                data.flush()
                # the model bytes are ready before the data file is renamed into place
                temp_model.write_bytes(copy.SerializeToString())
        else:
            temp_model.write_bytes(copy.SerializeToString())


def _tensor_nbytes(tensor: TensorProto) -> int:
    if tensor.raw_data:
        return len(tensor.raw_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _clear_data(tensor: TensorProto) -> None:
    for field in (
        "raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
        "string_data",
    ):  # fmt: skip
        tensor.ClearField(field)


# --------------------------------------------------------------------------------------------
# Checking


def shape_inference_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy of ``model`` for shape inference and checks: large initializers become typed
    graph inputs (their values never matter to shapes), so copying is cheap and a model over
    2 GiB fits in one protobuf. Small initializers (shapes, axes) stay, so inference stays exact.
    """
    view = onnx.ModelProto()
    view.ir_version = model.ir_version
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    graph = view.graph
    source = model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    inputs = {value.name for value in source.input}
    for tensor in source.initializer:
        if not _uses_external_data(tensor) and _tensor_nbytes(tensor) <= _SKELETON_BYTES:
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    if view.ir_version < 4 and len(graph.initializer) != len(source.initializer):
        view.ir_version = 4  # initializers need not be inputs from IR 4 on
    return view


def check_onnx_model(model: onnx.ModelProto, *, is_input: bool = False) -> None:
    """Run the ONNX checker (``full_check``) and strict shape inference with data propagation.

    A failure raises :class:`ParityError` (a rewritten model must be valid) or, with
    ``is_input=True``, :class:`BadInputError` (the user's model is broken), with one line.
    """
    what = "the input model" if is_input else "the rewritten model"
    error_type = BadInputError if is_input else ParityError
    target = model if fits_one_protobuf(model) else shape_inference_view(model)
    try:
        onnx.checker.check_model(target, full_check=True)
        onnx.shape_inference.infer_shapes(target, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        problem = _unrunnable_graph(model.graph)
        if problem is not None:  # the checker calls both "not topologically sorted"
            raise error_type(f"{what} is not a runnable graph: {problem}") from error
        raise error_type(f"{what} fails the ONNX checker: {_one_line(error)}") from error
    except (RuntimeError, ValueError) as error:
        raise error_type(f"{what} cannot be checked: {_one_line(error)}") from error


def _unrunnable_graph(graph: onnx.GraphProto) -> str | None:
    """Why the main graph cannot run in any order: a value that nothing produces, or a cycle.

    None when every node can run (the checker's own message then says what is wrong).
    """
    available = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    available |= {t.values.name for t in graph.sparse_initializer} | {""}
    produced = {name for node in graph.node for name in node.output}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name not in available and name not in produced:
                return (f"node {node.name or f'#{index}'!r} ({node.op_type}) reads {name!r}, "
                        "which no node, graph input or initializer produces")
    for value in graph.output:
        if value.name not in available and value.name not in produced:
            return f"graph output {value.name!r} is produced by no node"
    waiting = [sum(name not in available for name in set(node.input)) for node in graph.node]
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input) - available:
            consumers.setdefault(name, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    while ready:  # Kahn's topological sort; a value made twice counts once, the checker says more
        for name in graph.node[ready.pop()].output:
            if name not in available:
                available.add(name)
                for index in consumers.get(name, ()):
                    waiting[index] -= 1
                    if waiting[index] == 0:
                        ready.append(index)
    stuck = [node for node, count in zip(graph.node, waiting) if count > 0]
    if stuck:
        names = ", ".join(repr(node.name or node.op_type) for node in stuck[:4])
        more = f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""
        return f"it has a cycle: node(s) {names}{more} wait on each other's outputs"
    return None


# --------------------------------------------------------------------------------------------
# Inputs, running, parity


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed: those that are not initializers (overridable defaults)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def make_onnx_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, from its declared shape and element type.

    A dynamic dimension takes its size from ``input_shapes[name]`` (the whole shape of that
    input); otherwise a dynamic leading (batch-like) dimension is 1 and any other raises
    :class:`UsageError` naming it. Floats are standard normal; booleans fair coin flips;
    integers lie in ``[0, bound)`` with ``bound`` from :func:`gather_bound` (token ids stay
    inside the embedding tables they index; 0 or 1 for other index-like inputs). Equal seeds
    give equal inputs.
    """
    shapes = {name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()}
    inputs = _graph_inputs(model)
    unknown = sorted(set(shapes) - {value.name for value in inputs})
    if unknown:
        raise UsageError(
            f"input shape given for {', '.join(map(repr, unknown))}, which the model does not "
            f"take; its inputs are {', '.join(repr(v.name) for v in inputs)}"
        )
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in inputs:
        if value.type.WhichOneof("value") != "tensor_type":
            raise UsageError(f"input {value.name!r} is not a tensor; cadrelu cannot feed it")
        tensor_type = value.type.tensor_type
        shape = _input_shape(value, shapes.get(value.name))
        feeds[value.name] = _random_array(rng, tensor_type.elem_type, shape, value.name,
                                          gather_bound(model, value.name))
    return feeds


def gather_bound(model: onnx.ModelProto, name: str) -> int:
    """The rows of the smallest table (a ``Gather`` data initializer, axis 0) that the graph
    input ``name`` indexes directly: ids below it are in range everywhere. 2 when it indexes
    none (0 and 1 are in range for any index-like input)."""
    tables = {tensor.name: tensor for tensor in model.graph.initializer}
    rows = [
        tables[node.input[0]].dims[0]
        for node in model.graph.node
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name
        and node.input[0] in tables and tables[node.input[0]].dims
        and next((a.i for a in node.attribute if a.name == "axis"), 0) == 0
    ]
    return max(1, min(rows)) if rows else 2


def _input_shape(value: onnx.ValueInfoProto, given: tuple[int, ...] | None) -> tuple[int, ...]:
    tensor_type = value.type.tensor_type
    example = ",".join(
        str(dim.dim_value) if dim.HasField("dim_value") else f"<{dim.dim_param or 'size'}>"
        for dim in tensor_type.shape.dim
    ) or "<sizes>"
    hint = f"give its whole shape (--input-shape {value.name}:{example})"
    if not tensor_type.HasField("shape"):
        if given is None:
            raise UsageError(f"input {value.name!r} has no declared shape; {hint}")
        return affordable(f"input {value.name!r}", given)
    dims = tensor_type.shape.dim
    if given is not None:
        if len(given) != len(dims):
            raise BadInputError(
                f"input {value.name!r} has {len(dims)} dimensions, --input-shape gives {len(given)}"
            )
        for axis, (dim, size) in enumerate(zip(dims, given)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise BadInputError(
                    f"input {value.name!r} has size {dim.dim_value} at axis {axis}, "
                    f"--input-shape says {size}"
                )
        return affordable(f"input {value.name!r}", given)
    shape = []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            if dim.dim_value < 0:
                raise BadInputError(
                    f"input {value.name!r} declares size {dim.dim_value} at axis {axis}; "
                    "sizes cannot be negative (the model file is damaged)"
                )
            shape.append(dim.dim_value)
        elif axis == 0:
            shape.append(1)
        else:
            label = f" {dim.dim_param!r}" if dim.dim_param else ""
            raise UsageError(
                f"input {value.name!r} has a dynamic dimension{label} at axis {axis}; {hint}"
            )
    return affordable(f"input {value.name!r}", shape)


def _random_array(
    rng: np.random.Generator, elem_type: int, shape: tuple[int, ...], name: str, bound: int = 2
) -> np.ndarray:
    try:
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError) as error:
        raise UsageError(f"input {name!r} has an element type cadrelu cannot feed") from error
    if elem_type == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if elem_type in _INTEGER_TYPES:
        return rng.integers(0, min(bound, int(np.iinfo(dtype).max) + 1), size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating) or elem_type == TensorProto.BFLOAT16:
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)
    raise UsageError(f"input {name!r} has element type {dtype}, which cadrelu cannot feed")


def onnx_runner(model: onnx.ModelProto) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """:func:`run_onnx` for several runs of one model: the onnxruntime session is built once."""
    import onnxruntime

    from retrofit.onnx_path.session import inference_session  # imported here: it uses save_onnx

    session = inference_session(model)
    expected = {value.name for value in session.get_inputs()}

    options = onnxruntime.RunOptions()
    options.log_severity_level = 3  # the error below says it once, in one line

    def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        unknown = sorted(set(inputs) - expected)
        missing = sorted(expected - set(inputs))
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
            raise UsageError("cannot run the model: " + "; ".join(parts))
        try:
            return list(session.run(None, dict(inputs), options))
        except Exception as error:  # onnxruntime's pybind exception types
            raise BadInputError(f"onnxruntime failed to run the model: {_one_line(error)}") from error

    return run


def run_onnx(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime's CPU provider; one array per graph output, in order."""
    return onnx_runner(model)(inputs)
