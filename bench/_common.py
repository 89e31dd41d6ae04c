"""What the bench scripts share: the benchmark models, retrofitting, interleaved timing, peak
memory, and writing ``bench/results/<name>.json`` plus a Markdown table.

Timing: the original ReLU model and its retrofits run *interleaved* (A, B, C, A, B, C, ...) after a
warm-up, so slow drifts of a shared machine (other jobs, thermal, turbo) hit every variant alike;
a ratio is the median of the per-round ratios to the original, and the absolute numbers are
medians too.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the measured call minus what was
allocated before it. On CPU, PyTorch has no allocation counter, so the profiler's memory events
(``profile_memory=True``: every allocation and free of the CPU allocator) are replayed in order and
the highest running total above the starting point is taken: the peak of tensor memory the call
allocated, which is what an activation can change (weights and the process itself are outside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrofit.config import CompetitiveReLUConfig, MRePUConfig  # noqa: E402
from retrofit.torch_path.rewrite import retrofit_torch_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ACTIVATIONS = {"carelu": CompetitiveReLUConfig(), "mrepu": MRePUConfig()}


# --- models ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus the (projected) input, then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """A CIFAR-style ResNet for 3x32x32 inputs: 8 basic blocks in three stages (16/32/64
    channels), 17 ReLU sites."""

    def __init__(self, width: int = 16, blocks: Sequence[int] = (3, 3, 2), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for index in range(count):
                layers.append(BasicBlock(cin, cout, 2 if stage and not index else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    """784 -> 4 x 512 -> 10, ReLU spelled functionally."""

    def __init__(self, inputs: int = 784, hidden: int = 512, depth: int = 4, classes: int = 10):
        super().__init__()
        sizes = [inputs] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = nn.functional.relu(layer(x))
        return self.out(x)


class Transformer(nn.Module):
    """``nn.TransformerEncoder`` (4 layers, d=128, 4 heads, ff=512, relu) on 64-token
    sequences of 128 features, mean-pooled into a linear head."""

    def __init__(self, d: int = 128, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="relu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


@dataclass(frozen=True)
class Subject:
    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # one sample, without the batch axis


SUBJECTS = (
    Subject("resnet_cnn", ResNetCNN, (3, 32, 32)),
    Subject("mlp", MLP, (784,)),
    Subject("transformer", Transformer, (64, 128)),
)


def subject_models(subject: Subject, device: str, activations: Sequence[str] = ("carelu", "mrepu")
                   ) -> dict[str, nn.Module]:
    """The original model (``relu``, BatchNorm statistics made non-trivial) and one retrofit per
    activation, each a separate copy, in eval mode on ``device``."""
    torch.manual_seed(0)
    original = subject.build()
    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):  # trained-looking statistics; a small
                module.running_mean.normal_(0, 0.1)  # gain keeps MRePU (cubic growth) finite
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.1, 0.3)
    original.eval()
    models = {"relu": original}
    for name in activations:
        models[name] = retrofit_torch_model(original, ACTIVATIONS[name]).model.eval()
    return {name: model.to(device) for name, model in models.items()}


def batch(subject: Subject, size: int, device: str) -> torch.Tensor:
    return torch.randn((size, *subject.sample_shape), generator=torch.Generator().manual_seed(1)
                       ).to(device)


# --- measuring ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(calls: dict[str, Callable[[], Any]], device: str, *, warmup: int,
                      rounds: int, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured in interleaved rounds after ``warmup``
    rounds; stops after ``rounds`` rounds or, when ``min_seconds`` is set, once that much time
    has passed and at least 5 rounds ran."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for index in range(rounds):
        order = list(calls) if index % 2 == 0 else list(reversed(calls))
        for name in order:
            sync(device)
            begin = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - begin)
        if min_seconds and index >= 4 and time.perf_counter() - start > min_seconds:
            break
    return times


def ratio_summary(times: dict[str, list[float]], reference: str = "relu") -> dict[str, dict]:
    """Per variant: median seconds, and the median over rounds of its time / the reference's."""
    out = {}
    for name, values in times.items():
        ratios = [v / r for v, r in zip(values, times[reference])]
        out[name] = {"median_s": statistics.median(values), "ratio": statistics.median(ratios),
                     "rounds": len(values)}
    return out


def timed_summary(calls: dict[str, Callable[[], Any]], device: str, args: argparse.Namespace, *,
                  rounds: int, quick_rounds: int) -> dict[str, dict]:
    """:func:`ratio_summary` of the interleaved times, as the command line asks: ``--quick`` is
    one warm-up round and ``quick_rounds`` rounds, else three warm-up rounds and ``rounds``
    rounds or the ``--seconds`` budget, whichever ends first."""
    times = interleaved_times(calls, device, warmup=1 if args.quick else 3,
                              rounds=quick_rounds if args.quick else rounds,
                              min_seconds=0 if args.quick else args.seconds)
    return ratio_summary(times)


def add_peak_memory(summary: dict[str, dict], calls: dict[str, Callable[[], Any]],
                    device: str, reference: str = "relu") -> None:
    """Each variant's ``peak_bytes`` (:func:`peak_memory_bytes` of its call, in the order of
    ``calls``) and ``memory_ratio`` to the reference's (None when the reference allocated
    nothing), into ``summary``."""
    for name, call in calls.items():
        summary[name]["peak_bytes"] = peak_memory_bytes(call, device)
    base = summary[reference]["peak_bytes"]
    for name in calls:
        summary[name]["memory_ratio"] = summary[name]["peak_bytes"] / base if base else None


def peak_memory_bytes(call: Callable[[], Any], device: str) -> int:
    """Peak bytes of tensor memory allocated during ``call()`` above what was allocated before
    it (see the module docstring for the CPU method)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # The raw allocator events (FunctionEvent lists fold most of them into their ops).
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


# --- command line and results ------------------------------------------------------------------


def common_arguments(parser: argparse.ArgumentParser, *, seconds: float, per: str) -> None:
    """The options every timing script takes; ``--quick`` and ``--seconds`` are what
    :func:`timed_summary` reads, ``seconds`` the budget's default per ``per``."""
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (and onnxruntime threads); 2 mimics CI")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--seconds", type=float, default=seconds,
                        help=f"time budget per {per} (at least 5 interleaved rounds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON + Markdown")
    parser.add_argument("--tag", default="",
                        help="suffix of the result files (bench_inference_<tag>.json)")


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "load_average_at_start": os.getloadavg(),
        "quick": bool(args.quick),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, args: argparse.Namespace, payload: dict[str, Any], title: str,
                  columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
                  ) -> None:
    """Write ``<out>/<name>.json`` (environment + payload) and ``<out>/<name>.md``; print the
    table."""
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{name}_{args.tag}" if getattr(args, "tag", "") else name
    document = {"benchmark": name, "environment": environment(args), **payload}
    (args.out / f"{name}.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    env = document["environment"]
    load = env["load_average_at_start"][0]
    header = (f"# {title}\n\ntorch {env['torch']}, device {env['device']}, "
              f"{env['threads']} threads, load average at start {load:.2f}"
              f"{' (quick run)' if args.quick else ''}, {env['date']}\n")
    text = header + "\n" + markdown_table(columns, rows) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (args.out / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / (name + '.json')} and {name}.md")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
