"""Run an ONNX graph as a trainable torch module, and write what training learned back into it.

Fine-tuning an ONNX model must hand the user back *their* model: the same graph, node names,
inputs, outputs and opset, with only the weights changed. So training does not go through a
model converted to some other architecture; :func:`onnx_to_torch` turns the ONNX graph into a
``torch.fx.GraphModule`` that computes exactly what the graph computes (one fx node per ONNX op,
a few where one torch call cannot say it), whose float initializers are ``nn.Parameter``\\ s
named by :func:`torch_name`. After training, :func:`write_back_initializers` copies the trained
values into the original initializers by those names.

What callers may rely on:

* Placeholders are the graph inputs that are not initializers, in graph order; the module returns
  one tensor for a one-output graph, else a tuple in graph-output order.
* Each ONNX ``Relu`` becomes one ``call_function`` node with target ``torch.relu`` and
  ``node.meta["site_name"]`` set to the site name the ONNX rewrite uses (``node.name`` or its
  first output, made unique in graph order by :func:`retrofit.onnx_path.site_names.graph_site_names`).
* Float initializers used as run-time tensors are parameters; other initializers used at run time
  (integer tables, BatchNormalization running statistics) are persistent buffers; ``Constant``
  nodes and values folded at build time are non-persistent buffers or Python literals. The state
  dict therefore holds initializers only, keyed by :func:`torch_name`.
* Values the graph computes from shapes stay symbolic (``x.size(i)`` and integer arithmetic), so
  the module is re-traceable by ``torch.fx.symbolic_trace`` and exportable by
  ``torch.export.export``, dynamic batch included. Arguments an op needs as Python values
  (Reshape targets, Slice bounds, Squeeze axes, Resize scales) must be constants or shape
  arithmetic; an initializer read that way is a constant, not a parameter.
* An initializer used at several places is one parameter. Exporters store equal tensors once
  (a fresh BatchNorm's running variance *is* its weight), so such values train together, which
  is what the written-back ONNX model then computes.
* ``Dropout`` is the identity and ``BatchNormalization`` uses its running statistics: the module
  computes what the ONNX model computes at inference, in ``train()`` and ``eval()`` mode alike.
  A Dropout whose ``training_mode`` input is true (or only known at run time) is refused: its
  result is random.
* Graph inputs and outputs must be tensors of a type torch computes with (no strings, no
  unsigned integers wider than 8 bits, no float8/int4): others are refused up front.
* Tensors the graph creates (from shapes, ConstantOfShape, Range) are made on the device of the
  tensor they derive from, so ``module.to("cuda")`` works. Every fx node records the ONNX node it
  came from in ``node.meta["onnx_node"]``.
* Ops are registered by ONNX op version (their schema's ``since_version`` at the model's
  opset): each handler lists the versions whose semantics it implements, and a version it does
  not list is refused up front, never run as an older version whose meaning differs.
* An op or op feature this module cannot express raises :class:`UnsupportedModelError` before
  any work is done (op types) or when the node is reached (features); the input is never changed.
"""

from __future__ import annotations

import builtins
import hashlib
import keyword
import math
import operator
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import fx, nn

from retrofit.errors import BadInputError, RetrofitError, UnsupportedModelError, first_line
from retrofit.onnx_path.site_names import DEFAULT_DOMAINS, graph_site_names, is_relu

__all__ = [
    "SUPPORTED_OPS",
    "initializer_torch_names",
    "onnx_to_torch",
    "torch_name",
    "write_back_initializers",
]

_CONTROL_FLOW = ("If", "Loop", "Scan")

_TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Names a placeholder must not take: the generated forward() uses them.
_RESERVED_NAMES = frozenset(dir(builtins)) | {"self", "torch", "inf", "nan", "operator", "fx"}
# Slice bounds at or beyond this mean "to the end" (exporters write INT64_MAX / INT64_MIN).
_BIG = 2**62


# --------------------------------------------------------------------------- names


_UNSAFE_CHARS = re.compile(r"[^0-9A-Za-z_]")


def torch_name(initializer_name: str) -> str:
    """The torch attribute (and state-dict key) that holds the ONNX value ``initializer_name``.

    Deterministic and a valid Python identifier: ``onnx_`` plus the name with every character
    outside ``[0-9A-Za-z_]`` turned into ``_``; when that changed the name, 8 hex digits of its
    SHA-1 follow, so ``conv.weight`` and ``conv_weight`` get different attributes.
    """
    clean = _UNSAFE_CHARS.sub("_", initializer_name)
    if clean == initializer_name:
        return f"onnx_{clean}"
    digest = hashlib.sha1(initializer_name.encode("utf-8")).hexdigest()[:8]
    return f"onnx_{clean}_{digest}"


def initializer_torch_names(model: onnx.ModelProto) -> dict[str, str]:
    """Map every initializer name of ``model``'s main graph to its :func:`torch_name`."""
    names = {init.name: torch_name(init.name) for init in model.graph.initializer}
    if len(set(names.values())) != len(names):  # a SHA-1 prefix collision; never seen
        raise BadInputError("two ONNX initializer names map to the same torch attribute name")
    return names


# --------------------------------------------------------------------------- build-time values


@dataclass(frozen=True)
class _Sizes:
    """An integer tensor of rank 0 or 1 known at build time element by element: each element is
    a Python int or an fx node computing an int (a dimension of a run-time tensor, or arithmetic
    on such). Shape computations stay in this form so that no tensor data is read at run time."""

    elems: tuple[int | fx.Node, ...]
    scalar: bool
    dtype: torch.dtype = torch.int64
    # A run-time tensor the sizes were read from: tensors made from them go to its device.
    anchor: fx.Node | None = None


@dataclass(frozen=True)
class _Weight:
    """A float initializer: a parameter (or a buffer) once used as a run-time tensor, a constant
    when an op reads it as a Python value."""

    name: str
    tensor: torch.Tensor


