"""Fine-tune a retrofitted model on the user's data, keep its best state, say what happened.

:func:`finetune` is the whole training loop: AdamW or SGD with its own learning rate for the new
activation parameters, linear warm-up then cosine decay per step, gradient clipping, bf16
autocast on CUDA, the MRePU blend ramp, validation after every epoch (the best state by top-1 is
what comes back), a checkpoint at every epoch end and on Ctrl-C/SIGTERM, exact resume, and
several processes under ``torchrun`` (see :mod:`retrofit.training.distributed`).

What a caller may rely on:

* The model passed in is not modified: training runs on a deep copy, returned in
  :attr:`FinetuneResult.model`.
* Same seed, data and config give the same weights (on the same device, bit for bit on CPU), so
  the caller can fine-tune the retrofitted model and an untouched ReLU copy with one config and
  compare them fairly. A fresh run seeds torch's, Python's and NumPy's global generators with
  ``seed`` (the same in every process); the data order of epoch e depends on (seed, epoch)
  only, and validation draws nothing from the generators training uses.
* A run resumed from its checkpoint reaches the weights an uninterrupted run reaches (with the
  same settings and process count). Ctrl-C and SIGTERM wait for the current step to end, so the
  checkpoint they write is the state after the last completed step.
* N processes with ``batch_size`` B compute, step for step, what one process computes with batch
  N*B (parameters, LR schedule, blend schedule), except for BatchNorm, whose statistics are per
  process, and dropout, whose masks depend on the batch layout.
* The returned model computes the activation it was retrofitted with: every MRePU has blend 1.0
  (when training stopped before the ramp ended, ``ramp_finished`` is False and a note says so).
* Modules from ``torch.export`` (``ExportedProgram.module()``) refuse ``.train()``/``.eval()``:
  they are fine-tuned and validated in the mode they were exported in (usually eval mode, i.e.
  BatchNorm uses its stored statistics and dropout is off); buffers a training-mode graph updates
  are put back after each validation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from retrofit.activations.modules import ACTIVATION_MODULES, CompetitiveReLU, MRePU
from retrofit.atomic import check_output_path
from retrofit.training.checkpoint import (
    StopRequest,
    deferred_interrupts,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retrofit.evaluation.datasets.checks import MODEL_CALL_ERRORS, check_labels_fit, model_input_error
from retrofit.training.distributed import (
    DistContext,
    PlannedBatch,
    any_rank,
    barrier,
    broadcast_module_state,
    broadcast_object,
    epoch_batches,
    order_seed,
    setup_distributed,
    steps_per_epoch,
    sum_ranks,
    teardown_distributed,
)
from retrofit.errors import (
    BadInputError,
    ExitCode,
    RetrofitError,
    UnsupportedModelError,
    UsageError,
    first_line,
)
from retrofit.evaluation.evaluate import (  # shared so that training and evaluation read batches alike
    check_batch_labels,
    evaluate,
    input_dtype,
    loader_batches,
    logits_of,
    torch_predictor,
)
from retrofit.verify import copy_module

OptimizerName = Literal["adamw", "sgd"]
AmpMode = Literal["auto", "bf16", "off"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)

_NOT_COMPARED_ON_RESUME = ("device", "num_workers", "checkpoint", "resume")
"""Config fields a resumed run may change: they do not change what is computed."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Every field that changes the result is stored in the checkpoint, and a
    resumed run must use the same values.

    - ``lr``: the peak learning rate of the weights; ``activation_lr`` that of the new
      activations' parameters (CAReLU alpha/beta), None for the same as ``lr``.
    - ``weight_decay`` applies to weights of 2 or more dimensions only: never to biases,
      normalisation scales or activation parameters.
    - ``warmup_fraction``: the LR rises linearly over this fraction of all steps, then follows a
      cosine to zero (see :func:`warmup_cosine`).
    - ``grad_clip``: maximal gradient norm, 0 for none.
    - ``deterministic``: also ask torch for deterministic kernels (the data order is always
      seeded). On CUDA this sets ``CUBLAS_WORKSPACE_CONFIG`` unless it is set already.
    - ``amp``: ``auto`` is bf16 autocast on a CUDA GPU that has bf16 and off elsewhere.
    - ``blend_ramp_fraction``: MRePU's lam goes linearly from 0 to 1 over this fraction of all
      steps (0: MRePU from the first step); None takes the MRePU config's ``ramp_fraction``.
    - ``batch_size`` is per process: under torchrun with N processes the step sees N*B samples.
    - ``checkpoint``: written at every epoch end and on interruption; ``resume`` continues it.
      Without ``resume`` an existing file is an error rather than silently replaced.
    - ``exact_batches``: every step and every validation batch has exactly ``batch_size``
      samples (per process), for a model whose batch size is fixed. Each epoch leaves out the
      last ``n % batch_size`` samples of its shuffled order (another set each epoch); validation
      pads its last batch and drops the padding's outputs.
    """

    epochs: int = 3
    batch_size: int = 64
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-4
    activation_lr: float | None = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    deterministic: bool = False
    amp: AmpMode = "auto"
    blend_ramp_fraction: float | None = None
    device: str = "auto"
    num_workers: int = 0
    checkpoint: str | os.PathLike[str] | None = None
    resume: bool = False
    exact_batches: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one "
             f"of: {', '.join(OPTIMIZERS)}"),
            (0 < self.lr < math.inf, f"the learning rate must be a finite positive number, got {self.lr}"),
            (self.activation_lr is None or 0 <= self.activation_lr < math.inf,
             f"the activation learning rate must be a finite number, 0 or more, got "
             f"{self.activation_lr}"),
            (0 <= self.weight_decay < math.inf,
             f"weight decay must be a finite number, 0 or more, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (0 <= self.warmup_fraction <= 1,
             f"warmup fraction must lie in [0, 1], got {self.warmup_fraction}"),
            (0 <= self.grad_clip < math.inf,
             f"gradient clip must be 0 (off) or a finite positive number, got {self.grad_clip}"),
            (self.amp in AMP_MODES, f"unknown amp mode {self.amp!r}; choose one of: "
             f"{', '.join(AMP_MODES)}"),
            (self.blend_ramp_fraction is None or 0 <= self.blend_ramp_fraction <= 1,
             f"blend ramp fraction must lie in [0, 1], got {self.blend_ramp_fraction}"),
            (self.num_workers >= 0, f"num_workers must be 0 or more, got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (the checkpoint path as a string), for checkpoints and reports."""
        values = dataclasses.asdict(self)
        if self.checkpoint is not None:
            values["checkpoint"] = os.fspath(self.checkpoint)
        return values


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of history. Accuracies in percent.

    ``lr``/``activation_lr`` are the rates of the epoch's last step (``activation_lr`` None when
    the model has no activation parameters); ``samples_per_second`` counts training only (0 when
    a resumed run had nothing left of the epoch). ``blend`` is MRePU's lam at the end of the
    epoch (None without MRePU); ``activations`` maps each activation module's name to its values
    then: ``{"alpha": .., "beta": ..}`` for CompetitiveReLU, ``{"lam": .., "gain_in": ..,
    "gain_out": ..}`` for MRePU.
    ``val_top1`` is None without validation data.
    """

    epoch: int
    steps: int
    train_loss: float
    train_top1: float
    val_top1: float | None
    lr: float
    activation_lr: float | None
    samples_per_second: float
    blend: float | None
    activations: dict[str, dict[str, float]]


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns (or attaches to the error it raises).

    ``model`` holds the best weights: those of the epoch with the highest validation top-1 among
    epochs that ended with the blend ramp complete (ties: the later epoch), or of the last such
    epoch without validation data. ``best_epoch`` is 0 when no epoch qualified: the model then
    has the weights it was given. ``start_val_top1`` is the validation accuracy before the first
    step. ``stopped_early`` says why training ended before its last step (None when it did not);
    ``interrupted`` is True after Ctrl-C/SIGTERM. ``notes`` are remarks for the report.
    """

    model: nn.Module
    history: list[EpochRecord]
    best_epoch: int
    best_val_top1: float | None
    start_val_top1: float | None
    stopped_early: str | None
    interrupted: bool
    ramp_finished: bool
    steps: int
    total_steps: int
    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


