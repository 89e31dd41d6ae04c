"""The model being retrofitted, whatever its format, behind one small interface.

The job (:mod:`retrofit.job`) rewrites, verifies, scores, fine-tunes and saves a model without
knowing whether it is a torch module or an ONNX graph: a :class:`TorchSubject` or an
:class:`OnnxSubject` does the format-specific part of each step. Fine-tuning always happens in
torch; an ONNX model is run as a torch module (:mod:`retrofit.onnx_torch`) and its trained values
are written back into the original graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from retrofit.census import take_census
from retrofit.config import ActivationConfig, MRePUConfig
from retrofit.errors import BadInputError
from retrofit.evaluate import Predictor, onnx_predictor, torch_predictor
from retrofit.inputs import InputShape, random_inputs
from retrofit.model_io import ModelFormat, TorchModel, load_torch_model, save_torch_model
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector, unique_site_names
from retrofit.torch_rewrite import retrofit_torch_model
from retrofit.verify import (
    OutputParity, compare_outputs, copy_module, torch_outputs, torch_parity,
)


NO_SAMPLE_INPUT = "no sample input: pass --input-shape (or --data) to verify outputs"
"""Why a model's outputs could not be compared with the original's (``Subject.parity`` None)."""


def final_config(config: ActivationConfig) -> ActivationConfig:
    """The activation as it ends up after fine-tuning: an MRePU blend always ends at lam = 1."""
    return replace(config, blend=1.0) if isinstance(config, MRePUConfig) else config


class Subject(Protocol):
    """What the job needs from a model of any format."""

    format: ModelFormat
    path: Path
    original: Any

    def rewrite(self, config: ActivationConfig, select: SiteSelector) -> RetrofitResult[Any]: ...
    def parity(self, rewritten: Any) -> OutputParity | None: ...
    def predictor(self, model: Any, device: str) -> Predictor: ...
    def trainable(self, config: ActivationConfig, select: SiteSelector) -> nn.Module: ...
    def trainable_original(self) -> nn.Module: ...
    def from_trained(self, trained: nn.Module, config: ActivationConfig,
                     select: SiteSelector) -> tuple[Any, OutputParity | None]: ...
    def save(self, model: Any, path: Path) -> None: ...


def _add_census(result: RetrofitResult[nn.Module], inputs: tuple[torch.Tensor, ...]) -> None:
    """Add the ReLU calls that ran where no rewrite reached, and warn about shared activations."""
    census = take_census(result.model, inputs)
    # Calls the rewrite already listed as kept (a ReLU function in a forward left as written, or
    # as an attribute) run in their module too: they are not counted twice.
    listed = Counter(site.owner for site in result.sites
                     if not site.replaced and not site.kind.startswith("nn.ReLU"))
    owners = [owner for owner, count in census.unreached.items()
              for _ in range(max(0, count - listed[owner]))]
    names = unique_site_names([f"{owner}.unreached" if owner else "unreached" for owner in owners])
    for name, owner in zip(names, owners):
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


@dataclass
class TorchSubject:
    """A PyTorch model (``.pt2``, state dict + arch, pickled module)."""

    loaded: TorchModel

    @property
    def format(self) -> ModelFormat:
        return self.loaded.format

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def original(self) -> nn.Module:
        return self.loaded.module

    @property
    def inputs(self) -> tuple[torch.Tensor, ...] | None:
        return self.loaded.example_inputs

    def rewrite(self, config: ActivationConfig, select: SiteSelector) -> RetrofitResult[nn.Module]:
        result = retrofit_torch_model(self.original, config, select)
        result.notes[:0] = self.loaded.notes
        if self.inputs is not None:
            _add_census(result, self.inputs)
        return result

    def parity(self, rewritten: nn.Module) -> OutputParity | None:
        return None if self.inputs is None else torch_parity(self.original, rewritten, self.inputs)

    def predictor(self, model: nn.Module, device: str) -> Predictor:
        return torch_predictor(model, device=device)

    def trainable(self, config: ActivationConfig, select: SiteSelector) -> nn.Module:
        return retrofit_torch_model(self.original, config, select).model

    def trainable_original(self) -> nn.Module:
        return copy_module(self.original)

    def from_trained(self, trained: nn.Module, config: ActivationConfig,
                     select: SiteSelector) -> tuple[nn.Module, None]:
        """The trained module is the result: nothing to translate, so nothing to compare."""
        return trained.cpu(), None

    def save(self, model: nn.Module, path: Path) -> None:
        save_torch_model(self.loaded, model, path)


@dataclass
class OnnxSubject:
    """An ONNX model; ``inputs`` are feeds built from the graph's own input shapes."""

    original: Any  # onnx.ModelProto
    path: Path
    inputs: dict[str, Any]
    as_functions: bool = False
    format: ModelFormat = ModelFormat.ONNX

    def rewrite(self, config: ActivationConfig, select: SiteSelector) -> RetrofitResult[Any]:
        from retrofit.onnx_rewrite import rewrite_onnx_relus

        return rewrite_onnx_relus(self.original, config, select, as_functions=self.as_functions)

    def parity(self, rewritten: Any) -> OutputParity:
        from retrofit.onnx_io import check_onnx_model, run_onnx

        check_onnx_model(rewritten)
        return compare_outputs(run_onnx(self.original, self.inputs), run_onnx(rewritten, self.inputs))

    def predictor(self, model: Any, device: str) -> Predictor:
        return onnx_predictor(model)

    def trainable(self, config: ActivationConfig, select: SiteSelector) -> nn.Module:
        return retrofit_torch_model(self.trainable_original(), config, select).model

    def trainable_original(self) -> nn.Module:
        from retrofit.onnx_torch import onnx_to_torch

        return onnx_to_torch(self.original)

    def from_trained(self, trained: nn.Module, config: ActivationConfig,
                     select: SiteSelector) -> tuple[Any, OutputParity]:
        """Trained weights into the original initializers, trained activation values into a
        fresh rewrite of the original graph; onnxruntime must then agree with torch."""
        from retrofit.onnx_io import check_onnx_model, run_onnx
        from retrofit.onnx_rewrite import rewrite_onnx_relus
        from retrofit.onnx_torch import write_back_initializers

        trained = trained.cpu()
        state = trained.state_dict()
        rewritten_sites = retrofit_torch_model(self.trainable_original(), config, select).sites
        site_values = {
            site.name: {key.rpartition(".")[2]: float(state[key]) for key in site.parameters}
            for site in rewritten_sites if site.replaced and site.parameters
        }
        weights = write_back_initializers(self.original, state)
        result = rewrite_onnx_relus(weights, final_config(config), select,
                                    as_functions=self.as_functions, site_values=site_values)
        check_onnx_model(result.model)
        feeds = tuple(torch.from_numpy(value) for value in self.inputs.values())
        parity = compare_outputs(torch_outputs(trained, feeds), run_onnx(result.model, self.inputs))
        return result.model, parity

    def save(self, model: Any, path: Path) -> None:
        from retrofit.onnx_io import save_onnx

        save_onnx(model, path, source=self.path)


