"""The model being retrofitted, whatever its format, behind one small interface.

The job (:mod:`retrofit.pipeline.job`) rewrites, verifies, scores, fine-tunes and saves a model without
knowing whether it is a torch module or an ONNX graph: a :class:`TorchSubject` or an
:class:`OnnxSubject` does the format-specific part of each step. Fine-tuning always happens in
torch; an ONNX model is run as a torch module (:mod:`retrofit.onnx_path.to_torch.builder`) and its trained values
are written back into the original graph.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, Union

import numpy as np
import torch
from torch import nn

from retrofit.evaluation.batching import (
    first_row_repeated, fixed_batch_note, probe_fixed_batch, reexport_dynamic_batch,
    static_batch, torch_forward,
)
from retrofit.torch_path.census import take_census
from retrofit.config import ActivationConfig, MRePUConfig
from retrofit.evaluation.datasets.checks import MODEL_CALL_ERRORS
from retrofit.errors import BadInputError, UsageError, first_line
from retrofit.evaluation.evaluate import Predictor, onnx_predictor, torch_predictor
from retrofit.inputs import (
    InputShape, assign_shapes, embedding_bound, embedding_inputs, random_inputs, table_bounds,
)
from retrofit.torch_path.formats import ModelFormat, TorchModel
from retrofit.torch_path.io import load_torch_model, save_torch_model
from retrofit.torch_path.record import RetrofitRecord, RetrofitStep
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector, unique_site_names
from retrofit.torch_path.rewrite import retrofit_torch_model
from retrofit.verify import OutputParity, compare_outputs, torch_outputs

if TYPE_CHECKING:
    import onnx


Model = Union[nn.Module, "onnx.ModelProto"]
"""A model in a subject's own format: a torch module, or an ONNX graph."""

NO_SAMPLE_INPUT = "no sample input: pass --input-shape (or --data) to verify outputs"
"""Why a model's outputs could not be compared with the original's (``Subject.parity`` None)."""


def final_config(config: ActivationConfig) -> ActivationConfig:
    """The activation as it ends up after fine-tuning: an MRePU blend always ends at lam = 1."""
    return replace(config, blend=1.0) if isinstance(config, MRePUConfig) else config


