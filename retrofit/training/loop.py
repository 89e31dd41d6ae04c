"""Fine-tune a retrofitted model on the user's data, keep its best state, say what happened.

:func:`finetune` is the whole training loop: AdamW or SGD with its own learning rate for the new
activation parameters, linear warm-up then cosine decay per step, gradient clipping, bf16
autocast on CUDA, the MRePU blend ramp, validation after every epoch (the best state by top-1 is
what comes back), a checkpoint at every epoch end and on Ctrl-C/SIGTERM, exact resume, and
several processes under ``torchrun`` (see :mod:`retrofit.training.distributed`).
This module is the loop itself; beside it are the settings (:mod:`~retrofit.training.config`),
the LR and blend schedules (:mod:`~retrofit.training.schedule`), the parameter groups
(:mod:`~retrofit.training.optimizer`), the resumable state (:mod:`~retrofit.training.state`) and
what comes back (:mod:`~retrofit.training.results`).

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
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from retrofit.activations.modules import MRePU
from retrofit.atomic import check_output_path
from retrofit.errors import BadInputError, UnsupportedModelError, UsageError, first_line
# Shared with evaluation, so that training and evaluation read and check batches alike.
from retrofit.evaluation.evaluate import (
    BatchLogits,
    evaluate,
    input_dtype,
    loader_batches,
    torch_predictor,
)
from retrofit.evaluation.progress import progress_bar
from retrofit.training.checkpoint import StopRequest, deferred_interrupts, save_checkpoint
from retrofit.training.config import FinetuneConfig
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
from retrofit.training.modes import buffers_kept, determinism, is_export_graph
from retrofit.verify import set_training
from retrofit.training.optimizer import make_optimizer, parameter_groups, scaled_rates, set_rates
from retrofit.training.results import (
    FinetuneResult,
    TrainingDiverged,
    TrainingInterrupted,
    diverged_message,
    interrupted_message,
)
from retrofit.training.schedule import Schedule, ramp_fraction
from retrofit.training.state import (
    EpochRecord,
    RunState,
    activation_values,
    checkpoint_state,
    resume_run,
    snapshot,
)
from retrofit.verify import copy_module


class _Diverged(Exception):
    """Internal: the loss was not finite on some process (all processes agree)."""


class _StopRequested(Exception):
    """Internal: a SIGINT/SIGTERM reached some process (all processes agree)."""


class _Finetuning:
    """One run; :meth:`run` is the loop. Everything collective (any_rank, sum_ranks, broadcasts,
    barriers) is reached by all processes at the same step."""

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
        self.fixed_mode = not set_training(self.model, True) or is_export_graph(self.model)
        self.amp_dtype = (torch.bfloat16 if config.amp == "bf16" or (
            config.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
            else None)
        self.input_dtype = input_dtype(self.model)
        groups = parameter_groups(self.model, config)
        if not groups:
            raise UsageError("the model has no trainable parameters to fine-tune")
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config)
        self.mrepu = [m for m in self.model.modules() if isinstance(m, MRePU)]
        self.n = len(train)  # type: ignore[arg-type]
        steps = steps_per_epoch(self.n, config.batch_size, ctx.world_size, config.exact_batches)
        if steps == 0:
            raise BadInputError(
                f"{getattr(train, 'source', 'the training data')} has {self.n} training samples, "
                f"fewer than one batch of exactly {config.batch_size * ctx.world_size}, the "
                "model's fixed batch size: fine-tuning needs at least one full batch")
        self.schedule = Schedule.build(config.epochs * steps, config.warmup_fraction,
                                       ramp_fraction(config.blend_ramp_fraction, self.mrepu))
        self.net: nn.Module = self.model
        self.state = RunState()
        self.in_update = False  # True while a weight update is half done: nothing to save
        self.notes: list[str] = []  # for the report, whatever the outcome

    # ----- start, finish

    def run(self) -> FinetuneResult:
        if self.config.resume:
            assert self.checkpoint is not None
            self.state = resume_run(
                self.checkpoint, config=self.config, world_size=self.ctx.world_size,
                is_main=self.ctx.is_main, model=self.model, optimizer=self.optimizer,
                train_size=self.n)
            left = ("nothing was left to train" if self.state.epoch >= self.config.epochs
                    else "training went on from there")
            self.notes.append(f"resumed from {self.checkpoint} {self.state.position()}: {left}")
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
            np.random.seed(self.config.seed % 2**32)
            self._set_blend(self.schedule.blend(0))
            val = self._validate("validating before fine-tuning") if self.val is not None else None
            self.state.start_val = broadcast_object(self.ctx, val)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # At lam = 0 (the ramp's first step) MRePU computes ReLU and its gains get no
            # gradient; DDP must be told, or it waits for them at the next step.
            ramping = bool(self.mrepu) and self.schedule.ramp_steps > 0
            self.net = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=ramping)
        self.logits = BatchLogits(self.net, self.train)
        try:
            self._train()
        except _Diverged as diverged:
            self._restore_best(collective=True)
            result = self._result(stopped_early=str(diverged))
            message = diverged_message(str(diverged), self.state.best_epoch, self.state.best_val)
            raise TrainingDiverged(message, result) from None
        except (_StopRequested, KeyboardInterrupt) as interrupt:
            agreed = isinstance(interrupt, _StopRequested)
            saved = self._save_interrupted(agreed)
            self._restore_best(collective=agreed)
            where = self.state.position()
            result = self._result(stopped_early=f"interrupted {where}", interrupted=True)
            message = interrupted_message(where, saved, self.checkpoint)
            raise TrainingInterrupted(message, result, saved) from None
        self._restore_best(collective=True)
        return self._result()

    def _restore_best(self, *, collective: bool) -> None:
        """Load the best state (or the given weights when no epoch qualified), make every MRePU
        compute MRePU, and leave the model in the mode the input model was in."""
        if self.state.best_state is not None:
            self.model.load_state_dict(self.state.best_state)
        elif self.state.best_epoch == 0:
            self.model.load_state_dict(self.source.state_dict())
        if collective:
            broadcast_module_state(self.ctx, self.model)
        self._set_blend(1.0)
        set_training(self.model, self.source.training)

    def _result(self, *, stopped_early: str | None = None, interrupted: bool = False
                ) -> FinetuneResult:
        state, schedule, notes = self.state, self.schedule, list(self.notes)
        ramp_finished = state.step >= schedule.ramp_steps
        if self.mrepu and not ramp_finished:
            notes.append(
                f"training stopped before the MRePU blend ramp ended (lam "
                f"{schedule.blend(state.step):.3f} after {state.step} of "
                f"{schedule.ramp_steps} ramp steps); the returned model computes MRePU "
                "(lam 1) with weights tuned for a partial blend")
        if state.best_epoch == 0:
            notes.append("no fine-tuned epoch qualified as best; the model keeps the weights it "
                         "was given")
        if self.fixed_mode:
            notes.append("a torch.export graph keeps the training/evaluation behaviour it was "
                         "exported with: it was fine-tuned and validated in that mode")
        return FinetuneResult(
            model=self.model, history=list(state.history), best_epoch=state.best_epoch,
            best_val_top1=state.best_val, start_val_top1=state.start_val,
            stopped_early=stopped_early, interrupted=interrupted, ramp_finished=ramp_finished,
            steps=state.step, total_steps=schedule.total_steps, checkpoint=self.checkpoint,
            notes=notes)

    # ----- the loop

    def _train(self) -> None:
        cfg, state = self.config, self.state
        self._stop_if_requested()  # Ctrl-C during the start validation
        while state.epoch < cfg.epochs:
            full = epoch_batches(self.n, cfg.batch_size, seed=cfg.seed, epoch=state.epoch,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size,
                                 drop_last=cfg.exact_batches)
            plan = full[state.batch_in_epoch:]
            done = sum(b.global_size for b in full[: state.batch_in_epoch])
            # The loader's own generator: creating it must not draw from torch's global one.
            loader = DataLoader(
                self.train, batch_sampler=[b.indices for b in plan], num_workers=cfg.num_workers,
                generator=torch.Generator().manual_seed(order_seed(cfg.seed, state.epoch)),
                pin_memory=self.device.type == "cuda")
            seen, started = 0, time.perf_counter()
            with progress_bar(f"epoch {state.epoch + 1}/{cfg.epochs}", self.n, enabled=self.show,
                              done=done, keep=True, metrics="loss {loss:.4f}  acc {top1:5.1f}%"
                              ) as advance, contextlib.closing(loader_batches(loader)) as batches:
                for (x, y), planned in zip(batches, plan):
                    self._step(x, y, planned)
                    seen += planned.global_size
                    loss, correct, count = state.totals
                    advance(planned.global_size, loss=loss / max(count, 1),
                            top1=100 * correct / max(count, 1))
            self._end_epoch(seen, time.perf_counter() - started)

    def _step(self, x: Tensor, y: Tensor, planned: PlannedBatch) -> None:
        cfg, state = self.config, self.state
        x = x.to(self.device, non_blocking=True)
        if self.amp_dtype is None and self.input_dtype is not None and x.is_floating_point():
            x = x.to(self.input_dtype)
        self._set_blend(self.schedule.blend(state.step))
        set_rates(self.optimizer, self.schedule.lr_factor(state.step))
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            logits, y = self.logits(x, y)
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
                            f"{state.epoch + 1}, step {state.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.in_update = True  # an interrupt from here to the end leaves no consistent state
        self.optimizer.step()
        state.step += 1
        state.batch_in_epoch += 1
        state.totals = [state.totals[0] + loss_sum, state.totals[1] + n_correct,
                        state.totals[2] + planned.real]
        self.in_update = False
        if stop:
            raise _StopRequested

    def _end_epoch(self, seen: int, seconds: float) -> None:
        cfg, state = self.config, self.state
        loss_sum, correct, count = sum_ranks(self.ctx, state.totals, self.device)
        blend = self.schedule.blend(state.step)
        self._set_blend(blend)
        val_top1 = None
        if self.ctx.is_main and self.val is not None:
            val_top1 = self._validate(f"validating epoch {state.epoch + 1}")
        factor = self.schedule.lr_factor(state.step - 1)
        record = EpochRecord(
            epoch=state.epoch + 1, steps=state.step, train_loss=loss_sum / max(count, 1),
            train_top1=100.0 * correct / max(count, 1), val_top1=val_top1,
            lr=cfg.lr * factor,
            activation_lr=scaled_rates(self.optimizer, factor).get("activation"),
            samples_per_second=seen / seconds if seen and seconds > 0 else 0.0,
            blend=blend if self.mrepu else None, activations=activation_values(self.model))
        # Only epochs that end with the full activation can be the best: the returned model
        # computes MRePU with lam 1, and an epoch validated at lam < 1 measured something else.
        eligible = blend == 1.0 or not self.mrepu
        best = state.best_epoch, state.best_val
        if self.ctx.is_main and eligible and (
                val_top1 is None or state.best_val is None or val_top1 >= state.best_val):
            state.best_state = snapshot(self.model)
            best = record.epoch, val_top1
        record, best = broadcast_object(self.ctx, (record, best))
        self.in_update = True
        state.history.append(record)
        state.best_epoch, state.best_val = best
        state.epoch, state.batch_in_epoch, state.totals = state.epoch + 1, 0, [0.0, 0.0, 0.0]
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
        with torch.random.fork_rng(devices=devices), buffers_kept(self.model):
            predictor = torch_predictor(
                self.model, device=self.device, autocast_dtype=self.amp_dtype,
                fixed_batch=self.config.batch_size if self.config.exact_batches else None)
            result = evaluate(predictor, self.val, batch_size=self.config.batch_size,
                              num_workers=self.config.num_workers, progress=self.show,
                              description=description)
        set_training(self.model, True)
        return result.top1

    def _set_blend(self, value: float) -> None:
        for module in self.mrepu:
            module.blend = value

    # ----- checkpoints

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint, self._checkpoint_state())
        barrier(self.ctx)

    def _checkpoint_state(self) -> dict:
        return checkpoint_state(self.state, config=self.config, world_size=self.ctx.world_size,
                                model=self.model, optimizer=self.optimizer,
                                schedule=self.schedule, train_size=self.n)

    def _save_interrupted(self, agreed: bool) -> Path | None:
        """The checkpoint of an interrupt. ``agreed``: every process stopped at this step, so
        the epoch's totals can be summed and the others wait for the file. A bare
        KeyboardInterrupt reached this process alone: no collective is safe, and inside a
        weight update there is no consistent state to write."""
        if self.checkpoint is None or (not agreed and self.in_update):
            return None
        if agreed:
            self.state.totals = sum_ranks(self.ctx, self.state.totals, self.device)
            self._save()
        elif self.ctx.is_main:
            save_checkpoint(self.checkpoint, self._checkpoint_state())
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
        with determinism(config.deterministic), deferred_interrupts() as stop:
            result = _Finetuning(model, train, val, config, ctx, device, show, on_epoch,
                                 stop).run()
        barrier(ctx)  # no process tears the group down while another still talks through it
        return result
    finally:
        teardown_distributed(ctx)
