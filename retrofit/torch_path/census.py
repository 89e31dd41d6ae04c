"""Run the retrofitted model once and see what actually executes.

Tracing cannot see inside a forward that does not trace; running can. One forward pass on sample
inputs tells which ReLU calls still run as plain ReLU in places the rewrite did not reach, and
how many times each new activation ran (a module-swapped activation called twice shares its
parameters between two call sites).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from retrofit.activations.modules import ACTIVATION_MODULES

_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


@dataclass
class CallCensus:
    """``unreached``: plain ReLU calls per module, in code no rewrite could reach;
    ``activation_calls``: calls of each new activation module in one forward pass."""

    unreached: Counter[str] = field(default_factory=Counter)
    activation_calls: Counter[str] = field(default_factory=Counter)


class _ReluCounter(TorchDispatchMode):
    def __init__(self, stack: list[nn.Module], names: dict[int, str], census: CallCensus):
        super().__init__()
        self.stack, self.names, self.census = stack, names, census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _RELU_OPS and self.stack:
            inner = self.stack[-1]
            # Plain ReLU modules are sites kept by the selection; calls made directly by a traced
            # graph are kept graph sites. Anything else ran where the rewrite could not look.
            if not isinstance(inner, (nn.ReLU, fx.GraphModule)):
                self.census.unreached[self.names.get(id(inner), "?")] += 1
        return func(*args, **(kwargs or {}))


def take_census(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> CallCensus:
    """One forward pass of ``model`` on ``inputs``, watched at the dispatcher and module level."""
    census = CallCensus()
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    stack: list[nn.Module] = []

    def enter(module: nn.Module, args: object) -> None:
        stack.append(module)
        if isinstance(module, ACTIVATION_MODULES):
            census.activation_calls[names.get(id(module), "?")] += 1

    def leave(module: nn.Module, args: object, output: object) -> None:
        stack.pop()

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        with torch.no_grad(), _ReluCounter(stack, names, census):
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return census
