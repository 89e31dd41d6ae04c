"""The PyTorch rewrite: find every ReLU site of an ``nn.Module`` and give each its own activation.

How sites are reached. Each module's own forward is traced with ``torch.fx`` on its own, its
children kept as calls (a graph already, the module of a ``torch.export`` program or an ONNX graph
turned into torch, is used as it is). Every call is a node, so every spelling (``nn.ReLU`` also
in-place, ``F.relu``, ``torch.relu``, ``Tensor.relu_``, ``aten.relu``) is found. Then, per module:

1. Module swap, wherever it gives every site its own parameters: ``nn.ReLU`` children called once
   and ReLU functions stored as attributes (``nn.TransformerEncoderLayer.activation``) are
   replaced in place. The module keeps its object and its code.
2. Graph rewrite, only where a forward calls a ReLU function or one ``nn.ReLU`` module at two
   places (two sites, each with its own parameters): the traced copy replaces that one module,
   unless the trace would fix something to one case (an optional argument, the training mode,
   a type check), in which case the module is kept and those calls are listed as not replaced.

A module whose forward does not trace is kept; what module swap cannot reach in it, functional
calls written in that forward, is found by :mod:`retrofit.torch_path.census` when sample inputs are given.

The input model is never modified: the rewrite works on a deep copy.
"""

from __future__ import annotations