def _contains_node(obj: Any) -> bool:
    found = False

    def visit(node: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return node

    fx.node.map_arg(obj, visit)
    return found


def _tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    """A writable CPU tensor with the value of ``proto``; raises for types torch cannot hold."""
    if proto.data_type not in _TORCH_DTYPES:
        name = TensorProto.DataType.Name(proto.data_type)
        raise UnsupportedModelError(
            f"cannot fine-tune this ONNX model: tensor {proto.name!r} has type {name}"
        )
    if proto.data_location == TensorProto.EXTERNAL and not proto.raw_data:
        raise BadInputError(
            f"ONNX tensor {proto.name!r} is stored in an external data file that was not loaded"
        )
    array = numpy_helper.to_array(proto)
    if proto.data_type == TensorProto.BFLOAT16:
        bits = np.ascontiguousarray(array).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedModelError(
                f"cannot fine-tune this ONNX model: {node.op_type} has a subgraph"
            )
        if attribute.type == onnx.AttributeProto.TENSOR:
            values[attribute.name] = _tensor_from_proto(attribute.t)
            continue
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        values[attribute.name] = value
    return values


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    raise BadInputError("the ONNX model does not import the default operator set")


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _unsupported_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(
        {
            _op_label(node)
            for node in model.graph.node
            if node.domain not in DEFAULT_DOMAINS or node.op_type not in _HANDLERS
        }
    )


def _unknown_versions(model: onnx.ModelProto) -> list[str]:
    """``Op-version`` labels of the model's ops whose version no handler claims."""
    opset = _default_opset(model)
    unknown = set()
    for node in model.graph.node:
        version = _op_version(node.op_type, opset)
        if version is None:
            unknown.add(f"{node.op_type} (not defined at opset {opset})")
        elif version not in _VERSIONS[node.op_type]:
            unknown.add(f"{node.op_type}-{version} (opset {opset})")
    return sorted(unknown)


def _check_value_types(model: onnx.ModelProto) -> None:
    """Refuse graph inputs and outputs of element types torch cannot compute with here.

    Initializers and Cast targets are checked where they are read; the graph's own inputs and
    outputs are only declared, so an unsigned 16-64 bit or string input would otherwise fail
    (or compute in another type) at run time.
    """
    for info in (*model.graph.input, *model.graph.output):
        kind = info.type.WhichOneof("value")
        if kind is None:  # no type recorded: shape inference and the handlers decide
            continue
        if kind != "tensor_type":
            raise UnsupportedModelError(
                f"cannot fine-tune this ONNX model: value {info.name!r} is not a tensor"
            )
        elem_type = info.type.tensor_type.elem_type
        if elem_type != TensorProto.UNDEFINED and elem_type not in _TORCH_DTYPES:
            name = TensorProto.DataType.Name(elem_type)
            raise UnsupportedModelError(
                f"cannot fine-tune this ONNX model: value {info.name!r} has type {name}"
            )


def _value_infos(model: onnx.ModelProto) -> dict[str, tuple[torch.dtype | None, tuple | None]]:
    """Element type and shape (ints, or None per unknown dim) of every value ONNX can infer."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a hint; a graph it rejects may still run
        inferred = model
    infos: dict[str, tuple[torch.dtype | None, tuple | None]] = {}
    graph = inferred.graph
    for info in (*graph.value_info, *graph.input, *graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type":
            continue
        tensor_type = info.type.tensor_type
        dtype = _TORCH_DTYPES.get(tensor_type.elem_type)
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                dim.dim_value if dim.HasField("dim_value") else None
                for dim in tensor_type.shape.dim
            )
        infos[info.name] = (dtype, shape)
    return infos


# --------------------------------------------------------------------------- the builder


class _Builder:
    """Builds the fx graph for one ONNX model: holds the value of every ONNX name and adds nodes.

    A value is a run-time ``fx.Node``, a build-time constant ``torch.Tensor``, :class:`_Sizes`
    (shape arithmetic) or a :class:`_Weight` (a float initializer).

    ``call``/``method`` run the torch call at once when no argument is a run-time node (constant
    folding), so one handler serves constants, shape arithmetic and run-time tensors alike.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = _default_opset(model)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.values: dict[str, Any] = {}
        self.infos = _value_infos(model)
        self.attr_nodes: dict[str, fx.Node] = {}
        self.constant_buffers: set[str] = set()
        self.size_nodes: dict[fx.Node, fx.Node] = {}
        self.device_nodes: dict[fx.Node, fx.Node] = {}
        self.sizes_tensors: dict[_Sizes, fx.Node] = {}
        # id(tensor) -> (ONNX-level name, tensor); holding the tensor keeps its id unique.
        self.const_names: dict[int, tuple[str, torch.Tensor]] = {}
        self.current: onnx.NodeProto | None = None
        self.since = 0  # the current node's op version (its schema's since_version)
        self.current_label = ""
        self.initializer_names = {init.name for init in model.graph.initializer}
        self.stat_only = self._statistics_only_initializers()

    # ---- errors

    def unsupported(self, what: str) -> UnsupportedModelError:
        where = self.current_label or "?"
        return UnsupportedModelError(f"cannot fine-tune this ONNX model: {what} (node {where!r})")

    # ---- emitting

    def _new_node(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        args, kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda a: self._const_node(a) if isinstance(a, torch.Tensor) else a
        )
        hint = None
        if self.current is not None and self.current.output:
            hint = _UNSAFE_CHARS.sub("_", self.current.output[0]) or None
        node = self.graph.create_node(op, target, tuple(args), dict(kwargs), name=hint)
        if self.current is not None:
            node.meta["onnx_node"] = self.current_label
        return node

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> Any:
        if _contains_node((args, kwargs)):
            return self._new_node("call_function", target, args, kwargs)
        return target(*args, **kwargs)

    def method(self, name: str, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if _contains_node((obj, args, kwargs)):
            return self._new_node("call_method", name, (obj, *args), kwargs)
        return getattr(obj, name)(*args, **kwargs)

    def _attr_node(self, attr: str, tensor: torch.Tensor, kind: str) -> fx.Node:
        if attr not in self.attr_nodes:
            if kind == "parameter":
                # Initializer tensors are fresh copies: the parameter can own the memory.
                self.root.register_parameter(attr, nn.Parameter(tensor, requires_grad=True))
            else:
                self.root.register_buffer(attr, tensor.clone())
                if kind == "constant":
                    self.constant_buffers.add(attr)
            node = self.graph.get_attr(attr)
            self.attr_nodes[attr] = node
        return self.attr_nodes[attr]

    def _const_node(self, tensor: torch.Tensor) -> fx.Node:
        known = self.const_names.get(id(tensor))
        if known is None:
            base = self.current.output[0] if self.current is not None else "const"
            known = (f"{base}::const{len(self.attr_nodes)}", tensor)
            self.const_names[id(tensor)] = known
        name = known[0]
        attr = torch_name(name)
        kind = "buffer" if name in self.initializer_names else "constant"
        return self._attr_node(attr, tensor, kind)

    def dim(self, x: Any, index: int) -> int | fx.Node:
        """``x.size(index)`` as a Python int for constants, a (cached) node otherwise."""
        if not isinstance(x, fx.Node):
            return int(x.shape[index])
        if x not in self.size_nodes:
            self.size_nodes[x] = self._new_node("call_method", "size", (x,), {})
        return self._new_node("call_function", operator.getitem, (self.size_nodes[x], index), {})

    # ---- reading values

    def has(self, node: onnx.NodeProto, index: int) -> bool:
        return index < len(node.input) and node.input[index] != ""

    def value(self, name: str) -> Any:
        if name not in self.values:
            raise BadInputError(f"the ONNX graph uses value {name!r} before anything produces it")
        return self.values[name]

    def tensor(self, name: str) -> fx.Node | torch.Tensor:
        """The value as a run-time node or a build-time constant tensor."""
        return self.as_tensor(self.value(name))

    def as_tensor(self, value: Any) -> fx.Node | torch.Tensor:
        if isinstance(value, _Weight):
            kind = "buffer" if value.name in self.stat_only else "parameter"
            return self._attr_node(torch_name(value.name), value.tensor, kind)
        if isinstance(value, _Sizes):
            return self._sizes_tensor(value)
        return value

    def is_frozen(self, name: str) -> bool:
        """True when the value cannot require grad: a constant or a buffer initializer."""
        value = self.value(name)
        if isinstance(value, _Weight):
            return value.name in self.stat_only
        return isinstance(value, (torch.Tensor, _Sizes))

    def operand(self, name: str) -> Any:
        """Like :meth:`tensor`, but a 0-d constant comes back as a Python number (a literal)."""
        value = self.tensor(name)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return value.item()
        return value

    def static(self, name: str) -> torch.Tensor | None:
        """The value as a constant tensor when it is known at build time, else None."""
        value = self.value(name)
        if isinstance(value, _Weight):
            return value.tensor
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, _Sizes) and all(isinstance(e, int) for e in value.elems):
            return torch.tensor(value.elems, dtype=value.dtype).reshape(() if value.scalar else -1)
        return None

    def ints(self, name: str, what: str) -> list[int]:
        const = self.static(name)
        if const is None:
            raise self.unsupported(f"{what} computed at run time")
        return [int(v) for v in const.reshape(-1).tolist()]

    def floats(self, name: str, what: str) -> list[float]:
        const = self.static(name)
        if const is None:
            raise self.unsupported(f"{what} computed at run time")
        return [float(v) for v in const.reshape(-1).tolist()]

    def scalar(self, name: str, what: str) -> int | float | bool | fx.Node:
        """A 0-d or one-element value as a Python number or an int node (shape arithmetic)."""
        value = self.value(name)
        if isinstance(value, _Sizes) and len(value.elems) == 1:
            return value.elems[0]
        const = self.static(name)
        if const is None or const.numel() != 1:
            raise self.unsupported(f"{what} computed at run time")
        return const.reshape(()).item()

    def sizes(self, name: str) -> list[int | fx.Node] | fx.Node:
        """A 1-D integer value as a list of ints/int nodes, or (run-time data) a list node."""
        value = self.value(name)
        if isinstance(value, _Sizes):
            return list(value.elems)
        const = self.static(name)
        if const is not None:
            return [int(v) for v in const.reshape(-1).tolist()]
        return self.method("tolist", value)

    def shape_tensor(self, x: fx.Node) -> fx.Node:
        """``x``'s shape as an int64 tensor on ``x``'s device (data: not exportable)."""
        return self.method("to", self.call(torch._shape_as_tensor, x), self.device_of(x))

    def anchor(self, name: str) -> fx.Node | None:
        """The run-time tensor a value depends on (for the device of tensors made from it)."""
        value = self.value(name)
        if isinstance(value, _Sizes):
            return value.anchor
        return value if isinstance(value, fx.Node) else None

    def dtype(self, name: str) -> torch.dtype | None:
        value = self.value(name)
        if isinstance(value, _Weight):
            return value.tensor.dtype
        if isinstance(value, torch.Tensor):
            return value.dtype
        if isinstance(value, _Sizes):
            return value.dtype
        return self.infos.get(name, (None, None))[0]

    def shape(self, name: str) -> tuple | None:
        """Static shape (ints, None where unknown), or None when even the rank is unknown."""
        value = self.value(name)
        if isinstance(value, _Weight):
            return tuple(value.tensor.shape)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, _Sizes):
            return () if value.scalar else (len(value.elems),)
        return self.infos.get(name, (None, None))[1]

    def rank(self, name: str, what: str | None = None) -> int | None:
        shape = self.shape(name)
        if shape is None and what is not None:
            raise self.unsupported(f"{what} needs the rank of {name!r}, which shape inference "
                                   "could not find")
        return None if shape is None else len(shape)

    def _sizes_tensor(self, sizes: _Sizes) -> fx.Node | torch.Tensor:
        if all(isinstance(e, int) for e in sizes.elems):
            tensor = torch.tensor(sizes.elems, dtype=sizes.dtype)
            return tensor.reshape(()) if sizes.scalar else tensor
        if sizes not in self.sizes_tensors:
            options = {"dtype": sizes.dtype, "device": self.device_of(sizes.anchor)}
            parts = [
                self._new_node("call_function", torch.scalar_tensor, (e,), options)
                for e in sizes.elems
            ]
            node = (
                parts[0]
                if sizes.scalar
                else self._new_node("call_function", torch.stack, (parts,), {})
            )
            self.sizes_tensors[sizes] = node
        return self.sizes_tensors[sizes]

    def is_sizes_like(self, name: str) -> bool:
        """True for integer values of rank <= 1 small enough to be worked on element by element."""
        value = self.value(name)
        if isinstance(value, _Sizes):
            return True
        return (
            isinstance(value, torch.Tensor)
            and value.dtype in _INT_DTYPES
            and value.dim() <= 1
            and value.numel() <= 64
        )

    def as_sizes(self, name: str) -> _Sizes:
        value = self.value(name)
        if isinstance(value, _Sizes):
            return value
        return _Sizes(tuple(int(v) for v in value.reshape(-1).tolist()), value.dim() == 0,
                      value.dtype)

    def device_of(self, anchor: fx.Node | None) -> fx.Node | None:
        """A node reading ``anchor.device`` (cached), so that tensors the graph creates follow
        the module to the GPU; None (the default device) without an anchor."""
        if anchor is None:
            return None
        if anchor not in self.device_nodes:
            self.device_nodes[anchor] = self._new_node(
                "call_function", getattr, (anchor, "device"), {}
            )
        return self.device_nodes[anchor]

    # ---- storing results

    def store(self, name: str, value: Any) -> None:
        if isinstance(value, _Sizes) and all(isinstance(e, int) for e in value.elems):
            value = torch.tensor(value.elems, dtype=value.dtype).reshape(
                () if value.scalar else -1
            )
        if isinstance(value, (int, float, bool)):
            value = torch.tensor(value)
        if isinstance(value, torch.Tensor):
            self.const_names.setdefault(id(value), (name, value))
        self.values[name] = value

    # ---- set-up

    def _statistics_only_initializers(self) -> set[str]:
        """Float initializers used only as BatchNormalization running statistics: buffers."""
        source = {}  # Identity output -> the value it passes on
        for node in self.model.graph.node:
            if node.op_type == "Identity" and node.input and node.output:
                source[node.output[0]] = node.input[0]

        def root(name: str) -> str:
            seen = set()
            while name in source and name not in seen:
                seen.add(name)
                name = source[name]
            return name

        uses: dict[str, set[bool]] = {}
        for node in self.model.graph.node:
            if node.op_type == "Identity":
                continue
            for index, name in enumerate(node.input):
                is_stat = node.op_type == "BatchNormalization" and index in (3, 4)
                uses.setdefault(root(name), set()).add(is_stat)
        for output in self.model.graph.output:
            uses.setdefault(root(output.name), set()).add(False)
        return {name for name, kinds in uses.items() if kinds == {True}}

    def add_inputs(self) -> None:
        for init in self.model.graph.initializer:
            tensor = _tensor_from_proto(init)
            if init.data_type in _FLOAT_TYPES:
                self.values[init.name] = _Weight(init.name, tensor)
            else:
                self.store(init.name, tensor)
        used: set[str] = set()
        for graph_input in self.model.graph.input:
            if graph_input.name in self.initializer_names:
                continue
            name = _UNSAFE_CHARS.sub("_", graph_input.name) or "input"
            if name[0].isdigit() or keyword.iskeyword(name) or name in _RESERVED_NAMES:
                name = f"input_{name}"
            while name in used:
                name += "_"
            used.add(name)
            self.values[graph_input.name] = self.graph.placeholder(name)

    def add_nodes(self) -> None:
        nodes = list(self.model.graph.node)
        relus = [node for node in nodes if is_relu(node)]
        self.site_names = {id(n): s for n, s in zip(relus, graph_site_names(nodes))}
        for node in _topological_order(nodes, set(self.values)):
            self.current = node
            self.since = _op_version(node.op_type, self.opset)
            self.current_label = node.name or (node.output[0] if node.output else node.op_type)
            try:
                outputs = _HANDLERS[node.op_type](self, node)
            except RetrofitError:
                raise
            except Exception as error:  # noqa: BLE001 - one line for the user, cause chained
                raise UnsupportedModelError(
                    first_line(f"cannot fine-tune this ONNX model: {node.op_type} node "
                               f"{self.current_label!r} cannot be built: {error}")
                ) from error
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            for name, value in zip(node.output, outputs):
                if name:
                    self.store(name, value)
        self.current = None

    def add_outputs(self) -> None:
        results = [self.as_tensor(self.value(out.name)) for out in self.model.graph.output]
        results = [
            self._const_node(r) if isinstance(r, torch.Tensor) else r for r in results
        ]
        self.graph.output(results[0] if len(results) == 1 else tuple(results))


