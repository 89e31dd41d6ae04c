"""Inference latency and peak memory of retrofitted models relative to their ReLU originals.

    python bench/bench_inference.py [--threads 2] [--device cpu|cuda] [--quick]
                                    [--batches 1 64] [--compile-batches 64] [--skip-compile]
                                    [--skip-onnx]

For a CIFAR-style ResNet (8 basic blocks, 3x32x32), an MLP (4 x 512) and an
``nn.TransformerEncoder`` (4 layers, relu), the original model and its CompetitiveReLU and MRePU
retrofits (``retrofit_torch_model``, default configs) run under ``torch.no_grad`` in eager
PyTorch, ``torch.compile`` (default Inductor) and onnxruntime (the files written by the project's
``export_onnx``). The variants of one model run interleaved in the same process; each ratio is the
median over rounds of retrofit time / original time (see ``bench/_common.py``), the peak memory
ratio compares the tensor memory one forward allocates (not measured for onnxruntime, whose arena
torch cannot see). A backend that fails is recorded with its error, and the run goes on.

Writes ``bench/results/bench_inference.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SUBJECTS,
    batch,
    common_arguments,
    compiled_calls,
    eager_calls,
    finite_outputs,
    first_line,
    setup,
    subject_models,
    timed_summary,
    timed_with_memory,
    write_results,
)

VARIANTS = ("relu", "carelu", "mrepu")
ROUNDS, QUICK_ROUNDS = 40, 4


def measure(calls: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing plus peak memory of each variant's call."""
    return timed_with_memory(calls, args.device, args, rounds=ROUNDS, quick_rounds=QUICK_ROUNDS)


def onnx_sessions(models: dict[str, torch.nn.Module], example: torch.Tensor, threads: int,
                  folder: Path) -> dict[str, Any]:
    """Export each variant with the project's exporter (dynamic batch) and open a session."""
    import onnxruntime as ort

    from retrofit.torch_path.export import export_onnx

    sessions = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        export_onnx(model.cpu(), (example.cpu(),), path, tolerance=1e-4)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(path), options,
                                              providers=["CPUExecutionProvider"])
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, seconds=6.0, per="measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--compile-batches", type=int, nargs="+", default=[64],
                        help="batch sizes for torch.compile (each costs a compile per variant)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-onnx", action="store_true")
    args = parser.parse_args()
    setup(args)

    results: list[dict[str, Any]] = []
    rows = []

    def record(model: str, size: int, backend: str, outcome: dict[str, Any]) -> None:
        results.append({"model": model, "batch": size, "backend": backend, **outcome})
        if "error" in outcome:
            rows.append([model, size, backend, "-", "-", "-", "-", "-", outcome["error"][:80]])
            return
        s = outcome["summary"]
        mem = [s[v].get("memory_ratio") for v in ("carelu", "mrepu")]
        rows.append([model, size, backend, s["relu"]["median_s"] * 1e3, s["carelu"]["ratio"],
                     s["mrepu"]["ratio"], *("-" if m is None else m for m in mem),
                     f"{s['relu']['rounds']} rounds"])
        print(f"{model} batch {size} {backend}: carelu x{s['carelu']['ratio']:.3f}, "
              f"mrepu x{s['mrepu']['ratio']:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for subject in SUBJECTS:
            models = subject_models(subject, args.device)
            for size in args.batches:
                x = batch(subject, size, args.device)
                record(subject.name, size, "eager",
                       {"summary": measure(eager_calls(models, x), args),
                        "finite_outputs": finite_outputs(models, x)})
            if not args.skip_compile:
                for size in args.compile_batches:
                    x = batch(subject, size, args.device)
                    try:
                        calls, seconds = compiled_calls(models, x)
                        outcome = {"summary": measure(calls, args), "compile_seconds": seconds}
                    except Exception as error:  # noqa: BLE001 - record any compile failure
                        outcome = {"error": first_line(error)}
                    record(subject.name, size, "compile", outcome)
            if not args.skip_onnx:
                try:
                    sessions = onnx_sessions(models, batch(subject, 2, "cpu"), args.threads,
                                             Path(tmp))
                except Exception as error:  # noqa: BLE001 - record any export failure
                    for size in args.batches:
                        record(subject.name, size, "onnxruntime", {"error": first_line(error)})
                    sessions = None
                for size in args.batches if sessions else ():
                    feed = {"input": batch(subject, size, "cpu").numpy()}
                    calls = {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}
                    summary = timed_summary(calls, "cpu", args, rounds=ROUNDS,
                                            quick_rounds=QUICK_ROUNDS)
                    record(subject.name, size, "onnxruntime", {"summary": summary})

    columns = ["model", "batch", "backend", "relu ms", "carelu ×relu", "mrepu ×relu",
               "carelu peak mem ×relu", "mrepu peak mem ×relu", "note"]
    notes = [
        "ratios: median over interleaved rounds of retrofit time / ReLU time, same process",
        "peak mem: tensor memory allocated by one no-grad forward (CPU: profiler allocator "
        "events; CUDA: max_memory_allocated), relative to the ReLU model",
        "targets (CPU, 2 threads, CompetitiveReLU): onnxruntime batch 64 resnet_cnn ≤ 1.20x, "
        "transformer ≤ 1.10x; eager resnet_cnn batch 64 ≤ 1.08x, batch 1 ≤ 1.25x, mlp batch 64 "
        "≤ 1.20x; torch.compile resnet_cnn batch 64 ≤ 1.04x",
    ]
    write_results("bench_inference", args, {"results": results},
                  "Inference: retrofitted vs original ReLU model", columns, rows, notes)


if __name__ == "__main__":
    main()
