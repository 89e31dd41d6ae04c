"""The retrofit itself: pretrained sample ReLU models -> CompetitiveReLU / MRePU, accuracy after
equal fine-tuning budgets, against a ReLU control fine-tuned with the same budget and seed.

    python bench/repro_retrofit_budget.py [--models cnn mlp] [--budgets 1 3 10] [--seeds 0]

Every row is one call of the product's own job, ``retrofit.pipeline.job.retrofit_file`` with a
``RetrofitRequest`` (``control=True``), i.e. what ``cadrelu retrofit MODEL --data val --finetune
train --epochs N --control`` computes: accuracy before, after the swap, after fine-tuning, the
control, and the paired bootstrap 95% CI of (fine-tuned - control). Fine-tuning settings are the
CLI's defaults (AdamW, lr 1e-4, activation lr 1e-2, weight decay 1e-4, warm-up 10%, clip 1.0,
batch 64). Variants: CompetitiveReLU (energy, identity init); MRePU with the calibrated swap
(gains fitted per site on the training data, the default) fine-tuned as MRePU from the first
step (the default) or through a blend ramp from ReLU over half the steps (``--blend-ramp
0.5``); and the plain swap (``--no-calibrate``, a = b = 1) with the same two schedules, as the
product did before the calibrated swap. A run whose loss turns NaN/inf raises
``TrainingDiverged`` in the job: it is recorded as diverged, and its before / after-swap scores
come from the same job without fine-tuning. A swap whose outputs on the sample inputs hold
NaN/inf is refused by the job (``ParityError``, exit code 4) and recorded as refused.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
import tempfile
from dataclasses import replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repro_common import (  # noqa: E402
    ROOT,
    Timer,
    digits_arguments,
    finite_or_none,
    markdown_table,
    parse_arguments,
    write_results,
)
from retrofit.config import CompetitiveReLUConfig, MRePUConfig  # noqa: E402
from retrofit.errors import ParityError  # noqa: E402
from retrofit.pipeline.job import retrofit_file  # noqa: E402
from retrofit.pipeline.request import DataOptions, RetrofitRequest  # noqa: E402
from retrofit.training.config import FinetuneConfig  # noqa: E402
from retrofit.training.results import TrainingDiverged  # noqa: E402

MODELS = {"cnn": "samples/models/digits_cnn.pt2", "mlp": "samples/models/digits_mlp.pt2"}
VARIANTS = {
    # name: (activation config, blend ramp fraction, label)
    "carelu": (CompetitiveReLUConfig(), 0.0, "CompetitiveReLU (energy)"),
    "mrepu": (MRePUConfig(), 0.0, "MRePU calibrated"),
    "mrepu-blend": (MRePUConfig(), 0.5, "MRePU calibrated, blend ramp 0.5"),
    "mrepu-plain": (MRePUConfig(calibrate=False), 0.0, "MRePU plain swap"),
    "mrepu-plain-blend": (MRePUConfig(calibrate=False), 0.5, "MRePU plain swap, blend ramp 0.5"),
}


def delta_dict(delta) -> dict | None:
    if delta is None:
        return None
    return {"delta": delta.delta, "ci_low": delta.ci_low, "ci_high": delta.ci_high,
            "gained": delta.gained, "lost": delta.lost, "mcnemar_p": delta.mcnemar_p,
            "n": delta.n}


def run_one(model: str, variant: str, budget: int, seed: int, args, scratch: Path) -> dict:
    config, ramp, _ = VARIANTS[variant]
    data = DataOptions(val=args.val, train=args.train, batch_size=64)
    finetune = FinetuneConfig(
        epochs=budget, batch_size=64, optimizer="adamw", lr=args.lr, activation_lr=1e-2,
        weight_decay=1e-4, warmup_fraction=0.1, grad_clip=1.0, seed=seed,
        blend_ramp_fraction=ramp, device="cpu")
    request = RetrofitRequest(
        model=ROOT / MODELS[model], config=config, output=scratch / f"{model}-{variant}.pt2",
        force=True, seed=seed, device="cpu", data=data, finetune=finetune, control=True)
    record = {"model": MODELS[model], "variant": variant, "budget_epochs": budget, "seed": seed,
              "status": "ok", "note": None}
    try:
        report = retrofit_file(request)
    except ParityError as refused:  # the swap computes NaN/inf: exit 4, nothing to score
        record.update({"status": "refused", "note": str(refused), "before": None,
                       "after_swap": None, "after_finetune": None, "control": None,
                       "deltas": {}, "notes": []})
        return record
    except TrainingDiverged as diverged:
        record["status"], record["note"] = "diverged", str(diverged)
        history = diverged.result.history
        record["diverged_after_epochs"] = len(history)
        report = retrofit_file(replace(request, data=replace(data, train=None), finetune=None,
                                       control=False))
    stages = {stage.name: stage.result.top1 for stage in report.stages}
    record.update({
        "before": stages.get("before"), "after_swap": stages.get("after swap"),
        "after_finetune": stages.get("after fine-tune"),
        "control": report.control.result.top1 if report.control else None,
        "deltas": {name: delta_dict(d) for name, d in report.deltas.items()},
        "parity_max_abs_diff": finite_or_none(report.parity.max_abs_diff) if report.parity else None,
        "notes": list(report.notes),
    })
    if report.finetune is not None:
        record["finetune_history"] = [
            {"epoch": r.epoch, "train_loss": finite_or_none(r.train_loss), "val_top1": r.val_top1,
             "blend": r.blend} for r in report.finetune.history]
        record["best_epoch"] = report.finetune.best_epoch
    return record


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def row(record: dict, controls: dict) -> list[str]:
    _, _, label = VARIANTS[record["variant"]]
    control = record["control"]
    if control is None:
        control = controls.get((record["model"], record["budget_epochs"], record["seed"]))
    vs = record["deltas"].get("vs_control")
    if record["status"] == "refused":
        after, versus = "refused: NaN/inf after the swap (exit 4)", "—"
    elif record["status"] == "diverged":
        where = re.search(r"epoch (\d+), step (\d+)", record["note"] or "")
        after = "diverged" + (f" (NaN/inf loss at epoch {where[1]}, step {where[2]})"
                              if where else "")
        versus = "—"
    else:
        after = pct(record["after_finetune"])
        versus = (f"{vs['delta']:+.2f} [{vs['ci_low']:+.2f}, {vs['ci_high']:+.2f}]"
                  if vs else "—")
    return [Path(record["model"]).stem, label, str(record["budget_epochs"]), str(record["seed"]),
            pct(record["before"]), pct(record["after_swap"]), after, pct(control), versus]


def summary_table(records: list[dict], controls: dict) -> str:
    """Mean over seeds of (fine-tuned - control) per model, variant and budget."""
    lines = ["Mean over seeds (pp, fine-tuned minus control; diverged or refused runs counted "
             "apart):", "",
             markdown_table(["model", "activation", "epochs", "seeds", "mean Δ vs control",
                             "diverged or refused"], [])]
    keys = sorted({(r["model"], r["variant"], r["budget_epochs"]) for r in records},
                  key=lambda k: (k[0], list(VARIANTS).index(k[1]), k[2]))
    for model, variant, budget in keys:
        mine = [r for r in records if (r["model"], r["variant"], r["budget_epochs"])
                == (model, variant, budget)]
        deltas = [r["deltas"]["vs_control"]["delta"] for r in mine
                  if r["status"] == "ok" and r["deltas"].get("vs_control")]
        diverged = sum(r["status"] != "ok" for r in mine)
        mean = f"{sum(deltas) / len(deltas):+.2f}" if deltas else "—"
        lines.append(f"| {Path(model).stem} | {VARIANTS[variant][2]} | {budget} | {len(mine)} | "
                     f"{mean} | {diverged}/{len(mine)} |")
    return "\n".join(lines)


def plot(records: list[dict], controls: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in records})
    budgets = sorted({r["budget_epochs"] for r in records})
    figure = Figure(figsize=(5.5 * len(models), 3.8), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    width = 0.8 / (len(VARIANTS) + 1)
    for axis, model in zip(axes, models):
        for b, budget in enumerate(budgets):
            mine = [r for r in records if r["model"] == model and r["budget_epochs"] == budget
                    and r["seed"] == records[0]["seed"]]
            control = controls.get((model, budget, records[0]["seed"]))
            bars = [("ReLU control", control, "ok")] + [
                (VARIANTS[r["variant"]][2], r["after_finetune"], r["status"]) for r in mine]
            for k, (label, value, status) in enumerate(bars):
                x = b + (k - len(bars) / 2 + 0.5) * width
                axis.bar(x, 0 if value is None else value, width, color=f"C{k}",
                         label=label if b == 0 else None)
                if value is None:
                    axis.text(x, 81, status, rotation=90, ha="center", va="bottom",
                              fontsize=7, color=f"C{k}")
        axis.set_xticks(range(len(budgets)), [f"{b} epoch(s)" for b in budgets])
        axis.set(ylim=(80, 100), ylabel="val top-1 (%) after fine-tune",
                 title=f"{Path(model).stem} (seed {records[0]['seed']})")
        axis.legend(fontsize=7, loc="lower right")
    figure.savefig(path, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=1e-4)
    digits_arguments(parser)
    args = parse_arguments(parser)
    # Deep-copying an ExportedProgram module (the job's ReLU control) warns about torch's own
    # pytree classes; nothing here can act on it.
    warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)

    records = []
    with Timer() as timer, tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for budget in args.budgets:
                for seed in args.seeds:
                    for variant in args.variants:
                        with Timer() as one:
                            record = run_one(model, variant, budget, seed, args, Path(scratch))
                        record["seconds"] = round(one.seconds, 2)
                        records.append(record)
                        print(f"{model} {variant:<13} {budget} ep seed {seed}: {record['status']:<8}"
                              f" before {pct(record['before'])} swap {pct(record['after_swap'])} "
                              f"ft {pct(record['after_finetune'])} control {pct(record['control'])}"
                              f"  ({one.seconds:.1f} s)", flush=True)

    # The control depends only on (model, budget, seed): a diverged row borrows it from a sibling.
    controls = {(r["model"], r["budget_epochs"], r["seed"]): r["control"]
                for r in records if r["control"] is not None}
    header = ["model", "activation", "epochs", "seed", "before %", "after swap %",
              "after fine-tune %", "ReLU control %", "Δ vs control, pp [95% CI]"]
    order = {name: k for k, name in enumerate(VARIANTS)}
    records.sort(key=lambda r: (r["model"], order[r["variant"]], r["budget_epochs"], r["seed"]))
    rows = [row(r, controls) for r in records]
    summary = summary_table(records, controls)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "repro_retrofit_budget.png"
    plot(records, controls, png)
    diverged = [f"{Path(r['model']).stem}/{r['variant']}/{r['budget_epochs']} ep"
                for r in records if r["status"] == "diverged"]
    refused = sorted({f"{Path(r['model']).stem}/{r['variant']}" for r in records
                      if r["status"] == "refused"})
    reading = (
        "Each row is one `retrofit_file` job; the control is the untouched ReLU model fine-tuned "
        "with the same budget and seed, the CI a paired bootstrap over the 450 validation "
        "digits. CompetitiveReLU keeps the accuracy through the swap (identity init); MRePU "
        "cannot start as ReLU, and its after-swap column shows what the calibrated swap keeps "
        "against the plain one (gains fitted on the training data). Diverged runs: "
        + (", ".join(diverged) if diverged else "none") + ". Swaps refused because the model "
        "computed NaN/inf on its sample inputs (exit 4, nothing written): "
        + (", ".join(refused) if refused else "none") + "."
    )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({
        "finetune": "CLI defaults: AdamW lr 1e-4, activation lr 1e-2, weight decay 1e-4, "
                    "warm-up 0.1, grad clip 1.0, batch 64, device cpu",
        "variants": {k: {"config": repr(v[0]), "blend_ramp_fraction": v[1]}
                     for k, v in VARIANTS.items()}})
    write_results("retrofit_budget", title="Retrofit + equal fine-tuning budgets vs ReLU control",
                  settings=settings, runs=records, header=header, rows=rows, reading=reading,
                  seconds=timer.seconds,
                  extra_md=summary + f"\n\n![accuracy after fine-tuning]({png.name})",
                  out_dir=args.out)


if __name__ == "__main__":
    main()
