r"""MRePU paper (Kim & Kang, arXiv:2408.02697): a phase-diagram scan of deep MLPs over (C_W, C_b).

    python bench/repro_mrepu_depth.py [--depths 4 8 16 32] [--c-w ...] [--c-b ...] [--seeds 0]

The claim: deep RePU networks fail (their kernel recursion has no critical point, so signals
explode or vanish with depth whatever the initialisation), while MRePU, initialised at its
critical point, trains deep like ReLU; the paper backs its initialisation with a phase diagram
over (C_W, C_b). Here the same diagram is measured. For ReLU, RePU and MRePU (the library's
``retrofit.activations.functional.repu``/``mrepu``, p = 2, c = 1), every cell (C_W, C_b, depth) is a
fully connected net of ``depth`` hidden layers (Linear -> activation) plus a linear head, with
*every* Linear drawn by ``retrofit.training.initialisation.initialise_weights``: weights
N(0, C_W / fan_in), biases N(0, C_b). Each cell trains with the same budget (Adam, constant lr)
on a generated polynomial of 4 inputs plus noise, fixed train/test split. Per cell:

* the signal at init: K_last / K_first, the mean squared pre-activation of the last hidden layer
  over that of the first, on the test inputs, in float64 (> 1 explodes, < 1 vanishes; null when
  it overflows float64);
* the outcome: *diverged* (training loss NaN/inf), else the test MSE relative to Var(y_test)
  (1.0 = no better than predicting the mean): *trained* at most ``TRAINED``, *no fit* above
  ``NO_FIT``, *poor* between.

The "shipped init" rows train ``initialise_from_scratch(model, name)`` over several seeds, so
what the library ships is exactly what is measured, and the reading names each activation's
best cell (lowest share of Var(y) left unexplained over all depths and seeds) next to it.

Budget of the default run (about 3.5 minutes on one CPU thread; a second thread only slows
these small layers down): width 32, 512 training points, 50 epochs of batch 128 (200 steps),
one seed per grid cell, three for the shipped rows. The shipped MRePU and RePU values come from
the five-seed run of their region (about 3.5 minutes too):

    python bench/repro_mrepu_depth.py --tag seeds --activations repu mrepu --depths 4 8 12 \
        --c-w 0.0625 0.09 0.125 0.18 0.25 0.35 0.5 --c-b 0 0.001 0.01 0.03 0.1 0.5 \
        --seeds 0 1 2 3 4 --shipped-seeds 0

``--width 64 --epochs 100 --n-train 1024 --seeds 0 1 2`` is the older, larger setting.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import markdown_table  # noqa: E402
from bench.repro_common import (  # noqa: E402
    RESULTS,
    Timer,
    finite_or_none,
    parse_arguments,
    write_results,
)
from retrofit.activations.functional import mrepu, repu  # noqa: E402
from retrofit.training.initialisation import (  # noqa: E402
    SCRATCH_INIT,
    initialise_from_scratch,
    initialise_weights,
)

ACTIVATIONS = ("relu", "repu", "mrepu")
C_W_GRID = (0.0625, 0.09, 0.125, 0.18, 0.25, 0.3, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)
"""Log-spaced 1/16..4 (factors of about sqrt 2), with an extra point at 0.3: between 0.25 and
0.35 MRePU's kernel at init turns from shrinking to exploding for these inputs, and below 0.25
is where it trains at all (the grid reaches lower than ReLU needs for that reason)."""
C_B_GRID = (0.0, 1e-3, 1e-2, 0.1, 0.5)
TRAINED = 0.1
"""A run whose relative test MSE is at most this learned 90% of the target's variance."""
NO_FIT = 0.9
"""A run whose relative test MSE stays above this learned (almost) nothing."""
STATUSES = ("trained", "poor", "no fit", "diverged")


