"""Export a (retrofitted) torch model to ONNX and prove the file computes what torch computes.

The export uses PyTorch's TorchScript-based exporter (``dynamo=False``): it ships with every
torch 2.x and needs no extra package. The file is validated before it is moved into place:
ONNX checker (full) and strict shape inference, then onnxruntime's outputs against torch's on the
sample inputs, and on a second batch size when the batch axis is dynamic. A file that fails is
never left behind.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from retrofit.atomic import atomic_output
from retrofit.errors import BadInputError
from retrofit.onnx_io import check_onnx_model, run_onnx
from retrofit.verify import OutputParity, compare_outputs, eval_mode, torch_outputs

DEFAULT_OPSET = 17


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
) -> OutputParity:
    """Write ``module`` as ONNX to ``path`` and return the onnxruntime-vs-torch parity.

    Axes listed in ``dynamic_dims`` (per input) stay dynamic; without them the first axis of
    every input and output is the dynamic batch axis. Raises
    :class:`~retrofit.errors.ParityError` when the outputs differ by more than ``tolerance``
    relative to their scale; nothing is written then.
    """
    outputs = torch_outputs(module, example_inputs)
    input_names = _names("input", len(example_inputs))
    output_names = _names("output", len(outputs))
    dims = dynamic_dims if dynamic_dims is not None else tuple((0,) for _ in example_inputs)
    dynamic_axes = {name: {axis: f"{name}_dim{axis}" for axis in axes}
                    for name, axes in zip(input_names, dims) if axes}
    batch_dynamic = all(0 in axes for axes in dims)
    if batch_dynamic:
        dynamic_axes.update({name: {0: "batch"} for name in output_names})
        for name in input_names:
            dynamic_axes[name][0] = "batch"
    with atomic_output(path) as temp:
        with eval_mode(module), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, tuple(example_inputs), str(temp), dynamo=False,
                                  opset_version=opset, input_names=input_names,
                                  output_names=output_names, dynamic_axes=dynamic_axes)
            except Exception as error:  # the exporter raises many types for unsupported code
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise BadInputError(f"cannot export the model to ONNX: {first}") from error
        exported = onnx.load(str(temp))
        check_onnx_model(exported)
        parity = _parity(module, exported, example_inputs, input_names, outputs)
        if batch_dynamic:
            larger = tuple(torch.cat([x, x[:1]]) for x in example_inputs)
            parity = max(parity, _parity(module, exported, larger, input_names),
                         key=lambda p: p.relative)
        parity.require(tolerance, f"the exported ONNX model {path.name} disagrees with torch")
    return parity


def _parity(module: nn.Module, exported: onnx.ModelProto, inputs: tuple[torch.Tensor, ...],
            names: list[str], reference: list | None = None) -> OutputParity:
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}
    reference = reference if reference is not None else torch_outputs(module, inputs)
    return compare_outputs(reference, run_onnx(exported, feeds))
