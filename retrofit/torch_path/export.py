"""Export a (retrofitted) torch model to ONNX and prove the file computes what torch computes.

The export uses PyTorch's supported exporter: ``torch.export`` captures an exported program, and
``torch.onnx.export(program, dynamo=True)`` (onnxscript) translates it; the TorchScript-based
exporter is deprecated and will be removed. The batch axis (axis 0 of every input) is made
dynamic whenever the graph allows it, even when the source ``.pt2`` had a static batch; where the
model's code fixes it, the file keeps that batch and the result says so in a note.

The model is checked in memory before anything is written: ONNX checker (full) and strict shape
inference, then onnxruntime's outputs against torch's on the sample inputs, and on a second
batch size when the batch axis is dynamic. Only a model that passes is written, atomically,
with its weights in a ``.data`` file beside it when it is too large for one protobuf.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from retrofit.activations.functional import onnx_export_form
from retrofit.evaluation.batching import first_row_repeated, outputs_when_grown
from retrofit.errors import BadInputError, ParityError, first_line
from retrofit.onnx_path.emission import DEFAULT_OPSET
from retrofit.torch_path.exported import torch_export_logs
from retrofit.onnx_path.io import check_onnx_model, fits_one_protobuf, iter_nodes, run_onnx, save_onnx
from retrofit.verify import OutputParity, compare_outputs, copy_module, eval_mode, torch_outputs

_EXTRA = 2
"""Rows added to the sample batch for the second batch size checked: the sample and two copies
of its first row, larger than the batch of two a batch of one is traced with."""
_MIXED_BATCH = ("at batch {larger} its outputs were not each sample's output at the sample "
                "batch: the graph mixes samples, as a reshape to a fixed batch does")


@dataclass(frozen=True)
class OnnxExport:
    """A written export: onnxruntime-vs-torch ``parity`` (the worst over the batch sizes
    checked), whether the batch axis is dynamic, and a ``note`` for the report when the file's
    batch is not what a user would assume (fixed, or made dynamic beyond a static source)."""

    path: Path
    parity: OutputParity
    dynamic_batch: bool
    note: str | None = None


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-5,
    force: bool = False,
) -> OnnxExport:
    """Write ``module`` as ONNX to ``path``; return the parity and how the batch axis came out.

    ``dynamic_dims`` are the axes (per input) that were dynamic in the source program: they
    stay dynamic; None means an eager module, whose code torch.export traces. Raises
    :class:`BadInputError` when the model cannot be exported,
    :class:`~retrofit.errors.ParityError` when the file fails the checks or its outputs differ
    by more than ``tolerance`` relative to their scale, and
    :class:`~retrofit.errors.OutputError` when a weights file beside ``path`` exists and
    ``force`` is off. Nothing is written when any of these is raised; ``module`` is not changed.
    """
    traceable = _without_input_guards(module)
    job = _Verifier(example_inputs, torch_outputs(module, example_inputs), opset, tolerance,
                    f"the exported ONNX model {path.name} disagrees with torch")
    program, failure = _export_program(traceable, example_inputs, dynamic_dims)
    model, dynamic, parity = job.translate(program)
    if any(dynamic):
        larger = tuple(first_row_repeated(x, _EXTRA) if grow else x
                       for x, grow in zip(example_inputs, dynamic))
        if _widened(dynamic, dynamic_dims):
            # The source defines its outputs at one batch only: a real batch axis keeps each
            # sample's output as it was, which is what the larger batch is held to.
            second = job.per_sample_parity(model, larger, dynamic.index(True))
            if second is None or not second.relative <= tolerance:
                failure = _MIXED_BATCH.format(larger=larger[dynamic.index(True)].shape[0])
                static = _export_static(traceable, example_inputs, dynamic_dims)
                model, dynamic, parity = job.translate(static)
                second = None
        else:
            second = job.parity(model, larger, torch_outputs(traceable, larger))
        if second is not None:
            parity = max(parity, second, key=lambda p: p.relative)
    parity.require(tolerance, job.what)
    _save(model, path, force)
    note = _batch_note(path, example_inputs, job.input_names, dynamic, dynamic_dims, failure)
    batched = [dyn for x, dyn in zip(example_inputs, dynamic) if x.dim()]
    return OnnxExport(path, parity, bool(batched) and all(batched), note)


@dataclass(frozen=True)
class _Verifier:
    """Translates exported programs of one model and checks them against its sample outputs."""

    inputs: tuple[torch.Tensor, ...]
    reference: list[np.ndarray]
    opset: int
    tolerance: float
    what: str

    @property
    def input_names(self) -> list[str]:
        return _names("input", len(self.inputs))

    def translate(self, program: torch.export.ExportedProgram
                  ) -> tuple[onnx.ModelProto, tuple[bool, ...], OutputParity]:
        """The checked ONNX model, which inputs have a dynamic batch, and the sample parity
        (raises :class:`~retrofit.errors.ParityError` beyond the tolerance)."""
        model = _to_onnx(program, self.opset, self.input_names,
                         _names("output", len(self.reference)))
        check_onnx_model(model)
        parity = self.parity(model, self.inputs, self.reference)
        parity.require(self.tolerance, self.what)
        return model, _dynamic_batch(program), parity

    def parity(self, model: onnx.ModelProto, inputs: tuple[torch.Tensor, ...],
               reference: list[np.ndarray]) -> OutputParity:
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs)}
        return compare_outputs(reference, run_onnx(model, feeds))

    def per_sample_parity(self, model: onnx.ModelProto, larger: tuple[torch.Tensor, ...],
                          batched_input: int) -> OutputParity | None:
        """Parity at the larger batch against the sample outputs, row by row: None when the
        outputs do not follow the batch (their shapes differ, or onnxruntime refuses)."""
        expected = outputs_when_grown(self.reference, self.inputs[batched_input].shape[0],
                                      _EXTRA)
        try:
            return self.parity(model, larger, expected)
        except (BadInputError, ParityError):
            return None


def _without_input_guards(module: nn.Module) -> nn.Module:
    """The module without the input checks ``ExportedProgram.module()`` adds (a ``_guards_fn``
    call and a pre-hook asserting the exported shapes): they would pin a static source's batch.

    A copy when there are any, so the caller's module keeps them; the graph itself is unchanged.
    """
    if not isinstance(module, torch.fx.GraphModule) or not hasattr(module, "_guards_fn"):
        return module
    copy = copy_module(module)
    assert isinstance(copy, torch.fx.GraphModule)
    for node in list(copy.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            copy.graph.erase_node(node)
    copy.delete_submodule("_guards_fn")
    copy.validate_inputs = False  # the pre-hook's own shape checks
    copy.recompile()
    return copy


def _export_program(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    dynamic_dims: tuple[tuple[int, ...], ...] | None,
) -> tuple[torch.export.ExportedProgram, str | None]:
    """``torch.export`` with the source's dynamic axes and, where the code allows, axis 0.

    Axis 0 gets ``Dim.AUTO`` (torch.export keeps it static where the code fixes it) unless the
    source had it dynamic (``Dim.DYNAMIC``: it must stay so). When tracing with a dynamic batch
    fails outright, the static export is tried; its success comes back with the failure's cause.
    """
    source = dynamic_dims or tuple(() for _ in example_inputs)
    dims = tuple(_with_batch(x, axes) for x, axes in zip(example_inputs, source))
    traced = _traceable_batch(example_inputs)
    try:
        program = _capture(module, traced, dims)
    except Exception as error:  # torch.export raises many types for code it cannot trace
        failure = f"torch.export cannot trace a dynamic batch ({_cause(error)})"
        return _export_static(module, example_inputs, dynamic_dims), failure
    if traced is not example_inputs and not any(_dynamic_batch(program)):
        # the batch of two was fixed by the code: the file takes the sample's batch instead
        return _export_static(module, example_inputs, dynamic_dims), None
    return program, None


def _export_static(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    dynamic_dims: tuple[tuple[int, ...], ...] | None,
) -> torch.export.ExportedProgram:
    """The export that keeps the sample's batch: the source's dynamic axes except axis 0."""
    source = dynamic_dims or tuple(() for _ in example_inputs)
    dims = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes if axis} for axes in source)
    try:
        return _capture(module, example_inputs, dims)
    except Exception as error:  # torch.export raises many types for code it cannot trace
        raise BadInputError(f"cannot export the model to ONNX: {_cause(error)}") from error


def _with_batch(x: torch.Tensor, axes: tuple[int, ...]) -> dict[int, Any]:
    """One input's ``dynamic_shapes`` entry: the source's dynamic axes, and axis 0 if allowed."""
    dims: dict[int, Any] = {axis: torch.export.Dim.DYNAMIC for axis in axes}
    if x.dim() and 0 not in axes:
        dims[0] = torch.export.Dim.AUTO
    return dims


def _traceable_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs torch.export can keep a batch axis dynamic for: it fixes axes of size 0 or 1, so a
    sample batch of one is traced as two (the file is still checked on the batch of one)."""
    batched = [x for x in inputs if x.dim()]
    if batched and all(x.shape[0] == 1 for x in batched):
        return tuple(torch.cat([x, x]) if x.dim() else x for x in inputs)
    return inputs


