"""The ONNX rewrite: every ``Relu`` node becomes the configured activation, one site each.

Where sites are:

- every default-domain ``Relu`` node of the main graph, named ``node.name or node.output[0]``;
- inside If/Loop/Scan subgraphs, at any depth, named ``<parent node's site-style name>/<attribute
  name>/<node name>``;
- inside model-local functions, once per call: a function called at two places holds two sites
  for each of its ``Relu`` nodes, named ``<call node name>/<function name>/<relu node name>``.
  The rewritten function takes the activation parameters as extra inputs and each call passes
  its own initializers. Calls that need different bodies (a site excluded at one call only,
  another rank or element type) call separate variants of the function; a variant takes the
  original function's name when the original is no longer called.

Each site gets its parameters (:func:`retrofit.onnx_path.emission.parameter_names`: CAReLU's
``alpha`` and ``beta``, MRePU's ``gain_in`` and ``gain_out``) as main-graph initializers named
``cadrelu.<site>.<parameter>`` (scopes joined by dots, other odd characters ``_``, numbered on a
clash); ``site_values`` replaces their values, which is how calibrated and trained values are
written back. An MRePU at blend 0 (plain ReLU) still gets its gains, unused, so every MRePU
site has the same parameters whatever its blend. With ``as_functions=True`` each activation
variant (element type, axes) is one model-local function in domain ``cadrelu`` and every site is
one call of it with its own initializers; model-local functions need IR version 8, so a lower IR
version is raised to 8 and the result says so in its notes. Ranks and element types come from
onnx shape inference (per subgraph and per function call, with the enclosing scope's types);
see :func:`retrofit.onnx_path.emission.competition_axes` for what an unknown rank allows.

The input model is never modified; on any error nothing is returned half-edited.
"""

from __future__ import annotations

import re
from collections import ChainMap, Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import onnx
from onnx import helper

from retrofit.config import ActivationConfig, CompetitiveReLUConfig
from retrofit.errors import UnsupportedModelError, UsageError
from retrofit.onnx_path.emission import (
    FUNCTION_DOMAIN,
    FUNCTION_MIN_IR_VERSION,
    FUNCTION_NAMES,
    MAX_OPSET,
    MIN_OPSET,
    Fresh,
    SitePlan,
    activation_call,
    activation_function,
    competition_axes,
    compute_type,
    emit_activation,
    parameter_names,
    parameter_tensor,
    parameter_values,
    type_name,
)
from retrofit.onnx_path.io import iter_nodes, subgraphs
from retrofit.onnx_path.site_names import DEFAULT_DOMAINS, is_relu, node_label
from retrofit.sites import (
    ReluSite, RetrofitResult, SiteSelector, no_site_message, unique_site_names,
)

SITE_KIND = "onnx.Relu"
PARAMETER_PREFIX = "cadrelu."

_RNN_OPS = {"RNN", "GRU", "LSTM"}
_SMALL_TENSOR_BYTES = 4096

FunctionKey = tuple[str, str, str]
"""A model-local function's identity: (domain, name, overload)."""
Types = Mapping[str, onnx.TypeProto]
Signature = tuple[Optional[SitePlan], ...]
"""What one call of a function needs from its body: a plan per site, None where it stays ReLU."""

_QUANTIZED_PREFIXES = ("QLinear", "QGemm", "QAttention", "QOrdered", "QEmbed", "MatMulNBits")
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "MatMulBnb4",
    "GatherBlockQuantized",
}
# onnxruntime contrib ops that carry a fused activation attribute.
_FUSED_ACTIVATION_OPS = {"FusedConv", "NhwcFusedConv", "FusedGemm"}