class Elementwise(nn.Module):
    """A stateless activation from a function (MRePU/RePU at their defaults p = 2, c = 1)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    return Elementwise({"repu": repu, "mrepu": mrepu}[name])


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


def deep_mlp(name: str, depth: int, width: int, inputs: int = 4) -> nn.Sequential:
    """``depth`` x (Linear -> activation) and a Linear head; the caller initialises it."""
    layers: list[nn.Module] = []
    for layer in range(depth):
        layers += [nn.Linear(inputs if layer == 0 else width, width), activation(name)]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def kernel_ratio(model: nn.Sequential, x: torch.Tensor) -> float | None:
    """K_last / K_first at init (mean squared pre-activation of the last hidden Linear over the
    first's), in float64 so that a signal that overflows float32 still gets a number."""
    kernels = []
    h = x.double()
    with torch.no_grad():
        for module in list(copy.deepcopy(model).double())[:-1]:
            h = module(h)
            if isinstance(module, nn.Linear):
                kernels.append(h.square().mean().item())
    ratio = kernels[-1] / kernels[0] if kernels[0] > 0 else math.nan
    return finite_or_none(ratio)


def train(model: nn.Module, data, seed: int, args) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    mse = nn.MSELoss()
    step = 0
    for _ in range(args.epochs):
        permutation = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(x_train), args.batch_size):
            index = permutation[start:start + args.batch_size]
            loss = mse(model(x_train[index]), y_train[index])
            if not torch.isfinite(loss):
                return {"status": "diverged", "diverged_at_step": step, "steps": step,
                        "relative_test_mse": None}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        relative = mse(model(x_test), y_test).item() / y_test.var(unbiased=False).item()
    if not math.isfinite(relative):
        status = "diverged"
    else:
        status = "trained" if relative <= TRAINED else "no fit" if relative > NO_FIT else "poor"
    return {"status": status, "diverged_at_step": None, "steps": step,
            "relative_test_mse": finite_or_none(relative)}


def run_cell(name: str, depth: int, seed: int, data, args, *, c_w: float | None = None,
             c_b: float | None = None) -> dict:
    """One trained net; the shipped init when ``c_w``/``c_b`` are not given."""
    torch.manual_seed(seed)
    model = deep_mlp(name, depth, args.width)
    generator = torch.Generator().manual_seed(seed)
    if c_w is None:
        shipped = initialise_from_scratch(model, name, generator=generator)
        c_w, c_b, grid = shipped.c_w, shipped.c_b, "shipped"
    else:
        initialise_weights(model, c_w, c_b, generator=generator)
        grid = "scan"
    with Timer() as timer:
        ratio = kernel_ratio(model, data[1][0])
        outcome = train(model, data, seed, args)
    return {"activation": name, "rows": grid, "depth": depth, "c_w": c_w, "c_b": c_b,
            "seed": seed, "kernel_ratio_at_init": ratio, **outcome,
            "seconds": round(timer.seconds, 3)}


def best_cell_text(name: str, scan: list[dict]) -> str:
    best = best_cell([r for r in scan if r["activation"] == name])
    if best is None:
        return f"{name} none"
    c_w, c_b, score = best
    text = f"{name} (C_W, C_b) = ({c_w:g}, {c_b:g}), {score:.2f} unexplained"
    if name in SCRATCH_INIT:
        same = (SCRATCH_INIT[name].c_w, SCRATCH_INIT[name].c_b) == (c_w, c_b)
        text += " (the shipped init)" if same else (
            f" (shipped: ({SCRATCH_INIT[name].c_w:g}, {SCRATCH_INIT[name].c_b:g}))")
    return text


def signal_text(ratio: float | None) -> str:
    return "overflow" if ratio is None else f"{ratio:.0e}"


def deepest_trained(runs: list[dict], depths: list[int]) -> str:
    """The depths at which every seed of a cell trained, e.g. ``4 8 16``; '–' for none."""
    ok = [d for d in depths if (cell := [r for r in runs if r["depth"] == d])
          and all(r["status"] == "trained" for r in cell)]
    return " ".join(map(str, ok)) or "–"


