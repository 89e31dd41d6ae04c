"""Retrofitted vs original models on a CUDA GPU: inference, training steps, a torchrun fine-tune.

    python bench/bench_gpu.py [--quick] [--skip-compile] [--skip-torchrun] [--seconds 1.5]
                              [--tag T]
    python bench/bench_gpu.py --device cpu     # smoke run: the same code, tiny sizes, on CPU

1. Inference: the bench subjects of ``_common.py`` (ReLU original, CompetitiveReLU and MRePU
   retrofits) under ``torch.no_grad``, interleaved as in ``bench_inference.py``, in eager
   float32, eager under ``torch.autocast("cuda", torch.bfloat16)`` and ``torch.compile``; time
   and peak-memory (``torch.cuda.max_memory_allocated``) ratios to the original.
2. Fine-tuning steps as in ``bench_training.py`` (forward + cross-entropy + backward +
   ``AdamW.step``; float32 and bf16 autocast): throughput and peak-memory ratios.
3. ``torchrun --standalone --nproc_per_node 1 -m cadrelu retrofit`` on the shipped samples with
   ``--finetune`` (this checkout's cadrelu, whatever is installed): wall time, exit code and the
   report's accuracies.

Sizes (``--quick`` in brackets): inference at batch 1 and 256 [256], compiled at 256 for every
subject [resnet_cnn only], training at batch 256 in float32 and bf16 [bf16], the fine-tune 3
epochs [1]; about 5 minutes on an H200 [under 2]. Progress lines say where the time goes.
``--device cpu`` runs every part at tiny sizes (compiling the MLP only) to check the script
without a GPU; its results go to ``bench_gpu_cpu_smoke.*``. Without CUDA and without
``--device cpu`` the script exits with status 2 and one line before doing any work.

Writes ``bench/results/bench_gpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    SUBJECTS,
    batch,
    common_arguments,
    compiled_calls,
    eager_calls,
    finite_outputs,
    first_line,
    require_device,
    setup,
    subject_models,
    timed_with_memory,
    training_summary,
    write_results,
)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
SAMPLES = ROOT / "samples"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, by mode."""

    batches: tuple[int, ...]
    """Eager inference, float32 and bf16."""
    compile_batches: tuple[int, ...]
    compile_subjects: tuple[str, ...]
    train_batch: int
    train_precisions: tuple[str, ...]
    epochs: int
    """Of the torchrun fine-tune."""
    rounds: int
    """Interleaved rounds per measurement, at most (the ``--seconds`` budget may end it first)."""
    torchrun_timeout_s: float


EVERY_SUBJECT = tuple(subject.name for subject in SUBJECTS)
PLANS = {
    "full": Plan((1, 256), (256,), EVERY_SUBJECT, 256, ("fp32", "bf16"), 3, 50, 300.0),
    "quick": Plan((256,), (256,), ("resnet_cnn",), 256, ("bf16",), 1, 10, 150.0),
    "cpu smoke": Plan((1, 2), (2,), ("mlp",), 4, ("fp32", "bf16"), 1, 2, 300.0),
}