class Subject(Protocol):
    """What the job needs from a model of any format.

    ``fixed_batch`` is the only batch size the model takes (None: any); ``takes_token_ids``
    says its (first) input is integer, so integer data is fed as int64; ``notes`` are what
    opening it found out (fixed batch, inferred input types), for the report.

    Fine-tuning and calibration run in torch: :meth:`trainable` is a rewrite's torch form, made
    once per rewrite, and :meth:`with_values` carries that form's values (calibrated gains,
    trained weights) back into the rewrite, so that no rewrite is done twice.
    """

    format: ModelFormat
    path: Path
    original: Model
    fixed_batch: int | None
    notes: list[str]

    @property
    def takes_token_ids(self) -> bool: ...

    @property
    def input_names(self) -> list[str]: ...

    @property
    def sample_tensors(self) -> tuple[torch.Tensor, ...] | None:
        """The sample inputs as torch tensors, in input order (None: there are none)."""

    def feed_data_sample(self, sample: torch.Tensor) -> None:
        """Make ``sample`` (data as the model takes it) the sample inputs, where they were
        taken from the data: parity and the NaN/inf check then run on real inputs."""

    def rewrite(self, config: ActivationConfig, select: SiteSelector) -> RetrofitResult[Model]: ...
    def parity(self, rewritten: Model) -> OutputParity | None: ...
    def scaled_outputs(self, model: Model, scale: float) -> list[np.ndarray]:
        """``model``'s outputs on the sample inputs with every floating input times ``scale``."""

    def predictor(self, model: Model, device: str) -> Predictor: ...
    def torch_original(self) -> nn.Module:
        """The original as a torch module, made once; callers copy it before changing it
        (:func:`~retrofit.training.loop.finetune` and the torch rewrite do)."""

    def trainable(self, rewritten: RetrofitResult[Model], config: ActivationConfig,
                  select: SiteSelector) -> RetrofitResult[nn.Module]:
        """``rewritten`` as torch modules, to calibrate and fine-tune."""

    def with_values(self, rewritten: RetrofitResult[Model], config: ActivationConfig,
                    torch_form: nn.Module, torch_sites: Sequence[ReluSite]
                    ) -> tuple[Model, OutputParity | None]:
        """``rewritten`` (made with ``config``) holding the values of ``torch_form``, a module
        made from :meth:`trainable` whose sites are ``torch_sites`` (calibrated or trained);
        and how the two compare where they are two programs (ONNX vs torch), else None."""

    def save(self, model: Model, path: Path, step: RetrofitStep | None = None) -> None: ...


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
    fixed_batch: int | None = None
    notes: list[str] = field(default_factory=list)
    inputs_from_data: bool = False
    _reference: list[np.ndarray] | None = field(default=None, repr=False)

    def feed_data_sample(self, sample: torch.Tensor) -> None:
        """A ``.pt2``'s own example inputs are replaced only by samples of their shape; their
        batch (a static one) and dtype are kept."""
        if not self.inputs_from_data:
            return
        (current,) = self.loaded.example_inputs
        self.loaded.example_inputs = (_rows_like(sample, current),)
        self._reference = None

    @property
    def takes_token_ids(self) -> bool:
        return bool(self.inputs) and _is_index_dtype(self.inputs[0].dtype)

    def reference_outputs(self) -> list[np.ndarray]:
        """The original's outputs on the sample inputs, computed once. The original failing on
        them is the inputs' fault (a shape, a value its code checks), not the rewrite's."""
        assert self.inputs is not None
        if self._reference is None:
            try:
                self._reference = torch_outputs(self.original, self.inputs)
            except Exception as error:  # the model's own code, whatever it raises
                why = first_line(error)
                if not isinstance(error, MODEL_CALL_ERRORS):
                    why = f"{type(error).__name__}: {why}"
                raise BadInputError(
                    f"{self.path} fails on its sample inputs ({why}); give "
                    "inputs it takes: --input-shape, or --data with samples it accepts"
                ) from error
        return self._reference

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

    @property
    def sample_tensors(self) -> tuple[torch.Tensor, ...] | None:
        return self.inputs

    @property
    def input_names(self) -> list[str]:
        """The program's own input names for a ``.pt2``; positions otherwise."""
        program = self.loaded.program
        if program is not None:
            return list(program.graph_signature.user_inputs)
        return [f"input {i + 1}" for i in range(len(self.inputs or ()) or 1)]

    def rewrite(self, config: ActivationConfig, select: SiteSelector) -> RetrofitResult[nn.Module]:
        result = retrofit_torch_model(self.original, config, select)
        if self.inputs is not None:
            self.reference_outputs()  # before the rewritten model runs: whose fault is a failure
            _add_census(result, self.inputs)
        return result

    def parity(self, rewritten: nn.Module) -> OutputParity | None:
        if self.inputs is None:
            return None
        return compare_outputs(self.reference_outputs(), torch_outputs(rewritten, self.inputs))

    def scaled_outputs(self, model: nn.Module, scale: float) -> list[np.ndarray]:
        assert self.inputs is not None
        return torch_outputs(model, tuple(t * scale if t.is_floating_point() else t
                                          for t in self.inputs))

    def predictor(self, model: nn.Module, device: str) -> Predictor:
        return torch_predictor(model, device=device, fixed_batch=self.fixed_batch)

    def torch_original(self) -> nn.Module:
        return self.original

    def trainable(self, rewritten: RetrofitResult[nn.Module], config: ActivationConfig,
                  select: SiteSelector) -> RetrofitResult[nn.Module]:
        """A torch rewrite is its own torch form."""
        return rewritten

    def with_values(self, rewritten: RetrofitResult[nn.Module], config: ActivationConfig,
                    torch_form: nn.Module, torch_sites: Sequence[ReluSite]
                    ) -> tuple[nn.Module, None]:
        """The torch form is the result: nothing to translate, so nothing to compare."""
        return torch_form.cpu(), None

    def save(self, model: nn.Module, path: Path, step: RetrofitStep | None = None) -> None:
        """Write in the input's format; a weights file records ``step`` after the history it
        came with, so it can be rebuilt from ``--arch`` alone."""
        loaded = self.loaded
        record = None
        if step is not None:
            record = (loaded.record or RetrofitRecord(())).then(step, loaded.arch,
                                                               loaded.arch_kwargs)
        save_torch_model(loaded, model, path, record=record)


