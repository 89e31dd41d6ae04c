"""``cadrelu compare``: which activation helps this model?

Every candidate (CompetitiveReLU with each competition measure, the calibrated MRePU) and the
untouched ReLU model, the control, are fine-tuned with the same budget and the same seed, for
each seed, and scored on the same validation samples. The candidates are ranked by their mean
top-1 change against the control, with a 95% interval paired over samples and seeds
(:func:`retrofit.evaluation.metrics.paired_delta_over_seeds`). Each arm is the retrofit job's own
pieces (:func:`~retrofit.pipeline.swap.swap`, :func:`~retrofit.pipeline.finetune.finetune_swapped`,
:func:`~retrofit.pipeline.finetune.report_trained`,
:func:`~retrofit.pipeline.finetune.finetune_control`): the model is opened, translated to torch
and the original scored once for all arms, and every fine-tune is
:func:`retrofit.training.loop.finetune`.

What a caller may rely on:

* Arms run seed by seed, the control first, then the candidates in their order. Under torchrun
  every process runs them in that order (each fine-tune is one DDP run) and ends with rank 0's
  numbers; rank 0 alone writes files.
* An arm that fails on its own (its fine-tune diverged, :class:`~retrofit.training.results.TrainingDiverged`;
  its model computes NaN/inf or an identity swap changed the outputs,
  :class:`~retrofit.errors.ParityError`) is recorded as failed with its reason and is not
  ranked; the other arms go on. A candidate that fails on any seed is failed. Any other error
  (bad data, a wrong option) stops the comparison.
* Each (arm, seed) fine-tune checkpoints to ``OUT_DIR/ARM-seedS.ckpt``. A finished run's
  numbers and per-sample flags go into ``OUT_DIR/state.json`` (written atomically), and then
  its checkpoint is removed. With ``resume`` the recorded runs are read back instead of run,
  the interrupted one goes on from its checkpoint, and the rest run. The state must come from
  the same model, data, fine-tuning budget and process count; seeds and candidates may be added.
* The gates apply to the top-ranked candidate: its mean top-1 after fine-tuning against the
  original's top-1.
* No model is written: the answer is which activation to retrofit with (``cadrelu retrofit``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from retrofit.atomic import check_output_path, write_text_atomic
from retrofit.config import CONFIGS, MEASURES, ActivationConfig, CompetitiveReLUConfig
from retrofit.training.distributed import (
    DistContext, broadcast_object, setup_distributed, teardown_distributed, world_size,
)
from retrofit.errors import (
    BadInputError, ExitCode, OutputError, ParityError, RetrofitError, UsageError,
)
from retrofit.evaluation.evaluate import EvalResult
from retrofit.evaluation.metrics import SeedPairedDelta, paired_delta_over_seeds
from retrofit.pipeline.finetune import (
    finetune_config, finetune_control, finetune_swapped, keeps_finished, report_trained,
)
from retrofit.pipeline.report import RetrofitReport, Stage
from retrofit.pipeline.request import GateResult, RetrofitRequest, gate_error, gate_results
from retrofit.pipeline.swap import OpenedModel, dataset_summary, open_model, score_stage, swap
from retrofit.torch_path.formats import ModelFormat
from retrofit.training.config import FinetuneConfig

CONTROL = "control"
"""The ReLU control's arm name."""
COMPARED = ("carelu", "mrepu")
STATE_FILE = "state.json"
STATE_VERSION = 1
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One activation to try; ``name`` names it in the table, the state and the checkpoints."""

    name: str
    config: ActivationConfig


def compared_activations(names: Sequence[str]) -> list[str]:
    """``names`` once each, in order, refused unless each is one :data:`COMPARED` can compare."""
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in COMPARED]
    if unknown or not names:
        raise UsageError(f"--to takes {' and '.join(COMPARED)}, got "
                         f"{', '.join(unknown) or 'nothing'}")
    return names


def candidates(configs: Mapping[str, ActivationConfig] | None = None,
               measures: Sequence[str] | None = None) -> tuple[Candidate, ...]:
    """The arms for ``configs`` (one config per activation in :data:`COMPARED`; default: each
    at its defaults): CompetitiveReLU once with each of ``measures`` (default: all three), and
    the calibrated MRePU as configured."""
    if configs is None:
        configs = {name: CONFIGS[name]() for name in COMPARED}
    activations = compared_activations(list(configs))
    if measures is not None and "carelu" not in activations:
        raise UsageError("--measures applies to --to carelu")
    measures = list(dict.fromkeys(measures or MEASURES))
    unknown = [name for name in measures if name not in MEASURES]
    if unknown or not measures:
        raise UsageError(f"--measures takes {', '.join(MEASURES)}, got "
                         f"{', '.join(unknown) or 'nothing'}")
    found: list[Candidate] = []
    for activation in activations:
        config = configs[activation]
        if isinstance(config, CompetitiveReLUConfig):
            found += [Candidate(f"carelu-{measure}", replace(config, measure=measure))
                      for measure in measures]
        else:
            found.append(Candidate(activation, config))
    return tuple(found)


@dataclass(frozen=True)
class CompareRequest:
    """A comparison. ``job`` holds what every arm shares: the model and how to open it, the
    data, the fine-tuning budget (``job.finetune``: its seed, checkpoint and resume are set per
    arm), the device, the site selection, the tolerance and the gates; its ``config`` and
    ``seed`` are each arm's. The validation split (without ``job.data.val``) and the sample
    inputs are drawn with the first seed, so that every arm is scored on the same samples.

    ``out_dir`` keeps the checkpoints and the state file (default ``MODEL_STEM.compare`` beside
    the model); ``resume`` goes on from it. ``markdown`` is only checked here (the caller
    writes it); ``plot`` is written by :func:`compare_file`. ``job.force`` replaces existing
    ``markdown``/``plot`` files and, without ``resume``, discards an earlier comparison in
    ``out_dir``.
    """

    job: RetrofitRequest
    candidates: tuple[Candidate, ...] = field(default_factory=candidates)
    seeds: tuple[int, ...] = (0,)
    out_dir: Path | None = None
    resume: bool = False
    markdown: Path | None = None
    plot: Path | None = None

    def __post_init__(self) -> None:
        if self.job.finetune is None:
            raise UsageError("compare fine-tunes every arm with the same budget: pass "
                             "--finetune TRAIN")
        if self.job.finetune.resume or self.job.finetune.checkpoint is not None:
            raise UsageError("compare keeps one checkpoint per arm in its out dir: set resume "
                             "on the CompareRequest, not a checkpoint on the FinetuneConfig")
        if not self.seeds:
            raise UsageError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"--seeds lists a seed twice: {', '.join(map(str, self.seeds))}")
        for seed in self.seeds:
            if not 0 <= seed < 2**32:
                raise UsageError(f"--seeds must lie in 0 .. 2**32-1, got {seed}")
        names = [candidate.name for candidate in self.candidates]
        if not names:
            raise UsageError("nothing to compare: no candidate activation")
        if len(set(names)) != len(names) or CONTROL in names:
            raise UsageError(f"candidate names must be unique and not {CONTROL!r}: "
                             f"{', '.join(names)}")

    @property
    def folder(self) -> Path:
        """Where the checkpoints and the state file go."""
        model = self.job.model
        return self.out_dir if self.out_dir is not None else model.with_name(
            model.stem + ".compare")


@dataclass
class ArmRun:
    """One arm fine-tuned with one seed; top-1/top-5 in percent.

    ``correct`` holds the fine-tuned model's per-sample top-1 flags (None when the run failed
    before it was scored); ``failure`` says why it failed and ``exit_code`` is that error's.
    ``recorded``: read back from the state file, not run now; ``resumed``: its fine-tune went
    on from a checkpoint. ``config`` is the candidate's activation config (None for the control).
    """

    arm: str
    seed: int
    config: dict[str, Any] | None
    top1_after_swap: float | None = None
    top1: float | None = None
    top5: float | None = None
    best_epoch: int | None = None
    correct: Tensor | None = None
    failure: str | None = None
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)
    resumed: bool = False
    recorded: bool = False

    @property
    def key(self) -> str:
        return run_key(self.arm, self.seed)

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def to_state(self) -> dict[str, Any]:
        """JSON-ready; the flags packed 8 to a byte, as hex."""
        data = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)
                if item.name not in ("correct", "recorded")}
        if self.correct is not None:
            flags = self.correct.cpu().numpy().astype(bool)
            data["correct"] = {"n": int(flags.size), "bits": np.packbits(flags).tobytes().hex()}
        return data

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> "ArmRun":
        values = dict(data)
        packed = values.pop("correct", None)
        correct = None
        if packed is not None:
            bits = np.frombuffer(bytes.fromhex(packed["bits"]), dtype=np.uint8)
            correct = torch.from_numpy(np.unpackbits(bits, count=packed["n"]).astype(bool))
        return cls(**values, correct=correct, recorded=True)


def run_key(arm: str, seed: int) -> str:
    """The name of one run in the state file and of its checkpoint: ``carelu-l1-seed0``."""
    return f"{arm}-seed{seed}"


@dataclass
class ArmSummary:
    """One arm over all seeds: its runs, its paired delta against the control (None when it or
    the control failed) and its rank (1 = best; None when not ranked)."""

    name: str
    config: ActivationConfig | None
    runs: list[ArmRun]
    delta: SeedPairedDelta | None = None
    rank: int | None = None

    @property
    def failure(self) -> str | None:
        """The first failed run's reason, with its seed."""
        failed = next((run for run in self.runs if run.failed), None)
        return None if failed is None else f"seed {failed.seed}: {failed.failure}"

    @property
    def mean_top1(self) -> float | None:
        """Mean top-1 after fine-tuning over the runs that were scored."""
        return _mean([run.top1 for run in self.runs])

    @property
    def mean_top1_after_swap(self) -> float | None:
        return _mean([run.top1_after_swap for run in self.runs])


