"""The calibrated swap (activations.md §2): fit each MRePU site's gains to the ReLU it replaced.

A network trained for ReLU's scale explodes under MRePU, which grows like |x|^3. Before any
fine-tuning, each site's ``y = b * MRePU(a * x)`` is fitted by least squares to what the
original network's ReLU computed there, on calibration batches. Sites are fitted in the order
the forward pass reaches them, each on the inputs it sees with the earlier sites already
calibrated, against the original network's ReLU output at that place: a site also takes up
the drift the earlier ones leave.

The fit itself (:func:`fit_gains`) is a 1-D search over ``a`` with ``b`` in closed form, on a
random subset of each site's input elements, in float64.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from retrofit.activations.functional import mrepu
from retrofit.activations.modules import MRePU
from retrofit.evaluation.datasets.checks import MODEL_CALL_ERRORS, model_input_error
from retrofit.sites import RetrofitResult

ELEMENTS_PER_SITE = 1 << 16
"""How many input elements of each site the fit uses, spread over the calibration batches."""

Shape = Callable[[Tensor], Tensor]

RANDOM_INPUTS = "random sample inputs"
"""The calibration source when there is no data: the gains keep the scale, not the accuracy."""


@dataclass(frozen=True)
class SiteFit:
    """One site's fitted gains, and its relative RMS error against the ReLU output before
    (a = b = 1, the plain swap) and after the fit, on the same calibration inputs."""

    site: str
    gain_in: float
    gain_out: float
    error_before: float
    error_after: float


@dataclass(frozen=True)
class Calibration:
    """Every reached site's fit, in graph order; ``unreached`` are sites the calibration
    batches never ran through (their gains stay 1); ``source`` says what the batches were."""

    fits: tuple[SiteFit, ...]
    unreached: tuple[str, ...]
    samples: int
    source: str

    def site_values(self) -> dict[str, dict[str, float]]:
        """The fitted gains by site, as the ONNX rewrite takes them (``site_values``)."""
        return {fit.site: {"gain_in": fit.gain_in, "gain_out": fit.gain_out} for fit in self.fits}

    def summary(self) -> str:
        """One line for the report."""
        if not self.fits:
            return f"MRePU gains not fitted: the {self.source} reached no MRePU site"
        before = statistics.median(fit.error_before for fit in self.fits)
        after = statistics.median(fit.error_after for fit in self.fits)
        text = (f"MRePU gains fitted to the replaced ReLUs on {self.samples} sample(s) of the "
                f"{self.source}, {len(self.fits)} site(s) in graph order: median site error "
                f"{before:.3g} -> {after:.3g} (relative RMS against ReLU's output)")
        if self.source == RANDOM_INPUTS:
            text += "; no data was given: pass --data or --finetune to fit on real inputs"
        if self.unreached:
            text += (f"; {len(self.unreached)} site(s) never ran and keep gains 1: "
                     f"{', '.join(self.unreached)}")
        return text


def fit_gains(x: Tensor, target: Tensor, shape: Shape) -> tuple[float, float, float]:
    """``(a, b, relative error)`` minimising ``||b * shape(a * x) - target||`` over ``a > 0``.

    For a given ``a`` the best ``b`` is a projection, so only ``a`` is searched: a log grid
    spanning eight decades around ``1 / rms(x)``, then golden-section refinement between the
    best point's neighbours. ``a = 1`` is always a candidate, so the fit is never worse than
    the plain shape with its best ``b``. The error is relative to ``||target||`` (0 when the
    target is all zero: then ``b = 0`` fits it exactly).
    """
    x, target = x.detach().double().flatten(), target.detach().double().flatten()
    finite = torch.isfinite(x) & torch.isfinite(target)  # an overflowing input says nothing
    x, target = x[finite], target[finite]
    total = float(target.dot(target))
    if total == 0.0:
        return 1.0, 0.0, 0.0

    def residual(log_a: float) -> tuple[float, float]:
        f = shape(math.exp(log_a) * x)
        ff, ft = float(f.dot(f)), float(f.dot(target))
        if not (math.isfinite(ff) and math.isfinite(ft)) or ff == 0.0:
            return total, 0.0
        return max(total - ft * ft / ff, 0.0), ft / ff

    rms = float(x.square().mean().sqrt())
    centre = -math.log(rms) if rms > 0 else 0.0
    grid = [centre + math.log(10.0) * (i / 10.0 - 4.0) for i in range(81)]
    errors = [residual(log_a)[0] for log_a in grid]
    best = min(range(len(grid)), key=errors.__getitem__)
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if residual(left)[0] <= residual(right)[0]:
            high = right
        else:
            low = left
    candidates = [0.5 * (low + high), grid[best], 0.0]
    log_a = min(candidates, key=lambda value: residual(value)[0])
    error, b = residual(log_a)
    return math.exp(log_a), b, math.sqrt(error / total)


def _relative_error(prediction: Tensor, target: Tensor) -> float:
    target = target.double()
    total = float(target.dot(target))
    gap = float((prediction.double() - target).square().sum())
    return math.sqrt(gap / total) if total > 0 else (0.0 if gap == 0 else math.inf)


class _Reached(BaseException):
    """Ends a forward pass once the site being fitted has seen its input: nothing after it
    matters for its fit. A BaseException, so a model's own ``except Exception`` lets it by."""