def _capture(module: nn.Module, inputs: tuple[torch.Tensor, ...],
             dims: tuple[dict[int, Any], ...]) -> torch.export.ExportedProgram:
    with eval_mode(module), _quiet(), onnx_export_form():
        return torch.export.export(module, inputs, dynamic_shapes=dims if any(dims) else None)


def _dynamic_batch(program: torch.export.ExportedProgram) -> tuple[bool, ...]:
    """Per user input: whether axis 0 came out of torch.export symbolic (dynamic)."""
    users = set(program.graph_signature.user_inputs)
    values = [node.meta["val"] for node in program.graph.nodes
              if node.op == "placeholder" and node.name in users]
    return tuple(bool(v.dim()) and not is_concrete_int(v.shape[0]) for v in values)


def _to_onnx(program: torch.export.ExportedProgram, opset: int, input_names: list[str],
             output_names: list[str]) -> onnx.ModelProto:
    try:
        with _quiet():
            exported = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                         input_names=input_names, output_names=output_names,
                                         optimize=True, verbose=False)
            model = exported.model_proto
    except Exception as error:  # the exporter raises many types for unsupported ops
        raise BadInputError(f"cannot export the model to ONNX: {_cause(error)}") from error
    _name_dims(model)
    _drop_trace_metadata(model)
    return model


