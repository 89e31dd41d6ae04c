"""The retrofit job end to end, as a library call: load, rewrite, verify, save, report.

``cadrelu retrofit`` and ``cadrelu inspect`` are thin wrappers over :func:`retrofit_file` and
:func:`inspect_file`; a Python user gets the same behaviour and the same report object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from retrofit.atomic import check_output_path
from retrofit.census import take_census
from retrofit.config import ActivationConfig, CompetitiveReLUConfig
from retrofit.errors import UsageError
from retrofit.inputs import InputShape, random_inputs
from retrofit.model_io import (
    ModelFormat,
    TorchModel,
    default_output_path,
    detect_format,
    load_torch_model,
    save_torch_model,
)
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector, unique_site_names
from retrofit.torch_rewrite import retrofit_torch_model
from retrofit.verify import OutputParity, torch_parity


@dataclass(frozen=True)
class RetrofitRequest:
    """Everything a retrofit needs; defaults are the CLI's defaults."""

    model: Path
    config: ActivationConfig = CompetitiveReLUConfig()
    select: SiteSelector = SiteSelector()
    output: Path | None = None
    force: bool = False
    arch: str | None = None
    trust_pickle: bool = False
    input_shapes: tuple[InputShape, ...] = ()
    tolerance: float = 1e-5
    seed: int = 0


@dataclass
class RetrofitReport:
    """What happened: every site, remarks, the parity figure, where the model was written.

    ``parity`` compares the rewritten model with the original on sample inputs (None when no
    sample input was available). ``preserves_function`` is True when the new activation starts
    as ReLU (CompetitiveReLU at identity init), so parity must hold within ``tolerance``.
    """

    model: Path
    format: ModelFormat
    activation: str
    config: ActivationConfig
    sites: list[ReluSite]
    notes: list[str] = field(default_factory=list)
    parity: OutputParity | None = None
    preserves_function: bool = True
    tolerance: float = 1e-5
    output: Path | None = None

    @property
    def replaced(self) -> list[ReluSite]:
        return [site for site in self.sites if site.replaced]


def _sample_inputs(model: TorchModel, request: RetrofitRequest) -> tuple[torch.Tensor, ...] | None:
    if request.input_shapes:
        return random_inputs(request.input_shapes, seed=request.seed)
    return model.example_inputs


def _add_census(result: RetrofitResult[nn.Module], inputs: tuple[torch.Tensor, ...]) -> None:
    """Add the ReLU calls that ran where no rewrite reached, and warn about shared activations."""
    census = take_census(result.model, inputs)
    unreached = [owner for owner, count in census.unreached.items() for _ in range(count)]
    names = unique_site_names([f"{owner}.unreached" if owner else "unreached" for owner in unreached])
    for name, owner in zip(names, unreached):
        result.sites.append(ReluSite(
            name, "relu (runtime)", owner, False,
            "ran inside code that does not trace: rewrite it with an nn.ReLU module to reach it",
        ))
    for path, calls in census.activation_calls.items():
        if calls > 1:
            result.notes.append(
                f"{path} ran {calls} times in one forward pass: those calls share one set of "
                "parameters because its module could not be traced"
            )


def _rewrite_torch(request: RetrofitRequest, model: TorchModel) -> tuple[RetrofitResult[nn.Module], OutputParity | None, tuple[torch.Tensor, ...] | None]:
    result = retrofit_torch_model(model.module, request.config, request.select)
    inputs = _sample_inputs(model, request)
    parity = None
    if inputs is None:
        result.notes.append("no sample input: pass --input-shape (or --data) to verify the outputs")
    else:
        _add_census(result, inputs)
        parity = torch_parity(model.module, result.model, inputs)
    return result, parity, inputs


def inspect_file(request: RetrofitRequest) -> RetrofitReport:
    """A dry run: every ReLU site and whether the rewrite would replace it. Nothing is written."""
    model_format = detect_format(request.model)
    model = load_torch_model(request.model, arch=request.arch, trust_pickle=request.trust_pickle,
                             model_format=model_format)
    result, parity, _ = _rewrite_torch(request, model)
    return RetrofitReport(request.model, model_format, request.config.name, request.config,
                          result.sites, result.notes, parity,
                          request.config.is_identity_init, request.tolerance)


def retrofit_file(request: RetrofitRequest) -> RetrofitReport:
    """Rewrite the model file, verify the result and write it; the input is never modified.

    Raises :class:`~retrofit.errors.ParityError` when an identity-init rewrite does not
    reproduce the original outputs within ``request.tolerance`` (nothing is written then).
    """
    model_format = detect_format(request.model)
    output = request.output or default_output_path(request.model, request.config.name, model_format)
    check_output_path(output, inputs=[request.model], force=request.force)
    model = load_torch_model(request.model, arch=request.arch, trust_pickle=request.trust_pickle,
                             model_format=model_format)
    result, parity, inputs = _rewrite_torch(request, model)
    report = RetrofitReport(request.model, model_format, request.config.name, request.config,
                            result.sites, result.notes, parity,
                            request.config.is_identity_init, request.tolerance, output)
    if parity is not None and report.preserves_function:
        parity.require(request.tolerance, "the identity-initialised retrofit changed the outputs")
    if not report.preserves_function:
        report.notes.append(
            f"{request.config.name} does not start as ReLU: the model computes a different "
            "function now; fine-tune it (--finetune) to recover accuracy"
        )
    if model_format is ModelFormat.EXPORTED and inputs is not None:
        model.example_inputs = inputs
    if model_format is ModelFormat.EXPORTED and model.example_inputs is None:
        raise UsageError("saving a .pt2 needs sample inputs: pass --input-shape")
    save_torch_model(model, result.model, output)
    return report
