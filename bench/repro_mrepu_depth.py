"""MRePU paper (Kim & Kang, arXiv:2408.02697), polynomial regression with deep MLPs.

    python bench/repro_mrepu_depth.py [--depths 2 4 8 16 24] [--seeds 0 1 2] [--epochs 100]

The claim: deep RePU networks fail (their kernel recursion has no critical point, so signals
explode or vanish with depth whatever the initialisation), while MRePU, initialised at its
critical point, trains like ReLU. Here: fully connected nets of equal width and depth
(``depth`` hidden layers, each Linear -> activation), trained with the same Adam schedule on a
generated polynomial of 4 inputs plus noise, fixed train/test split. Reported: final test MSE,
also relative to the variance of the test targets (1.0 = no better than predicting the mean);
a run whose training loss becomes NaN/inf is marked diverged and left out of the mean.

Initialisation (weights N(0, C_W / fan_in), biases 0): ReLU He (C_W = 2, its critical point);
MRePU C_W = 1 = 1 / sigma'(0)^2 with sigma'(0) = c^p = 1, its K* = 0 critical point; RePU has
no critical point, it gets the same C_W = 1 as MRePU. The activations are the library's
``retrofit.activations`` modules built by ``make_activation`` (p = 2, c = 1, blend 1).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repro_common import RESULTS, Timer, finite_or_none, set_threads, write_results  # noqa: E402
from retrofit.activations import make_activation  # noqa: E402
from retrofit.config import MRePUConfig, RePUConfig  # noqa: E402

ACTIVATIONS = ("relu", "repu", "mrepu", "mrepu-small")
C_W = {"relu": 2.0, "repu": 1.0, "mrepu": 1.0, "mrepu-small": 1.0}
C_W_FIRST = {"mrepu-small": 1e-3}
"""The first layer's C_W where it differs: ``mrepu-small`` starts the kernel at ~3e-4, where
MRePU(x) ~ x and the K* = 0 analysis holds; at C_W = 1 with inputs of variance 1/3 the kernel
recursion K' = K + 18 K^2 + ... (MRePU's Taylor coefficients 1, 2, 1) blows up within layers."""
NO_FIT = 0.9
"""A run whose relative test MSE stays above this learned (almost) nothing."""


def polynomial_data(n_train: int, n_test: int, noise: float, seed: int = 0):
    """y = 1 + x1 - 2 x2^2 + x1 x3 + 0.5 x4^3 - 1.5 x1 x2 x4 + noise, x ~ U[-1, 1]^4."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n_train + n_test, 4))
    x1, x2, x3, x4 = x.T
    y = 1 + x1 - 2 * x2**2 + x1 * x3 + 0.5 * x4**3 - 1.5 * x1 * x2 * x4
    y = y + noise * rng.standard_normal(y.shape)
    x_t = torch.tensor(x, dtype=torch.float32)
    y_t = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    return (x_t[:n_train], y_t[:n_train]), (x_t[n_train:], y_t[n_train:])


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    return make_activation(RePUConfig() if name == "repu" else MRePUConfig())