@dataclass
class OnnxSubject:
    """An ONNX model; ``inputs`` are feeds built from the graph's own input shapes."""

    original: onnx.ModelProto
    path: Path
    inputs: dict[str, np.ndarray]
    as_functions: bool = False
    format: ModelFormat = ModelFormat.ONNX
    fixed_batch: int | None = None
    notes: list[str] = field(default_factory=list)
    inputs_from_data: bool = False
    _torch: nn.Module | None = field(default=None, repr=False)

    def feed_data_sample(self, sample: torch.Tensor) -> None:
        if not self.inputs_from_data:
            return
        ((name, current),) = self.inputs.items()
        rows = _rows_like(sample, torch.from_numpy(current))
        self.inputs = {name: rows.numpy().astype(current.dtype)}

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def sample_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(value) for value in self.inputs.values())

    @property
    def takes_token_ids(self) -> bool:
        first = next(iter(self.inputs.values()), None)
        return first is not None and np.issubdtype(first.dtype, np.integer)

    def rewrite(self, config: ActivationConfig, select: SiteSelector
                ) -> RetrofitResult[onnx.ModelProto]:
        from retrofit.onnx_path.rewrite import rewrite_onnx_relus

        return rewrite_onnx_relus(self.original, config, select, as_functions=self.as_functions)

    def parity(self, rewritten: onnx.ModelProto) -> OutputParity:
        from retrofit.onnx_path.io import check_onnx_model, run_onnx

        check_onnx_model(rewritten)
        return compare_outputs(run_onnx(self.original, self.inputs), run_onnx(rewritten, self.inputs))

    def scaled_outputs(self, model: onnx.ModelProto, scale: float) -> list[np.ndarray]:
        from retrofit.onnx_path.io import run_onnx

        return run_onnx(model, {name: (value * scale).astype(value.dtype)
                                if np.issubdtype(value.dtype, np.floating) else value
                                for name, value in self.inputs.items()})

    def predictor(self, model: onnx.ModelProto, device: str) -> Predictor:
        return onnx_predictor(model, fixed_batch=self.fixed_batch)

    def torch_original(self) -> nn.Module:
        """The graph as a torch module whose initializers are parameters, translated once."""
        if self._torch is None:
            from retrofit.onnx_path.to_torch.builder import onnx_to_torch

            self._torch = onnx_to_torch(self.original)
        return self._torch

    def trainable(self, rewritten: RetrofitResult[onnx.ModelProto], config: ActivationConfig,
                  select: SiteSelector) -> RetrofitResult[nn.Module]:
        """The same rewrite of the graph's torch form: the site names agree
        (:mod:`retrofit.onnx_path.site_names`), which is what the values are carried back by."""
        return retrofit_torch_model(self.torch_original(), config, select)

    def with_values(self, rewritten: RetrofitResult[onnx.ModelProto], config: ActivationConfig,
                    torch_form: nn.Module, torch_sites: Sequence[ReluSite]
                    ) -> tuple[onnx.ModelProto, OutputParity]:
        """The torch form's weights into the graph's initializers and each site's activation
        values into its parameter initializers; onnxruntime must then agree with torch."""
        from retrofit.onnx_path.emission import parameter_names
        from retrofit.onnx_path.io import check_onnx_model, run_onnx
        from retrofit.onnx_path.to_torch.weights import write_back_initializers

        torch_form = torch_form.cpu()
        state = torch_form.state_dict()
        graph_sites = {site.name: site for site in rewritten.sites if site.replaced}
        values: dict[str, np.ndarray] = {}
        for site in torch_sites:
            if site.replaced and site.parameters:
                # A site's initializers come in the order of its activation's parameters.
                named = dict(zip(parameter_names(config), graph_sites[site.name].parameters))
                for key in site.parameters:
                    values[named[key.rpartition(".")[2]]] = state[key].detach().numpy()
        model = write_back_initializers(rewritten.model, state, extra=values)
        check_onnx_model(model)
        parity = compare_outputs(torch_outputs(torch_form, self.sample_tensors),
                                 run_onnx(model, self.inputs))
        return model, parity

    def save(self, model: onnx.ModelProto, path: Path, step: RetrofitStep | None = None) -> None:
        """The graph says what it computes: ``step`` needs no record here."""
        from retrofit.onnx_path.io import save_onnx

        save_onnx(model, path, source=self.path)