_TRACE_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
"""Per-node debug records of the exporter: source paths of the machine that exported the
program, and the FX node text. They tripled the sample CNN's file; the module path of each
node (``namespace``, ``pkg.torch.onnx.name_scopes``) stays."""


def _drop_trace_metadata(model: onnx.ModelProto) -> None:
    for node in iter_nodes(model):
        kept = [prop for prop in node.metadata_props if prop.key not in _TRACE_KEYS]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _name_dims(model: onnx.ModelProto) -> None:
    """Sizes torch.export specialised keep a symbol's form and come out as ``dim_param: "2"``,
    which declares a dynamic axis: they become the fixed sizes they are. A batch symbol that
    all inputs share (``s77``) is named ``batch``, as the file's users expect."""
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    first = {value.type.tensor_type.shape.dim[0].dim_param for value in graph.input
             if value.type.tensor_type.shape.dim}
    batch = first.pop() if len(first) == 1 else ""
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param.isdecimal():
                dim.dim_value = int(dim.dim_param)
            elif batch and not batch.isdecimal() and dim.dim_param == batch:
                dim.dim_param = "batch"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress prints, log records and warnings out of the tool's output;
    a failure is reported by the exception it raises."""
    sink = io.StringIO()
    with warnings.catch_warnings(), torch_export_logs(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _cause(error: BaseException) -> str:
    """The first line of the innermost cause: torch.onnx wraps it in a generic header."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error, typed=True)


def _widened(dynamic: tuple[bool, ...], dynamic_dims: tuple[tuple[int, ...], ...] | None) -> bool:
    """Whether the export made a batch axis dynamic that the source program had fixed."""
    return dynamic_dims is not None and any(
        dyn and 0 not in axes for dyn, axes in zip(dynamic, dynamic_dims))


def _save(model: onnx.ModelProto, path: Path, force: bool) -> None:
    """One file, or the file and its ``.data`` when over the protobuf limit; the weights file
    follows the same replace-only-with-force rule as the file itself."""
    save_onnx(model, path, external_data=not fits_one_protobuf(model), force=force)


def _batch_note(path: Path, inputs: tuple[torch.Tensor, ...], names: list[str],
                dynamic: tuple[bool, ...], dynamic_dims: tuple[tuple[int, ...], ...] | None,
                failure: str | None) -> str | None:
    """Why the file's batch axis is not simply dynamic, or why its dynamic batch is inferred."""
    fixed = [(name, x) for name, x, dyn in zip(names, inputs, dynamic) if x.dim() and not dyn]
    if fixed:
        sizes = ", ".join(f"{x.shape[0]} ({name})" for name, x in fixed)
        why = failure or "the model's code fixes that axis (a reshape to a constant batch, say)"
        return f"{path.name} has a fixed batch of {sizes}: {why}"
    if _widened(dynamic, dynamic_dims):
        batch = inputs[dynamic.index(True)].shape[0]
        return (f"{path.name} has a dynamic batch although the source program fixed it at "
                f"{batch}: each sample's output at batch {batch + _EXTRA} matched the one at "
                f"{batch}, but a branch the source took on its batch size when it was exported "
                "cannot show; export the source with a dynamic batch to be sure")
    return None
