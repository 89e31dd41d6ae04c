"""The activation factory: one module per site from a config (or an activation's name), what
the torch rewrite and everyone else who builds activations from configs calls."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from retrofit.activations.modules import ACTIVATION_MODULES
from retrofit.config import ActivationConfig, RePUConfig, resolve_config

ACTIVATIONS: dict[str, type[nn.Module]] = {kind.config_type.name: kind
                                           for kind in ACTIVATION_MODULES}
"""Activation name (``config.name``, the CLI's ``--to``) -> module class."""


def make_activation(
    config: ActivationConfig | str,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A new activation module for one site, built from a config (or a name, with defaults).

    ``device``/``dtype`` place the module's parameters (CAReLU's alpha/beta, MRePU's gains);
    creating them in the model's dtype keeps the identity init exact in float64. RePU has none.
    """
    config = resolve_config(config)
    kind = ACTIVATIONS[config.name]
    if isinstance(config, RePUConfig):
        return kind(config)
    return kind(config, device=device, dtype=dtype)