class Progress:
    """Progress lines with the seconds since the start, so a run shows where its time goes."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)


def ratios_text(summary: dict[str, dict]) -> str:
    return ", ".join(f"{name} x{s['ratio']:.3f} time x{s['memory_ratio'] or 0:.3f} mem"
                     for name, s in summary.items() if name != "relu")


def inference(plan: Plan, args: argparse.Namespace, progress: Progress,
              record: Callable[..., None]) -> None:
    """Part 1: eager float32 and bf16 at each batch size, compiled float32 where planned."""
    for subject in SUBJECTS:
        models = subject_models(subject, args.device)
        for size in plan.batches:
            x = batch(subject, size, args.device)
            for precision, dtype in PRECISIONS.items():
                mode = "eager" if dtype is None else f"eager {precision} autocast"
                record("inference", subject.name, size, mode, lambda: {
                    "finite_outputs": finite_outputs(models, x, dtype),
                    "summary": timed_with_memory(eager_calls(models, x, dtype), args.device,
                                                 args, rounds=plan.rounds,
                                                 quick_rounds=plan.rounds)})
        if args.skip_compile or subject.name not in plan.compile_subjects:
            continue
        for size in plan.compile_batches:
            x = batch(subject, size, args.device)

            def compiled() -> dict[str, Any]:
                progress(f"compiling {subject.name} at batch {size} ({len(models)} variants)")
                calls, seconds = compiled_calls(models, x)
                return {"compile_seconds": seconds,
                        "summary": timed_with_memory(calls, args.device, args,
                                                     rounds=plan.rounds,
                                                     quick_rounds=plan.rounds)}
            record("inference", subject.name, size, "compile", compiled)


def training(plan: Plan, args: argparse.Namespace, record: Callable[..., None]) -> None:
    """Part 2: fine-tuning steps of every subject in each planned precision."""
    for subject in SUBJECTS:
        for precision in plan.train_precisions:
            mode = "fp32" if precision == "fp32" else f"{precision} autocast"
            record("training", subject.name, plan.train_batch, mode, lambda: {
                "summary": training_summary(subject, plan.train_batch, args.device, args,
                                            dtype=PRECISIONS[precision], rounds=plan.rounds,
                                            quick_rounds=plan.rounds)})


def cadrelu_environment(folder: Path) -> dict[str, str]:
    """The environment of a child process that runs this checkout's cadrelu: the repository and
    a folder where ``cadrelu`` links to ``cli/`` (the installed package's mapping) lead
    ``PYTHONPATH``, so an installed copy elsewhere, or none, changes nothing."""
    shim = folder / "shim"
    shim.mkdir()
    (shim / "cadrelu").symlink_to(ROOT / "cli", target_is_directory=True)
    paths = [str(ROOT), str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def torchrun_finetune(plan: Plan, device: str, folder: Path) -> dict[str, Any]:
    """Part 3: the sample CNN retrofitted and fine-tuned by ``cadrelu retrofit`` under
    ``torchrun --standalone --nproc_per_node 1`` (``python -m torch.distributed.run``, what the
    ``torchrun`` script runs); its JSON report's accuracies, exit code and wall time."""
    arguments = ["retrofit", "samples/models/digits_cnn.pt2",
                 "--data", "samples/data/digits_val.npz",
                 "--finetune", "samples/data/digits_train.npz", "--epochs", str(plan.epochs),
                 "--device", device, "-o", str(folder / "digits_cnn.carelu.pt2"), "--json"]
    launcher = ["--standalone", "--nproc_per_node", "1", "-m", "cadrelu"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, *arguments]
    outcome: dict[str, Any] = {"command": " ".join(["torchrun", *launcher, *arguments])}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=cadrelu_environment(folder),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=plan.torchrun_timeout_s)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its worker on SIGTERM
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        outcome["error"] = f"timed out after {plan.torchrun_timeout_s:.0f} s"
    outcome.update(seconds=time.perf_counter() - start, exit_code=process.returncode)
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if report is None or process.returncode:
        outcome.update(stdout_tail=out[-1500:], stderr_tail=err[-1500:])
    if report is not None:
        outcome["accuracy"] = report["accuracy"]
        outcome["finetune_delta"] = report["deltas"].get("finetune")
        finetune = report["finetune"] or {}
        outcome["epochs"] = [{key: epoch[key] for key in
                              ("epoch", "train_loss", "val_top1", "samples_per_second")}
                             for epoch in finetune.get("history", [])]
    return outcome


