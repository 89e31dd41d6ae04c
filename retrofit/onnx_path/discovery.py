"""Where the ReLU sites of an ONNX model are, and what shape inference knows about each one.

Sites are:

- every default-domain ``Relu`` node of the main graph, named ``node.name or node.output[0]``;
- inside If/Loop/Scan subgraphs, at any depth, named ``<parent node's site-style name>/<attribute
  name>/<node name>``;
- inside model-local functions, once per call: a function called at two places holds two sites
  for each of its ``Relu`` nodes, named ``<call node name>/<function name>/<relu node name>``.

Element types and ranks come from onnx shape inference: once for the main graph, whose
subgraphs onnx types from their enclosing scopes, and once per function call, on the body with
the call's attribute values bound and its inputs typed as the call's (a function body has no
types of its own). Inference is best effort: what it cannot tell stays unknown, and the rewrite
decides what an unknown type or rank allows.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import onnx
from onnx import helper

from retrofit.errors import UnsupportedModelError
from retrofit.onnx_path.io import shape_inference_view, subgraphs
from retrofit.onnx_path.site_names import DEFAULT_DOMAINS, default_opset, is_relu, node_label

FunctionKey = tuple[str, str, str]
"""A model-local function's identity: (domain, name, overload)."""
Types = ChainMap[str, onnx.TypeProto]
"""The types visible in one scope: its own, then its enclosing scopes'."""

_RNN_OPS = {"RNN", "GRU", "LSTM"}


def function_key(function: onnx.FunctionProto) -> FunctionKey:
    return (function.domain, function.name, function.overload)


def call_key(node: onnx.NodeProto) -> FunctionKey:
    return (node.domain, node.op_type, node.overload)


# --------------------------------------------------------------------------------------------
# Types by shape inference


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # best effort: unknown types only limit what the rewrite can do
        return model


def _own_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """The types one graph scope declares or inference found for it."""
    types = {value.name: value.type for value in (*graph.input, *graph.value_info, *graph.output)
             if value.type.WhichOneof("value")}
    for tensor in graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    return types


def _tensor_info(types: Mapping[str, onnx.TypeProto], name: str) -> tuple[int, int | None]:
    """(element type or 0, rank or None) of a value, as far as inference knows."""
    value_type = types.get(name)
    if value_type is None or value_type.WhichOneof("value") != "tensor_type":
        return 0, None
    tensor_type = value_type.tensor_type
    rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return tensor_type.elem_type, rank


def _bind_attributes(nodes: Iterable[onnx.NodeProto], function: onnx.FunctionProto,
                     call_attributes: Iterable[onnx.AttributeProto]) -> None:
    """Replace the attribute references in ``nodes``, a copy of ``function``'s body, by the
    call's values or the function's defaults (unset ones are dropped), so that inference sees
    what this call computes."""
    if function.attribute or function.attribute_proto:
        values = {attr.name: attr for attr in (*function.attribute_proto, *call_attributes)}
        for node in nodes:
            _bind(node, values)


def _bind(node: onnx.NodeProto, values: Mapping[str, onnx.AttributeProto]) -> None:
    unset = []
    for index, attr in enumerate(node.attribute):
        if not attr.ref_attr_name:
            continue
        if attr.ref_attr_name in values:
            name = attr.name
            attr.CopyFrom(values[attr.ref_attr_name])
            attr.name = name
        else:
            unset.append(index)
    for index in reversed(unset):
        del node.attribute[index]
    for _, sub in subgraphs(node):
        for inner in sub.node:
            _bind(inner, values)


# --------------------------------------------------------------------------------------------
# Finding sites


@dataclass
class FoundSite:
    """One Relu found (one site), where it is, and what inference says about its input."""

    base_name: str
    owner: str
    elem_type: int
    rank: int | None
    opset: int | None
    graph_key: int | None = None  # graph scope holding the node (None inside functions)
    index: int = -1  # node index in that scope
    call: FunctionCall | None = None  # the function call this site belongs to


@dataclass
class FunctionCall:
    """A call from a graph scope to a model-local function whose body holds Relu sites."""

    graph_key: int
    index: int
    function: FunctionKey
    sites: list[FoundSite] = field(default_factory=list)