import inspect
import os
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from retrofit.activations.registry import make_activation
from retrofit.config import ActivationConfig
from retrofit.errors import UnsupportedModelError, UsageError, first_line
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
    """State of one rewrite: candidates in model order and graph modules to recompile.

    ``others`` counts the activations that are not ReLU, for the error of a model without one.

    ``visited``: ids of the modules looked at (a module registered twice is looked at once);
    ``untraced``: path of each module whose forward does not trace, and why; ``claimed``:
    (holder id, attribute) of each ReLU module already made a site by module swap.
    """

    root: nn.Module
    candidates: list[_Candidate] = field(default_factory=list)
    graphs: list[fx.GraphModule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    visited: set[int] = field(default_factory=set)
    untraced: dict[str, str] = field(default_factory=dict)
    claimed: set[tuple[int, str]] = field(default_factory=set)
    others: Counter[str] = field(default_factory=Counter)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


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


class _SiteTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one call node.

    The smallest traced scope: a traced copy then replaces only the module whose own code holds
    a site, and each child is looked at on its own. It takes no arguments, so a GraphModule it
    made can be pickled (``GraphModule.__reduce__`` records the tracer class and re-creates it).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# Names whose use in a forward makes a trace hold for one case only. fx records the mode it
# traced in (dropout's ``training=self.training``, grad-mode checks), and an argument is a Proxy
# while tracing: ``isinstance(x, tuple)`` is False and ``hasattr(x, "keys")`` True for any call.
_SPECIALISING_NAMES = {
    **dict.fromkeys(("training", "is_grad_enabled", "is_inference_mode_enabled",
                     "is_autocast_enabled", "is_scripting", "is_tracing", "is_compiling"),
                    "the mode it ran in"),
    **dict.fromkeys(("isinstance", "hasattr", "type"), "the types of what it was given"),
}
_TORCH_FOLDER = os.path.dirname(torch.__file__)


def _trace(module: nn.Module) -> tuple[fx.Graph | None, str, str]:
    """Trace ``module``'s own forward (children stay calls; node targets are paths in it).

    Returns the graph (None when the forward does not trace), the reason it failed, and what
    the trace would silently fix to one case (see :func:`_specialisation`), "" when nothing.
    """
    tracer = _SiteTracer()
    try:
        graph = tracer.trace(module)
    except Exception as error:  # any failure of user code under fx
        return None, first_line(error, typed=True), ""
    for node in graph.nodes:
        # Annotations kept as strings (``from __future__ import annotations``) would become
        # string globals of the generated code, which a pickled GraphModule cannot name.
        node.type = None
    return graph, "", _specialisation(module)


def _specialisation(module: nn.Module) -> str:
    """What a trace of ``module`` would fix to the one case seen while tracing, "" if nothing.

    fx runs Python control flow once: an optional argument is a placeholder that is never None
    (``if mask is not None`` keeps one branch), ``self.training`` and grad-mode checks keep the
    mode of the trace, type checks see a Proxy (see ``_SPECIALISING_NAMES``). Branches on a tensor's value or shape raise instead, and branches on the
    module's own attributes (``if self.downsample is not None``) hold for every call. The code
    read is the forward's and that of the methods of its class it names (``self.helper(x)``).
    """
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return "a forward whose signature cannot be read"
    optional = [p.name for p in parameters if p.default is not inspect.Parameter.empty
                or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if optional:
        return f"its optional arguments: {', '.join(optional)}"
    for code in _own_code(type(module)):
        read = sorted(name for name in code.co_names if name in _SPECIALISING_NAMES)
        if read:
            return (f"{_SPECIALISING_NAMES[read[0]]}: {code.co_name} reads "
                    f"{', '.join(read)}")
    return ""


def _own_code(cls: type) -> list[types.CodeType]:
    """Code objects of ``cls.forward``, the functions nested in it and the methods of ``cls``
    it names, outside torch's own code."""
    pending = [cls.forward]
    found: dict[types.CodeType, None] = {}
    while pending:
        function = inspect.unwrap(pending.pop())
        code = getattr(function, "__code__", None)
        if code is None or code in found or code.co_filename.startswith(_TORCH_FOLDER):
            continue
        found[code] = None
        nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
        while nested:
            inner = nested.pop()
            found[inner] = None
            nested += [c for c in inner.co_consts if isinstance(c, types.CodeType)]
        for name in code.co_names:
            method = inspect.getattr_static(cls, name, None)
            method = getattr(method, "__func__", method)  # staticmethod, classmethod
            if inspect.isfunction(method):
                pending.append(method)
    return list(found)


def _node_site(node: fx.Node, gm: nn.Module) -> tuple[str, str, bool] | None:
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
    """Collect the ReLU nodes of a graph, and look at each other module it calls on its own."""
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
                target = str(node.target)
                expanded.add(target)
                holder_path, _, name = target.rpartition(".")
                _submodule_candidates(rewrite, gm.get_submodule(target), _join(prefix, target),
                                      (gm.get_submodule(holder_path), name))
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


def _kept_candidates(rewrite: _Rewrite, module: nn.Module, path: str) -> None:
    """Sites of a module kept as written whose calls are not known (it does not trace, or its
    trace holds for one case only): every ReLU child and every ReLU function held as an
    attribute is swapped in place, every other child is looked at on its own."""
    for attr, value in list(vars(module).items()):
        if callable(value) and value in _RELU_FUNCTIONS:
            rewrite.candidates.append(
                _Candidate(_join(path, attr), f"{_RELU_FUNCTIONS[value]} (attribute)", path,
                           _attribute_attach(module, attr, path),
                           remark="module swap: calls of this attribute share its parameters")
            )
    for name, child in module.named_children():
        _call_candidates(rewrite, module, name, path, "module swap: calls of this module "
                         "share its parameters")


def _called_candidates(rewrite: _Rewrite, module: nn.Module, graph: fx.Graph,
                       path: str) -> None:
    """Sites of a module kept as written whose trace holds for every call: each ReLU module it
    calls (once, else it would be traced) is swapped where it sits, and each other module it
    calls is looked at on its own, in call order."""
    for target in dict.fromkeys(str(n.target) for n in graph.nodes if n.op == "call_module"):
        holder_path, _, name = target.rpartition(".")
        _call_candidates(rewrite, module.get_submodule(holder_path), name,
                         _join(path, holder_path), "")


def _call_candidates(rewrite: _Rewrite, holder: nn.Module, name: str, path: str,
                     remark: str) -> None:
    """The child ``name`` of ``holder`` (at ``path``): a ReLU module becomes a site swapped in
    place, once per holder attribute; any other module is looked at on its own."""
    child = holder.get_submodule(name)
    child_path = _join(path, name)
    if not _is_relu_module(child):
        _submodule_candidates(rewrite, child, child_path, holder=(holder, name))
        return
    if (id(holder), name) in rewrite.claimed:
        return
    rewrite.claimed.add((id(holder), name))
    rewrite.candidates.append(
        _Candidate(child_path, "nn.ReLU(inplace)" if child.inplace else "nn.ReLU", path,
                   _attribute_attach(holder, name, path, inplace=bool(child.inplace)),
                   remark=remark)
    )


def _submodule_candidates(
    rewrite: _Rewrite, module: nn.Module, path: str, holder: tuple[nn.Module, str]
) -> None:
    """A child: torch.nn's own modules keep their code (their ReLU attributes are swapped);
    others are traced on their own. A module registered at two places is looked at once."""
    if id(module) in rewrite.visited:
        return
    rewrite.visited.add(id(module))
    if not isinstance(module, fx.GraphModule) and fx.Tracer().is_leaf_module(module, path):
        _kept_candidates(rewrite, module, path)
    else:
        _module_candidates(rewrite, module, path, holder)


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
    (see :class:`~retrofit.activations.modules.CompetitiveReLU`), which saves a buffer per site."""
    if inplace and hasattr(activation, "inplace"):
        activation.inplace = True


def _module_candidates(
    rewrite: _Rewrite, module: nn.Module, path: str, holder: tuple[nn.Module, str] | None
) -> None:
    """Collect the sites of ``module``; a traced copy replaces it only where it must.

    A traced copy replaces the module only when its own forward holds a ReLU that module swap
    cannot give its own parameters (a functional call, a ReLU module called twice) and the
    trace fixes nothing to one case (:func:`_specialisation`). Every other module keeps its
    object and code: its ReLU children are swapped in place and its children looked at alone.
    """
    where = path or "the model"
    if isinstance(module, fx.GraphModule):  # already a graph: export, ONNX, an earlier rewrite
        _count_other_activations(rewrite, module, module.graph)
        rewrite.graphs.append(module)
        _graph_candidates(rewrite, module, path)
        return
    graph, failure, specialised = _trace(module)
    if graph is None:
        rewrite.untraced[where] = failure
        rewrite.others.update(label for child in module.children()
                              if (label := _activation_module_label(child)))
        _kept_candidates(rewrite, module, path)
        return
    _count_other_activations(rewrite, module, graph)
    sites = [site for node in graph.nodes if (site := _node_site(node, module))]
    relu_calls = Counter(module_path for _, module_path, _ in sites if module_path)
    functional = [kind for kind, module_path, _ in sites if not module_path]
    needs_graph = bool(functional) or any(count > 1 for count in relu_calls.values())
    if needs_graph and not specialised:
        gm = _traced_copy(module, graph)
        if holder is None:
            rewrite.root = gm
        else:
            setattr(holder[0], holder[1], gm)
        rewrite.graphs.append(gm)
        _graph_candidates(rewrite, gm, path)
    elif not specialised:
        _called_candidates(rewrite, module, graph, path)
    else:
        if needs_graph:
            kept = (f"{where} is kept as written: a traced copy would hold for one case of "
                    f"{specialised}")
            rewrite.notes.append(f"{kept}; its ReLU function calls are not replaced")
            for kind in functional:
                rewrite.candidates.append(_Candidate(_join(path, kind.replace("(inplace)", "")),
                                                     kind, path, None, f"not rewritten: {kept}"))
        _kept_candidates(rewrite, module, path)


def _traced_copy(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The graph module of ``module``'s traced forward, holding the original's own children,
    parameters and buffers, in order.

    fx copies only what the graph uses, and puts an empty module where a path passes through a
    child; with the originals back, the state dict keeps its names and other code that reaches
    into the module finds what it did.
    """
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm.training = module.training
    children = dict(module.named_children())
    extra = {name: child for name, child in gm.named_children() if name not in children}
    gm._modules.clear()
    gm._modules.update({**children, **extra})
    for name, parameter in module.named_parameters(recurse=False):
        gm.register_parameter(name, parameter)
    buffers = dict(module.named_buffers(recurse=False))
    for name, buffer in buffers.items():
        gm.register_buffer(name, buffer,
                           persistent=name not in module._non_persistent_buffers_set)
    # fx makes a plain tensor attribute the graph reads a buffer: it stays out of the state dict.
    gm._non_persistent_buffers_set.update(set(gm._buffers) - set(buffers))
    return gm


def _collect(model: nn.Module) -> _Rewrite:
    rewrite = _Rewrite(root=model)
    rewrite.visited.add(id(model))
    _module_candidates(rewrite, model, "", holder=None)
    if rewrite.untraced:
        rewrite.notes.append(_untraced_note(rewrite.untraced))
    return rewrite


def _untraced_note(untraced: dict[str, str]) -> str:
    """One note for all modules whose forward does not trace (a transformer has dozens)."""
    (first, reason), *others = untraced.items()
    listed = ", ".join(list(untraced)[:4]) + (", ..." if len(untraced) > 4 else "")
    names = f"{len(untraced)} modules ({listed})" if others else first
    verb = "does" if not others else "do"
    return (f"{names} {verb} not trace ({first + ': ' if others else ''}{reason}); kept as "
            "written: ReLU children are swapped as modules, and ReLU calls written in a forward "
            "that does not trace are found only by running the model on sample inputs")


def retrofit_torch_model(
    model: nn.Module, config: ActivationConfig, select: SiteSelector | None = None,
    site_values: Mapping[str, Mapping[str, float]] | None = None,
) -> RetrofitResult[nn.Module]:
    """Replace the selected ReLU sites of ``model`` with new activations built from ``config``.

    Returns a new module (the input is left as it was) in the mode the input was in, and every
    site found with what happened to it. ``site_values`` sets a site's parameters by name
    (``{"gain_in": .., "gain_out": ..}`` for a calibrated MRePU), as the ONNX rewrite does.
    Raises :class:`UnsupportedModelError` when the model has no ReLU site,
    :class:`~retrofit.errors.SelectionError` when a rule matches nothing, :class:`UsageError`
    for ``site_values`` naming no replaced site or no parameter of one.
    """
    select = select or SiteSelector()
    rewrite = _collect(copy_module(model))
    if not rewrite.candidates:
        message = no_site_message("nn.ReLU, F.relu, torch.relu, Tensor.relu and their in-place "
                                  "forms", rewrite.others)
        if rewrite.untraced:
            where, reason = next(iter(rewrite.untraced.items()))
            message += (f"; {where}'s forward does not trace ({reason}), so ReLU calls written in "
                        "it cannot be reached: call an nn.ReLU module there instead")
        raise UnsupportedModelError(message)
    names = unique_site_names([c.base_name for c in rewrite.candidates])
    decisions = select.select(names)
    values = dict(site_values or {})
    reference = next(iter(model.parameters()), None)
    placement = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
    sites = []
    for name, candidate in zip(names, rewrite.candidates):
        reason = candidate.reason or decisions[name]
        if reason or candidate.attach is None:
            sites.append(ReluSite(name, candidate.kind, candidate.owner, False, reason))
            continue
        activation = make_activation(config, **placement)
        _set_values(activation, name, values.pop(name, {}))
        path = candidate.attach(activation)
        parameters = tuple(_join(path, p) for p, _ in activation.named_parameters())
        sites.append(ReluSite(name, candidate.kind, candidate.owner, True,
                              candidate.remark, parameters))
    if values:
        raise UsageError(f"site values for sites that were not replaced: {', '.join(sorted(values))}")
    for gm in rewrite.graphs:
        gm.graph.lint()
        gm.recompile()
    return RetrofitResult(rewrite.root, sites, config.name, rewrite.notes)


def _set_values(activation: nn.Module, site: str, values: Mapping[str, float]) -> None:
    parameters = dict(activation.named_parameters())
    unknown = sorted(set(values) - set(parameters))
    if unknown:
        raise UsageError(f"site {site}: no parameter {', '.join(unknown)} (it has "
                         f"{', '.join(parameters) or 'none'})")
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].fill_(float(value))


# Activations that are not ReLU, named as reports spell them; what a model without ReLU holds.
_OTHER_ACTIVATION_OPS = frozenset({
    "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "hardtanh", "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus", "softsign",
    "threshold", "glu", "logsigmoid", "tanhshrink",
})


# Where activation modules are defined: torch's, and ours (a file retrofitted before).
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "retrofit.activations.modules")


def _count_other_activations(rewrite: _Rewrite, module: nn.Module, graph: fx.Graph) -> None:
    rewrite.others.update(label for node in graph.nodes
                          if (label := _activation_label(node, module)))


def _activation_module_label(module: nn.Module) -> str | None:
    kind = type(module)
    return _module_label(kind) if kind.__module__ in _ACTIVATION_MODULES else None


def _module_label(kind: type) -> str:
    """``nn.ReLU6`` for torch's modules, the bare name for ours (``CompetitiveReLU``)."""
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.") else kind.__name__


def _activation_label(node: fx.Node, owner: nn.Module) -> str | None:
    """How a report names the activation ``node`` computes, when it is one other than ReLU."""
    if node.op == "call_module":
        return _activation_module_label(owner.get_submodule(str(node.target)))
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
