"""The PyTorch rewrite: find every ReLU site of an ``nn.Module`` and give each its own activation.

How sites are reached, best first:

1. Graph rewrite. The model is traced with ``torch.fx`` (or already is a graph: the module of a
   ``torch.export`` program, or an ONNX graph turned into torch). Every call is a node, so every
   spelling (``nn.ReLU`` also in-place, ``F.relu``, ``torch.relu``, ``Tensor.relu_``,
   ``aten.relu``) is found, and a module called at two places is two nodes: two sites, each with
   its own parameters.
2. Module swap, for code that does not trace. A submodule whose ``forward`` cannot be traced is
   kept whole (the rest of the model still traces around it); inside it, ``nn.ReLU`` children and
   ReLU functions stored as attributes (``nn.TransformerEncoderLayer.activation``) are swapped,
   and its children are traced on their own. What this cannot reach, functional calls written in
   that forward, is found by :mod:`retrofit.census` when sample inputs are given.

The input model is never modified: the rewrite works on a deep copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from retrofit.activations import make_activation
from retrofit.config import ActivationConfig
from retrofit.errors import UnsupportedModelError
from retrofit.sites import (
    ReluSite, RetrofitResult, SiteSelector, no_site_message, unique_site_names,
)
from retrofit.verify import copy_module

_aten = torch.ops.aten

# call_function targets that compute ReLU, with how the model spelled them.
_RELU_FUNCTIONS: dict[object, str] = {
    F.relu: "F.relu",
    F.relu_: "F.relu_",
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    _aten.relu.default: "aten.relu",
    _aten.relu_.default: "aten.relu_",
    _aten.relu: "aten.relu",
    _aten.relu_: "aten.relu_",
}
_RELU_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}

# ``torch_fn`` metadata of exported graphs records the spelling the aten op came from.
_EXPORT_SPELLINGS = {
    "function.relu": "F.relu",
    "function.relu_": "F.relu_",
    "builtin_function_or_method.relu": "torch.relu",
    "builtin_function_or_method.relu_": "torch.relu_",
    "method_descriptor.relu": "Tensor.relu",
    "method_descriptor.relu_": "Tensor.relu_",
}

# Fused kernels that compute a ReLU inside them, where no rewrite can reach it.
_FUSED_RELU_OPS = {_aten._transformer_encoder_layer_fwd.default}


@dataclass
class _Candidate:
    """A site found but not yet named or replaced; ``attach`` installs its new activation and
    returns the module path the activation lives at."""

    base_name: str
    kind: str
    owner: str
    attach: Callable[[nn.Module], str] | None
    reason: str = ""
    remark: str = ""


@dataclass
class _Rewrite:
    """State of one rewrite: candidates in model order and graph modules to recompile."""

    root: nn.Module
    candidates: list[_Candidate] = field(default_factory=list)
    graphs: list[fx.GraphModule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, creating empty parents where the path does not exist yet
    (exported graph modules only hold the submodules that own parameters)."""
    *parents, leaf = path.split(".")
    holder = root
    for name in parents:
        if not hasattr(holder, name):
            holder.add_module(name, nn.Module())
        holder = getattr(holder, name)
    holder.add_module(leaf, module) if leaf not in holder._modules else setattr(holder, leaf, module)


