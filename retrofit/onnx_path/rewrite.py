"""The ONNX rewrite: every ``Relu`` node becomes the configured activation, one site each.

Sites, their names and their types are :mod:`retrofit.onnx_path.discovery`'s. Here: a site in a
graph scope is replaced by the activation's nodes; a site in a model-local function is replaced
in the function, which takes the activation parameters as extra inputs, and each call passes
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
version is raised to 8 and the result says so in its notes. See
:func:`retrofit.onnx_path.emission.competition_axes` for what an unknown rank allows.

The input model is never modified; on any error nothing is returned half-edited.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import onnx
from onnx import helper

from retrofit.config import ActivationConfig, CompetitiveReLUConfig
from retrofit.errors import UnsupportedModelError, UsageError
from retrofit.onnx_path.discovery import Discovery, FoundSite, FunctionCall, FunctionKey, call_key, function_key
from retrofit.onnx_path.site_names import default_opset
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
    local_fresh,
    parameter_names,
    parameter_tensor,
    parameter_values,
    type_name,
)
from retrofit.onnx_path.io import iter_nodes, subgraphs
from retrofit.onnx_path.site_names import is_relu, node_label
from retrofit.sites import (
    ReluSite, RetrofitResult, SiteSelector, no_site_message, unique_site_names,
)

SITE_KIND = "onnx.Relu"
PARAMETER_PREFIX = "cadrelu."

Signature = tuple[Optional[SitePlan], ...]
"""What one call of a function needs from its body: a plan per site, None where it stays ReLU."""

# --------------------------------------------------------------------------------------------
# What the rewrite cannot handle


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
# Names and node lists


def _sanitize(name: str) -> str:
    """A site name as part of a tensor name: scopes joined by dots, other characters ``_``."""
    dotted = name.replace("/", ".")
    return re.sub(r"[^A-Za-z0-9_.]+", "_", dotted).strip("_.") or "site"


def _used_names(nodes: Iterable[onnx.NodeProto], values: Iterable[str]) -> set[str]:
    """Every name of one namespace (a graph with its subgraphs, or a function body): the
    ``values`` it declares and every name its nodes and their subgraphs use or declare."""
    names = set(values)
    for node in nodes:
        names.update((node.name, *node.input, *node.output))
        for _, sub in subgraphs(node):
            names |= _used_names(sub.node, _declared(sub))
    return names


def _declared(graph: onnx.GraphProto) -> list[str]:
    return [*(value.name for value in (*graph.input, *graph.output, *graph.value_info)),
            *(tensor.name for tensor in graph.initializer),
            *(sparse.values.name for sparse in graph.sparse_initializer)]


def _under(fresh: Fresh, prefix: str) -> Fresh:
    """Fresh names that start with ``prefix.``: a site's nodes are named after the site."""
    return lambda hint: fresh(f"{prefix}.{hint}")


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


def _not_float_reason(elem_type: int) -> str:
    return f"{type_name(elem_type)} tensor: only floating-point ReLU sites are rewritten"


# --------------------------------------------------------------------------------------------
# Rewriting


@dataclass
class _Planned:
    """A selected site ready to emit: its plan, its scope's opset and its parameter names."""

    found: FoundSite
    name: str
    plan: SitePlan
    params: list[str]