def ensure_rewritable(model: onnx.ModelProto) -> None:
    """Raise :class:`UnsupportedModelError` for a quantized graph (QLinear*, Q/DQ, *Integer)
    or for ReLUs already fused into other ops (onnxruntime's FusedConv/FusedGemm), naming them.

    A quantized model's scales were calibrated for ReLU outputs, and a fused ReLU cannot be
    reached by a graph rewrite: both must be converted from the float, unfused model.
    """
    quantized: dict[str, int] = {}
    fused: list[str] = []
    for node in iter_nodes(model):
        op = node.op_type
        if op in _QUANTIZED_OPS or op.startswith(_QUANTIZED_PREFIXES):
            quantized[op] = quantized.get(op, 0) + 1
        elif op in _FUSED_ACTIVATION_OPS:
            activation = next((a.s for a in node.attribute if a.name == "activation"), b"")
            if activation == b"Relu":
                fused.append(f"{op} {node.name or node.output[0]!r}")
    if quantized:
        listed = ", ".join(f"{op} x{count}" for op, count in sorted(quantized.items()))
        raise UnsupportedModelError(
            f"the model is quantized ({listed}); rewrite the float model, then quantize it again"
        )
    if fused:
        listed = ", ".join(fused[:5]) + (f" and {len(fused) - 5} more" if len(fused) > 5 else "")
        raise UnsupportedModelError(
            f"the model has ReLUs fused into other ops ({listed}) that cannot be rewritten; "
            "export it without onnxruntime graph optimizations"
        )


# --------------------------------------------------------------------------------------------
# Small helpers




def _function_key(function: onnx.FunctionProto) -> FunctionKey:
    return (function.domain, function.name, function.overload)


def _call_key(node: onnx.NodeProto) -> FunctionKey:
    return (node.domain, node.op_type, node.overload)