def _rows_like(sample: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``sample``'s rows in place of ``current``'s: as many (the first ones, repeated when there
    are too few: a fixed batch), in ``current``'s dtype where both are floating or both not."""
    rows = current.shape[0]
    if sample.shape[0] < rows:
        sample = first_row_repeated(sample, rows - sample.shape[0])
    sample = sample[:rows]
    if sample.is_floating_point() == current.is_floating_point():
        sample = sample.to(current.dtype)
    return sample


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _feed_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs a caller feeds (initializers listed as inputs are not fed)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def open_subject(
    path: Path, model_format: ModelFormat, *, arch: str | None, trust_pickle: bool,
    arch_kwargs: dict[str, Any] | None = None, input_shapes: tuple[InputShape, ...], seed: int,
    as_functions: bool = False,
    data_sample: torch.Tensor | None = None,
) -> Subject:
    """Load the model and settle its sample inputs (given shapes first, then what the file
    carries (``.pt2``), then the first samples of the dataset), their types, and whether the
    model takes only one batch size (:mod:`retrofit.evaluation.batching`)."""
    if model_format is ModelFormat.ONNX:
        return _open_onnx(path, input_shapes, seed, as_functions, data_sample)
    loaded = load_torch_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                              model_format=model_format)
    return _open_torch(loaded, input_shapes, seed, data_sample)


def _open_torch(loaded: TorchModel, input_shapes: tuple[InputShape, ...], seed: int,
                data_sample: torch.Tensor | None) -> TorchSubject:
    path = loaded.path
    notes = list(loaded.notes)
    exported = loaded.format is ModelFormat.EXPORTED
    static = static_batch(loaded.example_inputs, loaded.dynamic_dims) if exported else None
    fixed = _exported_batch(loaded, static, notes) if static is not None else None
    if input_shapes:
        loaded.example_inputs = _torch_sample_inputs(loaded, input_shapes, seed, static, notes)
    carried = loaded.example_inputs  # a .pt2's own: data samples of their shape replace them
    from_data = not input_shapes and data_sample is not None and (
        carried is None or (len(carried) == 1 and carried[0].shape[1:] == data_sample.shape[1:]))
    if from_data and carried is None:
        sample = data_sample
        if embedding_inputs(loaded.module, (sample,)):
            sample = sample.long()  # integer data stays exact; float data is refused by the job
        loaded.example_inputs = (sample,)
    if loaded.format is not ModelFormat.EXPORTED and loaded.example_inputs is not None:
        probe = probe_fixed_batch(torch_forward(loaded.module), loaded.example_inputs)
        if probe.failure is not None and data_sample is not None and not input_shapes:
            shape = ",".join(str(d) for d in data_sample.shape[1:])
            raise BadInputError(
                f"data samples of shape {tuple(data_sample.shape[1:])} do not fit {path} in "
                f"batches of {data_sample.shape[0]} or 1 ({probe.failure}); if the model takes "
                f"one batch size only, name it: cadrelu retrofit --input-shape N,{shape}")
        if probe.fixed is not None:
            loaded.example_inputs = probe.inputs
            fixed = probe.fixed
            notes.append(fixed_batch_note(str(path), fixed, "at one more it fails or computes "
                                          "other outputs"))
    return TorchSubject(loaded, fixed, notes, inputs_from_data=from_data)