def deep_mlp(name: str, depth: int, width: int, inputs: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = inputs
    for layer in range(depth):
        linear = nn.Linear(fan_in, width)
        c_w = C_W_FIRST.get(name, C_W[name]) if layer == 0 else C_W[name]
        nn.init.normal_(linear.weight, std=math.sqrt(c_w / fan_in))
        nn.init.zeros_(linear.bias)
        layers += [linear, activation(name)]
        fan_in = width
    head = nn.Linear(fan_in, 1)
    nn.init.normal_(head.weight, std=math.sqrt(1.0 / fan_in))
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


def train_one(name: str, depth: int, seed: int, data, args) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = deep_mlp(name, depth, args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    mse = nn.MSELoss()
    curve: list[float] = []
    status, diverged_at, step = "ok", None, 0
    with torch.no_grad():
        init_test = mse(model(x_test), y_test).item()
    for epoch in range(args.epochs):
        permutation = torch.randperm(len(x_train), generator=order)
        total, count = 0.0, 0
        for start in range(0, len(x_train), args.batch_size):
            index = permutation[start:start + args.batch_size]
            loss = mse(model(x_train[index]), y_train[index])
            if not torch.isfinite(loss):
                status, diverged_at = "diverged", step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(index)
            count += len(index)
        if status != "ok":
            break
        curve.append(total / count)
    with torch.no_grad():
        test = mse(model(x_test), y_test).item() if status == "ok" else float("nan")
    if status == "ok" and not math.isfinite(test):
        status = "diverged"
    var = y_test.var(unbiased=False).item()
    if status == "ok" and test / var > NO_FIT:
        status = "no fit"
    return {"activation": name, "depth": depth, "seed": seed, "status": status,
            "diverged_at_step": diverged_at, "steps": step,
            "init_test_mse": finite_or_none(init_test),
            "test_mse": finite_or_none(test), "relative_test_mse": finite_or_none(test / var),
            "train_loss_per_epoch": [finite_or_none(v) for v in curve]}


def cell(runs: list[dict]) -> str:
    finished = [r["test_mse"] for r in runs if r["status"] != "diverged"]
    diverged = sum(r["status"] == "diverged" for r in runs)
    no_fit = sum(r["status"] == "no fit" for r in runs)
    if not finished:
        return f"diverged ({diverged}/{len(runs)})"
    mean = statistics.fmean(finished)
    text = f"{mean:.2e}" + (f" ± {statistics.stdev(finished):.1e}" if len(finished) > 1 else "")
    notes = []
    if diverged:
        notes.append(f"{diverged}/{len(runs)} diverged")
    if no_fit:
        notes.append(f"{no_fit}/{len(runs)} no fit")
    return text + (f" ({', '.join(notes)})" if notes else "")


def plot(runs: list[dict], depths: list[int], var: float, path: Path, curve_depth: int) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    colors = {"relu": "tab:blue", "repu": "tab:red", "mrepu": "tab:green",
              "mrepu-small": "tab:olive"}
    for name in ACTIVATIONS:
        xs, ys, xd = [], [], []
        for depth in depths:
            cell_runs = [r for r in runs if r["activation"] == name and r["depth"] == depth]
            finished = [r["test_mse"] for r in cell_runs if r["test_mse"] is not None]
            if finished:
                xs.append(depth)
                ys.append(statistics.fmean(finished))
            if any(r["status"] == "diverged" for r in cell_runs):
                xd.append(depth)
        left.plot(xs, ys, marker="o", color=colors[name], label=name)
        if xd:
            offset = 3 * 1.6 ** ACTIVATIONS.index(name)
            left.scatter(xd, [var * offset] * len(xd), marker="x", s=60, color=colors[name],
                         label=f"{name} diverged")
        labelled = False
        for r in runs:
            if r["activation"] != name or r["depth"] != curve_depth:
                continue
            curve = [v for v in r["train_loss_per_epoch"] if v is not None]
            if curve:
                right.plot(range(1, len(curve) + 1), curve, color=colors[name], alpha=0.7,
                           label=None if labelled else name)
                labelled = True
    left.axhline(var, color="grey", linestyle="--", label="Var(y) (predict the mean)")
    left.set(xscale="log", yscale="log", xlabel="depth (hidden layers)", ylabel="test MSE",
             title="final test MSE (mean over seeds)")
    left.minorticks_off()
    left.set_xticks(depths, [str(d) for d in depths])
    left.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    right.set(yscale="log", xlabel="epoch", ylabel="train MSE",
              title=f"training loss, depth {curve_depth}, every seed\n(runs that failed at "
                    "step 0 have no curve)")
    right.legend(fontsize=8)
    figure.savefig(path, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 24])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    set_threads(args.threads)

    data = polynomial_data(args.n_train, args.n_test, args.noise)
    var = data[1][1].var(unbiased=False).item()
    runs = []
    with Timer() as timer:
        for depth in args.depths:
            for name in args.activations:
                for seed in args.seeds:
                    with Timer() as one:
                        run = train_one(name, depth, seed, data, args)
                    run["seconds"] = round(one.seconds, 2)
                    runs.append(run)
                    print(f"depth {depth:>2} {name:<5} seed {seed}: {run['status']:<8} "
                          f"test MSE {run['test_mse']}  ({one.seconds:.1f} s)", flush=True)

    header = ["depth"] + [f"{name} test MSE" for name in args.activations]
    rows = [[str(depth)] + [cell([r for r in runs if r["activation"] == name
                                  and r["depth"] == depth]) for name in args.activations]
            for depth in args.depths]
    png = args.out / "repro_mrepu_depth.png"
    args.out.mkdir(parents=True, exist_ok=True)
    curve_depth = 8 if 8 in args.depths else args.depths[-1]
    plot(runs, args.depths, var, png, curve_depth)

    def trains(name: str) -> list[int]:
        return [d for d in args.depths if all(
            r["status"] == "ok" for r in runs if r["activation"] == name and r["depth"] == d)]

    reading = (
        f"Mean ± std of the final test MSE over seeds {args.seeds} (Var(y_test) = {var:.3f}; "
        f"diverged = loss NaN/inf, no fit = test MSE above {NO_FIT} Var(y)). Depths where every "
        + "seed trained: " + "; ".join(f"{name} {trains(name) or 'none'}"
                                        for name in args.activations) + ". "
        "Reading of the default run: RePU fails with depth as the paper says. MRePU at the C_W = 1 init overflows in the "
        "forward pass at step 0 from depth 4 on, so the paper's 'deep MRePU stacks train' is "
        "*not* reproduced with O(1) inputs: its Taylor series x + 2x^2 + x^3 makes the kernel "
        "grow (K' ~ K + 18 K^2), which the K* = 0 criticality only tames for small K. Started "
        "small (`mrepu-small`) it fits the polynomial better than ReLU up to depth 8, and still "
        "blows up by depth 16-24."
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({"target": "1 + x1 - 2 x2^2 + x1 x3 + 0.5 x4^3 - 1.5 x1 x2 x4 + N(0, noise^2)",
                     "inputs": "x ~ U[-1, 1]^4, data seed 0", "test_target_variance": var,
                     "init_C_W": C_W, "optimizer": "Adam, constant lr, no clipping",
                     "no_fit_threshold_relative_mse": NO_FIT})
    write_results("mrepu_depth", title="MRePU vs RePU vs ReLU: deep MLPs on polynomial regression",
                  settings=settings, runs=runs, header=header, rows=rows, reading=reading,
                  seconds=timer.seconds, extra_md=f"![test MSE by depth]({png.name})",
                  out_dir=args.out)


if __name__ == "__main__":
    main()
