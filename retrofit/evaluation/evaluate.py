"""Score a model, torch or ONNX, on a labelled dataset.

A model is wrapped into a :class:`Predictor` (batch in, CPU float32 logits out) by
:func:`torch_predictor` or :func:`onnx_predictor`, so :func:`evaluate` and everything after it
(metrics, report) treat both kinds the same. :func:`evaluate` keeps the per-sample correctness in
dataset order, which is what the paired before/after comparison in :mod:`retrofit.evaluation.metrics` needs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from retrofit.evaluation.batching import run_in_batches
from retrofit.evaluation.datasets.checks import (
    MODEL_CALL_ERRORS,
    check_labels_fit,
    model_input_error,
)
from retrofit.errors import BadInputError, UnsupportedModelError, UsageError, first_line
from retrofit.evaluation.metrics import accuracy, topk_correct
from retrofit.evaluation.progress import progress_bar
from retrofit.verify import set_training


class Predictor(Protocol):
    """Anything that maps an input batch to logits of shape (batch, classes), CPU float32.

    A predictor raises ``RuntimeError`` (or ``ValueError``/``AssertionError``) when the batch
    does not fit the model; :func:`evaluate` turns that into a one-line BadInputError.
    """

    def __call__(self, batch: Tensor) -> Tensor: ...


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"`` is CUDA when there is a GPU, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` name
    themselves. Anything else (``mps``, ``tpu``, a GPU that is not there) is a usage error."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {str(device)!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} was asked for but no CUDA GPU is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"device {device} was asked for but there are only "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


class TorchPredictor:
    """Runs an ``nn.Module`` in eval mode under ``torch.inference_mode`` on ``device``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        fixed_batch: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.autocast_dtype = autocast_dtype
        self.fixed_batch = fixed_batch
        set_training(module, False)  # torch.export modules refuse; they run in their own mode
        self.module = module.to(self.device)
        self.input_dtype = input_dtype(module)
        self.name = f"torch on {self.device}" + (
            f" ({str(autocast_dtype).replace('torch.', '')} autocast)" if autocast_dtype else ""
        )

    def __call__(self, batch: Tensor) -> Tensor:
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            cast = self.autocast_dtype is None and self.input_dtype is not None
            if cast and x.is_floating_point():
                x = x.to(self.input_dtype)
            autocast = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                if self.fixed_batch is None:
                    return logits_of(self.module(x)).float().cpu()
                return run_in_batches(lambda chunk: logits_of(self.module(chunk)), x,
                                      self.fixed_batch).float().cpu()


@contextlib.contextmanager
def device_kept(model: object) -> Iterator[None]:
    """Give a torch module back on the device it was on once it is scored: a predictor moves it
    to the scoring device in place (a GPU), and what runs after (the overflow probe, saving,
    export) feeds it CPU sample inputs. Anything else (an ONNX model) passes through."""
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, nn.Module) else []
    home = tensors[0].device if tensors else None
    try:
        yield
    finally:
        if home is not None:
            model.to(home)  # type: ignore[union-attr]


def input_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype floating inputs are cast to for ``module``: its first floating parameter's (a
    float64 or half model takes its own type), None when it has none (inputs go as they are)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def torch_predictor(
    module: nn.Module,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    fixed_batch: int | None = None,
) -> TorchPredictor:
    """Wrap a module as a :class:`Predictor`. The module is put in eval mode and moved to
    ``device`` in place; floating inputs are cast to its parameters' dtype unless autocast is on
    (integer inputs, token ids, are fed as they are); outputs that are tuples, or dicts/objects
    with ``logits``, give their logits. ``fixed_batch``: the only batch size the module takes;
    batches are then run in chunks of it (:func:`retrofit.evaluation.batching.run_in_batches`)."""
    return TorchPredictor(module, device=device, autocast_dtype=autocast_dtype,
                          fixed_batch=fixed_batch)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a ``logits`` key or attribute (a Hugging Face
    ``ModelOutput``, whose None fields are not keys), or the first element of a tuple
    (multi-output classifiers). A mapping without logits is refused rather than guessed at:
    its first field may be a loss or hidden states."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    fields = f" (fields: {', '.join(map(str, output))})" if isinstance(output, Mapping) else ""
    raise UnsupportedModelError(
        f"the model returned a {type(output).__name__}{fields}; expected a tensor of logits"
    )