def _exported_batch(loaded: TorchModel, size: int, notes: list[str]) -> int | None:
    """A ``.pt2`` exported with a static batch of ``size``: re-exported with a dynamic batch
    when its code allows (then None: any batch), else ``size``."""
    assert loaded.example_inputs is not None
    flexible = reexport_dynamic_batch(loaded.program, loaded.example_inputs, loaded.dynamic_dims)
    if flexible is None:
        notes.append(fixed_batch_note(str(loaded.path), size, "its .pt2 has a static batch and "
                                      "torch.export cannot make it dynamic"))
        return size
    loaded.module = flexible
    notes.append(f"{loaded.path} was exported with a static batch of {size}; re-exported with a "
                 f"dynamic batch (same outputs at batch {size} and {size + 1}), it is scored and "
                 f"fine-tuned at any batch size; the written .pt2 keeps the static batch of {size}")
    return None


def _torch_sample_inputs(loaded: TorchModel, shapes: tuple[InputShape, ...], seed: int,
                         static: int | None, notes: list[str]) -> tuple[torch.Tensor, ...]:
    """Inputs of the given shapes. An input's type is the one given, else the ``.pt2``
    program's, else int64 when the model feeds it into an embedding, else float32. A ``.pt2``
    with a ``static`` batch needs that batch: the program is written back with these inputs."""
    shapes = _ordered_shapes(loaded, shapes)
    program = loaded.example_inputs if loaded.format is ModelFormat.EXPORTED else None
    dtypes = []
    for index, shape in enumerate(shapes):
        declared = program[index].dtype if program and index < len(program) else None
        if shape.dtype is not None and declared is not None and shape.dtype != declared:
            raise BadInputError(f"--input-shape {index + 1} says {_dtype_name(shape.dtype)} but "
                             f"{loaded.path} takes {_dtype_name(declared)} there")
        if static is not None and shape.dims[0] != static:
            raise BadInputError(f"--input-shape says batch {shape.dims[0]} but {loaded.path} was "
                             f"exported with a static batch of {static}, which the written "
                             f".pt2 keeps: give batch {static}")
        dtypes.append(shape.dtype or declared or torch.float32)
    bound = embedding_bound(loaded.module)  # in range for every table: safe for a first run
    inputs = random_inputs(shapes, dtypes, seed=seed, index_bound=bound)
    guessed = {i for i, shape in enumerate(shapes)
               if shape.dtype is None and dtypes[i].is_floating_point}
    ids = embedding_inputs(loaded.module, inputs) & guessed
    dtypes = [torch.int64 if index in ids else dtype for index, dtype in enumerate(dtypes)]
    if not any(_is_index_dtype(dtype) for dtype in dtypes):
        return inputs
    bounds = table_bounds(loaded.module, random_inputs(shapes, dtypes, seed=seed,
                                                       index_bound=bound))
    for index in sorted(ids):
        notes.append(f"input {index + 1} goes straight into an embedding: its sample input holds "
                     f"int64 token ids in [0, {bounds[index]}) (add :int64 to --input-shape to "
                     "say so)")
    return random_inputs(shapes, dtypes, seed=seed, index_bound=bounds)


def _ordered_shapes(loaded: TorchModel, shapes: tuple[InputShape, ...]
                    ) -> tuple[InputShape, ...]:
    """The shapes in the order the model takes its inputs (a torch model takes them by
    position): each one named or at its position, none left out before the last one given, and
    one for every input without a default. A forward of ``*args`` is taken as given."""
    signature = _torch_input_names(loaded)
    if signature is None:
        return shapes
    names, required = signature
    assigned = assign_shapes(shapes, names, loaded.path)
    count = max(required, *(names.index(name) + 1 for name in assigned))
    missing = [name for name in names[:count] if name not in assigned]
    if missing:
        raise UsageError(f"{loaded.path} takes its inputs by position ({', '.join(names)}): "
                         f"give an --input-shape for {', '.join(missing)} too")
    return tuple(assigned[name] for name in names[:count])