@dataclass
class Layout:
    """A function's sites in body order, by structure alone: ``("relu", label)`` entries and
    ``("call", label, callee, count)`` entries that stand for ``count`` sites of the callee."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    count: int = 0
    labels: list[str] = field(default_factory=list)


class Discovery:
    """Walks a model: ``found``, its sites in graph order; ``graphs``, the graph scopes holding
    them by id (children before parents, the order to edit them in); ``calls``, the function
    calls from graph scopes that hold sites; ``notes`` on Relus that are no sites."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.functions = {function_key(f): f for f in model.functions}
        self.opset = default_opset(model.opset_import)
        self.found: list[FoundSite] = []
        self.calls: list[FunctionCall] = []
        self.graphs: dict[int, onnx.GraphProto] = {}
        self.notes: list[str] = []
        self._layouts: dict[FunctionKey, Layout] = {}
        self._reached: set[FunctionKey] = set()

    def run(self) -> Discovery:
        main = self.model.graph
        typed = _inferred(shape_inference_view(self.model)).graph
        owner = main.name or "main graph"
        self._walk(main.node, typed.node, ChainMap(_own_types(typed)), "", owner, main,
                   self.opset, (), None)
        for key, function in self.functions.items():
            if key not in self._reached and self.layout(key).count:
                self.notes.append(
                    f"model-local function {function.name!r} holds Relu but is never called; "
                    "left as it is"
                )
        return self

    def _walk(
        self,
        nodes: Sequence[onnx.NodeProto],
        typed_nodes: Sequence[onnx.NodeProto],
        types: Types,
        prefix: str,
        owner: str,
        graph: onnx.GraphProto | None,
        opset: int | None,
        stack: tuple[FunctionKey, ...],
        sink: list[FoundSite] | None,
    ) -> None:
        """Visit one scope; ``typed_nodes`` are the same nodes in the inferred copy, whose
        subgraphs carry their inferred types. ``graph`` is the graph scope being walked (sites
        there are edited in place); ``sink`` collects the sites of a function body instead
        (``graph`` is None). ``opset`` is the scope's default-domain version."""
        for index, (node, typed) in enumerate(zip(nodes, typed_nodes, strict=True)):
            label = prefix + node_label(node, index)
            if is_relu(node):
                elem_type, rank = _tensor_info(types, node.input[0] if node.input else "")
                found = FoundSite(label, owner, elem_type, rank, opset)
                if graph is None:
                    assert sink is not None
                    sink.append(found)
                else:
                    found.graph_key, found.index = id(graph), index
                    self.found.append(found)
                continue
            self._note_hidden_relu(node, label)
            subs = subgraphs(node)
            for (attr_label, sub), (_, typed_sub) in zip(subs, subgraphs(typed) if subs else (),
                                                         strict=True):
                scope = f"{label}/{attr_label}"
                self._walk(sub.node, typed_sub.node, types.new_child(_own_types(typed_sub)),
                           scope + "/", scope, sub if graph is not None else None, opset, stack,
                           sink)  # fmt: skip
            function = self.functions.get(call_key(node))
            if function is None:
                continue
            sites = self._function_sites(function, node, types, label, stack)
            if not sites:
                continue
            if graph is None:
                assert sink is not None
                sink.extend(sites)
                continue
            call = FunctionCall(id(graph), index, function_key(function), sites)
            for site in sites:
                site.call = call
            self.calls.append(call)
            self.found.extend(sites)
        if graph is not None:
            self.graphs[id(graph)] = graph  # after its subgraphs: children come first

    def _function_sites(
        self,
        function: onnx.FunctionProto,
        call: onnx.NodeProto,
        types: Types,
        label: str,
        stack: tuple[FunctionKey, ...],
    ) -> list[FoundSite]:
        key = function_key(function)
        if key in stack:
            raise UnsupportedModelError(f"model-local function {function.name!r} calls itself")
        if self.layout(key).count == 0:
            return []
        self._reached.add(key)
        inputs = []
        for position, name in enumerate(function.input):
            value = onnx.ValueInfoProto(name=name)
            if position < len(call.input) and call.input[position] in types:
                value.type.CopyFrom(types[call.input[position]])
            inputs.append(value)
        body = onnx.GraphProto(name="cadrelu_types", input=inputs, node=function.node)
        _bind_attributes(body.node, function, call.attribute)
        typed = _inferred(onnx.ModelProto(
            ir_version=onnx.IR_VERSION, graph=body, functions=self.model.functions,
            opset_import=function.opset_import or self.model.opset_import)).graph
        opset = default_opset(function.opset_import) or self.opset
        sites: list[FoundSite] = []
        scope = f"{label}/{function.name}"
        self._walk(typed.node, typed.node, ChainMap(_own_types(typed)), scope + "/", scope,
                   None, opset, (*stack, key), sites)
        return sites

    def layout(self, key: FunctionKey) -> Layout:
        """The structural site layout of a function (memoised)."""
        if key not in self._layouts:
            layout = Layout()
            self._layouts[key] = layout  # a recursive call finds the partial layout
            self._layout_scope(self.functions[key].node, "", layout)
        return self._layouts[key]

    def _layout_scope(self, nodes: Sequence[onnx.NodeProto], prefix: str, layout: Layout) -> None:
        for index, node in enumerate(nodes):
            label = prefix + node_label(node, index)
            if is_relu(node):
                layout.entries.append(("relu", label))
                layout.labels.append(label)
                layout.count += 1
                continue
            for attr_label, sub in subgraphs(node):
                self._layout_scope(sub.node, f"{label}/{attr_label}/", layout)
            callee = call_key(node)
            if callee in self.functions:
                inner = self.layout(callee)
                if inner.count:
                    layout.entries.append(("call", label, callee, inner.count))
                    layout.labels.extend(
                        f"{label}/{self.functions[callee].name}/{name}" for name in inner.labels
                    )
                    layout.count += inner.count

    def _note_hidden_relu(self, node: onnx.NodeProto, label: str) -> None:
        if node.op_type in _RNN_OPS and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "activations" and b"Relu" in attr.strings:
                    self.notes.append(
                        f"{node.op_type} node {label!r} applies Relu inside the op; "
                        "it is not a rewritable site and stays ReLU"
                    )
