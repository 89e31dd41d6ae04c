"""The switches fine-tuning flips, and gives back: a model's train/eval mode (which torch.export
graphs refuse or ignore), its buffers through a validation, and torch's deterministic kernels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


def is_export_graph(model: nn.Module) -> bool:
    """A graph of ATen ops, as ``torch.export`` makes: its train/eval behaviour was fixed when it
    was exported, whatever ``.training`` says (a rewritten copy may accept ``.train()``)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        isinstance(node.target, torch._ops.OpOverload) for node in model.graph.nodes)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put the buffers back afterwards: a graph exported in training mode updates BatchNorm
    statistics even when it is only evaluated (for other models this is a no-op)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training; the caller's global settings come back after.
    ``warn_only``: an op without a deterministic kernel warns instead of failing mid-run."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
