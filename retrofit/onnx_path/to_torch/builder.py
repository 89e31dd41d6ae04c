"""Build the torch module for an ONNX graph: the up-front model checks, the graph builder that
runs each node's registered handler in topological order, and :func:`onnx_to_torch`.

The contract callers rely on is the package's (:mod:`retrofit.onnx_path.to_torch`).
"""

from __future__ import annotations

import builtins
import keyword
import operator
from typing import Any, Callable, Iterator

import onnx
import torch
from onnx import TensorProto
from torch import fx, nn

from retrofit.errors import BadInputError, RetrofitError, UnsupportedModelError, first_line
from retrofit.onnx_path.site_names import DEFAULT_DOMAINS, default_opset, graph_site_names, is_relu
from retrofit.onnx_path.to_torch.context import (
    FLOAT_TYPES,
    INT_DTYPES,
    TORCH_DTYPES,
    Sizes,
    Weight,
    tensor_from_proto,
)
from retrofit.onnx_path.to_torch.registry import HANDLERS, op_types, op_version
from retrofit.onnx_path.to_torch.weights import UNSAFE_CHARS, initializer_torch_names, torch_name

__all__ = ["onnx_to_torch"]


_CONTROL_FLOW = ("If", "Loop", "Scan")
# Names a placeholder must not take: the generated forward() uses them.
_RESERVED_NAMES = frozenset(dir(builtins)) | {"self", "torch", "inf", "nan", "operator", "fx"}


def _contains_node(obj: Any) -> bool:
    found = False

    def visit(node: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return node

    fx.node.map_arg(obj, visit)
    return found


def _default_opset(model: onnx.ModelProto) -> int:
    opset = default_opset(model.opset_import)
    if opset is None:
        raise BadInputError("the ONNX model does not import the default operator set")
    return opset


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _unsupported_ops(model: onnx.ModelProto) -> list[str]:
    supported = op_types()
    return sorted(
        {
            _op_label(node)
            for node in model.graph.node
            if node.domain not in DEFAULT_DOMAINS or node.op_type not in supported
        }
    )


def _unknown_versions(model: onnx.ModelProto) -> list[str]:
    """``Op-version`` labels of the model's ops whose version no handler claims."""
    opset = _default_opset(model)
    unknown = set()
    for node in model.graph.node:
        version = op_version(node.op_type, opset)
        if version is None:
            unknown.add(f"{node.op_type} (not defined at opset {opset})")
        elif (node.op_type, version) not in HANDLERS:
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
        if elem_type != TensorProto.UNDEFINED and elem_type not in TORCH_DTYPES:
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
        dtype = TORCH_DTYPES.get(tensor_type.elem_type)
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                dim.dim_value if dim.HasField("dim_value") else None
                for dim in tensor_type.shape.dim
            )
        infos[info.name] = (dtype, shape)
    return infos


# --------------------------------------------------------------------------- the builder