def accuracy_lines(outcome: dict[str, Any]) -> list[str]:
    """The fine-tune's report, as lines: how it ended, then each stage's top-1."""
    ended = (f"exit code {outcome['exit_code']} after {outcome['seconds']:.1f} s"
             + (f" ({outcome['error']})" if "error" in outcome else ""))
    lines = [f"torchrun fine-tune (`{outcome['command']}`): {ended}"]
    for stage, result in outcome.get("accuracy", {}).items():
        lines.append(f"{stage}: top-1 {result['top1']:.2f}% on {result['n']} samples")
    for epoch in outcome.get("epochs", []):
        val = "-" if epoch["val_top1"] is None else f"{epoch['val_top1']:.2f}%"
        lines.append(f"epoch {epoch['epoch']}: {epoch['samples_per_second']:.0f} samples/s, "
                     f"val top-1 {val}")
    if outcome["exit_code"] and outcome.get("stderr_tail"):
        lines.append("stderr ends: " + outcome["stderr_tail"].strip().splitlines()[-1][:200])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, seconds=1.5, per="measurement", device="cuda",
                     device_help="cuda; cpu runs a smoke test of this script at tiny sizes")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--skip-torchrun", action="store_true",
                        help="leave out the torchrun fine-tune")
    args = parser.parse_args()
    require_device(args)  # before any work
    smoke = not args.device.startswith("cuda")
    if smoke:
        args.quick, args.tag = True, args.tag or "cpu_smoke"
    plan = PLANS["cpu smoke" if smoke else "quick" if args.quick else "full"]
    setup(args)
    progress = Progress()
    progress(f"{'smoke run' if smoke else 'quick run' if args.quick else 'full run'} on "
             f"{torch.cuda.get_device_name() if not smoke else 'cpu'}: {plan}")

    results: list[dict[str, Any]] = []
    rows: list[list[Any]] = []

    def record(part: str, model: str, size: int, mode: str,
               measure: Callable[[], dict[str, Any]]) -> None:
        """Measure one row; a failure is recorded with its error and the run goes on."""
        try:
            outcome = measure()
        except Exception as error:  # noqa: BLE001 - a GPU run must not lose its other parts
            outcome = {"error": first_line(error)}
        results.append({"part": part, "model": model, "batch": size, "mode": mode, **outcome})
        if "error" in outcome:
            rows.append([part, model, size, mode, "-", "-", "-", "-", "-", outcome["error"][:80]])
            progress(f"{part} {model} batch {size} {mode}: {outcome['error']}")
            return
        s = outcome["summary"]
        note = [f"{s['relu']['rounds']} rounds"]
        if "carelu_plain" in s:
            note.append(f"carelu_plain x{s['carelu_plain']['ratio']:.3f} time, "
                        f"x{s['carelu_plain']['memory_ratio'] or 0:.3f} mem")
        if "samples_per_s" in s["relu"]:
            note.append(f"relu {s['relu']['samples_per_s']:.0f} samples/s")
        overflowed = [name for name, ok in outcome.get("finite_outputs", {}).items() if not ok]
        if overflowed:
            note.append(f"non-finite outputs: {', '.join(overflowed)}")
        memory = [s[v]["memory_ratio"] for v in ("carelu", "mrepu")]
        rows.append([part, model, size, mode, s["relu"]["median_s"] * 1e3, s["carelu"]["ratio"],
                     s["mrepu"]["ratio"], *("-" if m is None else m for m in memory),
                     "; ".join(note)])
        progress(f"{part} {model} batch {size} {mode}: {ratios_text(s)}")

    inference(plan, args, progress, record)
    training(plan, args, record)
    finetune = None
    if not args.skip_torchrun:
        progress(f"torchrun fine-tune, {plan.epochs} epoch(s)")
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
            finetune = torchrun_finetune(plan, args.device, Path(folder))
        for line in accuracy_lines(finetune):
            progress(line)

    columns = ["part", "model", "batch", "mode", "relu ms", "carelu ×relu", "mrepu ×relu",
               "carelu peak mem ×relu", "mrepu peak mem ×relu", "note"]
    notes = [
        "×relu: median over interleaved rounds of the retrofit's time / the ReLU original's "
        "(training: step time; its throughput ratio is the inverse), same process",
        "inference: torch.no_grad forward; bf16 autocast: torch.autocast(device, bfloat16) "
        "around it; compile: torch.compile(dynamic=False), float32",
        "training: forward + cross-entropy + backward + AdamW.step in train mode; "
        "carelu_plain: CompetitiveReLU on the plain formula (no custom autograd Function)",
        "peak mem: max_memory_allocated during one call above what was allocated before it "
        "(CPU smoke run: profiler allocator events), relative to the ReLU original",
        *(accuracy_lines(finetune) if finetune else []),
    ]
    write_results("bench_gpu", args, {"plan": dataclasses.asdict(plan), "results": results,
                                      "torchrun_finetune": finetune},
                  "GPU: retrofitted vs original ReLU model", columns, rows, notes)
    progress("done")


if __name__ == "__main__":
    main()