def _mean(values: list[float | None]) -> float | None:
    scored = [value for value in values if value is not None]
    return sum(scored) / len(scored) if scored else None


class ComparisonFailed(RetrofitError):
    """Nothing could be ranked: every candidate failed, or the control did. The exit code is
    that of the first failure (3 for a diverged fine-tune, 4 for NaN/inf outputs)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


@dataclass
class CompareReport:
    """What the comparison found. ``arms`` are the candidates, ranked ones first (best first),
    then failed ones; ``control`` the ReLU control; ``before`` the original's score.
    ``gated_arm`` is the candidate the gates were applied to (the top-ranked one).
    ``failure`` is set when nothing could be ranked: the caller shows the report, then
    :meth:`raise_for_outcome` raises it (or the failed gates' error)."""

    model: Path
    format: ModelFormat
    dataset: dict[str, Any]
    before: EvalResult
    seeds: tuple[int, ...]
    finetune: FinetuneConfig
    control: ArmSummary
    arms: list[ArmSummary]
    folder: Path
    world_size: int = 1
    gates: list[GateResult] = field(default_factory=list)
    gated_arm: str | None = None
    notes: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    failure: RetrofitError | None = None

    @property
    def ranked(self) -> list[ArmSummary]:
        return [arm for arm in self.arms if arm.rank is not None]

    @property
    def winner(self) -> ArmSummary | None:
        return self.ranked[0] if self.ranked else None

    @property
    def failed_runs(self) -> list[ArmRun]:
        """Every failed run, the control's included, in the order they ran."""
        runs = [run for arm in (self.control, *self.arms) for run in arm.runs]
        return sorted((run for run in runs if run.failed),
                      key=lambda run: (self.seeds.index(run.seed), run.arm != CONTROL))

    @property
    def recorded_runs(self) -> int:
        """How many runs were read back from the state file (``resume``)."""
        return sum(run.recorded for arm in (self.control, *self.arms) for run in arm.runs)

    @property
    def gates_passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    def raise_for_outcome(self) -> None:
        """Raise what the comparison ended with, for a caller that shows the report first:
        why nothing was ranked, else a :class:`~retrofit.errors.GateError` for failed gates
        (on the top-ranked candidate)."""
        if self.failure is not None:
            raise self.failure
        failed = gate_error(self.gates, on=self.gated_arm)
        if failed is not None:
            raise failed


def compare_file(request: CompareRequest) -> CompareReport:
    """Run the control and every candidate with every seed (see the module docstring), rank the
    candidates and apply the gates; write the plot when asked.

    Raises :class:`~retrofit.training.results.TrainingInterrupted` (a KeyboardInterrupt) on Ctrl-C during
    a fine-tune, after its checkpoint was written, and any :class:`RetrofitError` that is not
    one arm's own failure. When nothing could be ranked, ``report.failure`` says why.
    """
    job = request.job
    folder = request.folder
    _check_outputs(request, folder)
    ctx, _ = setup_distributed(job.device)
    try:
        _on_main(ctx, lambda: _prepare(request, folder))
        first = replace(job, seed=request.seeds[0])
        opened = open_model(first)
        assert opened.val is not None and opened.train is not None
        before = score_stage(opened.subject, opened.subject.original, opened.val, first, "before")
        settings = _settings(request, opened)
        state = _on_main(ctx, lambda: _State.open(folder / STATE_FILE, settings, request.resume))
        runs = []
        for seed in request.seeds:
            for candidate in (None, *request.candidates):
                runs.append(_run_or_recall(ctx, state, opened, request, candidate, seed, before))
        report = _report(request, opened, before, runs)
        if request.plot is not None and ctx.is_main and report.ranked:
            from retrofit.pipeline.plots import save_compare_plot

            save_compare_plot([(arm.name, arm.delta) for arm in report.ranked],
                              [arm.name for arm in report.arms if arm.rank is None],
                              request.plot, title=f"{job.model.name}: top-1 vs ReLU control")
            report.written.append(request.plot)
        return report
    finally:
        teardown_distributed(ctx)


def _check_outputs(request: CompareRequest, folder: Path) -> None:
    """Every output checked before any work (read-only, on every process)."""
    job = request.job
    if folder.exists():
        if not folder.is_dir():
            raise OutputError(f"--out-dir {folder} is not a folder")
        check_output_path(folder / STATE_FILE, force=True)
    else:
        check_output_path(folder)
    inputs = [path for path in (job.model, job.data.val, job.data.train) if path]
    for path in (request.markdown, request.plot):
        if path is not None:
            check_output_path(path, inputs=inputs, force=job.force)


def _prepare(request: CompareRequest, folder: Path) -> None:
    """The out dir, made; an earlier comparison in it is gone on with (``resume``), discarded
    (``force``) or refused."""
    names = [STATE_FILE] + [run_key(arm, seed) + ".ckpt" for seed in request.seeds
                            for arm in (CONTROL, *(c.name for c in request.candidates))]
    earlier = [folder / name for name in names if (folder / name).exists()]
    if earlier and not request.resume:
        if not request.job.force:
            raise OutputError(f"{folder} holds an earlier comparison ({earlier[0].name}): pass "
                              "--resume to go on with it, or --force to start over")
        for path in earlier:
            path.unlink()
    folder.mkdir(exist_ok=True)


def _on_main(ctx: DistContext, work: Callable[[], T]) -> T:
    """``work()`` run by rank 0 alone, its result (or its error) on every process: decisions
    about files are taken once, where the files are written."""
    outcome: tuple[Any, RetrofitError | None] = (None, None)
    if ctx.is_main:
        try:
            outcome = (work(), None)
        except RetrofitError as error:
            outcome = (None, error)
    value, error = broadcast_object(ctx, outcome)
    if error is not None:
        raise error
    return value


def _settings(request: CompareRequest, opened: OpenedModel) -> dict[str, Any]:
    """What every recorded run must share with this one to be comparable: the model and how it
    was opened, the data, the fine-tuning budget and the process count."""
    job = request.job
    budget = {name: value for name, value in job.finetune.as_dict().items()
              if name not in ("seed", "checkpoint", "resume", "device", "num_workers")}
    assert opened.val is not None
    return _plain({
        "model": str(job.model), "arch": job.arch, "arch_kwargs": job.arch_kwargs,
        "input_shapes": [str(shape) for shape in job.input_shapes],
        "select": dataclasses.asdict(job.select), "tolerance": job.tolerance,
        "dataset": dataset_summary(opened.val, opened.train), "finetune": budget,
        "data_seed": request.seeds[0], "world_size": world_size(),
    })


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), to compare with a file."""
    return json.loads(json.dumps(value, default=str))


class _State:
    """The state file: the settings it was written with and each finished run, by key."""

    def __init__(self, path: Path, settings: dict[str, Any], runs: dict[str, ArmRun]) -> None:
        self.path, self.settings, self.runs = path, settings, runs

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any], resume: bool) -> "_State":
        if not resume or not path.exists():
            return cls(path, settings, {})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored, runs = data["settings"], data["runs"]
            if data["version"] != STATE_VERSION:
                raise ValueError(f"version {data['version']}")
            recalled = {key: ArmRun.from_state(value) for key, value in runs.items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInputError(f"cannot read the comparison state {path} ({error}); pass "
                                "--force without --resume to start over") from None
        changed = sorted(key for key in settings.keys() | stored.keys()
                         if settings.get(key) != stored.get(key))
        if changed:
            raise UsageError(f"{path} was written with other settings ({', '.join(changed)} "
                             "differ): resume with the same ones, or pass --force without "
                             "--resume to start over")
        return cls(path, settings, recalled)

    def recall(self, key: str, config: dict[str, Any] | None) -> ArmRun | None:
        run = self.runs.get(key)
        if run is not None and run.config != config:
            raise UsageError(f"{self.path} recorded {key} with other activation settings: "
                             "resume with the same ones, or pass --force without --resume to "
                             "start over")
        return run

    def record(self, run: ArmRun) -> None:
        self.runs[run.key] = run
        data = {"version": STATE_VERSION, "settings": self.settings,
                "runs": {key: recorded.to_state() for key, recorded in self.runs.items()}}
        write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")


def _run_or_recall(ctx: DistContext, state: _State, opened: OpenedModel, request: CompareRequest,
                   candidate: Candidate | None, seed: int, before: Stage) -> ArmRun:
    """One run: read back from the state when recorded there, else run (going on from its
    checkpoint when resuming) and recorded; every process returns rank 0's run."""
    arm = CONTROL if candidate is None else candidate.name
    config = None if candidate is None else _plain(dataclasses.asdict(candidate.config))
    checkpoint = request.folder / (run_key(arm, seed) + ".ckpt")
    recalled = state.recall(run_key(arm, seed), config)
    if recalled is not None:
        if ctx.is_main:
            checkpoint.unlink(missing_ok=True)  # left by an interrupt after the record
        return recalled
    resume = _on_main(ctx, lambda: request.resume and checkpoint.exists())
    job = request.job
    config_of_arm = job.config if candidate is None else candidate.config
    arm_request = replace(job, config=config_of_arm, seed=seed,
                          finetune=replace(job.finetune, seed=seed))
    run = ArmRun(arm, seed, config)
    if candidate is None:
        _run_control(opened, arm_request, checkpoint, resume, run)
    else:
        _run_candidate(opened, arm_request, checkpoint, resume, before, run)
    run = broadcast_object(ctx, run)
    if ctx.is_main:
        state.record(run)
        checkpoint.unlink(missing_ok=True)
    return run


