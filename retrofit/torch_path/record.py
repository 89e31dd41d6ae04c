"""What a retrofitted weights file carries so that its model can be rebuilt.

A state dict (``torch.save`` or safetensors) holds tensors only: loading one needs the
architecture (``--arch``) and, after a retrofit, which activation replaced which ReLU site. That
is this record, written beside the tensors as JSON text:

- safetensors: the header's metadata, key ``cadrelu``;
- ``torch.save`` state dict: the state dict's own ``_metadata[""]["cadrelu"]``, the per-module
  metadata that ``torch.load(weights_only=True)`` and ``load_state_dict`` already carry, so the
  file stays a plain state dict that plain torch loads.

:func:`retrofit.torch_path.io.load_torch_model` reads it and re-applies each step to the fresh
architecture before loading the weights strictly. The record never names code to import: the
architecture is still the user's ``--arch``; ``arch`` here only helps the error that asks for it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from retrofit.config import CONFIGS, ActivationConfig
from retrofit.errors import BadInputError, SelectionError, UsageError
from retrofit.sites import SiteSelector
from retrofit.torch_path.rewrite import retrofit_torch_model

METADATA_KEY = "cadrelu"
RECORD_VERSION = 1


@dataclass(frozen=True)
class RetrofitStep:
    """One retrofit: the activation's settings and the names of the sites it replaced."""

    config: ActivationConfig
    sites: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"activation": self.config.name, "config": dataclasses.asdict(self.config),
                "sites": list(self.sites)}


@dataclass(frozen=True)
class RetrofitRecord:
    """Every retrofit applied to a model, oldest first (a retrofitted file retrofitted again
    keeps its history, because the later step's site names exist only after the earlier one)."""

    steps: tuple[RetrofitStep, ...]
    arch: str | None = None
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def then(self, step: RetrofitStep, arch: str | None, arch_kwargs: dict[str, Any]) -> "RetrofitRecord":
        """This record with one more step."""
        return RetrofitRecord((*self.steps, step), arch, dict(arch_kwargs))

    def to_json(self) -> str:
        return json.dumps({"version": RECORD_VERSION, "arch": self.arch,
                           "arch_kwargs": {k: repr(v) for k, v in self.arch_kwargs.items()},
                           "steps": [step.to_dict() for step in self.steps]})

    @classmethod
    def from_json(cls, text: str, source: object) -> "RetrofitRecord":
        """Parse a record; anything malformed is a damaged file (BadInputError naming it)."""
        try:
            data = json.loads(text)
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"record version {data.get('version')!r}, this cadrelu reads "
                                 f"{RECORD_VERSION}")
            steps = tuple(
                RetrofitStep(_config(step["activation"], step["config"]),
                             tuple(str(name) for name in step["sites"]))
                for step in data["steps"]
            )
            return cls(steps, data.get("arch"), dict(data.get("arch_kwargs") or {}))
        # A config out of its ranges (UsageError) is a damaged file here, not a bad option.
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as error:
            raise BadInputError(f"{source}: damaged cadrelu record in the file's metadata "
                                f"({error})") from error

    def summary(self) -> str:
        return "; ".join(f"{step.config.name} at {len(step.sites)} site(s)" for step in self.steps)

    def rebuild(self, module: nn.Module, source: object) -> nn.Module:
        """Apply every step to a freshly built architecture, replacing exactly the recorded
        sites; a recorded site the architecture does not have is a mismatch (BadInputError)."""
        for step in self.steps:
            select = SiteSelector(include=tuple(re.escape(name) for name in step.sites))
            try:
                module = retrofit_torch_model(module, step.config, select).model
            except SelectionError as error:
                raise BadInputError(
                    f"{source}: the file was retrofitted at ReLU sites that --arch does not have "
                    f"({error}); give the architecture it was made from"
                ) from error
        return module


def _config(name: str, fields: dict[str, Any]) -> ActivationConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown activation {name!r}")
    return CONFIGS[name](**fields)
