"""Initialising a network that is trained from scratch with one of the activations.

A retrofit keeps the pretrained weights; a network trained from scratch needs weights whose
scale suits its activation, or deep stacks explode or vanish before training starts. Every
``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets weights ~ N(0, C_W / fan_in) and biases ~ N(0, C_b),
with (C_W, C_b) from :data:`SCRATCH_INIT`. For ReLU (and CAReLU, which computes ReLU at its
identity init) that is He, ReLU's critical point. MRePU and RePU have no usable critical point,
so their values are the best cells of the phase-diagram scan ``bench/repro_mrepu_depth.py``
(``bench/results/repro_mrepu_depth.md``, and ``repro_mrepu_depth_seeds.md`` for five seeds per
cell); they are the least-bad starts measured, not a guarantee that deep stacks train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from retrofit.config import ActivationConfig, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import UsageError


@dataclass(frozen=True)
class ScratchInit:
    """Weights ~ N(0, c_w / fan_in), biases ~ N(0, c_b); ``why`` says where the values come from
    and how deep they were seen to train."""

    c_w: float
    c_b: float
    why: str

    def __post_init__(self) -> None:
        if not (0.0 < self.c_w < math.inf and 0.0 <= self.c_b < math.inf):
            raise ValueError(f"need 0 < C_W and 0 <= C_b, both finite; got {self.c_w}, {self.c_b}")


HE = ScratchInit(2.0, 0.0, "He, ReLU's critical point (E[relu(z)^2] = K/2 keeps the kernel "
                           "fixed); the scan trains it at every depth up to 32")

SCRATCH_INIT: dict[str, ScratchInit] = {
    "relu": HE,
    "carelu": ScratchInit(HE.c_w, HE.c_b, "CAReLU at its identity init computes ReLU, so He"),
    "mrepu": ScratchInit(0.09, 0.0, (
        "best cell of the scan (5 seeds): trains at depth 4, fits poorly at 8 (about 30% of "
        "Var(y) left), diverges in training from 12 on; measured on inputs in [-1, 1]")),
    "repu": ScratchInit(0.25, 0.5, (
        "no critical point; best cell of the scan (5 seeds): trains at depth 4 and 8, poorly "
        "at 12, diverges deeper; the large bias holds the signal at a fixed point")),
}
"""Activation name (``relu`` or a ``--to`` name) -> the from-scratch initialisation shipped for it.

Why MRePU is not at its nominal critical point C_W = 1 / sigma'(0)^2 = 1, C_b = 0: its series
x + 2x^2 + x^3 gives the kernel map K -> K + 18 K^2 + ..., so at C_W = 1 every signal grows and
overflows within a few layers. Below C_W = 1 the zero signal is stable but only up to an
unstable fixed point; a sample whose pre-activations start above it explodes. C_W = 0.09 keeps
inputs of |x| <= 1 inside that basin (the signal shrinks by about C_W per layer at init and
training grows it back); training then pushes deep stacks over the edge, which is why no MRePU
cell trained beyond 8 layers (ReLU trained at 32, RePU with a large bias at 8). Inputs of
larger scale (standardised Gaussian features) can start outside the basin: scale them into
[-1, 1] first.
"""


def scratch_init_for(activation: str | ActivationConfig) -> ScratchInit:
    """The :class:`ScratchInit` for an activation name (``relu`` or a ``--to`` name) or config.

    Only the configurations the constants hold for are accepted: MRePU with p = 2, c = 1,
    blend 1; RePU with p = 2; CAReLU at its identity init (where it computes ReLU).
    """
    name = activation if isinstance(activation, str) else getattr(activation, "name", None)
    if name not in SCRATCH_INIT:
        raise UsageError(f"no from-scratch initialisation for activation {activation!r}; "
                         f"known: {', '.join(SCRATCH_INIT)}")
    if isinstance(activation, MRePUConfig) and (activation.p, activation.c,
                                                activation.blend) != (2.0, 1.0, 1.0):
        raise UsageError("the MRePU initialisation was measured for p=2, c=1, blend=1 only; "
                         f"got {activation}")
    if isinstance(activation, RePUConfig) and activation.p != 2.0:
        raise UsageError(f"the RePU initialisation was measured for p=2 only; got {activation}")
    if isinstance(activation, CompetitiveReLUConfig) and not activation.is_identity_init:
        raise UsageError("the CAReLU initialisation assumes its identity init "
                         "(alpha_init=0, beta_init unset)")
    return SCRATCH_INIT[name]


def initialise_from_scratch(model: nn.Module, activation: str | ActivationConfig, *,
                            generator: Optional[torch.Generator] = None) -> ScratchInit:
    """Re-draw every Linear/Conv weight and bias of ``model`` for training from scratch with
    ``activation`` (see :data:`SCRATCH_INIT`); returns the constants used. Other parameters
    (norms, embeddings, CAReLU's alpha/beta) are left as they are."""
    init = scratch_init_for(activation)
    initialise_weights(model, init.c_w, init.c_b, generator=generator)
    return init


def initialise_weights(model: nn.Module, c_w: float, c_b: float, *,
                       generator: Optional[torch.Generator] = None) -> None:
    """Weights ~ N(0, c_w / fan_in), biases ~ N(0, c_b) for every Linear and Conv1d/2d/3d, in
    ``model.modules()`` order, so one generator seed gives one set of weights on any device.

    fan_in is in_features for Linear and in_channels / groups * kernel size for a convolution.
    A transposed convolution is refused: its fan-in depends on the stride, not on its weight shape.
    """
    ScratchInit(c_w, c_b, "")  # validates the constants
    layers = list(_weighted_layers(model))
    if not layers:
        raise UsageError("the model has no nn.Linear or nn.Conv1d/2d/3d layer to initialise")
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight
            fan_in = weight[0].numel()
            _fill_normal(weight, math.sqrt(c_w / fan_in), generator)
            if layer.bias is not None:
                _fill_normal(layer.bias, math.sqrt(c_b), generator)


def _weighted_layers(model: nn.Module) -> Iterator[nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise UsageError(f"{name or 'the model'} is a transposed convolution; "
                             "initialise it yourself (its fan-in depends on the stride)")
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
        if lazy and module.has_uninitialized_params():
            raise UsageError(f"{name or 'the model'} is a lazy layer without shapes yet; "
                             "run one forward pass before initialising")
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            yield module


def _fill_normal(tensor: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    """Draw on the generator's device (CPU by default) and copy, so a seed means the same
    numbers whatever device the model is on."""
    device = generator.device if generator is not None else torch.device("cpu")
    values = torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float64)
    tensor.copy_(values * std)
