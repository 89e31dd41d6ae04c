"""The library's public calls, for models in memory: one rewrite for every kind of model, and
thin typed wrappers over what the command line runs (fine-tune, evaluate, compare).

:func:`retrofit_model` is the entry point, shaped like torchao's ``quantize_(model, config,
filter_fn)`` but returning a new model: the input is never modified.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from retrofit.config import ActivationConfig, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.evaluation.evaluate import EvalResult
from retrofit.pipeline.compare import CompareReport, CompareRequest
from retrofit.sites import RetrofitResult, SiteSelector
from retrofit.training.config import FinetuneConfig
from retrofit.training.results import FinetuneResult

if TYPE_CHECKING:  # onnx takes a second to import: only for ONNX models
    import onnx

Retrofittable = Union[nn.Module, "torch.export.ExportedProgram", "onnx.ModelProto"]
"""What :func:`retrofit_model` rewrites: a module, an exported program or an ONNX graph."""

PathLike = Union[str, os.PathLike]
FILTERED = "filter_fn"
"""The reason a site that ``filter_fn`` rejected is not replaced."""


def retrofit_model(model_or_onnx: Retrofittable, config: ActivationConfig,
                   select: SiteSelector | None = None,
                   filter_fn: Callable[[str], bool] | None = None) -> RetrofitResult:
    """Replace the ReLU sites of ``model_or_onnx`` with ``config``'s activation; returns a new
    model of the same kind (the input is left as it was) and every site with what happened to
    it.

    - an ``nn.Module`` is rewritten in place of its ReLU modules and calls
      (:func:`retrofit.torch_path.rewrite.retrofit_torch_model`), in the mode it was in;
    - a ``torch.export.ExportedProgram``'s module is rewritten and exported again with the
      program's example inputs and dynamic axes (it keeps the mode it was exported in);
    - an ``onnx.ModelProto``'s ``Relu`` nodes are rewritten
      (:func:`retrofit.onnx_path.rewrite.rewrite_onnx_relus`), its inputs, outputs, opset and
      other nodes kept.

    ``select`` picks sites by name (:class:`SiteSelector`, all by default; a rule that matches
    nothing is a :class:`~retrofit.errors.SelectionError`). ``filter_fn(site_name) -> bool``
    narrows that selection further: it is called with the name of each site ``select`` kept,
    and a site it returns False for stays ReLU, reported with the reason ``"filter_fn"``.
    A wrong type for any argument is a ``TypeError``.
    """
    if not isinstance(config, (CompetitiveReLUConfig, MRePUConfig, RePUConfig)):
        raise TypeError(f"config must be CompetitiveReLUConfig, MRePUConfig or RePUConfig, got "
                        f"{type(config).__name__}")
    if select is not None and not isinstance(select, SiteSelector):
        raise TypeError(f"select must be a SiteSelector or None, got {type(select).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function of the site name, got "
                        f"{type(filter_fn).__name__}")
    selector = select or SiteSelector()
    if filter_fn is not None:
        selector = _Filtered(include=selector.include, exclude=selector.exclude, keep=filter_fn)
    if isinstance(model_or_onnx, torch.export.ExportedProgram):
        return _retrofit_program(model_or_onnx, config, selector)
    if isinstance(model_or_onnx, nn.Module):
        from retrofit.torch_path.rewrite import retrofit_torch_model

        return retrofit_torch_model(model_or_onnx, config, selector)
    if _is_onnx(model_or_onnx):
        from retrofit.onnx_path.rewrite import rewrite_onnx_relus

        return rewrite_onnx_relus(model_or_onnx, config, selector)
    raise TypeError(f"retrofit_model takes an nn.Module, a torch.export.ExportedProgram or an "
                    f"onnx.ModelProto, got {type(model_or_onnx).__name__} (for a model file, "
                    "load it first, or run `cadrelu retrofit FILE`)")


@dataclass(frozen=True, kw_only=True)
class _Filtered(SiteSelector):
    """A selection narrowed by the caller's ``filter_fn``."""

    keep: Callable[[str], bool]

    def select(self, names: Iterable[str]) -> dict[str, str]:
        decisions = super().select(names)
        return {name: reason or ("" if self.keep(name) else FILTERED)
                for name, reason in decisions.items()}