def _feed_names(model: Any) -> list[str]:
    """Graph inputs a caller feeds (initializers listed as inputs are not fed)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def open_subject(
    path: Path, model_format: ModelFormat, *, arch: str | None, trust_pickle: bool,
    input_shapes: tuple[InputShape, ...], seed: int, as_functions: bool = False,
    data_sample: torch.Tensor | None = None,
) -> Subject:
    """Load the model and settle its sample inputs: given shapes first, then what the file
    carries (``.pt2``), then the first samples of the dataset."""
    if model_format is ModelFormat.ONNX:
        from retrofit.onnx_io import check_onnx_model, load_onnx, make_onnx_inputs

        model = load_onnx(path)
        try:
            check_onnx_model(model, is_input=True)
        except BadInputError as error:  # name the file: the checker's message cannot
            raise BadInputError(f"{path}: {error}") from error
        shapes = {shape.name or "": shape.dims for shape in input_shapes}
        if "" in shapes:
            shapes[_feed_names(model)[0]] = shapes.pop("")
        if data_sample is not None and not shapes and len(_feed_names(model)) == 1:
            shapes[_feed_names(model)[0]] = tuple(data_sample.shape)
        return OnnxSubject(model, path, make_onnx_inputs(model, shapes or None, seed), as_functions)
    loaded = load_torch_model(path, arch=arch, trust_pickle=trust_pickle, model_format=model_format)
    if input_shapes:
        loaded.example_inputs = random_inputs(input_shapes, seed=seed)
    elif loaded.example_inputs is None and data_sample is not None:
        loaded.example_inputs = (data_sample,)
    return TorchSubject(loaded)