def _is_relu_module(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class _Untraceable(Exception):
    """Raised through the tracer to name the innermost submodule whose forward failed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path)
        self.path = path
        self.reason = reason


class _SiteTracer(fx.Tracer):
    """An fx tracer that keeps ReLU modules and known-untraceable submodules as leaves."""

    def __init__(self, opaque: dict[str, str] | None = None) -> None:
        # The default lets a pickled GraphModule, which records its tracer class, be unpickled.
        super().__init__()
        self.opaque = opaque or {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Untraceable:
            raise
        except Exception as error:  # any failure inside a submodule's forward
            raise _Untraceable(path, _first_line(error)) from error


def _trace(module: nn.Module) -> tuple[fx.GraphModule | None, dict[str, str], str]:
    """Trace ``module``; submodules that fail are retried as leaves.

    Returns the graph module (None when the module's own forward does not trace), the opaque
    submodules with the reason each failed, and the root's own failure reason.
    """
    if isinstance(module, fx.GraphModule):
        return module, {}, ""
    opaque: dict[str, str] = {}
    while True:
        tracer = _SiteTracer(opaque)
        try:
            graph = tracer.trace(module)
        except _Untraceable as failure:
            if failure.path in opaque:
                return None, opaque, failure.reason
            opaque[failure.path] = failure.reason
            continue
        except Exception as error:  # the root's own forward does not trace
            return None, opaque, _first_line(error)
        traced = fx.GraphModule(tracer.root, graph, type(module).__name__)
        traced.training = module.training
        return traced, opaque, ""


def _node_site(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str, bool] | None:
    """``(kind, module path or "", in_place)`` when ``node`` computes ReLU, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if _is_relu_module(module):
            inplace = bool(module.inplace)
            return ("nn.ReLU(inplace)" if inplace else "nn.ReLU"), str(node.target), inplace
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _RELU_METHODS[str(node.target)], "", node.target == "relu_"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        kind = _RELU_FUNCTIONS[node.target]
        inplace = kind.endswith("_") or bool(
            node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
        )
        if kind.startswith("aten."):
            return _exported_spelling(node, kind, inplace)
        return (kind + "(inplace)" if kind == "F.relu" and inplace else kind), "", inplace
    return None


def _exported_spelling(node: fx.Node, kind: str, inplace: bool) -> tuple[str, str, bool]:
    """Recover the source spelling and module of an aten.relu node from export metadata."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, module_type = list(stack.values())[-1]
        if not isinstance(module_type, str):
            module_type = f"{module_type.__module__}.{module_type.__qualname__}"
        if module_type == "torch.nn.modules.activation.ReLU":
            return ("nn.ReLU(inplace)" if inplace else "nn.ReLU"), path, inplace
    torch_fn = node.meta.get("torch_fn")
    spelling = _EXPORT_SPELLINGS.get(torch_fn[1], kind) if torch_fn else kind
    return spelling, "", inplace


def _node_owner(node: fx.Node) -> str:
    """The module (relative to the traced graph) whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _attribute_name(owner_attrs: dict[str, int], owner: str, label: str) -> str:
    """A fresh attribute name on ``owner`` for a functional site's new module."""
    attr = "act_" + "".join(ch if ch.isalnum() else "_" for ch in label.replace("(inplace)", ""))
    key = _join(owner, attr)
    owner_attrs[key] = owner_attrs.get(key, 0) + 1
    count = owner_attrs[key]
    return _join(owner, f"{attr}_{count}" if count > 1 else attr)


def _replace_node(gm: fx.GraphModule, node: fx.Node, module_path: str, inplace: bool) -> None:
    """Swap a ReLU node for a call of the module at ``module_path``.

    In-place ReLU whose input is read again later keeps its in-place meaning through
    ``copy_``; otherwise the new activation simply runs out of place.
    """
    source = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    assert isinstance(source, fx.Node)
    source_read_again = len(source.users) > 1
    with gm.graph.inserting_before(node):
        result = gm.graph.call_module(module_path, (source,))
        result.meta = dict(node.meta)
        if inplace and source_read_again:
            result = gm.graph.call_method("copy_", (source, result))
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)


def _graph_candidates(rewrite: _Rewrite, gm: fx.GraphModule, prefix: str) -> None:
    """Collect the ReLU nodes of a traced graph, and expand the opaque modules it calls."""
    found = {node: _node_site(node, gm) for node in gm.graph.nodes}
    module_calls: dict[str, list[fx.Node]] = {}
    for node, site in found.items():
        if site is not None and site[1]:
            module_calls.setdefault(site[1], []).append(node)
    expanded: set[str] = set()
    owner_attrs: dict[str, int] = {}
    for node, site in found.items():
        if node.target in _FUSED_RELU_OPS:
            owner = _join(prefix, _node_owner(node))
            rewrite.candidates.append(
                _Candidate(_join(owner, "fused"), str(node.target), owner, None,
                           reason="ReLU inside a fused kernel; export the model in training mode")
            )
        elif site is None:
            if node.op == "call_module" and node.target not in expanded:
                expanded.add(str(node.target))
                _opaque_candidates(rewrite, gm.get_submodule(str(node.target)),
                                   _join(prefix, str(node.target)))
        elif site[1]:
            kind, module_path, inplace = site
            calls = module_calls[module_path]
            target = module_path if len(calls) == 1 else f"{module_path}.{calls.index(node)}"
            rewrite.candidates.append(
                _Candidate(_join(prefix, module_path), kind, _join(prefix, _parent(module_path)),
                           _graph_attach(gm, node, target, calls, inplace, prefix))
            )
        else:
            kind, _, inplace = site
            site_name = node.meta.get("site_name")
            owner = _node_owner(node)
            label = site_name or kind
            target = _attribute_name(owner_attrs, owner, label)
            base = site_name or _join(_join(prefix, owner), kind.replace("(inplace)", ""))
            rewrite.candidates.append(
                _Candidate(base, "onnx.Relu" if site_name else kind, _join(prefix, owner),
                           _graph_attach(gm, node, target, [node], inplace, prefix))
            )


def _graph_attach(
    gm: fx.GraphModule, node: fx.Node, target: str, calls: list[fx.Node], inplace: bool,
    prefix: str,
) -> Callable[[nn.Module], str]:
    """Install a site's activation at ``target`` and point the node at it.

    The i-th call of a reused ReLU module gets slot ``path.i`` of a ModuleList put at the
    module's path; calls left out by the selection keep a plain ReLU in their slot.
    """

    def attach(activation: nn.Module) -> str:
        _pass_on_inplace(activation, inplace)
        if len(calls) > 1:
            holder_path, _, index = target.rpartition(".")
            holder = gm.get_submodule(holder_path) if _has_submodule(gm, holder_path) else None
            if not isinstance(holder, nn.ModuleList):
                holder = nn.ModuleList(nn.ReLU() for _ in calls)
                _set_submodule(gm, holder_path, holder)
                for slot, call in enumerate(calls):
                    if call.op == "call_module":
                        call.target = f"{holder_path}.{slot}"
            holder[int(index)] = activation
        else:
            _set_submodule(gm, target, activation)
        _replace_node(gm, node, target, inplace)
        return _join(prefix, target)

    return attach


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _opaque_candidates(rewrite: _Rewrite, module: nn.Module, path: str) -> None:
    """Sites inside a module the graph treats as one call: swapped at module level."""
    for attr, value in list(vars(module).items()):
        if callable(value) and value in _RELU_FUNCTIONS:
            rewrite.candidates.append(
                _Candidate(_join(path, attr), f"{_RELU_FUNCTIONS[value]} (attribute)", path,
                           _attribute_attach(module, attr, path),
                           remark="module swap: calls of this attribute share its parameters")
            )
    for name, child in module.named_children():
        child_path = _join(path, name)
        if _is_relu_module(child):
            rewrite.candidates.append(
                _Candidate(child_path, "nn.ReLU", path,
                           _attribute_attach(module, name, path, inplace=bool(child.inplace)),
                           remark="module swap: calls of this module share its parameters")
            )
        elif fx.Tracer().is_leaf_module(child, child_path):
            _opaque_candidates(rewrite, child, child_path)
        else:
            _module_candidates(rewrite, child, child_path, holder=(module, name))


def _attribute_attach(
    module: nn.Module, attr: str, path: str, inplace: bool = False
) -> Callable[[nn.Module], str]:
    def attach(activation: nn.Module) -> str:
        _pass_on_inplace(activation, inplace)
        if attr in module._modules:
            module._modules[attr] = activation
        else:
            delattr(module, attr)
            module.add_module(attr, activation)
        # nn.Transformer*Layer run a fused kernel with ReLU built in while this flag is set.
        if hasattr(module, "activation_relu_or_gelu"):
            module.activation_relu_or_gelu = 0
        return _join(path, attr)

    return attach


def _pass_on_inplace(activation: nn.Module, inplace: bool) -> None:
    """An in-place ReLU's caller gave up its input; the activation may use that in inference
    (see :class:`~retrofit.activations.CompetitiveReLU`), which saves a buffer per site."""
    if inplace and hasattr(activation, "inplace"):
        activation.inplace = True


def _module_candidates(
    rewrite: _Rewrite, module: nn.Module, path: str, holder: tuple[nn.Module, str] | None
) -> None:
    """Trace ``module`` and collect its sites; fall back to module swap where it does not trace."""
    gm, opaque, failure = _trace(module)
    for opaque_path, reason in opaque.items():
        rewrite.notes.append(
            f"{_join(path, opaque_path)} does not trace ({reason}); "
            "it is rewritten by module swap"
        )
    if gm is None:
        rewrite.notes.append(
            f"{path or 'the model'} does not trace ({failure}); its children are rewritten "
            "one by one and ReLU calls written in its own forward cannot be reached"
        )
        _opaque_candidates(rewrite, module, path)
        return
    if holder is None:
        rewrite.root = gm
    elif gm is not module:
        parent, name = holder
        setattr(parent, name, gm)
    rewrite.graphs.append(gm)
    _graph_candidates(rewrite, gm, path)


def _collect(model: nn.Module) -> _Rewrite:
    rewrite = _Rewrite(root=model)
    _module_candidates(rewrite, model, "", holder=None)
    return rewrite


def retrofit_torch_model(
    model: nn.Module, config: ActivationConfig, select: SiteSelector | None = None
) -> RetrofitResult[nn.Module]:
    """Replace the selected ReLU sites of ``model`` with new activations built from ``config``.

    Returns a new module (the input is left as it was) in the mode the input was in, and every
    site found with what happened to it. Raises :class:`UnsupportedModelError` when the model
    has no ReLU site, :class:`~retrofit.errors.SelectionError` when a rule matches nothing.
    """
    select = select or SiteSelector()
    rewrite = _collect(copy_module(model))
    if not rewrite.candidates:
        raise UnsupportedModelError(no_site_message(
            "nn.ReLU, F.relu, torch.relu, Tensor.relu and their in-place forms",
            _other_activations(rewrite)))
    names = unique_site_names([c.base_name for c in rewrite.candidates])
    decisions = select.select(names)
    reference = next(iter(model.parameters()), None)
    placement = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
    sites = []
    for name, candidate in zip(names, rewrite.candidates):
        reason = candidate.reason or decisions[name]
        if reason or candidate.attach is None:
            sites.append(ReluSite(name, candidate.kind, candidate.owner, False, reason))
            continue
        activation = make_activation(config, **placement)
        path = candidate.attach(activation)
        parameters = tuple(_join(path, p) for p, _ in activation.named_parameters())
        sites.append(ReluSite(name, candidate.kind, candidate.owner, True,
                              candidate.remark, parameters))
    for gm in rewrite.graphs:
        _drop_text_annotations(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return RetrofitResult(rewrite.root, sites, config.name, rewrite.notes)


def _drop_text_annotations(graph: fx.Graph) -> None:
    """Forget input annotations written as text (``from __future__ import annotations``).

    fx turns them into globals of the generated code that are strings, which pickling the
    module (``torch.save(model)``) cannot name; the annotations change nothing it computes.
    """
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


# Activations that are not ReLU, named as reports spell them; what a model without ReLU holds.
_OTHER_ACTIVATION_OPS = frozenset({
    "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "hardtanh", "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus", "softsign",
    "threshold", "glu", "logsigmoid", "tanhshrink",
})


# Where activation modules are defined: torch's, and ours (a file retrofitted before).
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "retrofit.activations")


def _other_activations(rewrite: _Rewrite) -> Counter[str]:
    """Count the non-ReLU activation calls of the traced graphs and opaque modules."""
    found: Counter[str] = Counter()
    for gm in rewrite.graphs:
        for node in gm.graph.nodes:
            label = _activation_label(node, gm)
            if label:
                found[label] += 1
    traced = {id(module) for gm in rewrite.graphs for module in gm.modules()}
    for module in rewrite.root.modules():
        if id(module) not in traced and type(module).__module__ in _ACTIVATION_MODULES:
            found[_module_label(type(module))] += 1
    return found


def _module_label(kind: type) -> str:
    """``nn.ReLU6`` for torch's modules, the bare name for ours (``CompetitiveReLU``)."""
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.") else kind.__name__


def _activation_label(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        kind = type(module)
        return _module_label(kind) if kind.__module__ in _ACTIVATION_MODULES else None
    if node.op not in ("call_function", "call_method"):
        return None
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0].rstrip("_")
    if name not in _OTHER_ACTIVATION_OPS:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if stack:  # an exported graph: the module the op came from names it best
        module_type = list(stack.values())[-1][1]
        type_name = module_type if isinstance(module_type, str) else module_type.__qualname__
        if ".activation." in str(getattr(module_type, "__module__", type_name)) or \
                type_name.startswith("torch.nn.modules.activation."):
            return f"nn.{type_name.rpartition('.')[2]}"
    return f"Tensor.{name}" if node.op == "call_method" else f"{name}"