def _retrofit_program(program: torch.export.ExportedProgram, config: ActivationConfig,
                      select: SiteSelector) -> RetrofitResult[torch.export.ExportedProgram]:
    """The program's module rewritten, then exported again as the command line writes a
    ``.pt2`` (the rewrite works on a copy: ``program`` is not modified)."""
    from retrofit.torch_path.exported import export_program, program_inputs
    from retrofit.torch_path.rewrite import retrofit_torch_model

    example, dynamic = program_inputs(program)
    result = retrofit_torch_model(program.module(), config, select)
    return replace(result, model=export_program(result.model, example, dynamic))


def finetune(model: nn.Module, config: FinetuneConfig, train: Dataset | PathLike,
             val: Dataset | PathLike | None = None) -> FinetuneResult:
    """Fine-tune a copy of ``model`` (e.g. ``retrofit_model(...).model``) on ``train``, keeping
    the epoch with the best top-1 on ``val`` (the last one without it): the training loop of
    ``cadrelu retrofit --finetune`` (:func:`retrofit.training.loop.finetune`). ``model`` is not
    modified; the result holds the trained copy, its history and notes.

    ``train``/``val`` are datasets of ``(x, y)`` samples, or data files as the command line
    reads them (image folders, ``.npz``/``.pt`` with ``x`` and ``y``, CSV) fed to a model with
    float inputs; for token ids pass a dataset. Raises
    :class:`~retrofit.training.results.TrainingDiverged` on a NaN/inf loss.
    """
    from retrofit.training.loop import finetune as train_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune takes an nn.Module, got {type(model).__name__}")
    return train_model(model, _dataset(train), None if val is None else _dataset(val), config)


def evaluate(model_or_path: Retrofittable | PathLike, dataset: Dataset | PathLike, *,
             batch_size: int = 256, device: str = "auto") -> EvalResult:
    """Top-1 (and top-5) accuracy, in percent, with what was right per sample (for paired
    comparisons): ``cadrelu evaluate``'s numbers.

    A model file (any format the command line reads) is opened and its data fed as the command
    line feeds it; ``dataset`` is then a data file. A model in memory is scored on a dataset of
    ``(x, y)`` samples or a data file read for float inputs; a module runs in eval mode on
    ``device`` (its mode and its device are restored afterwards).
    """
    from retrofit.evaluation.evaluate import evaluate as score
    from retrofit.evaluation.evaluate import device_kept, onnx_predictor, torch_predictor
    from retrofit.verify import eval_mode

    if isinstance(model_or_path, (str, os.PathLike)):
        from retrofit.pipeline.job import evaluate_file
        from retrofit.pipeline.request import DataOptions

        if not isinstance(dataset, (str, os.PathLike)):
            raise TypeError("a model file is scored on a data file (a path): load the model "
                            "to score it on a dataset in memory")
        data = DataOptions(val=Path(dataset), batch_size=batch_size)
        return evaluate_file(Path(model_or_path), data, device=device).result
    data = _dataset(dataset)
    if _is_onnx(model_or_path):
        return score(onnx_predictor(model_or_path), data, batch_size=batch_size)
    module = (model_or_path.module() if isinstance(model_or_path, torch.export.ExportedProgram)
              else model_or_path)
    if not isinstance(module, nn.Module):
        raise TypeError(f"evaluate takes a model (nn.Module, ExportedProgram, ModelProto) or a "
                        f"model file, got {type(model_or_path).__name__}")
    with eval_mode(module), device_kept(module):
        return score(torch_predictor(module, device=device), data, batch_size=batch_size)


def compare(request: CompareRequest) -> CompareReport:
    """``cadrelu compare``: every candidate activation and the ReLU control fine-tuned with one
    budget and seeds, ranked by top-1 change against the control with a paired 95% interval
    (:func:`retrofit.pipeline.compare.compare_file`). ``report.raise_for_outcome()`` raises
    what the command line exits with (nothing ranked, a gate failed)."""
    from retrofit.pipeline.compare import compare_file

    if not isinstance(request, CompareRequest):
        raise TypeError(f"compare takes a CompareRequest, got {type(request).__name__}")
    return compare_file(request)


def _is_onnx(model: object) -> bool:
    """Whether ``model`` is an ``onnx.ModelProto``, without importing onnx for other models."""
    if not type(model).__module__.startswith("onnx"):
        return False
    import onnx

    return isinstance(model, onnx.ModelProto)


def _dataset(data: Dataset | PathLike) -> Dataset:
    """A dataset as it is, or a data file read as the command line reads it for float inputs."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    from retrofit.evaluation.datasets.feeding import as_float_inputs
    from retrofit.evaluation.datasets.load import load_dataset

    return as_float_inputs(load_dataset(data))