class GraphBuilder:
    """Builds the fx graph for one ONNX model: holds the value of every ONNX name and adds nodes.

    Op handlers see it as :class:`retrofit.onnx_path.to_torch.context.Builder`, which documents
    each method they use; the set-up (``add_inputs``, ``add_nodes``, ``add_outputs``) is
    :func:`onnx_to_torch`'s.
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
        self.sizes_tensors: dict[Sizes, fx.Node] = {}
        # id(tensor) -> (ONNX-level name, tensor); holding the tensor keeps its id unique.
        self.const_names: dict[int, tuple[str, torch.Tensor]] = {}
        self.current: onnx.NodeProto | None = None
        self.since = 0  # the current node's op version (its schema's since_version)
        self.current_label = ""
        self.site_names: dict[int, str] = {}  # id(Relu node) -> site name, set by add_nodes
        self.initializer_names = {init.name for init in model.graph.initializer}
        self.stat_only = self._statistics_only_initializers()

    # ---- errors

    def unsupported(self, what: str) -> UnsupportedModelError:
        where = self.current_label or "?"
        return UnsupportedModelError(f"cannot fine-tune this ONNX model: {what} (node {where!r})")

    # ---- emitting

    def _new_node(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        args, kwargs = fx.node.map_aggregate(
            (args, kwargs), lambda a: self.const_node(a) if isinstance(a, torch.Tensor) else a
        )
        hint = None
        if self.current is not None and self.current.output:
            hint = UNSAFE_CHARS.sub("_", self.current.output[0]) or None
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

    def const_node(self, tensor: torch.Tensor) -> fx.Node:
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
        return self.as_tensor(self.value(name))

    def as_tensor(self, value: Any) -> fx.Node | torch.Tensor:
        if isinstance(value, Weight):
            kind = "buffer" if value.name in self.stat_only else "parameter"
            return self._attr_node(torch_name(value.name), value.tensor, kind)
        if isinstance(value, Sizes):
            return self._sizes_tensor(value)
        return value

    def is_frozen(self, name: str) -> bool:
        value = self.value(name)
        if isinstance(value, Weight):
            return value.name in self.stat_only
        return isinstance(value, (torch.Tensor, Sizes))

    def operand(self, name: str) -> Any:
        value = self.tensor(name)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return value.item()
        return value

    def static(self, name: str) -> torch.Tensor | None:
        value = self.value(name)
        if isinstance(value, Weight):
            return value.tensor
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, Sizes) and all(isinstance(e, int) for e in value.elems):
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
        value = self.value(name)
        if isinstance(value, Sizes) and len(value.elems) == 1:
            return value.elems[0]
        const = self.static(name)
        if const is None or const.numel() != 1:
            raise self.unsupported(f"{what} computed at run time")
        return const.reshape(()).item()

    def sizes(self, name: str) -> list[int | fx.Node] | fx.Node:
        value = self.value(name)
        if isinstance(value, Sizes):
            return list(value.elems)
        const = self.static(name)
        if const is not None:
            return [int(v) for v in const.reshape(-1).tolist()]
        return self.method("tolist", value)

    def shape_tensor(self, x: fx.Node) -> fx.Node:
        return self.method("to", self.call(torch._shape_as_tensor, x), self.device_of(x))

    def anchor(self, name: str) -> fx.Node | None:
        value = self.value(name)
        if isinstance(value, Sizes):
            return value.anchor
        return value if isinstance(value, fx.Node) else None

    def dtype(self, name: str) -> torch.dtype | None:
        value = self.value(name)
        if isinstance(value, Weight):
            return value.tensor.dtype
        if isinstance(value, torch.Tensor):
            return value.dtype
        if isinstance(value, Sizes):
            return value.dtype
        return self.infos.get(name, (None, None))[0]

    def shape(self, name: str) -> tuple | None:
        value = self.value(name)
        if isinstance(value, Weight):
            return tuple(value.tensor.shape)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, Sizes):
            return () if value.scalar else (len(value.elems),)
        return self.infos.get(name, (None, None))[1]

    def rank(self, name: str, what: str | None = None) -> int | None:
        shape = self.shape(name)
        if shape is None and what is not None:
            raise self.unsupported(f"{what} needs the rank of {name!r}, which shape inference "
                                   "could not find")
        return None if shape is None else len(shape)

    def _sizes_tensor(self, sizes: Sizes) -> fx.Node | torch.Tensor:
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
        value = self.value(name)
        if isinstance(value, Sizes):
            return True
        return (
            isinstance(value, torch.Tensor)
            and value.dtype in INT_DTYPES
            and value.dim() <= 1
            and value.numel() <= 64
        )

    def as_sizes(self, name: str) -> Sizes:
        value = self.value(name)
        if isinstance(value, Sizes):
            return value
        return Sizes(tuple(int(v) for v in value.reshape(-1).tolist()), value.dim() == 0,
                      value.dtype)

    def device_of(self, anchor: fx.Node | None) -> fx.Node | None:
        if anchor is None:
            return None
        if anchor not in self.device_nodes:
            self.device_nodes[anchor] = self._new_node(
                "call_function", getattr, (anchor, "device"), {}
            )
        return self.device_nodes[anchor]

    # ---- storing results

    def store(self, name: str, value: Any) -> None:
        if isinstance(value, Sizes) and all(isinstance(e, int) for e in value.elems):
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
            tensor = tensor_from_proto(init)
            if init.data_type in FLOAT_TYPES:
                self.values[init.name] = Weight(init.name, tensor)
            else:
                self.store(init.name, tensor)
        used: set[str] = set()
        for graph_input in self.model.graph.input:
            if graph_input.name in self.initializer_names:
                continue
            name = UNSAFE_CHARS.sub("_", graph_input.name) or "input"
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
            self.since = op_version(node.op_type, self.opset)
            self.current_label = node.name or (node.output[0] if node.output else node.op_type)
            try:
                outputs = HANDLERS[(node.op_type, self.since)](self, node)
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
            self.const_node(r) if isinstance(r, torch.Tensor) else r for r in results
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


def onnx_to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """Build a ``torch.fx.GraphModule`` that computes what ``model``'s main graph computes.

    The module's parameters are ``model``'s float initializers, named by :func:`torch_name`;
    train them and hand the state dict to ``weights.write_back_initializers``. ``model`` is not
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
    builder = GraphBuilder(model)
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
