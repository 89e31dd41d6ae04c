"""The optimizer: parameter groups with their own learning rate and weight decay, and the
scheduled learning rate each step sets on them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retrofit.activations.modules import ACTIVATION_MODULES
from retrofit.training.config import FinetuneConfig


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, each with a ``name``: ``weights`` (2+ dimensions, with
    weight decay), ``no_decay`` (biases, normalisation scales: 0/1 dimensions) and
    ``activation`` (parameters of :data:`ACTIVATION_MODULES`, at ``activation_lr``, no decay).
    Frozen parameters are left out, and so are empty groups."""
    activation = {id(p) for m in model.modules() if isinstance(m, ACTIVATION_MODULES)
                  for p in m.parameters()}
    named: dict[str, list[nn.Parameter]] = {"weights": [], "no_decay": [], "activation": []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in activation:
            named["activation"].append(parameter)
        elif parameter.ndim >= 2:
            named["weights"].append(parameter)
        else:
            named["no_decay"].append(parameter)
    activation_lr = config.lr if config.activation_lr is None else config.activation_lr
    settings = {
        "weights": (config.lr, config.weight_decay),
        "no_decay": (config.lr, 0.0),
        "activation": (activation_lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "base_lr": settings[name][0],
         "weight_decay": settings[name][1]}
        for name, params in named.items()
        if params
    ]




def make_optimizer(groups: list[dict[str, Any]], config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with ``config.momentum``) over ``groups``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def scaled_rates(optimizer: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """Each group's learning rate at the schedule's ``factor``, by group name."""
    return {group["name"]: group["base_lr"] * factor for group in optimizer.param_groups}


def set_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its peak rate times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
