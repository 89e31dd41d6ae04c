"""Fine-tuning throughput and peak training memory of retrofitted models relative to ReLU.

    python bench/bench_training.py [--threads 2] [--device cpu|cuda] [--quick] [--batch 64]
                                   [--no-plain]

One training step is forward + cross-entropy + backward + ``AdamW.step`` on a random batch, in
train mode (BatchNorm uses batch statistics, the transformer runs its ordinary path). The models
are those of ``bench_inference.py``: the ReLU original and its CompetitiveReLU and MRePU retrofits,
stepped interleaved in one process after warm-up steps (so AdamW's state exists). Throughput is
samples per second from the median step time; its ratio is the median over rounds of ReLU step
time / retrofit step time (above 1 is faster than ReLU). Peak memory is the tensor memory one
step allocates above what was live before it (activations saved for backward, gradients,
temporaries), relative to the ReLU model's step.

``carelu_plain`` is the same CompetitiveReLU retrofit forced onto the plain tensor formula (what
autograd records without the custom ``torch.autograd.Function``): the difference to ``carelu``
is what the Function saves. ``--no-plain`` leaves it out.

Writes ``bench/results/bench_training.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SUBJECTS,
    add_peak_memory,
    batch,
    common_arguments,
    setup,
    subject_models,
    timed_summary,
    write_results,
)

import retrofit.activations.functional as functional  # noqa: E402


@contextlib.contextmanager
def plain_formula() -> Iterator[None]:
    """Route CompetitiveReLU through the plain tensor formula (autograd records every op)."""
    fast = functional._eager_carelu_applies
    functional._eager_carelu_applies = lambda *args: False
    try:
        yield
    finally:
        functional._eager_carelu_applies = fast


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plain: bool
                  ) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with plain_formula() if plain else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, seconds=10.0, per="model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-plain", action="store_true",
                        help="leave out the carelu_plain variant")
    args = parser.parse_args()
    setup(args)

    results: list[dict[str, Any]] = []
    rows = []
    for subject in SUBJECTS:
        models = subject_models(subject, args.device)
        if not args.no_plain:
            models["carelu_plain"] = subject_models(subject, args.device, ("carelu",))["carelu"]
        x = batch(subject, args.batch, args.device)
        y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(2)
                          ).to(args.device)
        steps = {name: training_step(model, x, y, name == "carelu_plain")
                 for name, model in models.items()}
        summary = timed_summary(steps, args.device, args, rounds=30, quick_rounds=3)
        for name in steps:
            summary[name]["samples_per_s"] = args.batch / summary[name]["median_s"]
            summary[name]["throughput_ratio"] = 1.0 / summary[name]["ratio"]
        add_peak_memory(summary, steps, args.device)
        results.append({"model": subject.name, "batch": args.batch, "summary": summary})
        for name in steps:
            s = summary[name]
            rows.append([subject.name, name, s["samples_per_s"], s["throughput_ratio"],
                         s["peak_bytes"] / 2**20, s["memory_ratio"]])
        print(f"{subject.name}: " + ", ".join(
            f"{n} x{summary[n]['throughput_ratio']:.3f} speed, "
            f"x{summary[n]['memory_ratio']:.3f} mem" for n in steps), flush=True)

    columns = ["model", "activation", "samples/s", "throughput ×relu", "peak MiB",
               "peak mem ×relu"]
    notes = [
        f"batch {args.batch}; step = forward + cross-entropy + backward + AdamW.step",
        "throughput ×relu: median over interleaved rounds of ReLU step time / this step time",
        "peak: tensor memory one step allocates above the live set before it (CPU: profiler "
        "allocator events; CUDA: max_memory_allocated)",
        "carelu_plain: CompetitiveReLU without the custom autograd Function (plain formula)",
    ]
    write_results("bench_training", args, {"results": results},
                  "Training: retrofitted vs original ReLU model", columns, rows, notes)


if __name__ == "__main__":
    main()