def unexplained(run: dict) -> float:
    """The fraction of Var(y) a run leaves unexplained, capped at 1: a run that diverged or fits
    worse than the mean counts as having learned nothing."""
    value = run["relative_test_mse"]
    return 1.0 if run["status"] == "diverged" or value is None else min(value, 1.0)


def best_cell(runs: list[dict]) -> tuple[float, float, float] | None:
    """(C_W, C_b, score) of the cell with the lowest mean :func:`unexplained` over all its depths
    and seeds: the init that trains best across depths. The shipped init is checked against it."""
    cells = sorted({(r["c_w"], r["c_b"]) for r in runs})
    scores = [(statistics.fmean(unexplained(r) for r in runs if (r["c_w"], r["c_b"]) == cell),
               *cell) for cell in cells]
    if not scores:
        return None
    score, c_w, c_b = min(scores)
    return c_w, c_b, score


def plot(scan: list[dict], args, path: Path) -> None:
    """Rows: activations; columns: depths; each panel C_W (x) by C_b (y). Colour: log10 of the
    median relative test MSE over a cell's seeds (hatched grey: most seeds diverged); text:
    median log10 K_last/K_first at init; red outline: the shipped init."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(3.6 * len(args.depths) + 1.2, 2.6 * len(args.activations) + 0.8),
                    layout="constrained")
    axes = figure.subplots(len(args.activations), len(args.depths), squeeze=False)
    norm = Normalize(vmin=-3.0, vmax=0.0)
    image = None
    for i, name in enumerate(args.activations):
        shipped = (SCRATCH_INIT[name].c_w, SCRATCH_INIT[name].c_b)
        for j, depth in enumerate(args.depths):
            ax = axes[i][j]
            grid = np.full((len(args.c_b), len(args.c_w)), np.nan)
            for (y, c_b), (x, c_w) in itertools.product(enumerate(args.c_b), enumerate(args.c_w)):
                cell = [r for r in scan if (r["activation"], r["depth"], r["c_w"], r["c_b"])
                        == (name, depth, c_w, c_b)]
                mse = _middle(math.inf if r["status"] == "diverged"
                              or r["relative_test_mse"] is None
                              else r["relative_test_mse"] for r in cell)
                ratio = _middle(_log10_or_inf(r["kernel_ratio_at_init"]) for r in cell)
                if math.isinf(mse):
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor="0.8",
                                           hatch="xx", edgecolor="0.5", linewidth=0))
                else:
                    grid[y, x] = math.log10(max(mse, 1e-12))
                ax.text(x, y, "∞" if math.isinf(ratio) else f"{ratio:+.0f}", ha="center",
                        va="center", fontsize=5.5,
                        color="black" if math.isinf(mse) or mse <= TRAINED else "white")
                if (c_w, c_b) == shipped:
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False,
                                           edgecolor="red", linewidth=1.5))
            image = ax.imshow(grid, origin="lower", cmap="viridis_r", norm=norm, aspect="auto")
            ax.set_xticks(range(len(args.c_w)), [f"{v:g}" for v in args.c_w], fontsize=6,
                          rotation=90)
            ax.set_yticks(range(len(args.c_b)), [f"{v:g}" for v in args.c_b], fontsize=6)
            ax.set_title(f"{name}, depth {depth}", fontsize=8)
            if i == len(args.activations) - 1:
                ax.set_xlabel("C_W", fontsize=7)
            if j == 0:
                ax.set_ylabel("C_b", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.6, label="log10 test MSE / Var(y)  (0 = no fit)")
    figure.suptitle("Colour: relative test MSE after training (hatched = diverged). Text: log10 "
                    "K_last/K_first at init (∞ = overflows float64). Red: the shipped init.",
                    fontsize=8)
    figure.savefig(path, format="png", dpi=130)


def _middle(values) -> float:
    """The median, taking the upper middle value of an even count (no mean of inf and -inf)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _log10_or_inf(ratio: float | None) -> float:
    """log10 of a kernel ratio; an overflow (None) is +inf and a ratio of 0 is -inf."""
    if ratio is None:
        return math.inf
    return math.log10(ratio) if ratio > 0 else -math.inf