class TrainingDiverged(RetrofitError):
    """The training loss became NaN or infinite. ``result`` holds the model restored to its
    best state (see :class:`FinetuneResult`); the checkpoint on disk is the last good one."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, result: FinetuneResult) -> None:
        super().__init__(message)
        self.result = result


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was written (``checkpoint``, None
    when there is no checkpoint path or the interrupt came in the middle of a weight update, in
    which case the previous epoch's checkpoint stands). ``result`` holds the best state so far.
    A KeyboardInterrupt, so code that treats Ctrl-C as an exit keeps working."""

    def __init__(self, message: str, result: FinetuneResult, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.result = result
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- schedules


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): ``(step+1)/warmup_steps`` during
    warm-up, then ``0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))``,
    which starts at 1 and approaches 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def blend_at(step: int, ramp_steps: int) -> float:
    """MRePU's lam for a forward pass after ``step`` optimizer steps: ``step / ramp_steps``
    (0 at the first step: the network still computes ReLU), 1 from ``ramp_steps`` on."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


@dataclass(frozen=True)
class Schedule:
    """The step counts every schedule is a function of."""

    total_steps: int
    warmup_steps: int
    ramp_steps: int

    @classmethod
    def build(cls, total_steps: int, warmup_fraction: float, ramp_fraction: float) -> "Schedule":
        ramp = int(ramp_fraction * total_steps + 0.5)
        return cls(
            total_steps,
            int(warmup_fraction * total_steps + 0.5),
            max(ramp, 1) if ramp_fraction > 0 else 0,
        )


# --------------------------------------------------------------------------- parameters


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, each with a ``name``: ``weights`` (2+ dimensions, with
    weight decay), ``no_decay`` (biases, normalisation scales: 0/1 dimensions) and
    ``activation`` (parameters of :data:`ACTIVATION_MODULES`, at ``activation_lr``, no decay).
    Frozen parameters are left out, and so are empty groups."""
    activation = {id(p) for m in model.modules() if isinstance(m, ACTIVATION_MODULES)
                  for p in m.parameters()}
    named: dict[str, list[nn.Parameter]] = {"weights": [], "no_decay": [], "activation": []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in activation:
            named["activation"].append(parameter)
        elif parameter.ndim >= 2:
            named["weights"].append(parameter)
        else:
            named["no_decay"].append(parameter)
    activation_lr = config.lr if config.activation_lr is None else config.activation_lr
    settings = {
        "weights": (config.lr, config.weight_decay),
        "no_decay": (config.lr, 0.0),
        "activation": (activation_lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "base_lr": settings[name][0],
         "weight_decay": settings[name][1]}
        for name, params in named.items()
        if params
    ]


def activation_values(model: nn.Module) -> dict[str, dict[str, float]]:
    """Each activation module's current values by module name: CompetitiveReLU alpha/beta,
    MRePU lam and its gains."""
    values: dict[str, dict[str, float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompetitiveReLU):
            values[name] = {"alpha": module.alpha.item(), "beta": module.beta.item()}
        elif isinstance(module, MRePU):
            values[name] = {"lam": float(module.blend), "gain_in": module.gain_in.item(),
                            "gain_out": module.gain_out.item()}
    return values


def _make_optimizer(groups: list[dict[str, Any]], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _set_training(model: nn.Module, mode: bool) -> bool:
    """``model.train(mode)``; False for torch.export modules, which refuse to switch."""
    try:
        model.train(mode)
    except NotImplementedError:
        return False
    return True


def _is_export_graph(model: nn.Module) -> bool:
    """A graph of ATen ops, as ``torch.export`` makes: its train/eval behaviour was fixed when it
    was exported, whatever ``.training`` says (a rewritten copy may accept ``.train()``)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        isinstance(node.target, torch._ops.OpOverload) for node in model.graph.nodes)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put the buffers back afterwards: a graph exported in training mode updates BatchNorm
    statistics even when it is only evaluated (for other models this is a no-op)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training; the caller's global settings come back after.
    ``warn_only``: an op without a deterministic kernel warns instead of failing mid-run."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


@contextlib.contextmanager
def _epoch_bar(enabled: bool, description: str, total: int, done: int
               ) -> Iterator[Callable[[int, float, float, float], None]]:
    """Yield ``advance(samples, loss, top1, samples_per_second)``; a rich bar on stderr when
    enabled (it stays on screen as the epoch's summary line)."""
    if not enabled:
        yield lambda *_: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[top1]:5.1f}%  "
                   "{task.fields[rate]:,.0f} samples/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, completed=done, loss=float("nan"),
                            top1=float("nan"), rate=0.0)
        yield lambda count, loss, top1, rate: bar.update(
            task, advance=count, loss=loss, top1=top1, rate=rate)


class _Diverged(Exception):
    """Internal: the loss was not finite on some process (all processes agree)."""


class _StopRequested(Exception):
    """Internal: a SIGINT/SIGTERM reached some process (all processes agree)."""


# --------------------------------------------------------------------------- the loop


class _Finetuning:
    """The state of one run; :meth:`run` is the loop. Everything collective (any_rank,
    sum_ranks, broadcasts, barriers) is reached by all processes at the same step."""

    def __init__(self, source: nn.Module, train: Dataset, val: Dataset | None,
                 config: FinetuneConfig, ctx: DistContext, device: torch.device,
                 show: bool, on_epoch: Callable[[EpochRecord], None] | None,
                 stop: StopRequest) -> None:
        self.source, self.train, self.val, self.config = source, train, val, config
        self.ctx, self.device, self.show, self.on_epoch, self.stop = (
            ctx, device, show, on_epoch, stop)
        self.checkpoint = Path(config.checkpoint) if config.checkpoint is not None else None
        try:
            self.model = copy_module(source).to(device)
        except (TypeError, RuntimeError, copy.Error) as error:
            raise UnsupportedModelError(
                f"cannot copy the model for fine-tuning: {first_line(error)}") from error
        self.fixed_mode = not _set_training(self.model, True) or _is_export_graph(self.model)
        self.amp_dtype = (torch.bfloat16 if config.amp == "bf16" or (
            config.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
            else None)
        self.input_dtype = input_dtype(self.model)
        groups = parameter_groups(self.model, config)
        if not groups:
            raise UsageError("the model has no trainable parameters to fine-tune")
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = _make_optimizer(groups, config)
        self.mrepu = [m for m in self.model.modules() if isinstance(m, MRePU)]
        ramp = config.blend_ramp_fraction
        if ramp is None:
            ramp = max((m.config.ramp_fraction for m in self.mrepu), default=0.0)
        self.n = len(train)  # type: ignore[arg-type]
        self.steps_per_epoch = steps_per_epoch(self.n, config.batch_size, ctx.world_size,
                                               config.exact_batches)
        if self.steps_per_epoch == 0:
            raise BadInputError(
                f"{getattr(train, 'source', 'the training data')} has {self.n} training samples, "
                f"fewer than one batch of exactly {config.batch_size * ctx.world_size}, the "
                "model's fixed batch size: fine-tuning needs at least one full batch")
        self.schedule = Schedule.build(
            config.epochs * self.steps_per_epoch, config.warmup_fraction, ramp if self.mrepu else 0)
        self.net: nn.Module = self.model
        self.step = self.epoch = self.batch_in_epoch = 0
        self.totals = [0.0, 0.0, 0.0]  # loss sum, correct, samples of the current epoch
        self.history: list[EpochRecord] = []
        self.best_state: dict[str, Tensor] | None = None
        self.best_epoch, self.best_val = 0, None
        self.start_val: float | None = None
        self.in_update = False
        self.num_outputs: int | None = None
        self.notes: list[str] = []  # for the report, whatever the outcome

    # ----- setup, finish

    def run(self) -> FinetuneResult:
        if self.config.resume:
            self._resume()
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
            np.random.seed(self.config.seed % 2**32)
            self._set_blend(blend_at(0, self.schedule.ramp_steps))
            val = self._validate("validating before fine-tuning") if self.val is not None else None
            self.start_val = broadcast_object(self.ctx, val)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # At lam = 0 (the ramp's first step) MRePU computes ReLU and its gains get no
            # gradient; DDP must be told, or it waits for them at the next step.
            ramping = bool(self.mrepu) and self.schedule.ramp_steps > 0
            self.net = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=ramping)
        try:
            self._train()
        except _Diverged as diverged:
            self._restore_best(collective=True)
            result = self._result(stopped_early=str(diverged))
            raise TrainingDiverged(self._diverged_message(str(diverged)), result) from None
        except (_StopRequested, KeyboardInterrupt) as interrupt:
            agreed = isinstance(interrupt, _StopRequested)
            saved = self._save_interrupted(agreed)
            self._restore_best(collective=agreed)
            where = self._position()
            result = self._result(stopped_early=f"interrupted {where}", interrupted=True)
            if saved is not None:
                message = f"training interrupted {where}; checkpoint saved to {saved}"
            elif self.checkpoint is not None:
                message = (f"training interrupted during a weight update {where}; the "
                           f"checkpoint {self.checkpoint} holds the last epoch end")
            else:
                message = f"training interrupted {where}; no checkpoint path was set"
            raise TrainingInterrupted(message, result, saved) from None
        self._restore_best(collective=True)
        return self._result()

    def _resume(self) -> None:
        assert self.checkpoint is not None
        state = load_checkpoint(self.checkpoint)
        stored, current = state["config"], self.config.as_dict()
        defaults = FinetuneConfig().as_dict()  # a field added since the checkpoint: its default
        changed = [f"{key} {stored.get(key, defaults[key])!r} -> {value!r}"
                   for key, value in current.items() if key not in _NOT_COMPARED_ON_RESUME
                   and stored.get(key, defaults[key]) != value]
        if changed:
            raise UsageError(f"checkpoint {self.checkpoint} was written with other settings "
                             f"({'; '.join(changed)}); resume with the same settings")
        if state["world_size"] != self.ctx.world_size:
            raise UsageError(f"checkpoint {self.checkpoint} was written by {state['world_size']} "
                             f"process(es); resume with the same number")
        schedule = state["schedule"]
        if schedule["train_size"] != self.n:
            raise BadInputError(f"checkpoint {self.checkpoint} was written for a training set "
                                f"of {schedule['train_size']} samples, this one has {self.n}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise BadInputError(f"checkpoint {self.checkpoint} does not fit this model: "
                                f"{first_line(error)}") from error
        self.step, self.epoch = schedule["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.totals = list(state["epoch_totals"]) if self.ctx.is_main else [0.0, 0.0, 0.0]
        best = state["best"]
        self.best_state = best["state"] if self.ctx.is_main else None
        self.best_epoch, self.best_val = best["epoch"], best["val_top1"]
        self.start_val = state["start_val_top1"]
        self.history = [EpochRecord(**record) for record in state["history"]]
        set_rng_state(state["rng"])
        left = ("nothing was left to train" if self.epoch >= self.config.epochs
                else "training went on from there")
        self.notes.append(f"resumed from {self.checkpoint} {self._position()}: {left}")

    def _restore_best(self, *, collective: bool) -> None:
        """Load the best state (or the given weights when no epoch qualified), make every MRePU
        compute MRePU, and leave the model in the mode the input model was in."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        elif self.best_epoch == 0:
            self.model.load_state_dict(self.source.state_dict())
        if collective:
            broadcast_module_state(self.ctx, self.model)
        self._set_blend(1.0)
        _set_training(self.model, self.source.training)

    def _result(self, *, stopped_early: str | None = None, interrupted: bool = False
                ) -> FinetuneResult:
        notes = list(self.notes)
        ramp_finished = self.step >= self.schedule.ramp_steps
        if self.mrepu and not ramp_finished:
            notes.append(
                f"training stopped before the MRePU blend ramp ended (lam "
                f"{blend_at(self.step, self.schedule.ramp_steps):.3f} after {self.step} of "
                f"{self.schedule.ramp_steps} ramp steps); the returned model computes MRePU "
                "(lam 1) with weights tuned for a partial blend")
        if self.best_epoch == 0:
            notes.append("no fine-tuned epoch qualified as best; the model keeps the weights it "
                         "was given")
        if self.fixed_mode:
            notes.append("a torch.export graph keeps the training/evaluation behaviour it was "
                         "exported with: it was fine-tuned and validated in that mode")
        return FinetuneResult(
            model=self.model, history=list(self.history), best_epoch=self.best_epoch,
            best_val_top1=self.best_val, start_val_top1=self.start_val,
            stopped_early=stopped_early, interrupted=interrupted, ramp_finished=ramp_finished,
            steps=self.step, total_steps=self.schedule.total_steps, checkpoint=self.checkpoint,
            notes=notes)

    def _position(self) -> str:
        if self.batch_in_epoch:
            return f"at epoch {self.epoch + 1}, step {self.step}"
        return f"at the end of epoch {self.epoch}" if self.epoch else "before the first step"

    def _diverged_message(self, reason: str) -> str:
        if self.best_epoch == 0:
            kept = "kept the weights the model was given"
        elif self.best_val is None:
            kept = f"kept the weights of epoch {self.best_epoch}"
        else:
            kept = (f"kept the weights of epoch {self.best_epoch} "
                    f"(validation top-1 {self.best_val:.2f}%)")
        return (f"{reason}; {kept}. Lower the learning rate, set a gradient clip, or check the "
                "data for extreme values")

    # ----- the loop

    def _train(self) -> None:
        cfg = self.config
        self._stop_if_requested()  # Ctrl-C during the start validation
        while self.epoch < cfg.epochs:
            full = epoch_batches(self.n, cfg.batch_size, seed=cfg.seed, epoch=self.epoch,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size,
                                 drop_last=cfg.exact_batches)
            plan = full[self.batch_in_epoch:]
            done = sum(b.global_size for b in full[: self.batch_in_epoch])
            # The loader's own generator: creating it must not draw from torch's global one.
            loader = DataLoader(
                self.train, batch_sampler=[b.indices for b in plan], num_workers=cfg.num_workers,
                generator=torch.Generator().manual_seed(order_seed(cfg.seed, self.epoch)),
                pin_memory=self.device.type == "cuda")
            seen, started = 0, time.perf_counter()
            with _epoch_bar(self.show, f"epoch {self.epoch + 1}/{cfg.epochs}", self.n, done
                            ) as advance, contextlib.closing(loader_batches(loader)) as batches:
                for (x, y), planned in zip(batches, plan):
                    self._step(x, y, planned)
                    seen += planned.global_size
                    loss, correct, count = self.totals
                    rate = seen / max(time.perf_counter() - started, 1e-9)
                    advance(planned.global_size, loss / max(count, 1),
                            100 * correct / max(count, 1), rate)
            self._end_epoch(seen, time.perf_counter() - started)

    def _step(self, x: Tensor, y: Tensor, planned: PlannedBatch) -> None:
        cfg = self.config
        y = torch.as_tensor(y).to(torch.int64).view(-1)
        x = x.to(self.device, non_blocking=True)
        if self.amp_dtype is None and self.input_dtype is not None and x.is_floating_point():
            x = x.to(self.input_dtype)
        self._set_blend(blend_at(self.step, self.schedule.ramp_steps))
        factor = warmup_cosine(self.step, self.schedule.total_steps, self.schedule.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            logits = self._forward(x)
        check_batch_labels(y, logits.shape[1])
        y = y.to(self.device, non_blocking=True)
        weight = torch.full((y.shape[0],), 1.0 if planned.real else 0.0, device=self.device)
        losses = F.cross_entropy(logits.float(), y, reduction="none") * weight
        # Normalised by the global batch: averaged over processes, this is the mean loss of the
        # N*B samples, so the gradient equals one process's with batch N*B.
        loss = losses.sum() * (self.ctx.world_size / planned.global_size)
        flags = any_rank(self.ctx, torch.stack([
            (~torch.isfinite(loss.detach())).float(),
            torch.tensor(float(self.stop.requested), device=self.device)]))
        correct = ((logits.detach().argmax(1) == y).float() * weight).sum()
        nonfinite, stop, loss_sum, n_correct = torch.cat(
            [flags, torch.stack([losses.detach().sum(), correct])]).tolist()
        if nonfinite:
            raise _Diverged(f"the training loss became NaN or infinite at epoch "
                            f"{self.epoch + 1}, step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.in_update = True  # an interrupt from here to the end leaves no consistent state
        self.optimizer.step()
        self.step += 1
        self.batch_in_epoch += 1
        self.totals = [self.totals[0] + loss_sum, self.totals[1] + n_correct,
                       self.totals[2] + planned.real]
        self.in_update = False
        if stop:
            raise _StopRequested

    def _forward(self, x: Tensor) -> Tensor:
        try:
            output = self.net(x)
        except torch.OutOfMemoryError as error:
            raise UsageError(f"out of device memory at batch size {x.shape[0]}; use a smaller "
                             "batch size") from error
        except MODEL_CALL_ERRORS as error:
            if self.num_outputs is not None:
                raise
            raise model_input_error(error, x.shape[1:]) from error
        logits = logits_of(output)
        if logits.ndim > 2 and all(d == 1 for d in logits.shape[2:]):
            logits = logits.reshape(logits.shape[0], logits.shape[1])
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise BadInputError(f"the model's output has shape {tuple(logits.shape)} for a batch "
                                f"of {x.shape[0]}; expected (batch, classes) logits")
        if self.num_outputs is None:
            self.num_outputs = logits.shape[1]
            if hasattr(self.train, "targets") and hasattr(self.train, "source"):
                check_labels_fit(self.train, self.num_outputs)  # type: ignore[arg-type]
        return logits

    def _end_epoch(self, seen: int, seconds: float) -> None:
        cfg = self.config
        loss_sum, correct, count = sum_ranks(self.ctx, self.totals, self.device)
        blend = blend_at(self.step, self.schedule.ramp_steps)
        self._set_blend(blend)
        val_top1 = None
        if self.ctx.is_main and self.val is not None:
            val_top1 = self._validate(f"validating epoch {self.epoch + 1}")
        schedule = self.schedule
        factor = warmup_cosine(self.step - 1, schedule.total_steps, schedule.warmup_steps)
        rates = {g["name"]: g["base_lr"] * factor for g in self.optimizer.param_groups}
        record = EpochRecord(
            epoch=self.epoch + 1, steps=self.step, train_loss=loss_sum / max(count, 1),
            train_top1=100.0 * correct / max(count, 1), val_top1=val_top1,
            lr=cfg.lr * factor, activation_lr=rates.get("activation"),
            samples_per_second=seen / seconds if seen and seconds > 0 else 0.0,
            blend=blend if self.mrepu else None, activations=activation_values(self.model))
        # Only epochs that end with the full activation can be the best: the returned model
        # computes MRePU with lam 1, and an epoch validated at lam < 1 measured something else.
        eligible = blend == 1.0 or not self.mrepu
        best = self.best_epoch, self.best_val
        if self.ctx.is_main and eligible and (
                val_top1 is None or self.best_val is None or val_top1 >= self.best_val):
            self.best_state = _snapshot(self.model)
            best = record.epoch, val_top1
        record, best = broadcast_object(self.ctx, (record, best))
        self.in_update = True
        self.history.append(record)
        self.best_epoch, self.best_val = best
        self.epoch, self.batch_in_epoch, self.totals = self.epoch + 1, 0, [0.0, 0.0, 0.0]
        self.in_update = False
        self._save()
        if self.ctx.is_main and self.on_epoch is not None:
            self.on_epoch(record)
        self._stop_if_requested()

    def _stop_if_requested(self) -> None:
        """Honour Ctrl-C/SIGTERM between epochs (within an epoch, each step checks)."""
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        if any_rank(self.ctx, flag).item():
            raise _StopRequested

    def _validate(self, description: str) -> float:
        """Top-1 on the validation data; draws nothing from the training generators."""
        assert self.val is not None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _buffers_kept(self.model):
            predictor = torch_predictor(
                self.model, device=self.device, autocast_dtype=self.amp_dtype,
                fixed_batch=self.config.batch_size if self.config.exact_batches else None)
            result = evaluate(predictor, self.val, batch_size=self.config.batch_size,
                              num_workers=self.config.num_workers, progress=self.show,
                              description=description)
        _set_training(self.model, True)
        return result.top1

    def _set_blend(self, value: float) -> None:
        for module in self.mrepu:
            module.blend = value

    # ----- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "config": self.config.as_dict(),
            "world_size": self.ctx.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"step": self.step, "train_size": self.n,
                         **dataclasses.asdict(self.schedule)},
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_totals": list(self.totals),
            "rng": rng_state(),
            "best": {"state": self.best_state, "epoch": self.best_epoch,
                     "val_top1": self.best_val},
            "start_val_top1": self.start_val,
            "history": [dataclasses.asdict(record) for record in self.history],
        }

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint, self._state())
        barrier(self.ctx)

    def _save_interrupted(self, agreed: bool) -> Path | None:
        """The checkpoint of an interrupt. ``agreed``: every process stopped at this step, so
        the epoch's totals can be summed and the others wait for the file. A bare
        KeyboardInterrupt reached this process alone: no collective is safe, and inside a
        weight update there is no consistent state to write."""
        if self.checkpoint is None or (not agreed and self.in_update):
            return None
        if agreed:
            self.totals = sum_ranks(self.ctx, self.totals, self.device)
            self._save()
        elif self.ctx.is_main:
            save_checkpoint(self.checkpoint, self._state())
        else:
            return None  # rank 0 writes; whether it got that far, this process cannot know
        return self.checkpoint


def finetune(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    config: FinetuneConfig,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``train`` and return it with its best weights.

    ``val`` picks the best epoch (None: the last one). ``progress``: a bar per epoch on stderr
    when stderr is a terminal, unless False. ``on_epoch(record)`` runs on rank 0 after each
    epoch's checkpoint is written (the CLI prints a line there); a KeyboardInterrupt raised in it
    stops training like Ctrl-C.

    Under torchrun every process calls this with the same arguments; rank 0 alone validates,
    writes the checkpoint and shows progress, and all processes return the same weights.

    Raises :class:`TrainingDiverged` on a NaN/inf loss and :class:`TrainingInterrupted` (a
    KeyboardInterrupt) on Ctrl-C/SIGTERM, after writing a checkpoint at the end of the last
    completed step; both carry the :class:`FinetuneResult` with the best weights so far.
    """
    if len(train) == 0:  # type: ignore[arg-type]
        raise BadInputError(f"{getattr(train, 'source', 'the training data')} holds no samples")
    # Checked here, not in FinetuneConfig: the job fills in a default checkpoint path later.
    if config.resume and config.checkpoint is None:
        raise UsageError("resume needs a checkpoint path to resume from")
    if config.checkpoint is not None:
        path = Path(config.checkpoint)
        if not config.resume and path.exists():
            raise UsageError(f"checkpoint {path} already exists; resume it, or remove it to "
                             "start over")
        if config.resume and not path.exists():
            raise UsageError(f"no checkpoint at {path} to resume from")
        check_output_path(path, force=True)
    ctx, device = setup_distributed(config.device)
    show = progress is not False and ctx.is_main and sys.stderr.isatty()
    try:
        with _determinism(config.deterministic), deferred_interrupts() as stop:
            result = _Finetuning(model, train, val, config, ctx, device, show, on_epoch,
                                 stop).run()
        barrier(ctx)  # no process tears the group down while another still talks through it
        return result
    finally:
        teardown_distributed(ctx)