def _torch_input_names(loaded: TorchModel) -> tuple[list[str], int] | None:
    """The model's input names and how many of them have no default (None: not known)."""
    if loaded.program is not None:
        names = list(loaded.program.graph_signature.user_inputs)
        return names, len(names)
    try:
        parameters = list(inspect.signature(loaded.module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(parameter.kind is parameter.VAR_POSITIONAL for parameter in parameters):
        return None
    positional = [parameter for parameter in parameters
                  if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
    required = sum(parameter.default is parameter.empty for parameter in positional)
    return [parameter.name for parameter in positional], required


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _open_onnx(path: Path, input_shapes: tuple[InputShape, ...], seed: int, as_functions: bool,
               data_sample: torch.Tensor | None) -> OnnxSubject:
    from retrofit.onnx_path.io import check_onnx_model, load_onnx, make_onnx_inputs, onnx_runner

    model = load_onnx(path)
    try:
        check_onnx_model(model, is_input=True)
    except BadInputError as error:  # name the file: the checker's message cannot
        raise BadInputError(f"{path}: {error}") from error
    names = _feed_names(model)
    given = assign_shapes(input_shapes, names, path)
    for name, shape in given.items():
        declared = _onnx_input_dtype(model, name)
        if shape.dtype is not None and declared is not None and shape.dtype != declared:
            raise BadInputError(f"--input-shape {name}:... says {_dtype_name(shape.dtype)} but input "
                             f"{name!r} of {path} is {_dtype_name(declared)}")
    shapes = {name: shape.dims for name, shape in given.items()}
    declared_batch = _declared_batch(model, names)
    from_data = data_sample is not None and not shapes and len(names) == 1
    if from_data:
        shapes[names[0]] = (declared_batch or 1,) + tuple(data_sample.shape[1:])
    try:
        inputs = make_onnx_inputs(model, shapes or None, seed)
    except (BadInputError, UsageError) as error:  # name the file: the graph's inputs cannot
        raise type(error)(f"{path}: {error}") from error
    notes: list[str] = []
    if declared_batch is not None:
        notes.append(fixed_batch_note(str(path), declared_batch,
                                      f"its input declares batch {declared_batch}"))
        return OnnxSubject(model, path, inputs, as_functions, fixed_batch=declared_batch,
                           notes=notes, inputs_from_data=from_data)
    tensors = tuple(torch.from_numpy(array) for array in inputs.values())
    run = onnx_runner(model)  # one session for the probe's runs
    probe = probe_fixed_batch(
        lambda feeds: run({n: t.numpy() for n, t in zip(inputs, feeds)}), tensors)
    if probe.fixed is not None:
        inputs = {name: tensor.numpy() for name, tensor in zip(inputs, probe.inputs)}
        notes.append(fixed_batch_note(
            str(path), probe.fixed, f"its input's batch axis is dynamic, but the graph fails or "
            f"computes other outputs at batch {probe.fixed + 1}"))
    return OnnxSubject(model, path, inputs, as_functions, fixed_batch=probe.fixed, notes=notes,
                       inputs_from_data=from_data)


def _declared_batch(model: onnx.ModelProto, names: list[str]) -> int | None:
    """The batch size the graph's inputs declare, when every one declares the same fixed size."""
    values = {value.name: value for value in model.graph.input}
    sizes = set()
    for name in names:
        dims = values[name].type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def _onnx_input_dtype(model: onnx.ModelProto, name: str) -> torch.dtype | None:
    from onnx import helper

    value = next((v for v in model.graph.input if v.name == name), None)
    if value is None or not value.type.HasField("tensor_type"):
        return None
    try:
        array_type = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return torch.from_numpy(np.zeros(0, dtype=array_type)).dtype
    except (KeyError, ValueError, TypeError):
        return None