def _default_opset(opset_imports: Iterable[onnx.OperatorSetIdProto]) -> int | None:
    versions = [o.version for o in opset_imports if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _sanitize(name: str) -> str:
    """A site name as part of a tensor name: scopes joined by dots, other characters ``_``."""
    dotted = name.replace("/", ".")
    return re.sub(r"[^A-Za-z0-9_.]+", "_", dotted).strip("_.") or "site"


def _tensor_info(types: Types, name: str) -> tuple[int, int | None]:
    """(element type or 0, rank or None) of a value, as far as inference knows."""
    value_type = types.get(name)
    if value_type is None or value_type.WhichOneof("value") != "tensor_type":
        return 0, None
    tensor_type = value_type.tensor_type
    rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return tensor_type.elem_type, rank


def _rebuild(container: Any, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace nodes of a repeated node field (graph or function body) by index, in order."""
    if not replacements:
        return
    nodes = list(container)
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(nodes):
        new_nodes.extend(replacements.get(index, (node,)))
    del container[:]
    container.extend(new_nodes)


class _Names:
    """Fresh names in one namespace: a graph with all its subgraphs, or one function body."""

    def __init__(self, used: set[str]) -> None:
        self.used = used

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def under(self, prefix: str) -> Fresh:
        return lambda hint: self.fresh(f"{prefix}.{hint}")


def _graph_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    for value in (*graph.input, *graph.output, *graph.value_info):
        names.add(value.name)
    names.update(tensor.name for tensor in graph.initializer)
    names.update(sparse.values.name for sparse in graph.sparse_initializer)
    for node in graph.node:
        _node_names(node, names)
    return names


def _node_names(node: onnx.NodeProto, names: set[str]) -> None:
    names.add(node.name)
    names.update(node.input)
    names.update(node.output)
    for _, sub in subgraphs(node):
        _graph_names(sub, names)


def _function_names(function: onnx.FunctionProto) -> set[str]:
    names = set(function.input) | set(function.output)
    for node in function.node:
        _node_names(node, names)
    return names


# --------------------------------------------------------------------------------------------
# Types by shape inference


def _free_names(
    nodes: Iterable[onnx.NodeProto], defined: set[str], outputs: Iterable[str] = ()
) -> dict[str, None]:
    """Names read in ``nodes`` (at any depth) that they do not define: outer-scope values."""
    defined = set(defined)
    free: dict[str, None] = {}
    for node in nodes:
        for name in node.input:
            if name and name not in defined:
                free.setdefault(name)
        for _, sub in subgraphs(node):
            inner = {v.name for v in sub.input} | {t.name for t in sub.initializer}
            for name in _free_names(sub.node, inner, [o.name for o in sub.output]):
                if name not in defined:
                    free.setdefault(name)
        defined.update(name for name in node.output if name)
    for name in outputs:
        if name not in defined:
            free.setdefault(name)
    return free


def _infer(
    nodes: Sequence[onnx.NodeProto],
    inputs: Iterable[onnx.ValueInfoProto],
    initializers: Iterable[onnx.TensorProto],
    value_info: Iterable[onnx.ValueInfoProto],
    outer: Types,
    opset_imports: Iterable[onnx.OperatorSetIdProto],
    functions: Iterable[onnx.FunctionProto],
) -> dict[str, onnx.TypeProto]:
    """Types of every value in one scope, inferred in a throw-away model of just that scope.

    Outer-scope values become graph inputs typed from ``outer``; large initializers become typed
    inputs (values never matter to ranks), small ones stay so Reshape targets are known.
    """
    graph = onnx.GraphProto(name="cadrelu_types")
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    defined = {value.name for value in graph.input}
    for tensor in initializers:
        if _is_small(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in defined:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
        defined.add(tensor.name)
    graph.value_info.extend(value_info)
    for name in _free_names(nodes, defined):
        value = graph.input.add()
        value.name = name
        if name in outer:
            value.type.CopyFrom(outer[name])
    model = onnx.ModelProto(ir_version=onnx.IR_VERSION, graph=graph)
    model.opset_import.extend(opset_imports)
    model.functions.extend(functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort here: unknown types only limit what we can do
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.type.WhichOneof("value"):
            types[value.name] = value.type
    for tensor in inferred.graph.initializer:
        types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    return types


def _is_small(tensor: onnx.TensorProto) -> bool:
    """Small enough to copy into a throw-away inference model (shapes, axes, scalars)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    if tensor.raw_data:
        return len(tensor.raw_data) <= _SMALL_TENSOR_BYTES
    elements = 1
    for dim in tensor.dims:
        elements *= dim
    return elements * 8 <= _SMALL_TENSOR_BYTES


def _bind_attributes(
    function: onnx.FunctionProto, call_attributes: Iterable[onnx.AttributeProto]
) -> list[onnx.NodeProto]:
    """Copies of a function body with attribute references replaced by the call's values (or
    the function's defaults), so shape inference sees what this call computes."""
    nodes = []
    for node in function.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    if not function.attribute and not function.attribute_proto:
        return nodes
    values = {attr.name: attr for attr in function.attribute_proto}
    values.update({attr.name: attr for attr in call_attributes})
    for node in nodes:
        _bind_node(node, values)
    return nodes


def _bind_node(node: onnx.NodeProto, values: Mapping[str, onnx.AttributeProto]) -> None:
    bound = []
    for attr in node.attribute:
        copy = onnx.AttributeProto()
        if attr.ref_attr_name:
            if attr.ref_attr_name not in values:
                continue
            copy.CopyFrom(values[attr.ref_attr_name])
            copy.name = attr.name
        else:
            copy.CopyFrom(attr)
            for sub in [copy.g] if copy.type == onnx.AttributeProto.GRAPH else copy.graphs:
                for inner in sub.node:
                    _bind_node(inner, values)
        bound.append(copy)
    del node.attribute[:]
    node.attribute.extend(bound)


# --------------------------------------------------------------------------------------------
# Finding sites


@dataclass
class _Found:
    """One Relu found (one site), where it is, and what inference says about its input."""

    base_name: str
    owner: str
    elem_type: int
    rank: int | None
    opset: int | None
    graph_key: int | None = None  # graph scope holding the node (None inside functions)
    index: int = -1  # node index in that scope
    call: _Call | None = None  # the function call this site belongs to


@dataclass
class _Call:
    """A call from a graph scope to a model-local function whose body holds Relu sites."""

    graph_key: int
    index: int
    function: FunctionKey
    sites: list[_Found] = field(default_factory=list)


@dataclass
class _Layout:
    """A function's sites in body order, by structure alone: ``("relu", label)`` entries and
    ``("call", label, callee, count)`` entries that stand for ``count`` sites of the callee."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    count: int = 0
    labels: list[str] = field(default_factory=list)


class _Discovery:
    """Walks a model: sites in graph order, the graph scopes holding them (children first),
    and the function calls that hold sites."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.functions = {_function_key(f): f for f in model.functions}
        self.opset = _default_opset(model.opset_import)
        self.found: list[_Found] = []
        self.calls: list[_Call] = []
        self.graphs: dict[int, onnx.GraphProto] = {}
        self.notes: list[str] = []
        self._layouts: dict[FunctionKey, _Layout] = {}
        self.reached: set[FunctionKey] = set()

    def run(self) -> None:
        main = self.model.graph
        types = _infer(
            main.node, main.input, main.initializer, main.value_info, {},
            self.model.opset_import, self.model.functions,
        )  # fmt: skip
        owner = main.name or "main graph"
        self._walk(main.node, types, "", owner, main, self.opset, self.model.opset_import, (), None)
        for key, function in self.functions.items():
            if key not in self.reached and self.layout(key).count:
                self.notes.append(
                    f"model-local function {function.name!r} holds Relu but is never called; "
                    "left as it is"
                )

    def _walk(
        self,
        nodes: Sequence[onnx.NodeProto],
        types: Types,
        prefix: str,
        owner: str,
        graph: onnx.GraphProto | None,
        opset: int | None,
        opsets: Sequence[onnx.OperatorSetIdProto],
        stack: tuple[FunctionKey, ...],
        sink: list[_Found] | None,
    ) -> None:
        """Visit one scope. ``graph`` is the graph scope being walked (sites there are edited in
        place); ``sink`` collects the sites of a function body instead (``graph`` is None).
        ``opset`` and ``opsets`` are the scope's default-domain version and opset imports."""
        for index, node in enumerate(nodes):
            label = prefix + node_label(node, index)
            if is_relu(node):
                elem_type, rank = _tensor_info(types, node.input[0] if node.input else "")
                found = _Found(label, owner, elem_type, rank, opset)
                if graph is not None:
                    found.graph_key, found.index = id(graph), index
                    self.found.append(found)
                else:
                    assert sink is not None
                    sink.append(found)
                continue
            self._note_hidden_relu(node, label)
            for attr_label, sub in subgraphs(node):
                local = _infer(
                    sub.node, sub.input, sub.initializer, sub.value_info, types, opsets,
                    self.model.functions,
                )  # fmt: skip
                sub_types = ChainMap(local, types)  # type: ignore[arg-type]
                scope = f"{label}/{attr_label}"
                self._walk(
                    sub.node, sub_types, scope + "/", scope,
                    sub if graph is not None else None, opset, opsets, stack, sink,
                )  # fmt: skip
            function = self.functions.get(_call_key(node))
            if function is None:
                continue
            sites = self._function_sites(function, node, types, label, stack)
            if not sites:
                continue
            if graph is None:
                assert sink is not None
                sink.extend(sites)
                continue
            call = _Call(id(graph), index, _function_key(function), sites)
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
    ) -> list[_Found]:
        key = _function_key(function)
        if key in stack:
            raise UnsupportedModelError(f"model-local function {function.name!r} calls itself")
        if self.layout(key).count == 0:
            return []
        self.reached.add(key)
        body = _bind_attributes(function, call.attribute)
        inputs = []
        for position, name in enumerate(function.input):
            value = onnx.ValueInfoProto(name=name)
            if position < len(call.input) and call.input[position] in types:
                value.type.CopyFrom(types[call.input[position]])
            inputs.append(value)
        opset_imports = function.opset_import or self.model.opset_import
        body_types = _infer(body, inputs, [], [], {}, opset_imports, self.model.functions)
        opset = _default_opset(function.opset_import) or self.opset
        sites: list[_Found] = []
        scope = f"{label}/{function.name}"
        self._walk(
            body, body_types, scope + "/", scope, None, opset, opset_imports, (*stack, key), sites
        )
        return sites

    def layout(self, key: FunctionKey) -> _Layout:
        """The structural site layout of a function (memoised)."""
        if key not in self._layouts:
            layout = _Layout()
            self._layouts[key] = layout  # a recursive call finds the partial layout
            self._layout_scope(self.functions[key].node, "", layout)
        return self._layouts[key]

    def _layout_scope(self, nodes: Sequence[onnx.NodeProto], prefix: str, layout: _Layout) -> None:
        for index, node in enumerate(nodes):
            label = prefix + node_label(node, index)
            if is_relu(node):
                layout.entries.append(("relu", label))
                layout.labels.append(label)
                layout.count += 1
                continue
            for attr_label, sub in subgraphs(node):
                self._layout_scope(sub.node, f"{label}/{attr_label}/", layout)
            callee = _call_key(node)
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


def find_onnx_relu_sites(model: onnx.ModelProto) -> list[ReluSite]:
    """Every ReLU site of ``model`` in graph order, named as the rewrite names them.

    Nothing is replaced (``replaced`` is False); sites the rewrite would keep say why in
    ``reason`` (a non-float tensor).
    """
    discovery = _Discovery(model)
    discovery.run()
    names = unique_site_names([found.base_name for found in discovery.found])
    sites = []
    for name, found in zip(names, discovery.found):
        reason = ""
        if found.elem_type and compute_type(found.elem_type) is None:
            reason = _not_float_reason(found.elem_type)
        sites.append(ReluSite(name, SITE_KIND, found.owner, reason=reason))
    return sites


def _not_float_reason(elem_type: int) -> str:
    return f"{type_name(elem_type)} tensor: only floating-point ReLU sites are rewritten"


# --------------------------------------------------------------------------------------------
# Rewriting


@dataclass
class _Planned:
    """A selected site ready to emit: its plan, its scope's opset and its parameter names."""

    found: _Found
    name: str
    plan: SitePlan
    params: list[str]


class _Rewriter:
    """Emits the new nodes, function variants and activation functions into the model copy."""

    def __init__(
        self,
        model: onnx.ModelProto,
        discovery: _Discovery,
        config: ActivationConfig,
        as_functions: bool,
    ) -> None:
        self.model = model
        self.discovery = discovery
        self.config = config
        self.as_functions = as_functions
        self.names = _Names(_graph_names(model.graph, set()))
        self.replacements: dict[int, dict[int, list[onnx.NodeProto]]] = {}
        self.activation_functions: dict[tuple[SitePlan, int], onnx.FunctionProto] = {}
        self.function_names = {(f.domain, f.name) for f in model.functions}
        self.variant_names: dict[tuple[FunctionKey, Signature], str] = {}

    # -- emission -------------------------------------------------------------------------

    def emit(
        self, plan: SitePlan, relu: onnx.NodeProto, params: Sequence[str], fresh: Fresh, opset: int
    ) -> list[onnx.NodeProto]:
        """The nodes that replace one Relu: inline, or one call of an activation function."""
        x, y = relu.input[0], relu.output[0]
        if not self.as_functions:
            return emit_activation(self.config, plan, x, y, opset=opset, fresh=fresh, params=params)
        function = self.activation_function(plan, opset)
        return [activation_call(function, x, y, params, node_name=fresh("call"))]

    def activation_function(self, plan: SitePlan, opset: int) -> onnx.FunctionProto:
        key = (plan, opset)
        if key not in self.activation_functions:
            base = FUNCTION_NAMES[self.config.name]
            name, k = base, 1
            while (FUNCTION_DOMAIN, name) in self.function_names:
                k += 1
                name = f"{base}_{k}"
            self.function_names.add((FUNCTION_DOMAIN, name))
            self.activation_functions[key] = activation_function(
                self.config, plan, opset=opset, name=name
            )
        return self.activation_functions[key]

    def replace(self, graph_key: int, index: int, nodes: list[onnx.NodeProto]) -> None:
        self.replacements.setdefault(graph_key, {})[index] = nodes

    def rewrite_graph_site(self, planned: _Planned) -> None:
        found = planned.found
        assert found.graph_key is not None and found.opset is not None
        relu = self.discovery.graphs[found.graph_key].node[found.index]
        fresh = self.names.under(PARAMETER_PREFIX + _sanitize(planned.name))
        nodes = self.emit(planned.plan, relu, planned.params, fresh, found.opset)
        self.replace(found.graph_key, found.index, nodes)

    def rewrite_call(self, call: _Call, signature: Signature, params: list[list[str]]) -> None:
        """Point a graph's call at the variant its signature needs, passing the sites' params."""
        if not any(signature):
            return
        graph = self.discovery.graphs[call.graph_key]
        node = onnx.NodeProto()
        node.CopyFrom(graph.node[call.index])
        function = self.discovery.functions[call.function]
        node.op_type = self.variant_names[(call.function, signature)]
        while len(node.input) < len(function.input):
            node.input.append("")
        for site_params in params:
            node.input.extend(site_params)
        self.replace(call.graph_key, call.index, [node])

    def finish_graphs(self) -> None:
        for graph_key, graph in self.discovery.graphs.items():  # children before parents
            _rebuild(graph.node, self.replacements.get(graph_key, {}))

    # -- function variants ----------------------------------------------------------------

    def plan_variants(self, signatures: list[tuple[FunctionKey, Signature]]) -> set[FunctionKey]:
        """Decide which function variants exist and their names; return the originals kept."""
        needed: dict[tuple[FunctionKey, Signature], None] = {}  # ordered set
        called_as_is: set[FunctionKey] = set()

        def need(key: FunctionKey, signature: Signature) -> None:
            if not any(signature):
                called_as_is.add(key)
                return
            if (key, signature) in needed:
                return
            needed[(key, signature)] = None
            slot = 0
            for entry in self.discovery.layout(key).entries:
                if entry[0] == "relu":
                    slot += 1
                else:
                    _, _, callee, count = entry
                    need(callee, signature[slot : slot + count])
                    slot += count

        for key, signature in signatures:
            need(key, signature)
        with_variants = {key for key, _ in needed}
        kept = set(called_as_is) | (set(self.discovery.functions) - with_variants)
        pending = list(kept)
        while pending:  # an original kept keeps what it calls
            key = pending.pop()
            for node in self.discovery.functions[key].node:
                for callee in self._callees(node):
                    if callee not in kept:
                        kept.add(callee)
                        pending.append(callee)
        for key in self.discovery.functions:
            variants = [signature for (k, signature) in needed if k == key]
            for number, signature in enumerate(variants):
                domain, name, _ = key
                if number == 0 and key not in kept:
                    new_name = name
                else:
                    new_name, k = f"{name}_cadrelu{number + 1}", number + 1
                    while (domain, new_name) in self.function_names:
                        k += 1
                        new_name = f"{name}_cadrelu{k}"
                    self.function_names.add((domain, new_name))
                self.variant_names[(key, signature)] = new_name
        return kept

    def _callees(self, node: onnx.NodeProto) -> Iterable[FunctionKey]:
        if _call_key(node) in self.discovery.functions:
            yield _call_key(node)
        for _, sub in subgraphs(node):
            for inner in sub.node:
                yield from self._callees(inner)

    def build_variant(
        self, key: FunctionKey, signature: Signature, opset: int
    ) -> onnx.FunctionProto:
        """A copy of a function whose selected sites compute the new activation from parameters
        appended to its inputs (in site order)."""
        original = self.discovery.functions[key]
        function = onnx.FunctionProto()
        function.CopyFrom(original)
        function.name = self.variant_names[(key, signature)]
        fresh_names = _Names(_function_names(original))
        labels = self.discovery.layout(key).labels
        slot_params: list[list[str]] = []
        for label, plan in zip(labels, signature):
            prefix = PARAMETER_PREFIX + _sanitize(label)
            names = parameter_names(self.config) if plan is not None else ()
            slot_params.append([fresh_names.fresh(f"{prefix}.{p}") for p in names])
        for names in slot_params:
            function.input.extend(names)
        body_opset = _default_opset(original.opset_import) or opset
        self._rewrite_body(function.node, signature, slot_params, [0], fresh_names, body_opset, "")
        imports_domain = any(o.domain == FUNCTION_DOMAIN for o in function.opset_import)
        if self.as_functions and not imports_domain:
            function.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
        return function

    def _rewrite_body(
        self,
        container: Any,  # a repeated NodeProto field
        signature: Signature,
        slot_params: list[list[str]],
        counter: list[int],
        names: _Names,
        opset: int,
        prefix: str,
    ) -> None:
        replacements: dict[int, list[onnx.NodeProto]] = {}
        for index, node in enumerate(container):
            label = prefix + node_label(node, index)
            if is_relu(node):
                slot = counter[0]
                counter[0] += 1
                plan = signature[slot]
                if plan is not None:
                    fresh = names.under(PARAMETER_PREFIX + _sanitize(label))
                    replacements[index] = self.emit(plan, node, slot_params[slot], fresh, opset)
                continue
            for attr_label, sub in subgraphs(node):
                self._rewrite_body(
                    sub.node, signature, slot_params, counter, names, opset,
                    f"{label}/{attr_label}/",
                )  # fmt: skip
            callee = _call_key(node)
            if callee in self.discovery.functions:
                count = self.discovery.layout(callee).count
                start = counter[0]
                counter[0] += count
                inner = signature[start : start + count]
                if count and any(inner):
                    call = onnx.NodeProto()
                    call.CopyFrom(node)
                    call.op_type = self.variant_names[(callee, inner)]
                    while len(call.input) < len(self.discovery.functions[callee].input):
                        call.input.append("")
                    for site_params in slot_params[start : start + count]:
                        call.input.extend(site_params)
                    replacements[index] = [call]
        _rebuild(container, replacements)


# ONNX ops that are activations other than ReLU (Clip is how exporters write ReLU6).
_OTHER_ACTIVATION_OPS = frozenset({
    "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Swish",
})


def rewrite_onnx_relus(
    model: onnx.ModelProto,
    config: ActivationConfig,
    select: SiteSelector = SiteSelector(),
    *,
    as_functions: bool = False,
    site_values: Mapping[str, Mapping[str, float]] | None = None,
) -> RetrofitResult[onnx.ModelProto]:
    """Replace every selected ReLU site of ``model`` by ``config``'s activation.

    Returns a new model (the input is not modified) whose inputs, outputs, metadata, doc
    strings, opset imports, IR version and untouched nodes are as they were, in the same order;
    each replaced site computes its activation with its own parameters, initialised from the
    config or from ``site_values[site]`` (``{"alpha": ..., "beta": ...}`` for CAReLU,
    ``{"gain_in": ..., "gain_out": ...}`` for MRePU; e.g. trained values).
    ``as_functions=True`` emits each activation variant once as a model-local function in domain
    ``cadrelu``, called per site (the IR version is raised to 8 when lower, with a note).

    Raises :class:`UnsupportedModelError` for a model without ReLU sites, a quantized or fused
    graph, an opset outside 9..28, or a site whose rank the configured reduction needs but
    inference cannot tell; :class:`SelectionError` when a rule matches no site;
    :class:`UsageError` for ``site_values`` naming no site or no parameter.
    """
    ensure_rewritable(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    discovery = _Discovery(out)
    discovery.run()
    if not discovery.found:
        raise UnsupportedModelError(no_site_message(
            "Relu nodes in the graph, its subgraphs and the functions it calls",
            Counter(node.op_type for node in iter_nodes(model)
                    if node.op_type in _OTHER_ACTIVATION_OPS)))
    names = unique_site_names([found.base_name for found in discovery.found])
    decisions = select.select(names)
    site_values = dict(site_values or {})
    _check_site_values(site_values, names, config)

    rewriter = _Rewriter(out, discovery, config, as_functions)
    sites, planned = _plan_sites(rewriter, names, decisions, site_values)
    for item in planned.values():
        if item.found.call is None:
            rewriter.rewrite_graph_site(item)
    _rewrite_calls(rewriter, planned)
    rewriter.finish_graphs()
    notes = [*discovery.notes, *_finish_model(out, sites, as_functions)]
    return RetrofitResult(out, sites, config.name, notes)


def _check_site_values(
    site_values: Mapping[str, Mapping[str, float]], names: Sequence[str], config: ActivationConfig
) -> None:
    unknown = sorted(set(site_values) - set(names))
    if unknown:
        raise UsageError(
            f"site value(s) given for {', '.join(map(repr, unknown[:5]))}, which name no ReLU "
            "site of this model; run `cadrelu inspect` to list the site names"
        )
    if site_values and not parameter_names(config):
        raise UsageError(f"{config.name} has no per-site values, but site values were given")
    for values in site_values.values():
        parameter_values(config, values)  # names a parameter the activation does not have?


def _plan_sites(
    rewriter: _Rewriter,
    names: Sequence[str],
    decisions: Mapping[str, str],
    site_values: Mapping[str, Mapping[str, float]],
) -> tuple[list[ReluSite], dict[int, _Planned]]:
    """Decide every site; selected ones get a plan and their parameter initializers.

    Returns the sites in graph order and the planned ones by position in graph order.
    """
    config, out = rewriter.config, rewriter.model
    sites: list[ReluSite] = []
    planned: dict[int, _Planned] = {}
    for position, (name, found) in enumerate(zip(names, rewriter.discovery.found)):
        reason = decisions[name]
        if not reason and found.elem_type and compute_type(found.elem_type) is None:
            reason = _not_float_reason(found.elem_type)
        if reason:
            sites.append(ReluSite(name, SITE_KIND, found.owner, False, reason))
            continue
        plan = _plan(config, found, name)
        params = []
        for param, value in parameter_values(config, site_values.get(name)).items():
            init_name = rewriter.names.fresh(f"{PARAMETER_PREFIX}{_sanitize(name)}.{param}")
            out.graph.initializer.append(parameter_tensor(init_name, value, plan))
            params.append(init_name)
        planned[position] = _Planned(found, name, plan, params)
        remark = f"p measured {plan.axes.describe()}" if plan.axes and plan.axes.flatten else ""
        sites.append(ReluSite(name, SITE_KIND, found.owner, True, remark, tuple(params)))
    return sites, planned


def _plan(config: ActivationConfig, found: _Found, name: str) -> SitePlan:
    if not found.elem_type:
        raise UnsupportedModelError(
            f"cannot tell the element type of ReLU site {name!r} (shape inference could not "
            "type its input); give the model typed inputs"
        )
    opset = found.opset
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"ReLU site {name!r} sits in default-domain opset {opset}; cadrelu rewrites opsets "
            f"{MIN_OPSET} to {MAX_OPSET} (convert the model with onnx.version_converter first)"
        )
    if isinstance(config, CompetitiveReLUConfig):
        axes = competition_axes(config.reduce, found.rank, opset, site=name)
        return SitePlan(found.elem_type, axes)
    return SitePlan(found.elem_type)


def _rewrite_calls(rewriter: _Rewriter, planned: Mapping[int, _Planned]) -> None:
    """Give each function call the body its sites need and replace the model's functions:
    originals still called stay, each rewritten function's variants follow it, and the
    activation functions (``as_functions``) come last."""
    discovery = rewriter.discovery
    position_of = {id(found): position for position, found in enumerate(discovery.found)}
    calls = []
    for call in discovery.calls:
        positions = [position_of[id(site)] for site in call.sites]
        signature = tuple(planned[p].plan if p in planned else None for p in positions)
        params = [planned[p].params if p in planned else [] for p in positions]
        calls.append((call, signature, params))
    kept = rewriter.plan_variants([(call.function, signature) for call, signature, _ in calls])
    for call, signature, params in calls:
        rewriter.rewrite_call(call, signature, params)

    opset = discovery.opset or MIN_OPSET
    variants: dict[FunctionKey, list[onnx.FunctionProto]] = {}
    for key, signature in rewriter.variant_names:
        variants.setdefault(key, []).append(rewriter.build_variant(key, signature, opset))
    if not variants and not rewriter.activation_functions:
        return
    model = rewriter.model
    functions = []
    for function in model.functions:
        key = _function_key(function)
        if key in kept:
            functions.append(function)
        functions.extend(variants.get(key, []))
    functions.extend(rewriter.activation_functions.values())
    del model.functions[:]
    model.functions.extend(functions)


def _finish_model(out: onnx.ModelProto, sites: Sequence[ReluSite], as_functions: bool) -> list[str]:
    """Model-level consequences of the new parameters and functions; returns the notes."""
    notes: list[str] = []
    if not any(site.replaced for site in sites):
        return notes
    parameters = {name for site in sites for name in site.parameters}
    if out.ir_version < 4 and parameters:  # before IR 4 every initializer is a graph input
        for tensor in out.graph.initializer:
            if tensor.name in parameters:
                value = helper.make_tensor_value_info(tensor.name, tensor.data_type, [])
                out.graph.input.append(value)
        notes.append("IR version < 4: the new parameters are also listed as graph inputs")
    if as_functions:
        if not any(o.domain == FUNCTION_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
        if out.ir_version < FUNCTION_MIN_IR_VERSION:
            notes.append(
                f"IR version raised from {out.ir_version} to {FUNCTION_MIN_IR_VERSION}: "
                "model-local functions need it"
            )
            out.ir_version = FUNCTION_MIN_IR_VERSION
    return notes