_ORT_INPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OnnxPredictor:
    """Runs an ONNX model with onnxruntime; one graph input, the first output as logits.

    A graph whose batch dimension is fixed at N (declared, or ``fixed_batch`` for a graph that
    declares a dynamic batch but reshapes to a fixed one) gets batches of exactly N: larger
    batches are split and the last one is padded, the padding's outputs dropped. Inputs are cast
    to the element type the graph declares (float, int64/int32 token ids, bool masks).
    """

    def __init__(self, model: Any, *, providers: list[str] | None = None,
                 fixed_batch: int | None = None) -> None:
        from retrofit.onnx_path.session import inference_session, onnxruntime_errors

        self._errors = onnxruntime_errors()
        self.session = inference_session(model, cuda=True, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UnsupportedModelError(
                f"the ONNX model has {len(inputs)} inputs ({names}); evaluation feeds exactly one"
            )
        graph_input = inputs[0]
        if graph_input.type not in _ORT_INPUT_TYPES:
            raise UnsupportedModelError(
                f"the ONNX model's input {graph_input.name} is {graph_input.type}; "
                f"evaluation feeds {', '.join(sorted(_ORT_INPUT_TYPES))}"
            )
        self.input_name = graph_input.name
        self.input_dtype = _ORT_INPUT_TYPES[graph_input.type]
        self.input_shape: list[int | str | None] = list(graph_input.shape)
        self.output_name = self.session.get_outputs()[0].name
        first = self.input_shape[0] if self.input_shape else None
        declared = first if isinstance(first, int) and first > 0 else None
        self.fixed_batch = declared or fixed_batch
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime ({self.providers[0]})"

    def __call__(self, batch: Tensor) -> Tensor:
        self._check_shape(tuple(batch.shape))
        if batch.is_floating_point() and not np.issubdtype(self.input_dtype, np.floating):
            raise RuntimeError(f"the ONNX model's input {self.input_name} takes "
                               f"{np.dtype(self.input_dtype).name} values, the data holds floats")
        batch = batch.detach().cpu()
        if self.fixed_batch is None:
            return self._run(batch)
        return run_in_batches(self._run, batch, self.fixed_batch)

    def _run(self, batch: Tensor) -> Tensor:
        array = batch.numpy().astype(self.input_dtype, copy=False)
        try:
            (output,) = self.session.run([self.output_name], {self.input_name: array})
        except self._errors as error:
            raise RuntimeError(first_line(error)) from error
        return torch.from_numpy(np.asarray(output)).float()

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        expected = self.input_shape
        shown = "(" + ", ".join(_dim_text(axis, dim) for axis, dim in enumerate(expected)) + ")"
        if len(shape) != len(expected):
            raise RuntimeError(f"the ONNX model expects input of shape {shown}, got {shape}")
        for axis, (want, got) in enumerate(zip(expected, shape)):
            if axis > 0 and isinstance(want, int) and want > 0 and want != got:
                raise RuntimeError(f"the ONNX model expects input of shape {shown}, got {shape}")


def _dim_text(axis: int, dim: int | str | None) -> str:
    if isinstance(dim, int) and dim > 0:
        return str(dim)
    return "N" if axis == 0 else "?"


def onnx_predictor(model: Any, *, providers: list[str] | None = None,
                   fixed_batch: int | None = None) -> OnnxPredictor:
    """Wrap an ONNX model (``onnx.ModelProto``, serialized bytes or a path) as a
    :class:`Predictor`; CUDA when onnxruntime has it, else CPU, unless ``providers`` says.
    ``fixed_batch``: the batch size a graph with a dynamic batch axis still requires."""
    return OnnxPredictor(model, providers=providers, fixed_batch=fixed_batch)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one model on one dataset, in percent, plus what was right per sample.

    ``correct1``/``correct5`` are BoolTensors in dataset order (for paired comparisons);
    ``top5``/``correct5`` are None when the model has 5 outputs or fewer.
    """

    n: int
    top1: float
    top5: float | None
    correct1: Tensor
    correct5: Tensor | None
    num_outputs: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def evaluate(
    predictor: Callable[[Tensor], Tensor],
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    description: str = "evaluating",
) -> EvalResult:
    """Run ``predictor`` over ``dataset`` in order and score top-1 (and top-5) accuracy.

    Labels are checked against the model's number of outputs once the first batch shows it
    (the whole dataset at once when it has ``targets``). Data that does not fit the model, a
    broken sample, or labels beyond the outputs raise a one-line BadInputError.
    ``progress``: None shows a bar when stderr is a terminal, True always, False never.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise BadInputError(f"{getattr(dataset, 'source', 'the dataset')} holds no samples")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    correct1: list[Tensor] = []
    correct5: list[Tensor] = []
    batch_logits = BatchLogits(predictor, dataset)
    start = time.perf_counter()
    with progress_bar(description, total, enabled=progress) as advance, contextlib.closing(
        loader_batches(loader)
    ) as batches:
        for x, y in batches:
            logits, y = batch_logits(x, y)
            logits = logits.float().cpu()
            correct1.append(topk_correct(logits, y, 1))
            if logits.shape[1] > 5:
                correct5.append(topk_correct(logits, y, 5))
            advance(y.shape[0])
    seconds = time.perf_counter() - start
    num_outputs = batch_logits.num_outputs
    assert num_outputs is not None
    all1 = torch.cat(correct1)
    all5 = torch.cat(correct5) if correct5 else None
    return EvalResult(
        n=all1.shape[0],
        top1=accuracy(all1),
        top5=accuracy(all5) if all5 is not None else None,
        correct1=all1,
        correct5=all5,
        num_outputs=num_outputs,
        seconds=seconds,
    )


class BatchLogits:
    """One model's logits on the batches of one labelled dataset, checked the same way wherever
    a batch meets the model (:func:`evaluate`, each fine-tuning step).

    ``batch_logits(x, y)`` returns ``(logits, labels)``: logits of shape (batch, classes) as the
    model gave them (device, dtype and autograd kept), labels as int64. Out of memory is a usage
    error; a batch the model refuses, an output that is not (batch, classes), a number of
    outputs that changes, or labels beyond the outputs are one-line BadInputErrors. The first
    batch fixes ``num_outputs`` and checks the dataset's labels against it (all of them at once
    when the dataset has ``targets``).
    """

    def __init__(self, forward: Callable[[Tensor], Any], dataset: Dataset) -> None:
        self.forward = forward
        self.dataset = dataset
        self.num_outputs: int | None = None

    def __call__(self, x: Tensor, y: Any) -> tuple[Tensor, Tensor]:
        y = torch.as_tensor(y).to(torch.int64).view(-1)
        try:
            output = self.forward(x)
        except torch.OutOfMemoryError as error:
            raise UsageError(
                f"out of device memory at batch size {x.shape[0]}; use a smaller batch size"
            ) from error
        except MODEL_CALL_ERRORS as error:
            raise model_input_error(error, x.shape[1:]) from error
        logits = logits_of(output)
        if logits.ndim > 2 and all(d == 1 for d in logits.shape[2:]):
            logits = logits.reshape(logits.shape[0], logits.shape[1])
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise BadInputError(
                f"the model's output has shape {tuple(logits.shape)} for a batch of "
                f"{x.shape[0]}; expected (batch, classes) logits"
            )
        if self.num_outputs is None:
            self.num_outputs = logits.shape[1]
            if hasattr(self.dataset, "targets") and hasattr(self.dataset, "source"):
                check_labels_fit(self.dataset, self.num_outputs)  # type: ignore[arg-type]
        elif logits.shape[1] != self.num_outputs:
            raise BadInputError(
                f"the model gave {logits.shape[1]} outputs for one batch and {self.num_outputs} "
                "for an earlier one"
            )
        check_batch_labels(y, self.num_outputs)
        return logits, y


def check_batch_labels(y: Tensor, num_outputs: int) -> None:
    """Refuse labels the model cannot predict, naming the offending label, instead of letting
    cross-entropy fail with an index error deep inside torch."""
    if y.numel() and (int(y.max()) >= num_outputs or int(y.min()) < 0):
        bad = int(y.max()) if int(y.max()) >= num_outputs else int(y.min())
        raise BadInputError(
            f"a label is {bad} but the model has {num_outputs} outputs "
            f"(labels 0..{num_outputs - 1})"
        )


def loader_batches(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches; a BadInputError raised in a worker process comes back as one line."""
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except BadInputError as error:
                raise BadInputError(_worker_message(str(error))) from None
            yield batch[0], batch[1]
    finally:
        # Stop worker processes now: left to the garbage collector after an error, torch's
        # shutdown waits out a 5 s timeout before the error reaches the user.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_message(text: str) -> str:
    """torch re-raises worker errors with the worker's traceback as the message; keep the
    original one line."""
    if "DataLoader worker" not in text:
        return text
    marker = "BadInputError: "
    for line in reversed(text.strip().splitlines()):
        if marker in line:
            return line.split(marker, 1)[1]
    return text.strip().splitlines()[-1]
