"""How close each CompetitiveReLU site of the CIFAR-style ResNet comes to its memory-traffic floor.

    python bench/bench_floor.py [--threads 2] [--device cpu|cuda] [--batch 64] [--quick]
                                [--seconds 15]

CAReLU needs the competition of every group before it can write any output, so no implementation
can do with less than one reduction over the competition axes plus one in-place scaling pass:
``s = z.sum(dims, keepdim=True); z.mul_(s)`` (one read, then one read and one write of ``z``),
the *floor*. The inputs are the real ones: forward pre-hooks on the CompetitiveReLU modules of
``retrofit_torch_model(ResNetCNN(), CompetitiveReLUConfig())`` (the bench subject of
``_common.py``) capture each of its 17 sites' input on one batch, in eval mode under
``torch.no_grad``. Per site three calls are timed, all of them interleaved in one process:

* ``activation``: the site's module called as the model calls it, ``module(z)``. Sites whose
  ReLU was in-place (``inplace=True``: the CPU kernel then writes its result into ``z``) are
  called on a scratch buffer;
* ``floor``: the two passes above, in place on the scratch buffer;
* ``relu``: what the original model ran there, ``torch.relu_`` on the scratch buffer for an
  in-place site, ``torch.relu`` otherwise.

Before every timed call the scratch buffer is refilled from the captured input
(``scratch.copy_(z)``) outside the timed region, for every call alike, so each call starts from
the same data in the same cache state and the copy is timed by none. A site's ratio is the
median of its per-round ratios; a shape's (and the overall line's, over all sites) is its sites'
ratios weighted by their floor times. Target: the activation within 1.5x of the floor at the
CNN's sizes.

Writes ``bench/results/bench_floor.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SUBJECTS,
    batch,
    common_arguments,
    ratio_summary,
    setup,
    subject_models,
    timed_rounds,
    write_results,
)

from retrofit.activations.functional import competition_axes  # noqa: E402
from retrofit.activations.modules import CompetitiveReLU  # noqa: E402

SUBJECT = next(subject for subject in SUBJECTS if subject.name == "resnet_cnn")
VARIANTS = ("activation", "floor", "relu")
TARGET = 1.5
"""The activation's time within this factor of the floor's (issue 14)."""


@dataclass(frozen=True)
class Site:
    """One CompetitiveReLU call of the retrofitted model and the input it got."""

    name: str
    module: CompetitiveReLU
    z: torch.Tensor
    dims: list[int]


def captured_sites(size: int, device: str) -> list[Site]:
    """Every CompetitiveReLU site of the retrofitted ResNet with a copy of its input on one
    batch of ``size`` (a pre-hook sees the input before an in-place site overwrites it)."""
    model = subject_models(SUBJECT, device, ("carelu",))["carelu"]
    modules = {name: module for name, module in model.named_modules()
               if isinstance(module, CompetitiveReLU)}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name in inputs:
                raise RuntimeError(f"{name} is called twice: one module, several sites")
            inputs[name] = args[0].detach().clone()
        return hook

    hooks = [module.register_forward_pre_hook(keep(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(batch(SUBJECT, size, device))
    finally:
        for hook in hooks:
            hook.remove()
    return [Site(name, module, inputs[name], competition_axes(inputs[name].dim(),
                                                              module.reduce))
            for name, module in modules.items()]


def site_calls(site: Site) -> tuple[dict[str, Callable[[], Any]], Callable[[], None]]:
    """The three timed calls of one site, all on one scratch buffer, and its refill."""
    scratch = torch.empty_like(site.z)
    module, dims = site.module, site.dims
    calls = {
        "activation": (lambda: module(scratch)),
        "floor": (lambda: scratch.mul_(scratch.sum(dims, keepdim=True))),
        "relu": (lambda: torch.relu_(scratch)) if module.inplace else (
            lambda: torch.relu(scratch)),
    }
    return calls, (lambda: scratch.copy_(site.z))


def grouped(per_site: dict[str, dict[str, dict]], sites: list[Site]) -> dict[str, dict]:
    """Each variant over ``sites``: its median seconds summed over them, and their ratios to the
    floor (each the median of that site's per-round ratios) weighted by their floor times, which
    is the summed time over the summed floor time on a quiet machine. (A median of per-round
    sums is not used: on a shared machine most rounds of 17 sites hold some stalled call.)"""
    floors = [per_site[site.name]["floor"]["median_s"] for site in sites]
    out = {}
    for variant in VARIANTS:
        ratios = [per_site[site.name][variant]["ratio"] for site in sites]
        out[variant] = {
            "median_s_sum": sum(per_site[site.name][variant]["median_s"] for site in sites),
            "ratio": sum(r * f for r, f in zip(ratios, floors)) / sum(floors)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, seconds=15.0, per="run (all sites together)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    setup(args)

    sites = captured_sites(args.batch, args.device)
    calls: dict[str, Callable[[], Any]] = {}
    prepare: dict[str, Callable[[], None]] = {}
    for site in sites:
        own, refill = site_calls(site)
        for variant, call in own.items():
            calls[f"{site.name}:{variant}"] = call
            prepare[f"{site.name}:{variant}"] = refill
    with torch.no_grad():
        times = timed_rounds(calls, args.device, args, rounds=2000, quick_rounds=5,
                             prepare=prepare)

    per_site = {site.name: ratio_summary({v: times[f"{site.name}:{v}"] for v in VARIANTS},
                                         reference="floor") for site in sites}
    groups: dict[tuple[int, ...], list[Site]] = {}
    for site in sites:
        groups.setdefault(tuple(site.z.shape), []).append(site)
    results, rows = [], []
    for shape, members in [*groups.items(), (("all",), sites)]:
        summary = grouped(per_site, members)
        overall = shape == ("all",)
        per = 1 if overall else len(members)  # shape rows: µs per site; overall: the sum
        inplace = sum(site.module.inplace for site in members)
        results.append({"shape": list(shape), "sites": [site.name for site in members],
                        "inplace_sites": inplace, "summary": summary})
        rows.append([f"all {len(members)} sites (sum)" if overall else "×".join(map(str, shape)),
                     len(members), inplace,
                     *(summary[v]["median_s_sum"] * 1e6 / per for v in VARIANTS),
                     summary["activation"]["ratio"], summary["relu"]["ratio"]])
    overall_summary = results[-1]["summary"]
    print(f"overall: activation x{overall_summary['activation']['ratio']:.3f} the floor "
          f"(target <= {TARGET}), relu x{overall_summary['relu']['ratio']:.3f}", flush=True)

    columns = ["input shape", "sites", "in-place", "activation µs", "floor µs", "relu µs",
               "activation ×floor", "relu ×floor"]
    notes = [
        f"batch {args.batch}, eval, torch.no_grad, {len(times[next(iter(calls))])} interleaved "
        "rounds; inputs captured at each CompetitiveReLU site "
        "of the retrofitted resnet_cnn (default CompetitiveReLUConfig: energy, reduce auto = "
        "the whole sample)",
        "activation: module(z) as the model calls it (in-place sites write into the buffer); "
        "floor: s = z.sum(competition axes, keepdim=True); z.mul_(s); relu: the original's "
        "ReLU there (torch.relu_ at in-place sites, torch.relu otherwise)",
        "every call runs on a scratch buffer refilled from the captured input before it, "
        "outside the timed region (the refill is timed by none)",
        "µs: each site's median per call, averaged over a shape's sites, summed over all sites "
        "in the last row; ×floor: each site's median over interleaved rounds of its time / its "
        "floor's, averaged weighted by the sites' floor times",
        f"target: activation within {TARGET}x of the floor at the CNN's sizes",
    ]
    write_results("bench_floor", args,
                  {"batch": args.batch, "target": TARGET, "groups": results,
                   "sites": per_site},
                  "CompetitiveReLU per site vs its memory-traffic floor", columns, rows, notes)


if __name__ == "__main__":
    main()
