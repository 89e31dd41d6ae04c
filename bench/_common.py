"""What the bench scripts share: the benchmark models, retrofitting, interleaved timing, peak
memory, the calls they time (no-grad forwards, eager, under autocast or compiled; fine-tuning
steps), and writing ``bench/results/<name>.json`` plus a Markdown table.

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
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import retrofit.activations.functional as functional  # noqa: E402
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
                      rounds: int, min_seconds: float = 0.0,
                      prepare: Mapping[str, Callable[[], Any]] | None = None
                      ) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured in interleaved rounds after ``warmup``
    rounds; stops after ``rounds`` rounds or, when ``min_seconds`` is set, once that much time
    has passed and at least 5 rounds ran. ``prepare[name]``, where given, runs before each call
    of ``name`` outside its timed region (to refill a buffer the call overwrites, say)."""
    prepare = prepare or {}

    def ready(name: str) -> None:
        if name in prepare:
            prepare[name]()

    for _ in range(warmup):
        for name, call in calls.items():
            ready(name)
            call()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for index in range(rounds):
        order = list(calls) if index % 2 == 0 else list(reversed(calls))
        for name in order:
            ready(name)
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


def timed_rounds(calls: dict[str, Callable[[], Any]], device: str, args: argparse.Namespace, *,
                 rounds: int, quick_rounds: int,
                 prepare: Mapping[str, Callable[[], Any]] | None = None
                 ) -> dict[str, list[float]]:
    """:func:`interleaved_times` as the command line asks: ``--quick`` is one warm-up round and
    ``quick_rounds`` rounds, else three warm-up rounds and ``rounds`` rounds or the
    ``--seconds`` budget, whichever ends first."""
    return interleaved_times(calls, device, warmup=1 if args.quick else 3,
                             rounds=quick_rounds if args.quick else rounds,
                             min_seconds=0 if args.quick else args.seconds, prepare=prepare)


def timed_summary(calls: dict[str, Callable[[], Any]], device: str, args: argparse.Namespace, *,
                  rounds: int, quick_rounds: int) -> dict[str, dict]:
    """:func:`ratio_summary` (to ``relu``) of :func:`timed_rounds`."""
    return ratio_summary(timed_rounds(calls, device, args, rounds=rounds,
                                      quick_rounds=quick_rounds))


def timed_with_memory(calls: dict[str, Callable[[], Any]], device: str,
                      args: argparse.Namespace, *, rounds: int, quick_rounds: int
                      ) -> dict[str, dict]:
    """:func:`timed_summary` plus each variant's peak memory (:func:`add_peak_memory`)."""
    summary = timed_summary(calls, device, args, rounds=rounds, quick_rounds=quick_rounds)
    add_peak_memory(summary, calls, device)
    return summary


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


# --- what is timed ------------------------------------------------------------------------------


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; None is full precision (nothing)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype)


def eager_calls(models: dict[str, nn.Module], x: torch.Tensor, dtype: torch.dtype | None = None
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """One no-grad forward of each model on ``x`` (under :func:`autocast` to ``dtype``)."""
    def call(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast(str(x.device), dtype):
                return model(x)
        return run
    return {name: call(model) for name, model in models.items()}


def finite_outputs(models: dict[str, nn.Module], x: torch.Tensor,
                   dtype: torch.dtype | None = None) -> dict[str, bool]:
    """Whether each model's output on ``x`` is finite: a ratio of a model that overflowed
    would time inf arithmetic, not the model."""
    return {name: bool(torch.isfinite(call()).all())
            for name, call in eager_calls(models, x, dtype).items()}


def compiled_calls(models: dict[str, nn.Module], x: torch.Tensor
                   ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, float]]:
    """torch.compile each variant (fresh, static shapes) and run it once to compile; the calls
    and the seconds each first call took."""
    torch._dynamo.reset()
    calls, seconds = {}, {}
    for name, model in models.items():
        compiled = torch.compile(model, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        sync(str(x.device))
        seconds[name] = time.perf_counter() - start
        calls.update(eager_calls({name: compiled}, x))
    return calls, seconds


@contextlib.contextmanager
def plain_formula() -> Iterator[None]:
    """Route CompetitiveReLU through the plain tensor formula (autograd records every op)."""
    fast = functional._eager_carelu_applies
    functional._eager_carelu_applies = lambda *args: False
    try:
        yield
    finally:
        functional._eager_carelu_applies = fast


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plain: bool,
                  dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One fine-tuning step: forward (under :func:`autocast` to ``dtype``) + cross-entropy +
    backward + ``AdamW.step``, in train mode; ``plain`` takes :func:`plain_formula`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with plain_formula() if plain else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            with autocast(str(x.device), dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
    return step


def training_summary(subject: Subject, size: int, device: str, args: argparse.Namespace, *,
                     plain: bool = True, dtype: torch.dtype | None = None, rounds: int = 30,
                     quick_rounds: int = 3) -> dict[str, dict]:
    """Interleaved :func:`training_step` s of the ReLU original and its retrofits (and, with
    ``plain``, ``carelu_plain``: the CompetitiveReLU retrofit on the plain formula) at batch
    ``size``: :func:`timed_with_memory` plus ``samples_per_s`` and ``throughput_ratio`` (ReLU
    step time / this one's) per variant."""
    models = subject_models(subject, device)
    if plain:
        models["carelu_plain"] = subject_models(subject, device, ("carelu",))["carelu"]
    x = batch(subject, size, device)
    y = torch.randint(0, 10, (size,), generator=torch.Generator().manual_seed(2)).to(device)
    steps = {name: training_step(model, x, y, name == "carelu_plain", dtype)
             for name, model in models.items()}
    summary = timed_summary(steps, device, args, rounds=rounds, quick_rounds=quick_rounds)
    for name in steps:
        summary[name]["samples_per_s"] = size / summary[name]["median_s"]
        summary[name]["throughput_ratio"] = 1.0 / summary[name]["ratio"]
    add_peak_memory(summary, steps, device)
    return summary


# --- command line and results ------------------------------------------------------------------


def common_arguments(parser: argparse.ArgumentParser, *, seconds: float, per: str,
                     device: str = "cpu", device_help: str = "cpu or cuda") -> None:
    """The options every timing script takes; ``--quick`` and ``--seconds`` are what
    :func:`timed_rounds` reads, ``seconds`` the budget's default per ``per``."""
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (and onnxruntime threads); 2 mimics CI")
    parser.add_argument("--device", default=device, help=device_help)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--seconds", type=float, default=seconds,
                        help=f"time budget per {per} (at least 5 interleaved rounds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON + Markdown")
    parser.add_argument("--tag", default="",
                        help="suffix of the result files (bench_inference_<tag>.json)")


def require_device(args: argparse.Namespace) -> None:
    """Exit with status 2 and one line, before any work, when ``--device`` asks for CUDA and
    torch sees none."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "sees no GPU"
        print(f"{Path(sys.argv[0]).name}: --device {args.device}: no CUDA device "
              f"(torch {torch.__version__} {build})", file=sys.stderr)
        raise SystemExit(2)


def setup(args: argparse.Namespace) -> None:
    require_device(args)
    torch.set_num_threads(args.threads)


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