def _run_candidate(opened: OpenedModel, request: RetrofitRequest, checkpoint: Path,
                   resume: bool, before: Stage, run: ArmRun) -> None:
    """Swap, fine-tune from the swap, check and score: the retrofit job's steps, into ``run``."""
    try:
        swapped = swap(opened, request, before=before)
    except ParityError as error:
        _failed(run, error)
        return
    report = swapped.report
    run.top1_after_swap = report.stages[-1].result.top1
    config = replace(finetune_config(opened, request, checkpoint, report), resume=resume)
    trained = _unless_diverged(run, report,
                               lambda: finetune_swapped(opened, request, swapped, config))
    if trained is None:
        return
    try:
        with keeps_finished(trained, checkpoint):
            report_trained(opened, request, swapped, trained)
    except ParityError as error:
        _failed(run, error, report)
        return
    _scored(run, report.stages[-1].result, report, trained.best_epoch)
    if report.failure is not None:
        _failed(run, report.failure, report)


def _run_control(opened: OpenedModel, request: RetrofitRequest, checkpoint: Path, resume: bool,
                 run: ArmRun) -> None:
    """The untouched ReLU model fine-tuned with the same budget and seed, into ``run``."""
    report = RetrofitReport(request.model, opened.subject.format, CONTROL, request.config, [])
    config = replace(finetune_config(opened, request, checkpoint, report), resume=resume)
    stage = _unless_diverged(run, report,
                             lambda: finetune_control(opened, request, report, config))
    if stage is not None:
        _scored(run, stage.result, report, None)