def _topological_order(nodes: list[onnx.NodeProto], known: set[str]) -> Iterator[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (graph order when it already is)."""
    available = set(known) | {""}
    pending = list(nodes)
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                yield node
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({n for node in waiting for n in node.input if n not in available})
            raise BadInputError(
                f"the ONNX graph uses value(s) {', '.join(map(repr, missing[:5]))} "
                "that no node or input produces"
            )
        pending = waiting


# --------------------------------------------------------------------------- op handlers

_Handler = Callable[[_Builder, onnx.NodeProto], Any]
_HANDLERS: dict[str, _Handler] = {}
# op type -> the ONNX versions (schema since_version) whose semantics its handler implements.
_VERSIONS: dict[str, frozenset[int]] = {}


def _op(
    *op_types: str, since: Sequence[int] | Mapping[str, Sequence[int]]
) -> Callable[[_Handler], _Handler]:
    """Register ``handler`` for ``op_types`` at exactly the op versions ``since`` lists.

    An op version is the ``since_version`` of its schema at the model's opset. A version not
    listed is refused up front, so a version whose semantics changed is never run as an older
    one; listing a version is the claim that the handler computes what that version says.
    ``since`` maps op type to versions where the op types have different histories.
    """

    def register(handler: _Handler) -> _Handler:
        for op_type in op_types:
            _HANDLERS[op_type] = handler
            _VERSIONS[op_type] = frozenset(since[op_type] if isinstance(since, Mapping) else since)
        return handler

    return register


def _op_version(op_type: str, opset: int) -> int | None:
    """The since_version of ``op_type``'s schema at ``opset``, None when it is not defined."""
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- elementwise


_UNARY: dict[str, Callable] = {
    "Abs": torch.abs,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "IsNaN": torch.isnan,
    "Log": torch.log,
    "Mish": F.mish,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Round": torch.round,
    "Sigmoid": torch.sigmoid,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Softsign": F.softsign,
    "Sqrt": torch.sqrt,
    "Tanh": torch.tanh,
}


_UNARY_SINCE = {
    "Abs": (1, 6, 13), "Ceil": (1, 6, 13), "Cos": (7, 22), "Erf": (9, 13), "Exp": (1, 6, 13),
    "Floor": (1, 6, 13), "IsNaN": (9, 13, 20), "Log": (1, 6, 13), "Mish": (18, 22),
    "Neg": (1, 6, 13), "Not": (1,), "Reciprocal": (1, 6, 13), "Round": (11, 22),
    "Sigmoid": (1, 6, 13), "Sign": (9, 13), "Sin": (7, 22), "Softsign": (1, 22),
    "Sqrt": (1, 6, 13), "Tanh": (1, 6, 13),
}


@_op(*_UNARY, since=_UNARY_SINCE)
def _unary(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(_UNARY[node.op_type], b.tensor(node.input[0]))


@_op("Relu", since=(1, 6, 13, 14))
def _relu(b: _Builder, node: onnx.NodeProto) -> fx.Node:
    x = b.tensor(node.input[0])
    if not isinstance(x, fx.Node):  # a ReLU site stays a node even on a constant input
        x = b._const_node(x)
    relu = b.call(torch.relu, x)
    relu.meta["site_name"] = b.site_names[id(node)]
    return relu


@_op("Identity", "Dropout", since={
    "Identity": (1, 13, 14, 16, 19, 21, 23, 24, 25), "Dropout": (1, 6, 7, 10, 12, 13, 22),
})
def _identity(b: _Builder, node: onnx.NodeProto) -> Any:
    value = b.value(node.input[0])
    if node.op_type == "Dropout" and b.since >= 12 and b.has(node, 2):
        training = b.static(node.input[2])
        ratio = b.static(node.input[1]) if b.has(node, 1) else torch.tensor(0.5)
        if training is None or ratio is None:
            raise b.unsupported("Dropout with training_mode or ratio computed at run time")
        if bool(training.reshape(-1)[0]) and float(ratio.reshape(-1)[0]) != 0.0:
            raise b.unsupported("Dropout with training_mode=1 (random; no fixed result)")
    if len(node.output) > 1 and node.output[1]:  # Dropout's mask: nothing dropped at inference
        mask_dtype = torch.bool if b.since >= 10 else None  # before 10 the mask has X's type
        return [value, b.call(torch.ones_like, b.tensor(node.input[0]), dtype=mask_dtype)]
    return value


def _sizes_elementwise(
    b: _Builder, on_ints: Callable, on_nodes: Callable, names: Sequence[str]
) -> _Sizes:
    """Shape arithmetic element by element: ``on_ints`` when both elements are known ints
    (exact ONNX semantics), else an ``on_nodes`` node (an ``operator`` function, which stays
    traceable and exportable)."""
    operands = [b.as_sizes(name) for name in names]
    length = max(len(op.elems) for op in operands)
    if any(len(op.elems) not in (1, length) for op in operands):
        raise b.unsupported("shape arithmetic on values that do not broadcast")
    elems = []
    for i in range(length):
        args = [op.elems[i if len(op.elems) > 1 else 0] for op in operands]
        if all(isinstance(a, int) for a in args):
            elems.append(on_ints(*args))
        else:
            elems.append(b.call(on_nodes, *args))
    anchor = next((op.anchor for op in operands if op.anchor is not None), None)
    return _Sizes(tuple(elems), all(op.scalar for op in operands), operands[0].dtype, anchor)


def _trunc_div(a: int, c: int) -> int:
    """Integer division rounding toward zero (ONNX Div on integers) for Python ints."""
    quotient = abs(a) // abs(c)
    return quotient if (a >= 0) == (c >= 0) else -quotient


def _int_fmod(a: int, c: int) -> int:
    return a - c * _trunc_div(a, c)


# op: (tensor function, shape arithmetic on ints, on int nodes) - None: no shape arithmetic.
# Dimensions are non-negative, so floor division of nodes is ONNX's truncating division.
_BINARY: dict[str, tuple[Callable, Callable | None, Callable | None]] = {
    "Add": (torch.add, operator.add, operator.add),
    "Sub": (torch.sub, operator.sub, operator.sub),
    "Mul": (torch.mul, operator.mul, operator.mul),
    "Div": (torch.div, _trunc_div, operator.floordiv),
    "Pow": (torch.pow, None, None),
    "Equal": (torch.eq, None, None),
    "Less": (torch.lt, None, None),
    "LessOrEqual": (torch.le, None, None),
    "Greater": (torch.gt, None, None),
    "GreaterOrEqual": (torch.ge, None, None),
    "And": (torch.logical_and, None, None),
    "Or": (torch.logical_or, None, None),
    "Xor": (torch.logical_xor, None, None),
}


_ARITHMETIC_SINCE = (1, 6, 7, 13, 14)  # 1 and 6: the legacy broadcast/axis attributes
_BINARY_SINCE = {
    "Add": _ARITHMETIC_SINCE, "Sub": _ARITHMETIC_SINCE, "Mul": _ARITHMETIC_SINCE,
    "Div": _ARITHMETIC_SINCE, "Pow": (1, 7, 12, 13, 15), "Equal": (1, 7, 11, 13, 19),
    "Less": (1, 7, 9, 13), "Greater": (1, 7, 9, 13), "LessOrEqual": (12, 16),
    "GreaterOrEqual": (12, 16), "And": (1, 7), "Or": (1, 7), "Xor": (1, 7),
}


@_op(*_BINARY, since=_BINARY_SINCE)
def _binary(b: _Builder, node: onnx.NodeProto) -> Any:
    tensor_fn, on_ints, on_nodes = _BINARY[node.op_type]
    left, right = node.input[0], node.input[1]
    if on_ints is not None and (
        isinstance(b.value(left), _Sizes) or isinstance(b.value(right), _Sizes)
    ):
        if b.is_sizes_like(left) and b.is_sizes_like(right):
            return _sizes_elementwise(b, on_ints, on_nodes, [left, right])
    a, c = b.tensor(left), _legacy_broadcast(b, node, b.operand(right))
    dtype = b.dtype(left) or b.dtype(right)
    if node.op_type == "Div" and dtype in _INT_DTYPES:  # ONNX integer Div truncates toward 0
        return b.call(torch.div, a, c, rounding_mode="trunc")
    if node.op_type == "Div" and dtype is None:
        raise b.unsupported("Div on values whose type shape inference could not find")
    result = b.call(tensor_fn, a, c)
    if node.op_type == "Pow" and dtype in _INT_DTYPES and b.dtype(right) not in _INT_DTYPES:
        result = b.method("to", result, dtype)  # ONNX Pow keeps the base's type
    return result


def _legacy_broadcast(b: _Builder, node: onnx.NodeProto, right: Any) -> Any:
    """Before version 7, ``broadcast=1`` with ``axis`` lines B's dims up with A's from ``axis``
    (B of shape (C,) against A of shape (N, C, H, W) at axis 1), not numpy-style from the end:
    B gets trailing unit dims so that numpy broadcasting computes the same."""
    attrs = _attributes(node)
    if b.since >= 7 or not attrs.get("broadcast", 0) or "axis" not in attrs:
        return right
    if not isinstance(right, (fx.Node, torch.Tensor)):
        return right  # a scalar broadcasts either way
    left_rank = b.rank(node.input[0], f"{node.op_type} with legacy broadcast")
    right_rank = b.rank(node.input[1], f"{node.op_type} with legacy broadcast")
    for _ in range(left_rank - _normalize_axis(attrs["axis"], left_rank) - right_rank):
        right = b.call(torch.unsqueeze, right, -1)
    return right


@_op("Mod", since=(10, 13, 28))
def _mod(b: _Builder, node: onnx.NodeProto) -> Any:
    fmod = _attributes(node).get("fmod", 0)
    left, right = node.input[0], node.input[1]
    if (
        isinstance(b.value(left), _Sizes) or isinstance(b.value(right), _Sizes)
    ) and b.is_sizes_like(left) and b.is_sizes_like(right):
        on_ints = _int_fmod if fmod else operator.mod
        return _sizes_elementwise(b, on_ints, operator.mod, [left, right])
    fn = torch.fmod if fmod else torch.remainder
    return b.call(fn, b.tensor(left), b.operand(right))


@_op("Max", "Min", "Sum", "Mean", since={
    "Max": (1, 6, 8, 12, 13), "Min": (1, 6, 8, 12, 13), "Sum": (1, 6, 8, 13), "Mean": (1, 6, 8, 13),
})
def _variadic(b: _Builder, node: onnx.NodeProto) -> Any:
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[
        node.op_type
    ]
    operands = [b.tensor(name) for name in node.input if name]
    result = operands[0]
    for other in operands[1:]:
        result = b.call(fn, result, other)
    if node.op_type == "Mean" and len(operands) > 1:
        result = b.call(torch.div, result, float(len(operands)))
    return result


@_op("Where", since=(9, 16))
def _where(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(
        torch.where, b.tensor(node.input[0]), b.tensor(node.input[1]), b.operand(node.input[2])
    )


# ---- activations


@_op("LeakyRelu", since=(1, 6, 16))
def _leaky_relu(b: _Builder, node: onnx.NodeProto) -> Any:
    alpha = _attributes(node).get("alpha", 0.01)
    return b.call(F.leaky_relu, b.tensor(node.input[0]), alpha)


@_op("Elu", since=(1, 6, 22))
def _elu(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.elu, b.tensor(node.input[0]), _attributes(node).get("alpha", 1.0))


@_op("Celu", since=(12, 28))
def _celu(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.celu, b.tensor(node.input[0]), _attributes(node).get("alpha", 1.0))


@_op("Selu", since=(1, 6, 22))
def _selu(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return b.call(torch.mul, b.call(F.elu, b.tensor(node.input[0]), alpha), gamma)


@_op("ThresholdedRelu", since=(10, 22))
def _thresholded_relu(b: _Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    alpha = _attributes(node).get("alpha", 1.0)
    return b.call(torch.where, b.call(torch.gt, x, alpha), x, 0.0)


@_op("PRelu", since=(1, 6, 7, 9, 16))
def _prelu(b: _Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    slope = b.tensor(node.input[1])
    slope_shape = b.shape(node.input[1])
    if b.since < 7 and slope_shape is not None and len(slope_shape) == 1 and slope_shape[0] != 1:
        # Before version 7 a 1-D slope holds one value per channel (dim 1), as PyTorch's
        # exports of nn.PReLU(num_parameters=C) rely on; from 7 on it broadcasts numpy-style.
        for _ in range(b.rank(node.input[0], "PRelu with per-channel slopes") - 2):
            slope = b.call(torch.unsqueeze, slope, -1)
    negative = b.call(torch.mul, x, slope)
    return b.call(torch.where, b.call(torch.lt, x, 0), negative, x)


@_op("Swish", since=(24,))
def _swish(b: _Builder, node: onnx.NodeProto) -> Any:
    alpha = _attributes(node).get("alpha", 1.0)
    x = b.tensor(node.input[0])
    if alpha == 1.0:
        return b.call(F.silu, x)
    return b.call(torch.mul, x, b.call(torch.sigmoid, b.call(torch.mul, x, alpha)))


@_op("Softplus", since=(1, 22))
def _softplus(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.softplus, b.tensor(node.input[0]))


@_op("Gelu", since=(20,))
def _gelu(b: _Builder, node: onnx.NodeProto) -> Any:
    approximate = _attributes(node).get("approximate", "none")
    return b.call(F.gelu, b.tensor(node.input[0]), approximate=approximate)


@_op("HardSigmoid", since=(1, 6, 22))
def _hard_sigmoid(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    scaled = b.call(torch.add, b.call(torch.mul, b.tensor(node.input[0]), alpha), beta)
    return b.call(torch.clamp, scaled, 0.0, 1.0)


@_op("HardSwish", since=(14, 22))
def _hard_swish(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(F.hardswish, b.tensor(node.input[0]))


@_op("Clip", since=(1, 6, 11, 12, 13))
def _clip(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    bounds: list[Any] = [attrs.get("min"), attrs.get("max")]
    for i in (0, 1):
        if b.has(node, i + 1):
            const = b.static(node.input[i + 1])
            bounds[i] = const.item() if const is not None else b.tensor(node.input[i + 1])
    if bounds == [None, None]:
        return b.value(node.input[0])
    return b.call(torch.clamp, b.tensor(node.input[0]), bounds[0], bounds[1])


@_op("Softmax", "LogSoftmax", since=(1, 11, 13))
def _softmax(b: _Builder, node: onnx.NodeProto) -> Any:
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    x = b.tensor(node.input[0])
    if b.since >= 13:
        return b.call(fn, x, dim=_attributes(node).get("axis", -1))
    # Before opset 13 the input is coerced to 2-D at `axis`: dims axis.. are one softmax row.
    axis = _attributes(node).get("axis", 1)
    rank = b.rank(node.input[0])
    if (rank is not None and _normalize_axis(axis, rank) == rank - 1) or axis == -1:
        return b.call(fn, x, dim=-1)
    rows = b.call(fn, b.call(torch.flatten, x, axis), dim=-1)
    return b.method("reshape_as", rows, x)


# ---- linear algebra


@_op("MatMul", since=(1, 9, 13))
def _matmul(b: _Builder, node: onnx.NodeProto) -> Any:
    return b.call(torch.matmul, b.tensor(node.input[0]), b.tensor(node.input[1]))


@_op("Gemm", since=(1, 6, 7, 9, 11, 13))
def _gemm(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    a, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    c = b.tensor(node.input[2]) if b.has(node, 2) else None
    c_rank = b.rank(node.input[2]) if c is not None else None
    if alpha == 1.0 and (c is None or (beta == 1.0 and c_rank == 1)) and not trans_a:
        if trans_b:
            return b.call(F.linear, a, w, c)
    if trans_a:
        a = b.method("t", a)
    if trans_b:
        w = b.method("t", w)
    if c is None:
        product = b.call(torch.mm, a, w)
        return product if alpha == 1.0 else b.call(torch.mul, product, alpha)
    return b.call(torch.addmm, c, a, w, beta=beta, alpha=alpha)


@_op("Einsum", since=(12, 28))
def _einsum(b: _Builder, node: onnx.NodeProto) -> Any:
    equation = _attributes(node)["equation"]
    return b.call(torch.einsum, equation, *[b.tensor(name) for name in node.input])


# ---- convolution and pooling


def _spatial_pads(
    b: _Builder,
    node: onnx.NodeProto,
    x: Any,
    attrs: dict[str, Any],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[Any, Any]]:
    """(begin, end) padding of every spatial dim, from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * (2 * n)))
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.unsupported(f"{node.op_type} with auto_pad={auto_pad}")
    shape = b.shape(node.input[0])
    result = []
    for i in range(n):
        effective = (kernel[i] - 1) * dilations[i] + 1
        stride = strides[i]
        size = shape[2 + i] if shape is not None and len(shape) == n + 2 else None
        if size is not None:
            total = max(0, (-(-size // stride) - 1) * stride + effective - size)
        elif stride == 1:
            total = effective - 1
        elif effective >= stride:  # never negative: exact with symbolic sizes
            dim = b.dim(x, 2 + i)
            blocks = b.call(operator.floordiv, b.call(operator.add, dim, stride - 1), stride)
            covered = b.call(operator.mul, b.call(operator.sub, blocks, 1), stride)
            total = b.call(operator.sub, b.call(operator.add, covered, effective), dim)
        else:
            raise b.unsupported(f"{node.op_type} with auto_pad={auto_pad} on dynamic sizes")
        small = b.call(operator.floordiv, total, 2)
        large = b.call(operator.sub, total, small)
        result.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    return result


def _is_zero(value: Any) -> bool:
    return isinstance(value, int) and value == 0


def _torch_pad_list(pads: Sequence[tuple[Any, Any]]) -> list[Any]:
    """ONNX per-dim (begin, end) pairs, first dim first, as F.pad's last-dim-first list."""
    flat: list[Any] = []
    for begin, end in reversed(pads):
        flat.extend([begin, end])
    return flat


def _symmetric(pads: Sequence[tuple[Any, Any]]) -> bool:
    return all(isinstance(p, int) and isinstance(q, int) and p == q for p, q in pads)


def _spatial_count(b: _Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> int:
    if "kernel_shape" in attrs:
        return len(attrs["kernel_shape"])
    weight_rank = b.rank(node.input[1]) if len(node.input) > 1 else None
    if weight_rank is not None:
        return weight_rank - 2
    return b.rank(node.input[0], node.op_type) - 2


@_op("Conv", since=(1, 11, 22))
def _conv(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    n = _spatial_count(b, node, attrs)
    if n not in (1, 2, 3):
        raise b.unsupported(f"Conv with {n} spatial dimensions")
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    kernel = attrs.get("kernel_shape") or list(b.shape(node.input[1])[2:])
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = _spatial_pads(b, node, x, attrs, kernel, strides, dilations)
    padding: list[Any] = [0] * n
    if _symmetric(pads):
        padding = [p for p, _ in pads]
    else:
        x = b.call(F.pad, x, _torch_pad_list(pads))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return b.call(conv, x, w, bias, strides, padding, dilations, attrs.get("group", 1))


@_op("ConvTranspose", since=(1, 11, 22))
def _conv_transpose(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    n = _spatial_count(b, node, attrs)
    if n not in (1, 2, 3):
        raise b.unsupported(f"ConvTranspose with {n} spatial dimensions")
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise b.unsupported(f"ConvTranspose with auto_pad={auto_pad}")
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    output_padding = list(attrs.get("output_padding", [0] * n))
    if "output_shape" in attrs or auto_pad.startswith("SAME"):
        pads = _conv_transpose_pads(b, node, attrs, strides, dilations, output_padding)
        # A negative end "pad" is more output at the end, which is what output_padding adds.
        output_padding = [extra + max(0, -q) for extra, (_, q) in zip(output_padding, pads)]
        pads = [(p, max(0, q)) for p, q in pads]
        if any(p < 0 for p, _ in pads) or any(
            extra >= max(stride, dilation)
            for extra, stride, dilation in zip(output_padding, strides, dilations)
        ):
            raise b.unsupported("ConvTranspose with an output_shape beyond its full output")
    else:
        raw = [0] * (2 * n) if auto_pad == "VALID" else attrs.get("pads", [0] * (2 * n))
        pads = [(raw[i], raw[i + n]) for i in range(n)]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    group = attrs.get("group", 1)
    if _symmetric(pads):
        padding = [p for p, _ in pads]
        return b.call(conv, x, w, bias, strides, padding, output_padding, group, dilations)
    full = b.call(conv, x, w, bias, strides, 0, output_padding, group, dilations)
    index = (Ellipsis, *(slice(p, -q if q else None) for p, q in pads))
    return b.call(operator.getitem, full, index)


def _conv_transpose_pads(
    b: _Builder,
    node: onnx.NodeProto,
    attrs: dict[str, Any],
    strides: Sequence[int],
    dilations: Sequence[int],
    output_padding: Sequence[int],
) -> list[tuple[int, int]]:
    """(begin, end) crop of the full transposed convolution that gives ``output_shape`` (or
    ``input * stride`` for SAME_*), split as the ONNX spec says: SAME_UPPER puts the odd
    element at the end, SAME_LOWER and an explicit output_shape at the beginning."""
    n = len(strides)
    shape = b.shape(node.input[0])
    weight = b.shape(node.input[1])
    sizes = list(shape[2:]) if shape is not None and len(shape) == n + 2 else [None] * n
    kernel = list(attrs.get("kernel_shape") or (weight[2:] if weight is not None else []))
    if any(not isinstance(v, int) for v in (*sizes, *kernel)) or len(kernel) != n:
        raise b.unsupported("ConvTranspose with output_shape or auto_pad=SAME on dynamic sizes")
    wanted = list(attrs["output_shape"])[-n:] if "output_shape" in attrs else [
        size * stride for size, stride in zip(sizes, strides)
    ]
    pads = []
    for i in range(n):
        full = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - wanted[i]  # negative: the output extends past the full result
        small = total // 2
        upper = attrs.get("auto_pad") == "SAME_UPPER"
        pads.append((small, total - small) if upper else (total - small, small))
    return pads


def _pool_setup(b: _Builder, node: onnx.NodeProto) -> tuple:
    attrs = _attributes(node)
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    if n not in (1, 2, 3):
        raise b.unsupported(f"{node.op_type} with {n} spatial dimensions")
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    x = b.tensor(node.input[0])
    pads = _spatial_pads(b, node, x, attrs, kernel, strides, dilations)
    return attrs, x, kernel, strides, dilations, pads, n


def _fits_torch_padding(pads: Sequence[tuple[Any, Any]], kernel: Sequence[int],
                        dilations: Sequence[int]) -> bool:
    return _symmetric(pads) and all(
        p <= ((k - 1) * d + 1) // 2 for (p, _), k, d in zip(pads, kernel, dilations)
    )


@_op("MaxPool", since=(1, 8, 10, 11, 12, 22))
def _max_pool(b: _Builder, node: onnx.NodeProto) -> Any:
    if len(node.output) > 1 and node.output[1]:
        raise b.unsupported("MaxPool with an Indices output")
    attrs, x, kernel, strides, dilations, pads, n = _pool_setup(b, node)
    padding: list[Any] = [0] * n
    if _fits_torch_padding(pads, kernel, dilations):
        padding = [p for p, _ in pads]
    else:
        x = b.call(F.pad, x, _torch_pad_list(pads), value=float("-inf"))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return b.call(pool, x, kernel, strides, padding, dilations, bool(attrs.get("ceil_mode", 0)))


@_op("AveragePool", since=(1, 7, 10, 11, 19, 22))
def _average_pool(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs, x, kernel, strides, dilations, pads, n = _pool_setup(b, node)
    if any(d != 1 for d in dilations):
        raise b.unsupported("AveragePool with dilations")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    if _fits_torch_padding(pads, kernel, dilations):
        padding = [p for p, _ in pads]
        return b.call(pool, x, kernel, strides, padding, ceil_mode, include_pad)
    flat = _torch_pad_list(pads)
    summed = b.call(pool, b.call(F.pad, x, flat), kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return summed
    # Average over real elements only: the same pooling of a padded mask of ones divides out.
    ones = b.call(F.pad, b.call(torch.ones_like, x), flat)
    return b.call(torch.div, summed, b.call(pool, ones, kernel, strides, 0, ceil_mode, True))


@_op("GlobalAveragePool", "GlobalMaxPool", since=(1, 22))
def _global_pool(b: _Builder, node: onnx.NodeProto) -> Any:
    rank = b.rank(node.input[0], node.op_type)
    dims = tuple(range(2, rank))
    fn = torch.mean if node.op_type == "GlobalAveragePool" else torch.amax
    return b.call(fn, b.tensor(node.input[0]), dim=dims, keepdim=True)


# ---- normalization


@_op("BatchNormalization", since=(1, 6, 7, 9, 14, 15))
def _batch_norm(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    if attrs.get("training_mode", 0) or any(name for name in node.output[1:]):
        raise b.unsupported("BatchNormalization in training mode")
    if not attrs.get("spatial", 1):
        raise b.unsupported("BatchNormalization with spatial=0 (per-activation statistics)")
    eps = attrs.get("epsilon", 1e-5)
    x, scale, bias, mean, var = (b.tensor(name) for name in node.input[:5])
    if not (b.is_frozen(node.input[3]) and b.is_frozen(node.input[4])):
        # The statistics are trained too (exporters share equal initializers, so a zero bias
        # and a zero running mean can be one tensor): fold them into the affine part, which
        # is differentiable in all four, and normalize with fixed zero mean and unit variance.
        factor = b.call(torch.mul, scale, b.call(torch.rsqrt, b.call(torch.add, var, eps)))
        shift = b.call(torch.sub, bias, b.call(torch.mul, mean, factor))
        zeros, ones = b.call(torch.zeros_like, mean), b.call(torch.ones_like, var)
        return b.call(F.batch_norm, x, zeros, ones, factor, shift, False, 0.0, 0.0)
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


@_op("LRN", since=(1, 13))
def _lrn(b: _Builder, node: onnx.NodeProto) -> Any:
    """Local response normalization across channels (AlexNet, CaffeNet, GoogLeNet, ZFNet).

    ONNX sums the squares of channels ``c - floor((size-1)/2) .. c + ceil((size-1)/2)``;
    ``F.local_response_norm`` puts an even window's extra channel on the other side, so the
    window is summed here from shifted views of the zero-padded squares.
    """
    attrs = _attributes(node)
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0], "LRN")
    padded = b.call(F.pad, b.call(torch.mul, x, x), [0, 0] * (rank - 2) + [(size - 1) // 2,
                                                                        size // 2])
    channels = b.dim(x, 1)
    total = b.method("narrow", padded, 1, 0, channels)
    for shift in range(1, size):
        total = b.call(torch.add, total, b.method("narrow", padded, 1, shift, channels))
    scale = b.call(torch.add, b.call(torch.mul, total, alpha / size), bias)
    return b.call(torch.div, x, b.call(torch.pow, scale, beta))


@_op("InstanceNormalization", since=(1, 6, 22))
def _instance_norm(b: _Builder, node: onnx.NodeProto) -> Any:
    eps = _attributes(node).get("epsilon", 1e-5)
    x, scale, bias = (b.tensor(name) for name in node.input[:3])
    return b.call(F.instance_norm, x, weight=scale, bias=bias, eps=eps)


@_op("LayerNormalization", "RMSNormalization",
     since={"LayerNormalization": (17,), "RMSNormalization": (23,)})
def _layer_norm(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    if any(name for name in node.output[1:]):
        raise b.unsupported(f"{node.op_type} with Mean/InvStdDev outputs")
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    if axis >= 0:
        axis -= b.rank(node.input[0], f"{node.op_type} with a non-negative axis")
    x = b.tensor(node.input[0])
    scale = b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if b.has(node, 2) else None
    scale_shape = b.shape(node.input[1])
    bias_shape = b.shape(node.input[2]) if bias is not None else None
    if (
        scale_shape is not None
        and len(scale_shape) == -axis
        and all(isinstance(d, int) and d > 1 for d in scale_shape)
        and (bias is None or bias_shape == scale_shape)
    ):  # scale (and bias) have exactly the normalized shape: torch's affine form
        shape = list(scale_shape)
        if node.op_type == "RMSNormalization":
            return b.call(F.rms_norm, x, shape, scale, eps)
        return b.call(F.layer_norm, x, shape, scale, bias, eps)
    normalized = [b.dim(x, i) for i in range(axis, 0)]
    if node.op_type == "RMSNormalization":
        plain = b.call(F.rms_norm, x, normalized, None, eps)
    else:
        plain = b.call(F.layer_norm, x, normalized, None, None, eps)
    result = b.call(torch.mul, plain, scale)  # a scale that broadcasts
    return result if bias is None else b.call(torch.add, result, bias)


# ---- shape and layout


@_op("Shape", since=(1, 13, 15, 19, 21, 23, 24, 25))
def _shape(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    value = b.value(node.input[0])
    if isinstance(value, (_Weight, torch.Tensor, _Sizes)):
        dims = list(b.shape(node.input[0]))
    elif b.rank(node.input[0]) is None:  # read at run time: traces, but does not export
        shape = b.shape_tensor(value)
        start, end = attrs.get("start", 0), attrs.get("end")
        return shape if (start, end) == (0, None) else b.call(
            operator.getitem, shape, slice(start, end)
        )
    else:
        dims = [b.dim(value, i) for i in range(b.rank(node.input[0]))]
    start, end = attrs.get("start", 0), attrs.get("end")
    anchor = value if isinstance(value, fx.Node) else None
    return _Sizes(tuple(dims[start:end]), False, anchor=anchor)


@_op("Size", since=(1, 13, 19, 21, 23, 24, 25))
def _size(b: _Builder, node: onnx.NodeProto) -> Any:
    value = b.value(node.input[0])
    if isinstance(value, fx.Node):
        return _Sizes((b.method("numel", value),), True, anchor=value)
    return torch.tensor(math.prod(b.shape(node.input[0])), dtype=torch.int64)


@_op("Constant", since=(1, 9, 11, 12, 13, 19, 21, 23, 24, 25))
def _constant(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise b.unsupported(f"Constant with {', '.join(attrs) or 'no value'}")


@_op("ConstantOfShape", since=(9, 20, 21, 23, 24, 25))
def _constant_of_shape(b: _Builder, node: onnx.NodeProto) -> Any:
    fill = _attributes(node).get("value", torch.zeros(1, dtype=torch.float32))
    shape = b.sizes(node.input[0])
    device = b.device_of(b.anchor(node.input[0]))
    return b.call(torch.full, shape, fill.reshape(()).item(), dtype=fill.dtype, device=device)


@_op("Cast", "CastLike", since={
    "Cast": (1, 6, 9, 13, 19, 21, 23, 24, 25, 28), "CastLike": (15, 19, 21, 23, 24, 25),
})
def _cast(b: _Builder, node: onnx.NodeProto) -> Any:
    if node.op_type == "Cast":
        to = _attributes(node)["to"]
        if isinstance(to, str):  # version 1 names the type ("FLOAT")
            to = TensorProto.DataType.Value(to.upper())
        if to not in _TORCH_DTYPES:
            raise b.unsupported(f"Cast to {TensorProto.DataType.Name(to)}")
        dtype = _TORCH_DTYPES[to]
    else:
        dtype = b.dtype(node.input[1])
        if dtype is None:
            raise b.unsupported("CastLike to a type shape inference could not find")
    value = b.value(node.input[0])
    if isinstance(value, _Sizes) and dtype in _INT_DTYPES:
        return replace(value, dtype=dtype)
    return b.method("to", b.tensor(node.input[0]), dtype)


@_op("Reshape", since=(1, 5, 13, 14, 19, 21, 23, 24, 25))
def _reshape(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    allow_zero = attrs.get("allowzero", 0)
    value = b.value(node.input[0])
    target = list(attrs["shape"]) if b.since < 5 else b.sizes(node.input[1])
    if (
        isinstance(value, _Sizes)
        and isinstance(target, list)
        and all(isinstance(t, int) for t in target)
    ):
        count = len(value.elems)
        if (not target and count == 1) or (len(target) == 1 and target[0] in (-1, count)):
            return replace(value, scalar=not target)
    x = b.tensor(node.input[0])
    if isinstance(target, list):
        if not allow_zero:
            target = [
                b.dim(x, i) if isinstance(t, int) and t == 0 else t for i, t in enumerate(target)
            ]
        return b.method("reshape", x, target)
    # The target is run-time data: read it (this is the one place a value leaves the graph).
    target_tensor = b.tensor(node.input[1])
    if not allow_zero:  # a 0 entry copies the input's size at that index
        length = (b.shape(node.input[1]) or (None,))[0]
        rank = b.rank(node.input[0])
        if length is None or rank is None:
            raise b.unsupported("Reshape to a run-time shape whose length or input rank is unknown")
        current = b.shape_tensor(x)
        if length > rank:  # entries past the input's rank cannot be 0; any filler will do
            current = b.call(F.pad, current, (0, length - rank), value=1)
        current = b.call(operator.getitem, current, slice(0, length))
        target_tensor = b.call(torch.where, b.call(torch.eq, target_tensor, 0), current,
                               target_tensor)
    return b.method("reshape", x, b.method("tolist", target_tensor))


@_op("Flatten", since=(1, 9, 11, 13, 21, 23, 24, 25))
def _flatten(b: _Builder, node: onnx.NodeProto) -> Any:
    axis = _attributes(node).get("axis", 1)
    x = b.tensor(node.input[0])
    if axis < 0:
        axis += b.rank(node.input[0], "Flatten with a negative axis")
    if axis == b.rank(node.input[0]):
        return b.method("reshape", x, -1, 1)
    if axis == 0:
        return b.method("reshape", x, 1, -1)
    rows = b.call(torch.flatten, x, axis)
    return rows if axis == 1 else b.call(torch.flatten, rows, 0, axis - 1)


@_op("Transpose", since=(1, 13, 21, 23, 24, 25))
def _transpose(b: _Builder, node: onnx.NodeProto) -> Any:
    perm = _attributes(node).get("perm")
    if perm is None:
        perm = list(reversed(range(b.rank(node.input[0], "Transpose without perm"))))
    value = b.value(node.input[0])
    if isinstance(value, _Sizes):
        return value
    return b.method("permute", b.tensor(node.input[0]), list(perm))


@_op("Squeeze", since=(1, 11, 13, 21, 23, 24, 25))
def _squeeze(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    axes = attrs.get("axes")
    if b.has(node, 1):
        axes = b.ints(node.input[1], "Squeeze axes")
    value = b.value(node.input[0])
    if isinstance(value, _Sizes) and len(value.elems) == 1 and axes in (None, [0], [-1]):
        return replace(value, scalar=True)
    x = b.tensor(node.input[0])
    if axes is None:
        return b.call(torch.squeeze, x)
    return b.call(torch.squeeze, x, tuple(axes))


@_op("Unsqueeze", since=(1, 11, 13, 21, 23, 24, 25))
def _unsqueeze(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    axes = attrs.get("axes")
    if b.has(node, 1):
        axes = b.ints(node.input[1], "Unsqueeze axes")
    value = b.value(node.input[0])
    if isinstance(value, _Sizes) and value.scalar and list(axes) in ([0], [-1]):
        return replace(value, scalar=False)
    x = b.tensor(node.input[0])
    if all(a >= 0 for a in axes):
        order = sorted(axes)
    elif all(a < 0 for a in axes):
        order = sorted(axes, reverse=True)
    else:
        out_rank = b.rank(node.input[0], "Unsqueeze with mixed-sign axes") + len(axes)
        order = sorted(_normalize_axis(a, out_rank) for a in axes)
    for axis in order:
        x = b.call(torch.unsqueeze, x, axis)
    return x


@_op("Concat", since=(1, 4, 11, 13))
def _concat(b: _Builder, node: onnx.NodeProto) -> Any:
    axis = _attributes(node).get("axis", 1 if b.since < 4 else None)
    if axis is None:
        raise BadInputError(f"ONNX Concat node {b.current_label!r} has no axis attribute")
    names = [name for name in node.input if name]
    if any(isinstance(b.value(n), _Sizes) for n in names) and all(
        b.is_sizes_like(n) and not b.as_sizes(n).scalar for n in names
    ):
        parts = [b.as_sizes(n) for n in names]
        anchor = next((p.anchor for p in parts if p.anchor is not None), None)
        return _Sizes(tuple(e for p in parts for e in p.elems), False, parts[0].dtype, anchor)
    return b.call(torch.cat, [b.tensor(n) for n in names], axis)


@_op("Split", since=(1, 2, 11, 13, 18))
def _split(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    axis = attrs.get("axis", 0)
    split = attrs.get("split")
    if b.has(node, 1):
        split = b.ints(node.input[1], "Split sizes")
    x = b.tensor(node.input[0])
    if split is not None:
        parts = b.call(torch.split, x, list(split), axis)
    else:
        count = attrs.get("num_outputs", len(node.output))
        parts = b.call(torch.chunk, x, count, axis)
    return [b.call(operator.getitem, parts, i) for i in range(len(node.output))]


def _slice_bound(value: Any) -> Any:
    if isinstance(value, int) and abs(value) >= _BIG:
        return None
    return value


@_op("Slice", since=(1, 10, 11, 13))
def _slice(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    if b.since < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = b.sizes(node.input[1]), b.sizes(node.input[2])
        if not isinstance(starts, list) or not isinstance(ends, list):
            raise b.unsupported("Slice with bounds computed from tensor data")
        axes = b.ints(node.input[3], "Slice axes") if b.has(node, 3) else list(
            range(len(starts))
        )
        steps = b.ints(node.input[4], "Slice steps") if b.has(node, 4) else [1] * len(starts)
    value = b.value(node.input[0])
    if isinstance(value, _Sizes) and axes in ([0], [-1]):
        if isinstance(starts[0], int) and isinstance(ends[0], int):
            window = slice(_slice_bound(starts[0]), _slice_bound(ends[0]), steps[0])
            return replace(value, elems=value.elems[window], scalar=False)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0])
    if any(a < 0 for a in axes) and not all(a < 0 for a in axes):
        if rank is None:
            raise b.unsupported("Slice with mixed-sign axes on a tensor of unknown rank")
        axes = [_normalize_axis(a, rank) for a in axes]
    windows: dict[int, slice] = {}
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step < 0:
            shape = b.shape(node.input[0])
            size = shape[axis] if shape is not None else None
            if not isinstance(size, int) or not isinstance(start, int) or not isinstance(end, int):
                raise b.unsupported("Slice with a negative step on a dynamic dimension")
            picked = list(range(*slice(start, end, step).indices(size)))
            x = b.method("index_select", x, axis, torch.tensor(picked, dtype=torch.int64))
            continue
        windows[axis] = slice(_slice_bound(start), _slice_bound(end), step if step != 1 else None)
    if not windows:
        return x
    if all(a >= 0 for a in windows):
        index = tuple(windows.get(i, slice(None)) for i in range(max(windows) + 1))
    else:
        index = (Ellipsis, *(windows.get(i, slice(None)) for i in range(min(windows), 0)))
    return b.call(operator.getitem, x, index)


@_op("Gather", since=(1, 11, 13))
def _gather(b: _Builder, node: onnx.NodeProto) -> Any:
    axis = _attributes(node).get("axis", 0)
    value = b.value(node.input[0])
    indices = b.static(node.input[1])
    if isinstance(value, _Sizes) and indices is not None and indices.dim() <= 1:
        picked = tuple(value.elems[int(i)] for i in indices.reshape(-1).tolist())
        return replace(value, elems=picked, scalar=indices.dim() == 0)
    x = b.tensor(node.input[0])
    index: Any = indices.item() if indices is not None and indices.dim() == 0 else b.tensor(
        node.input[1]
    )
    key = (
        (*(slice(None),) * axis, index)
        if axis >= 0
        else (Ellipsis, index, *(slice(None),) * (-axis - 1))
    )
    return b.call(operator.getitem, x, key)


@_op("GatherElements", since=(11, 13))
def _gather_elements(b: _Builder, node: onnx.NodeProto) -> Any:
    axis = _attributes(node).get("axis", 0)
    x, indices = b.tensor(node.input[0]), b.tensor(node.input[1])
    # ONNX counts negative indices from the end of the axis; torch.gather refuses them.
    wrapped = b.call(torch.add, indices, b.dim(x, axis))
    indices = b.call(torch.where, b.call(torch.lt, indices, 0), wrapped, indices)
    return b.call(torch.gather, x, axis, indices)


@_op("Expand", since=(8, 13))
def _expand(b: _Builder, node: onnx.NodeProto) -> Any:
    x = b.tensor(node.input[0])
    target = b.sizes(node.input[1])
    rank = b.rank(node.input[0])
    if isinstance(target, list) and rank is not None:
        out_rank = max(rank, len(target))
        sizes: list[Any] = [-1] * (out_rank - len(target))
        for i, size in enumerate(target):
            aligned = i + out_rank - len(target) - (out_rank - rank)
            sizes.append(-1 if aligned >= 0 and isinstance(size, int) and size == 1 else size)
        return b.method("expand", x, sizes)
    zeros = b.method("new_zeros", x, target, dtype=torch.bool)
    return b.call(operator.getitem, b.call(torch.broadcast_tensors, x, zeros), 0)


@_op("Tile", since=(6, 13))
def _tile(b: _Builder, node: onnx.NodeProto) -> Any:
    repeats = b.sizes(node.input[1])
    return b.method("repeat", b.tensor(node.input[0]), repeats)


@_op("Range", since=(11, 27))
def _range(b: _Builder, node: onnx.NodeProto) -> Any:
    start, limit, delta = (b.scalar(name, "Range bounds") for name in node.input[:3])
    dtype = b.dtype(node.input[0])
    if dtype is None:
        raise b.unsupported("Range of a type shape inference could not find")
    # torch.arange computes start + i * delta in float32 or wider, which is stash_type=1.
    if not _attributes(node).get("stash_type", 1) and dtype in (torch.float16, torch.bfloat16):
        raise b.unsupported("Range with stash_type=0 in half precision")
    anchor = next(filter(None, (b.anchor(name) for name in node.input[:3])), None)
    return b.call(torch.arange, start, limit, delta, dtype=dtype, device=b.device_of(anchor))


@_op("Pad", since=(1, 2, 11, 13, 18, 19, 21, 23, 24, 25))
def _pad(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    mode = attrs.get("mode", "constant")
    if b.since < 11:
        pads: list[Any] = list(attrs["paddings"] if b.since < 2 else attrs["pads"])
        fill: Any = attrs.get("value", 0.0)
    else:
        pads = b.sizes(node.input[1])
        if not isinstance(pads, list):
            raise b.unsupported("Pad with pads computed from tensor data")
        fill = b.scalar(node.input[2], "Pad value") if b.has(node, 2) else 0
    x = b.tensor(node.input[0])
    half = len(pads) // 2
    if b.has(node, 3):
        rank = b.rank(node.input[0], "Pad with axes")
        axes = [_normalize_axis(a, rank) for a in b.ints(node.input[3], "Pad axes")]
    else:
        rank, axes = half, list(range(half))
    per_dim = {a: (pads[i], pads[i + half]) for i, a in enumerate(axes)}
    padded = [a for a, (p, q) in per_dim.items() if not (_is_zero(p) and _is_zero(q))]
    if not padded:
        return b.value(node.input[0])
    # F.pad lists (begin, end) from the last dim backwards, down to the first padded dim.
    flat = _torch_pad_list([per_dim.get(d, (0, 0)) for d in range(min(padded), rank)])
    if mode == "constant":
        return b.call(F.pad, x, flat, value=fill)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise b.unsupported(f"Pad with mode={mode}")
    shape = b.shape(node.input[0])
    if shape is not None and all(
        isinstance(v, int) for d in padded for v in (shape[d], *per_dim[d])
    ):  # any dims, any rank: pick the source element of every output position
        for d in padded:
            index = _pad_source_index(shape[d], *per_dim[d], mode)
            x = b.method("index_select", x, d, index)
        return x
    # F.pad pads the last 1-3 dims of a tensor with one or two more dims in front.
    count = rank - min(padded)
    if count > 3 or rank > count + 2:
        raise b.unsupported(f"Pad with mode={mode} of dims {padded} of dynamic size")
    return b.call(F.pad, x, flat, mode=torch_mode)


def _pad_source_index(size: int, before: int, after: int, mode: str) -> torch.Tensor:
    """For each position of a dim padded by (before, after), the input index it copies."""
    positions = torch.arange(-before, size + after)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    period = max(2 * (size - 1), 1)  # reflect: mirror at both ends, without the edge twice
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


# ---- reductions


_REDUCE: dict[str, Callable] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
    "ReduceProd": torch.prod,
    "ReduceL1": torch.linalg.vector_norm,
    "ReduceL2": torch.linalg.vector_norm,
    "ReduceLogSumExp": torch.logsumexp,
    "ReduceSumSquare": torch.sum,
    "ReduceLogSum": torch.sum,
}


_REDUCE_SINCE = {
    op: (1, 11, 13, 18) for op in _REDUCE if op not in ("ReduceSum", "ReduceMax", "ReduceMin")
} | {
    "ReduceSum": (1, 11, 13), "ReduceMax": (1, 11, 12, 13, 18, 20),
    "ReduceMin": (1, 11, 12, 13, 18, 20), "ReduceLogSum": (1, 11, 13, 18, 28),
    "ReduceLogSumExp": (1, 11, 13, 18, 28),
}


@_op(*_REDUCE, since=_REDUCE_SINCE)
def _reduce(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    keepdim = bool(attrs.get("keepdims", 1))
    axes = attrs.get("axes")
    if b.has(node, 1):
        axes = b.ints(node.input[1], f"{node.op_type} axes")
    x = b.tensor(node.input[0])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return b.value(node.input[0])
        axes = None
    if node.op_type == "ReduceSumSquare":
        x = b.call(torch.mul, x, x)
    if node.op_type in ("ReduceProd", "ReduceLogSumExp") and axes is None:
        axes = list(range(b.rank(node.input[0], node.op_type)))
    dim = tuple(axes) if axes is not None else None
    if node.op_type in ("ReduceMax", "ReduceMin") and dim is None:
        dim = ()
    if node.op_type == "ReduceProd":
        rank = b.rank(node.input[0])
        order = sorted(
            (_normalize_axis(a, rank) if rank is not None else a for a in dim), reverse=True
        )
        if any(a < 0 for a in order):
            raise b.unsupported("ReduceProd with negative axes on a tensor of unknown rank")
        for axis in order:
            x = b.call(torch.prod, x, axis, keepdim)
        return x
    if node.op_type in ("ReduceL1", "ReduceL2"):
        order_p = 1 if node.op_type == "ReduceL1" else 2
        return b.call(torch.linalg.vector_norm, x, order_p, dim, keepdim)
    result = b.call(_REDUCE[node.op_type], x, dim=dim, keepdim=keepdim)
    if node.op_type == "ReduceLogSum":
        result = b.call(torch.log, result)
    return result


@_op("ArgMax", "ArgMin", since=(1, 11, 12, 13))
def _arg_reduce(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    axis, keepdim = attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
    x = b.tensor(node.input[0])
    if not attrs.get("select_last_index", 0):
        return b.call(fn, x, axis, keepdim)
    # The last of equal extremes: the first one along the reversed axis, counted back.
    first = b.call(fn, b.call(torch.flip, x, [axis]), axis, keepdim)
    return b.call(torch.sub, b.call(operator.sub, b.dim(x, axis), 1), first)


# ---- resizing


def _resize_mode(b: _Builder, attrs: dict[str, Any], integer_upscale: bool) -> tuple[str, Any]:
    """The F.interpolate mode (and align_corners) that computes this ONNX Resize exactly."""
    mode = attrs.get("mode", "nearest")
    legacy = b.since < 11 or b.current.op_type == "Upsample"
    transform = "asymmetric" if legacy else attrs.get("coordinate_transformation_mode",
                                                      "half_pixel")
    if attrs.get("antialias", 0):
        raise b.unsupported("Resize with antialias")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise b.unsupported("Resize with keep_aspect_ratio_policy")
    if mode == "nearest":
        rounding = "floor" if legacy else attrs.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and rounding == "floor":
            return "nearest", None
        no_ties = rounding == "round_prefer_floor" and integer_upscale
        if transform in ("half_pixel", "pytorch_half_pixel") and (
            rounding == "round_prefer_ceil" or no_ties
        ):
            return "nearest-exact", None  # floor((x + 0.5) / scale): no ties at integer scales
        raise b.unsupported(f"Resize nearest with {transform} and {rounding}")
    if mode == "linear":
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return "linear", False
        if transform == "align_corners":
            return "linear", True
        raise b.unsupported(f"Resize linear with {transform}")
    raise b.unsupported(f"Resize with mode={mode}")


@_op("Resize", "Upsample", since={"Resize": (10, 11, 13, 18, 19), "Upsample": (7, 9, 10)})
def _resize(b: _Builder, node: onnx.NodeProto) -> Any:
    attrs = _attributes(node)
    x = b.tensor(node.input[0])
    rank = b.rank(node.input[0], node.op_type)
    axes = list(attrs.get("axes", range(rank)))
    axes = [_normalize_axis(a, rank) for a in axes]
    scales: list[float] | None = None
    sizes: list[Any] | None = None
    if node.op_type == "Upsample" and "scales" in attrs:
        scales = list(attrs["scales"])
    elif b.since < 11 or node.op_type == "Upsample":
        scales = b.floats(node.input[1], "Resize scales")
    else:
        if b.has(node, 2) and b.static(node.input[2]) is not None and b.static(
            node.input[2]
        ).numel():
            scales = b.floats(node.input[2], "Resize scales")
        elif b.has(node, 3):
            found = b.sizes(node.input[3])
            if not isinstance(found, list):
                raise b.unsupported("Resize with sizes computed from tensor data")
            sizes = found
        else:
            raise b.unsupported("Resize with scales computed at run time")
    per_axis = scales if scales is not None else sizes
    full: dict[int, Any] = dict(zip(axes, per_axis))
    if any(full.get(a, 1) not in (1, 1.0) for a in (0, 1)) and sizes is None:
        raise b.unsupported("Resize of the batch or channel dimension")
    spatial = list(range(2, rank))
    if not 1 <= len(spatial) <= 3:
        raise b.unsupported(f"Resize of a rank-{rank} tensor")
    integer_upscale = scales is not None and all(
        float(full.get(a, 1.0)).is_integer() and full.get(a, 1.0) >= 1 for a in spatial
    )
    mode, align_corners = _resize_mode(b, attrs, integer_upscale)
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[len(spatial) - 1]
    kwargs: dict[str, Any] = {"mode": mode}
    if align_corners is not None:
        kwargs["align_corners"] = align_corners
    if scales is not None:
        kwargs["scale_factor"] = [float(full.get(a, 1.0)) for a in spatial]
    else:
        kwargs["size"] = [full[a] if a in full else b.dim(x, a) for a in spatial]
    return b.call(F.interpolate, x, **kwargs)


SUPPORTED_OPS: frozenset[str] = frozenset(_HANDLERS)
"""ONNX op types (default domain) that :func:`onnx_to_torch` can run."""


# --------------------------------------------------------------------------- public API


def onnx_to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """Build a ``torch.fx.GraphModule`` that computes what ``model``'s main graph computes.

    The module's parameters are ``model``'s float initializers, named by :func:`torch_name`;
    train them and hand the state dict to :func:`write_back_initializers`. ``model`` is not
    modified. Raises :class:`UnsupportedModelError` naming every op type it cannot run
    (control flow, ops of other domains, ops it does not know), and for an op feature it cannot
    express; :class:`BadInputError` for a malformed graph.
    """
    unsupported = _unsupported_ops(model)
    if unsupported:
        message = f"cannot fine-tune this ONNX model: unsupported ops {', '.join(unsupported)}"
        if any(op in _CONTROL_FLOW for op in unsupported):
            message += " (control flow cannot be fine-tuned)"
        raise UnsupportedModelError(message)
    unknown = _unknown_versions(model)
    if unknown:
        raise UnsupportedModelError(
            "cannot fine-tune this ONNX model: op versions this converter does not implement: "
            + ", ".join(unknown)
        )
    _check_value_types(model)
    if len(model.graph.sparse_initializer):
        raise UnsupportedModelError("cannot fine-tune this ONNX model: it has sparse initializers")
    initializer_torch_names(model)  # refuses the (theoretical) name collision up front
    builder = _Builder(model)
    builder.add_inputs()
    builder.add_nodes()
    builder.add_outputs()
    graph = builder.graph
    for node in reversed(list(graph.nodes)):  # drop unused shape nodes; ReLU sites all stay
        if node.op in ("call_function", "call_method", "get_attr") and not node.users:
            if "site_name" not in node.meta:
                graph.erase_node(node)
    graph.lint()
    module = fx.GraphModule(builder.root, graph, class_name="OnnxGraphModule")
    for name in builder.constant_buffers:
        if name in module._buffers:
            module.register_buffer(name, module._buffers[name], persistent=False)
    return module


def _set_initializer(init: TensorProto, value: torch.Tensor) -> None:
    """Overwrite ``init``'s data with ``value`` in ``init``'s own type; name and dims stay."""
    dims = tuple(init.dims)
    if tuple(value.shape) != dims:
        raise BadInputError(
            f"trained value for ONNX initializer {init.name!r} has shape {tuple(value.shape)}, "
            f"the model expects {dims}"
        )
    dtype = _TORCH_DTYPES.get(init.data_type)
    if dtype is None:
        raise UnsupportedModelError(
            f"cannot write ONNX initializer {init.name!r} of type "
            f"{TensorProto.DataType.Name(init.data_type)}"
        )
    tensor = value.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy()
    else:
        array = tensor.numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    for field in ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                  "uint64_data", "external_data"):
        init.ClearField(field)
    init.data_location = TensorProto.DEFAULT
    init.raw_data = array.tobytes()


def write_back_initializers(
    original: onnx.ModelProto,
    state_dict: Mapping[str, torch.Tensor],
    *,
    extra: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``original`` whose initializers hold the trained values of ``state_dict``.

    Keys are matched through :func:`torch_name`; keys that name no initializer (the new
    activations' parameters, constant buffers) are ignored. Every written initializer keeps its
    name, type and shape (a value of another shape raises :class:`BadInputError`); the graph,
    inputs, outputs and opsets are untouched. ``extra`` sets initializers by ONNX name: an
    existing one is overwritten in its own type, a new name is added with the array's type.
    Written values are stored inline, also those that were in an external data file.
    ``original`` is never modified.
    """
    updated = onnx.ModelProto()
    updated.CopyFrom(original)
    by_attr = {torch_name(init.name): init for init in updated.graph.initializer}
    if len(by_attr) != len(updated.graph.initializer):
        raise BadInputError("two ONNX initializer names map to the same torch attribute name")
    for key, value in state_dict.items():
        init = by_attr.get(key)
        if init is not None:
            _set_initializer(init, value)
    by_name = {init.name: init for init in updated.graph.initializer}
    for name, array in (extra or {}).items():
        array = np.asarray(array)
        if name in by_name:
            _set_initializer(by_name[name], torch.from_numpy(np.array(array, copy=True)))
        else:
            updated.graph.initializer.append(numpy_helper.from_array(array, name))
    return updated
