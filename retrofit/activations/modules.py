"""The activations that replace ReLU as ``nn.Module`` s: ``CompetitiveReLU`` (CAReLU), ``MRePU``
and ``RePU``, each built from its config of :mod:`retrofit.config` and computing the
functional form of :mod:`retrofit.activations.functional` with its parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from retrofit.activations.functional import carelu, gained_mrepu, repu
from retrofit.config import CompetitiveReLUConfig, MRePUConfig, RePUConfig, config_with


class CompetitiveReLU(nn.Module):
    """CAReLU with trainable scalars ``alpha`` and ``beta`` (0-dim parameters).

    Built from a :class:`CompetitiveReLUConfig`, optionally with keyword overrides of its fields
    (``CompetitiveReLU(measure="l1")``). The default config is the identity retrofit: alpha=0,
    beta=atanh(1/K), so ``s`` is 1 for every input (exactly in float32, to 1e-16 in float64)
    and the module computes ReLU. ``device``/``dtype`` place the parameters; pass
    ``dtype=torch.float64`` for a float64 model rather than calling ``.double()``, which keeps
    beta's float32 rounding (|s - 1| ~ 1.5e-8), or call :meth:`reset_parameters` afterwards.

    ``inplace`` means what it means for ``nn.ReLU``: the caller no longer needs the input, so
    eager inference (no autograd, CPU, a contiguous float32/float64 input, s >= 0 for every
    input) may write the result into the input's memory. Training and graph capture never do.
    The rewriters set it where the replaced ReLU was in-place.
    """

    config_type: ClassVar[type] = CompetitiveReLUConfig
    """The config this module is built from; its ``name`` is the activation's."""

    def __init__(
        self,
        config: Optional[CompetitiveReLUConfig] = None,
        *,
        inplace: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        config = config_with(self.config_type, config, overrides)
        self.config = config
        self.measure: str = config.measure
        self.reduce: str = config.reduce
        self.k: float = float(config.k)
        self.eps: float = float(config.eps)
        self.inplace: bool = inplace
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty((), **factory))
        self.beta = nn.Parameter(torch.empty((), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set alpha and beta to the config's start values, rounded once in their own dtype."""
        with torch.no_grad():
            self.alpha.fill_(float(self.config.alpha_init))
            self.beta.fill_(float(self.config.beta))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return carelu(z, self.alpha, self.beta, self.k, self.eps, self.measure, self.reduce,
                      self.inplace)

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        return f"measure={self.measure}, reduce={self.reduce}, k={self.k}, eps={self.eps}{inplace}"


class MRePU(nn.Module):
    """MRePU with the calibrated swap's gains, blended with ReLU:
    ``(1 - blend) * ReLU(x) + blend * gain_out * MRePU(gain_in * x)``.

    ``gain_in`` and ``gain_out`` are trainable 0-dim parameters, 1 at construction (the
    paper's MRePU) and fitted to the ReLU a site replaced by :mod:`retrofit.pipeline.calibrate`.
    ``blend`` (lam) is a plain float attribute that a fine-tuning schedule may set at any time;
    it is not a parameter and not saved in the state dict. ``config`` is the config the module
    was built from (its ``blend`` is the start value).
    """

    config_type: ClassVar[type] = MRePUConfig
    """The config this module is built from; its ``name`` is the activation's."""

    def __init__(self, config: Optional[MRePUConfig] = None, *,
                 device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None, **overrides: Any) -> None:
        super().__init__()
        config = config_with(self.config_type, config, overrides)
        self.config = config
        self.p: float = float(config.p)
        self.c: float = float(config.c)
        self.blend: float = float(config.blend)
        self.gain_in = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.gain_out = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gained_mrepu(x, self.gain_in, self.gain_out, self.blend, self.p, self.c)

    def extra_repr(self) -> str:
        return f"p={self.p}, c={self.c}, blend={self.blend}"


class RePU(nn.Module):
    """RePU ``max(0, x)^p``: for comparison experiments (deep RePU stacks do not train)."""

    config_type: ClassVar[type] = RePUConfig
    """The config this module is built from; its ``name`` is the activation's."""

    def __init__(self, config: Optional[RePUConfig] = None, **overrides: Any) -> None:
        super().__init__()
        config = config_with(self.config_type, config, overrides)
        self.config = config
        self.p: float = float(config.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return repu(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (CompetitiveReLU, MRePU, RePU)
"""Every activation module class: what a retrofitted model holds instead of ReLU."""