def _unless_diverged(run: ArmRun, report: RetrofitReport, fine_tune: Callable[[], T]) -> T | None:
    """``fine_tune()``; None, with ``run`` failed, when its loss diverged: an arm that fails on
    its own, while the other arms go on."""
    from retrofit.training.results import TrainingDiverged

    try:
        return fine_tune()
    except TrainingDiverged as diverged:
        _failed(run, diverged, report)
        return None


def _scored(run: ArmRun, result: EvalResult, report: RetrofitReport,
            best_epoch: int | None) -> None:
    run.top1, run.top5, run.correct = result.top1, result.top5, result.correct1.cpu()
    run.best_epoch, run.resumed = best_epoch, report.resumed
    run.notes = list(report.notes)


def _failed(run: ArmRun, error: RetrofitError, report: RetrofitReport | None = None) -> None:
    run.failure, run.exit_code = " ".join(str(error).split()), int(error.exit_code)
    if report is not None:
        run.notes, run.resumed = list(report.notes), report.resumed


def _report(request: CompareRequest, opened: OpenedModel, before: Stage,
            runs: list[ArmRun]) -> CompareReport:
    """Rank the candidates by mean delta against the control and apply the gates."""
    job = request.job
    assert opened.val is not None
    control = ArmSummary(CONTROL, None, [run for run in runs if run.arm == CONTROL])
    arms = [ArmSummary(c.name, c.config, [run for run in runs if run.arm == c.name])
            for c in request.candidates]
    if not any(run.failed for run in control.runs):
        for arm in arms:
            if not any(run.failed for run in arm.runs):
                arm.delta = paired_delta_over_seeds(
                    [run.correct for run in control.runs], [run.correct for run in arm.runs],
                    seed=request.seeds[0])
    ranked = sorted((arm for arm in arms if arm.delta is not None),
                    key=lambda arm: -arm.delta.delta)  # type: ignore[union-attr]
    for rank, arm in enumerate(ranked, 1):
        arm.rank = rank
    report = CompareReport(
        job.model, opened.subject.format, dataset_summary(opened.val, opened.train),
        before.result, request.seeds, replace(job.finetune, seed=request.seeds[0]), control,
        ranked + [arm for arm in arms if arm.rank is None], request.folder, world_size(),
        notes=_notes(opened.subject.notes, runs))
    winner = report.winner
    if winner is not None:
        assert winner.mean_top1 is not None
        report.gates = gate_results(job.gates, winner.mean_top1 - before.result.top1)
        report.gated_arm = winner.name if report.gates else None
    else:
        report.failure = _nothing_ranked(report)
    return report


def _notes(opening: list[str], runs: list[ArmRun]) -> list[str]:
    """The model's notes, then each run's once: a note every run made as it is, one that only
    some runs made (a calibration's fit, a resume) named by its run."""
    everywhere = set.intersection(*(set(run.notes) for run in runs)) if runs else set()
    notes = list(opening)
    for run in runs:
        for note in run.notes:
            text = note if note in everywhere or note in opening else (
                f"{run.arm}, seed {run.seed}: {note}")
            if text not in notes:
                notes.append(text)
    return notes


def _nothing_ranked(report: CompareReport) -> ComparisonFailed:
    """Why nothing was ranked: the control failed (its first failure), or every candidate
    did (the first failure)."""
    failed = report.failed_runs
    first = next((run for run in failed if run.arm == CONTROL), failed[0])
    assert first.exit_code is not None
    if first.arm == CONTROL:
        return ComparisonFailed(f"the ReLU control failed with seed {first.seed} "
                                f"({first.failure}): no candidate can be compared with it",
                                first.exit_code)
    return ComparisonFailed(f"every candidate failed; the first, {first.arm} with seed "
                            f"{first.seed}: {first.failure}", first.exit_code)
