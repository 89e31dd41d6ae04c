"""Accuracy per sample, and how sure we can be that a change of accuracy is real.

Accuracies and deltas are in percent / percentage points. The comparison is *paired*: the
models before and after a retrofit are scored on the same samples, so what varies between
them is only the samples where exactly one of the two is right (the discordant pairs). Both
the bootstrap interval and McNemar's test look only at those, which makes them far tighter
than comparing two independent accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def topk_correct(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Per sample, whether the target is among the ``k`` highest logits (a BoolTensor of N).

    ``k`` larger than the number of classes counts every sample as correct.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (samples, classes), got {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(
            f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets.to(top.device).view(-1, 1)).any(dim=1)


def accuracy(correct: Tensor) -> float:
    """Percent of samples marked correct (0-100)."""
    if correct.numel() == 0:
        raise ValueError("accuracy of no samples is undefined")
    return 100.0 * float(correct.float().mean())


@dataclass(frozen=True)
class PairedDelta:
    """Change of accuracy between two models scored on the same ``n`` samples.

    ``delta`` = after - before in percentage points, with a ``confidence`` interval
    ``[ci_low, ci_high]`` from a paired bootstrap; ``gained`` samples were wrong before and right
    after, ``lost`` the reverse; ``mcnemar_p`` is the exact two-sided McNemar p-value (the chance
    of a split of the discordant pairs at least this uneven if the models were equally good).
    """

    n: int
    before: float
    after: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    gained: int
    lost: int
    mcnemar_p: float
    n_boot: int

    @property
    def discordant(self) -> int:
        return self.gained + self.lost


def paired_delta_ci(
    correct_before: Tensor,
    correct_after: Tensor,
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedDelta:
    """Accuracy delta (after - before) with a paired bootstrap CI and an exact McNemar test.

    Method: resample the n samples with replacement ``n_boot`` times, keeping each sample's
    (before, after) pair together, and take the percentile interval of the resampled deltas.
    The per-sample difference is +1, -1 or 0, so a resample is fully described by how many
    +1s and -1s it draws: one multinomial draw of n over the three observed proportions, which
    is the same distribution as index resampling at a cost independent of n. Identical inputs
    give delta 0 and the interval [0, 0]. The same ``seed`` always gives the same interval.

    McNemar: under "equally good", each discordant pair is a fair coin flip, so
    ``p = min(1, 2 * P(Binomial(gained + lost, 1/2) <= min(gained, lost)))``; p = 1 with no
    discordant pairs. Computed exactly in log space, without scipy.
    """
    before = _as_bool(correct_before, "correct_before")
    after = _as_bool(correct_after, "correct_after")
    if before.shape != after.shape:
        raise ValueError(
            f"correct_before has {before.shape[0]} samples but correct_after has {after.shape[0]}"
        )
    n = before.shape[0]
    _check_bootstrap(n, confidence, n_boot)

    gained = int(np.count_nonzero(after & ~before))
    lost = int(np.count_nonzero(before & ~after))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [gained / n, lost / n, (n - gained - lost) / n], size=n_boot)
    ci_low, ci_high = _percentile_interval(100.0 * (draws[:, 0] - draws[:, 1]) / n, confidence)
    return PairedDelta(
        n=n,
        before=100.0 * float(before.mean()),
        after=100.0 * float(after.mean()),
        delta=100.0 * (gained - lost) / n,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        gained=gained,
        lost=lost,
        mcnemar_p=mcnemar_exact_p(gained, lost),
        n_boot=n_boot,
    )


@dataclass(frozen=True)
class SeedPairedDelta:
    """Change of accuracy between two training recipes, each run with the same ``seeds`` seeds
    and scored on the same ``n`` samples.

    ``delta`` is the mean over seeds of (after - before) in percentage points (``per_seed``
    gives each seed's), ``before``/``after`` the mean accuracies, with a ``confidence`` interval
    ``[ci_low, ci_high]`` that is paired over samples and over seeds (see
    :func:`paired_delta_over_seeds`).
    """

    n: int
    seeds: int
    before: float
    after: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    per_seed: tuple[float, ...]


def paired_delta_over_seeds(
    correct_before: Sequence[Tensor],
    correct_after: Sequence[Tensor],
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> SeedPairedDelta:
    """Mean accuracy delta over seeds (``correct_before[s]`` and ``correct_after[s]`` are the
    per-sample flags of seed ``s``'s two runs) with a bootstrap CI paired over samples and seeds.

    Why this construction: every seed's two runs are scored on the same samples, so the data is
    a crossed samples x seeds table of differences d[s, i] in {-1, 0, +1}. Samples vary (some
    are hard for one recipe) and seeds vary (one run is lucky), and the interval must carry
    both. Each bootstrap replicate resamples the samples and, independently, the seeds, with
    replacement, and averages d over the drawn (seed, sample) cells: the pigeonhole bootstrap
    for crossed designs (Owen 2007, "The pigeonhole bootstrap"), which keeps every pairing (a
    drawn sample brings the differences of all drawn seeds, a drawn seed its whole run) and is
    slightly conservative. With few seeds the seed part is coarse (two seeds give three
    patterns): more seeds give a truer interval. The percentile interval is taken.

    A replicate depends on the samples only through how often each per-sample difference
    profile (d[:, i], a vector over seeds) is drawn: one multinomial draw over the observed
    profiles, the same distribution as index resampling at a cost independent of n. Profiles
    are ordered gains first, ties (all zero) last, and the seed draw comes after the sample
    draw, so one seed gives exactly :func:`paired_delta_ci`'s interval for the same ``seed``.
    """
    if len(correct_before) != len(correct_after):
        raise ValueError(f"{len(correct_before)} seeds before but {len(correct_after)} after")
    if not correct_before:
        raise ValueError("no seeds to compare")
    before = np.stack([_as_bool(v, "correct_before") for v in _same_lengths(correct_before)])
    after = np.stack([_as_bool(v, "correct_after") for v in _same_lengths(correct_after)])
    if before.shape != after.shape:
        raise ValueError(f"correct_before has {before.shape[1]} samples per seed but "
                         f"correct_after has {after.shape[1]}")
    seeds, n = before.shape
    _check_bootstrap(n, confidence, n_boot)

    differences = after.astype(np.int64) - before.astype(np.int64)  # seeds x n
    profiles, counts = _difference_profiles(differences)
    rng = np.random.default_rng(seed)
    sample_draws = rng.multinomial(n, counts / n, size=n_boot)  # n_boot x profiles
    seed_draws = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=n_boot)
    totals = ((sample_draws @ profiles) * seed_draws).sum(axis=1)
    ci_low, ci_high = _percentile_interval(100.0 * totals / (seeds * n), confidence)
    return SeedPairedDelta(
        n=n,
        seeds=seeds,
        before=100.0 * float(before.mean()),
        after=100.0 * float(after.mean()),
        delta=100.0 * int(differences.sum()) / (seeds * n),
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        n_boot=n_boot,
        per_seed=tuple(100.0 * int(row.sum()) / n for row in differences),
    )


def _check_bootstrap(n: int, confidence: float, n_boot: int) -> None:
    """Refuse what both intervals cannot be computed from: no samples, a confidence outside
    (0, 1), no bootstrap replicates."""
    if n == 0:
        raise ValueError("no samples to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def _percentile_interval(deltas: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of the bootstrap ``deltas`` (equal tails)."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return float(low), float(high)


def _same_lengths(values: Sequence[Tensor]) -> Sequence[Tensor]:
    lengths = {len(v) for v in values}
    if len(lengths) > 1:
        raise ValueError(f"every seed must score the same samples, got {sorted(lengths)} samples")
    return values


def _difference_profiles(differences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct per-sample columns of ``differences`` (profiles x seeds) and how many
    samples have each, in the order :func:`paired_delta_over_seeds` relies on: descending,
    the all-zero profile last."""
    profiles, counts = np.unique(differences.T, axis=0, return_counts=True)
    profiles, counts = profiles[::-1], counts[::-1]
    ties = ~profiles.any(axis=1)
    order = np.concatenate([np.flatnonzero(~ties), np.flatnonzero(ties)])
    return profiles[order], counts[order]


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts."""
    m = gained + lost
    if m == 0:
        return 1.0
    k = min(gained, lost)
    i = torch.arange(k + 1, dtype=torch.float64)
    log_terms = (
        math.lgamma(m + 1) - torch.lgamma(i + 1) - torch.lgamma(m - i + 1) + m * math.log(0.5)
    )
    tail = math.exp(float(torch.logsumexp(log_terms, dim=0)))
    return min(1.0, 2.0 * tail)


def _as_bool(values: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one flag per sample, got shape {array.shape}")
    return array.astype(bool)