READING_OF_DEFAULT_RUN = (
    "Reading of the checked-in runs (this default run and the five-seed run of the MRePU/RePU "
    "region, `repro_mrepu_depth_seeds.md`). **ReLU** trains at every depth up to 32 for C_W 1 "
    "to 2 at every C_b (0.71 to 2 at C_b <= 0.01), He (its shipped init) with all three seeds; "
    "below that its signal vanishes with depth (K_last/K_first down to 1e-48 at depth 32) and "
    "depth 32 stops fitting, from C_W 2.83 it explodes. **RePU** has no critical point, as the "
    "paper says: at C_b = 0 its signal vanishes below C_W = 1 and explodes above, and it trains "
    "at depth 4 only. A large bias (C_b 0.1 to 0.5) holds the signal at a fixed point, and "
    "then RePU trains at depth 8 ((0.35, 0.5): 4 of 5 seeds), never at 16 or 32. **MRePU does "
    "not train deep here, at any (C_W, C_b).** At its nominal critical point C_W = 1, C_b = 0 "
    "the signal has grown 4e15-fold by depth 4 and overflows float64 deeper, so training "
    "diverges at step 0 at every depth. It trains at depth 4 for C_W <= 0.25 and C_b <= 0.1 "
    "(all five seeds for C_W <= 0.18; between 0.25 and 0.3 the signal at init turns from "
    "shrinking to exploding), but at depth 8 no cell trains with all five seeds (the best, "
    "(0.09, 0), fits poorly with all five: median 0.29 of Var(y) left), and from depth 12 on "
    "almost every run diverges during training: the signal, which has to grow for the net to "
    "fit, passes the unstable fixed point of MRePU's kernel map K -> C_b + C_W (K + 18 K^2 + "
    "...), beyond which the x^2 and x^3 terms blow it up within a step. So the paper's claim "
    "that MRePU, unlike RePU, trains deep stacks like ReLU is *not* reproduced in this "
    "setting: MRePU reached no deeper than RePU with a large bias, and both stay far short of "
    "ReLU. The shipped MRePU (0.09, 0) and RePU (0.25, 0.5) inits are the five-seed run's best "
    "cells, the least-bad starts found, not critical points. Limits: one small budget (200 "
    "Adam steps, width 32), inputs in [-1, 1] (larger inputs move MRePU's edge to smaller "
    "C_W), one seed per cell in the main table; on the MRePU region lr 5e-4 and 1.5e-4 "
    "(width 32) and width 128 (lr 2e-3) also diverged from depth 16 on (spot checks with "
    "`--lr`/`--width`, not recorded here)."
)
"""What the checked-in results show; written from them, so it describes those runs only."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--c-w", type=float, nargs="+", default=list(C_W_GRID))
    parser.add_argument("--c-b", type=float, nargs="+", default=list(C_B_GRID))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per grid cell")
    parser.add_argument("--shipped-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="results go to repro_mrepu_depth_TAG.*")
    args = parse_arguments(parser)

    data = polynomial_data(args.n_train, args.n_test, args.noise)
    var = data[1][1].var(unbiased=False).item()
    scan: list[dict] = []
    shipped: list[dict] = []
    start = time.perf_counter()
    with Timer() as timer:
        for name in args.activations:
            for depth in args.depths:
                for c_b in args.c_b:
                    for c_w in args.c_w:
                        scan += [run_cell(name, depth, seed, data, args, c_w=c_w, c_b=c_b)
                                 for seed in args.seeds]
                cells = [r for r in scan if r["activation"] == name and r["depth"] == depth]
                counts = {s: sum(r["status"] == s for r in cells) for s in STATUSES}
                print(f"{name:<5} depth {depth:>2}: {counts} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            shipped += [run_cell(name, depth, seed, data, args)
                        for depth in args.depths for seed in args.shipped_seeds]

    header = ["activation", "C_b"] + [f"C_W {c_w:g}" for c_w in args.c_w]
    rows = [[name, f"{c_b:g}"] + [deepest_trained(
                [r for r in scan if r["activation"] == name and r["c_w"] == c_w
                 and r["c_b"] == c_b], args.depths) for c_w in args.c_w]
            for name in args.activations for c_b in args.c_b]
    shipped_table = markdown_table(
        ["shipped init", "depth", "test MSE / Var(y) per seed", "outcomes",
         "K_last/K_first at init per seed"],
        [[f"{name} C_W={SCRATCH_INIT[name].c_w:g}, C_b={SCRATCH_INIT[name].c_b:g}", str(depth),
          ", ".join(_relative_text(r) for r in cell), _outcomes(cell),
          ", ".join(signal_text(r["kernel_ratio_at_init"]) for r in cell)]
         for name in args.activations for depth in args.depths
         if (cell := [r for r in shipped if r["activation"] == name and r["depth"] == depth])])

    result_name = "mrepu_depth" + (f"_{args.tag}" if args.tag else "")
    png = args.out / f"repro_{result_name}.png"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(scan, args, png)
    reading = (
        f"Main table: the depths at which a cell (C_W, C_b) trained (test MSE at most {TRAINED} "
        f"Var(y), seeds {args.seeds}); '–' = at none of {args.depths}. Var(y_test) = {var:.3f}; "
        f"every cell trained {args.epochs} epochs of {args.n_train} points (batch "
        f"{args.batch_size}, Adam lr {args.lr}, width {args.width}). Best cell per activation "
        "(lowest fraction of Var(y) left unexplained, capped at 1 and 1 for a diverged run, "
        f"averaged over depths {args.depths} and seeds {args.seeds}): "
        + "; ".join(best_cell_text(a, scan) for a in args.activations) + ". "
        + READING_OF_DEFAULT_RUN)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({"target": "1 + x1 - 2 x2^2 + x1 x3 + 0.5 x4^3 - 1.5 x1 x2 x4 + N(0, noise^2)",
                     "inputs": "x ~ U[-1, 1]^4 (E[x^2] = 1/3), data seed 0",
                     "test_target_variance": var, "optimizer": "Adam, constant lr, no clipping",
                     "init": "every Linear (head included): W ~ N(0, C_W/fan_in), b ~ N(0, C_b)",
                     "shipped_init": {n: vars(SCRATCH_INIT[n]) for n in args.activations},
                     "trained_threshold_relative_mse": TRAINED,
                     "no_fit_threshold_relative_mse": NO_FIT})
    extra = "\n".join([
        "Shipped initialisation (`retrofit.training.initialisation.initialise_from_scratch`), seeds "
        f"{args.shipped_seeds}; K_last/K_first per seed:", "", shipped_table, "",
        f"![phase diagram]({png.name})"])
    write_results(result_name, title="MRePU vs RePU vs ReLU: phase diagram of deep MLPs over "
                  "(C_W, C_b) on polynomial regression", settings=settings,
                  runs=scan + shipped, header=header, rows=rows, reading=reading,
                  seconds=timer.seconds, extra_md=extra, out_dir=args.out)


def _relative_text(run: dict) -> str:
    value = run["relative_test_mse"]
    if run["status"] == "diverged" or value is None:
        return "diverged"
    return f"{value:.3f}" if value < 10 else f"{value:.0e}"


def _outcomes(cell: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in cell) for s in STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


if __name__ == "__main__":
    main()
