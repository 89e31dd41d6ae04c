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
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SUBJECTS,
    common_arguments,
    setup,
    training_summary,
    write_results,
)


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
        summary = training_summary(subject, args.batch, args.device, args,
                                   plain=not args.no_plain)
        steps = list(summary)
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
        "targets (CPU, resnet_cnn, CompetitiveReLU): throughput ≥ 0.88x, peak memory ≤ 1.30x",
    ]
    write_results("bench_training", args, {"results": results},
                  "Training: retrofitted vs original ReLU model", columns, rows, notes)


if __name__ == "__main__":
    main()