@dataclass
class _Samples:
    """Where each site's sampled elements sit in each batch, and what was collected there."""

    index: dict[tuple[str, int], Tensor]
    inputs: dict[str, list[Tensor]]
    targets: dict[str, list[Tensor]]


def site_modules(rewritten: RetrofitResult[nn.Module]) -> dict[str, MRePU]:
    """Each replaced site's MRePU module in a rewritten torch model, by site name: what
    :func:`calibrate_gains` fits."""
    return {site.name: rewritten.model.get_submodule(site.parameters[0].rpartition(".")[0])
            for site in rewritten.sites if site.replaced and site.parameters}


def calibrate_gains(model: nn.Module, sites: Mapping[str, MRePU],
                    batches: Sequence[tuple[Tensor, ...]], source: str,
                    seed: int = 0) -> Calibration:
    """Fit ``sites`` (site name -> the MRePU module in ``model``) in place, in graph order, on
    ``batches`` (each a tuple of model inputs on the model's device). The model computes
    the original function while the targets are taken (every site at blend 0, which is ReLU
    exactly), and each site is then fitted with the earlier sites calibrated at blend 1, the
    MRePU the model ends with. Blends and the train/eval mode are restored afterwards."""
    blends = {name: module.blend for name, module in sites.items()}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    samples = _Samples({}, {name: [] for name in sites}, {name: [] for name in sites})
    order: list[str] = []
    fits: list[SiteFit] = []
    try:
        with torch.no_grad():
            for module in sites.values():
                module.blend = 0.0
            for number, batch in enumerate(batches):
                _take_targets(model, sites, batch, number, len(batches), samples, order,
                              generator)
            for name in order:
                module = sites[name]
                for number, batch in enumerate(batches):
                    _take_inputs(model, name, module, batch, number, samples)
                x, target = torch.cat(samples.inputs[name]), torch.cat(samples.targets[name])
                fits.append(_fit_site(name, module, x, target))
                module.blend = 1.0
    finally:
        for name, module in sites.items():
            module.blend = blends[name]
        model.train(was_training)
    count = sum(batch[0].shape[0] for batch in batches)
    unreached = tuple(name for name in sites if name not in order)
    return Calibration(tuple(fits), unreached, count, source)


def _take_targets(model: nn.Module, sites: Mapping[str, MRePU], batch: tuple[Tensor, ...],
                  number: int, batch_count: int, samples: _Samples, order: list[str],
                  generator: torch.Generator) -> None:
    """One pass of the original function: which elements each site samples in this batch,
    and ReLU's output there; the first batch also settles the graph order."""
    share = max(1, ELEMENTS_PER_SITE // batch_count)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            key = (name, number)
            if key in samples.index:  # a site called again in one pass: its first call counts
                return
            flat = args[0].detach().flatten()
            if flat.numel() <= share:
                index = torch.arange(flat.numel(), device=flat.device)
            else:
                index = torch.randint(flat.numel(), (share,), generator=generator).to(flat.device)
            samples.index[key] = index
            samples.targets[name].append(flat[index].double().clamp_min(0.0).cpu())
            if name not in order:
                order.append(name)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in sites.items()]
    try:
        _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _take_inputs(model: nn.Module, name: str, module: MRePU, batch: tuple[Tensor, ...],
                 number: int, samples: _Samples) -> None:
    """The site's input in this batch, with the earlier sites calibrated, at the elements its
    target was taken at; the pass stops there."""
    index = samples.index.get((name, number))
    if index is None:  # the site did not run on this batch
        return

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        samples.inputs[name].append(args[0].detach().flatten()[index].double().cpu())
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        _forward(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()


def _forward(model: nn.Module, batch: tuple[Tensor, ...]) -> None:
    """One calibration pass. Data the model cannot take (a token id beyond its table, a shape
    it refuses) is bad input, as when the data is scored."""
    try:
        model(*batch)
    except MODEL_CALL_ERRORS as error:
        raise model_input_error(error, batch[0].shape[1:]) from error


def _fit_site(name: str, module: MRePU, x: Tensor, target: Tensor) -> SiteFit:
    def shape(u: Tensor) -> Tensor:
        return mrepu(u, module.p, module.c)

    a, b, error = fit_gains(x, target, shape)
    with torch.no_grad():
        module.gain_in.fill_(a)
        module.gain_out.fill_(b)
    return SiteFit(name, a, b, _relative_error(shape(x), target), error)