class _Rewriter:
    """Emits the new nodes, function variants and activation functions into the model copy."""

    def __init__(
        self,
        model: onnx.ModelProto,
        discovery: Discovery,
        config: ActivationConfig,
        as_functions: bool,
    ) -> None:
        self.model = model
        self.discovery = discovery
        self.config = config
        self.as_functions = as_functions
        self.fresh = local_fresh(_used_names(model.graph.node, _declared(model.graph)))
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
        assert is_relu(relu), f"site {planned.name!r} does not point at its Relu node"
        fresh = _under(self.fresh, PARAMETER_PREFIX + _sanitize(planned.name))
        nodes = self.emit(planned.plan, relu, planned.params, fresh, found.opset)
        self.replace(found.graph_key, found.index, nodes)

    def rewrite_call(self, call: FunctionCall, signature: Signature, params: list[list[str]]) -> None:
        """Point a graph's call at the variant its signature needs, passing the sites' params."""
        if not any(signature):
            return
        node = self.discovery.graphs[call.graph_key].node[call.index]
        self.replace(call.graph_key, call.index,
                     [self._variant_call(node, call.function, signature, params)])

    def _variant_call(self, node: onnx.NodeProto, callee: FunctionKey, signature: Signature,
                      params: Iterable[Sequence[str]]) -> onnx.NodeProto:
        """A copy of the call ``node`` that calls the variant ``signature`` needs, with the
        sites' parameters after the callee's inputs (the optional ones it leaves out as "")."""
        call = onnx.NodeProto()
        call.CopyFrom(node)
        call.op_type = self.variant_names[(callee, signature)]
        while len(call.input) < len(self.discovery.functions[callee].input):
            call.input.append("")
        for site_params in params:
            call.input.extend(site_params)
        return call

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
        if call_key(node) in self.discovery.functions:
            yield call_key(node)
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
        fresh = local_fresh(_used_names(original.node, [*original.input, *original.output]))
        labels = self.discovery.layout(key).labels
        slot_params: list[list[str]] = []
        for label, plan in zip(labels, signature):
            prefix = PARAMETER_PREFIX + _sanitize(label)
            names = parameter_names(self.config) if plan is not None else ()
            slot_params.append([fresh(f"{prefix}.{p}") for p in names])
        for names in slot_params:
            function.input.extend(names)
        body_opset = default_opset(original.opset_import) or opset
        self._rewrite_body(function.node, signature, slot_params, [0], fresh, body_opset, "")
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
        fresh: Fresh,
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
                    site_fresh = _under(fresh, PARAMETER_PREFIX + _sanitize(label))
                    replacements[index] = self.emit(plan, node, slot_params[slot], site_fresh,
                                                    opset)
                continue
            for attr_label, sub in subgraphs(node):
                self._rewrite_body(
                    sub.node, signature, slot_params, counter, fresh, opset,
                    f"{label}/{attr_label}/",
                )  # fmt: skip
            callee = call_key(node)
            if callee in self.discovery.functions:
                count = self.discovery.layout(callee).count
                start = counter[0]
                counter[0] += count
                inner = signature[start : start + count]
                if count and any(inner):
                    replacements[index] = [self._variant_call(
                        node, callee, inner, slot_params[start : start + count])]
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

    Returns a new model whose inputs, outputs, metadata, doc strings, opset imports, IR version
    and untouched nodes are as they were, in the same order; each replaced site computes its
    activation with its own parameters, initialised from the config or from
    ``site_values[site]`` (``{"alpha": ..., "beta": ...}`` for CAReLU, ``{"gain_in": ...,
    "gain_out": ...}`` for MRePU; e.g. trained values). ``as_functions=True`` emits each
    activation variant once as a model-local function in domain ``cadrelu``, called per site
    (the IR version is raised to 8 when lower, with a note).

    Requires, each refused with a one-line error before anything is edited: a graph that is not
    quantized and has no ReLU fused into another op (:func:`ensure_rewritable`), and at least
    one ReLU site (:class:`UnsupportedModelError`); rules that each match a site
    (:class:`SelectionError`) and ``site_values`` that name sites and their parameters
    (:class:`UsageError`); for each selected site a float element type (other types are kept,
    with a reason), a default-domain opset from 9 to the newest, and a known rank where the
    configured reduction needs one (:class:`UnsupportedModelError`).

    Ensures: the input model is unchanged (the pass edits a copy). Asserted, as a failure is
    a bug in cadrelu: each edit of a graph scope replaces the site's own ``Relu`` node; every
    replaced site's parameters are main-graph initializers; the graph's outputs are as they
    were, and its inputs too, new parameters appended only below IR version 4.
    """
    ensure_rewritable(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    discovery = Discovery(out).run()
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
    _assert_ensured(model, out, sites)
    return RetrofitResult(out, sites, config.name, notes)


def _assert_ensured(model: onnx.ModelProto, out: onnx.ModelProto, sites: Sequence[ReluSite]
                    ) -> None:
    """The postconditions of :func:`rewrite_onnx_relus` that cost no walk over every node."""
    initializers = {tensor.name for tensor in out.graph.initializer}
    assert all(name in initializers for site in sites for name in site.parameters), \
        "a site's parameter is not an initializer"
    assert out.graph.output == model.graph.output, "the graph's outputs changed"
    inputs = len(model.graph.input)
    assert out.graph.input[:inputs] == model.graph.input[:] and (
        len(out.graph.input) == inputs or model.ir_version < 4), "the graph's inputs changed"


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
            init_name = rewriter.fresh(f"{PARAMETER_PREFIX}{_sanitize(name)}.{param}")
            out.graph.initializer.append(parameter_tensor(init_name, value, plan))
            params.append(init_name)
        planned[position] = _Planned(found, name, plan, params)
        remark = f"p measured {plan.axes.describe()}" if plan.axes and plan.axes.flatten else ""
        sites.append(ReluSite(name, SITE_KIND, found.owner, True, remark, tuple(params)))
    return sites, planned


def _plan(config: ActivationConfig, found: FoundSite, name: str) -> SitePlan:
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
        key = function_key(function)
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
