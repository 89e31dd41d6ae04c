"""retrofit.evaluation.metrics: top-k flags, accuracy in percent, the paired delta's CI and McNemar p."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.evaluation.metrics import accuracy, mcnemar_exact_p, paired_delta_ci, topk_correct


def test_topk_correct_marks_targets_among_the_k_highest_logits() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert topk_correct(logits, targets, 1).tolist() == [True, False, False]
    assert topk_correct(logits, targets, 2).tolist() == [True, True, False]
    assert topk_correct(logits, targets, 10).tolist() == [True, True, True]


def test_topk_correct_rejects_mismatched_targets() -> None:
    with pytest.raises(ValueError):
        topk_correct(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 1)


def test_accuracy_is_a_percentage() -> None:
    assert accuracy(torch.tensor([True, False, True, True])) == 75.0
    with pytest.raises(ValueError):
        accuracy(torch.tensor([], dtype=torch.bool))


def test_identical_vectors_give_zero_delta_and_a_zero_interval() -> None:
    correct = torch.rand(500, generator=torch.Generator().manual_seed(1)) > 0.3
    result = paired_delta_ci(correct, correct.clone())
    assert result.delta == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.gained == result.lost == 0
    assert result.mcnemar_p == 1.0


def test_clearly_better_after_has_an_interval_above_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    before = torch.rand(1000, generator=generator) > 0.4
    after = before.clone()
    fixable = torch.nonzero(~before).flatten()[:80]
    after[fixable] = True
    broken = torch.nonzero(before).flatten()[:10]
    after[broken] = False
    result = paired_delta_ci(before, after)
    assert result.gained == 80 and result.lost == 10 and result.n == 1000
    assert result.delta == pytest.approx(7.0)
    assert result.after - result.before == pytest.approx(result.delta)
    assert 0.0 < result.ci_low < result.delta < result.ci_high
    assert result.mcnemar_p < 1e-6


def test_clearly_worse_after_has_an_interval_below_zero() -> None:
    before = torch.ones(200, dtype=torch.bool)
    after = before.clone()
    after[:30] = False
    result = paired_delta_ci(before, after)
    assert result.delta == pytest.approx(-15.0)
    assert result.ci_high < 0.0


def test_mcnemar_matches_a_hand_computed_binomial_tail() -> None:
    # 8 gained, 2 lost: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    before = torch.tensor([False] * 8 + [True] * 2 + [True] * 5)
    after = torch.tensor([True] * 8 + [False] * 2 + [True] * 5)
    result = paired_delta_ci(before, after)
    assert result.gained == 8 and result.lost == 2
    assert result.mcnemar_p == pytest.approx(112 / 1024, rel=1e-9)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32, rel=1e-9)
    exact = 2 * sum(math.comb(400, i) for i in range(181)) / 2**400
    assert mcnemar_exact_p(220, 180) == pytest.approx(exact, rel=1e-8)


def test_interval_is_deterministic_for_a_seed() -> None:
    generator = torch.Generator().manual_seed(2)
    before = torch.rand(3000, generator=generator) > 0.5
    after = torch.rand(3000, generator=generator) > 0.45
    first = paired_delta_ci(before, after, seed=7, n_boot=500)
    assert paired_delta_ci(before, after, seed=7, n_boot=500) == first
    other = paired_delta_ci(before, after, seed=8, n_boot=500)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_bootstrap_interval_is_close_to_the_normal_approximation() -> None:
    generator = torch.Generator().manual_seed(3)
    before = torch.rand(5000, generator=generator) > 0.3
    after = torch.where(torch.rand(5000, generator=generator) < 0.1, ~before, before)
    result = paired_delta_ci(before, after, n_boot=20_000)
    d = (after.float() - before.float()) * 100
    half_width = 1.959964 * float(d.std()) / math.sqrt(5000)
    assert result.ci_low == pytest.approx(result.delta - half_width, abs=0.1)
    assert result.ci_high == pytest.approx(result.delta + half_width, abs=0.1)


def test_large_inputs_are_fast() -> None:
    before = torch.rand(2_000_000) > 0.5
    after = torch.rand(2_000_000) > 0.5
    result = paired_delta_ci(before, after)
    assert result.n == 2_000_000 and 0.0 <= result.mcnemar_p <= 1.0


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        paired_delta_ci(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


# --------------------------------------------------------------------------- over seeds


def _flags(n: int, seed: int, p: float = 0.8) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("case", range(12))
def test_one_seed_over_seeds_is_exactly_the_paired_interval(case: int) -> None:
    from retrofit.evaluation.metrics import paired_delta_over_seeds

    n = 30 + 97 * case
    before = _flags(n, case)
    after = before.clone()
    flip = _flags(n, 100 + case, p=0.02 * case)  # case 0: identical; gains or losses only too
    after[flip] = (case % 3 != 1) if case % 4 == 2 else ~after[flip]
    expected = paired_delta_ci(before, after, seed=case)
    got = paired_delta_over_seeds([before], [after], seed=case)
    assert (got.delta, got.ci_low, got.ci_high) == (expected.delta, expected.ci_low,
                                                    expected.ci_high)
    assert (got.before, got.after, got.n, got.seeds) == (expected.before, expected.after, n, 1)


def test_seeds_that_agree_add_nothing_and_seeds_that_disagree_widen_the_interval() -> None:
    from retrofit.evaluation.metrics import paired_delta_over_seeds

    before = _flags(450, 1, 0.9)
    gain, loss = before.clone(), before.clone()
    gain[:12], loss[:12] = True, False
    one = paired_delta_ci(before, gain)
    same = paired_delta_over_seeds([before, before], [gain, gain])
    assert (same.delta, same.ci_low, same.ci_high) == (one.delta, one.ci_low, one.ci_high)
    mixed = paired_delta_over_seeds([before, before, before], [gain, loss, gain])
    assert mixed.per_seed == (one.delta, paired_delta_ci(before, loss).delta, one.delta)
    assert mixed.delta == pytest.approx(sum(mixed.per_seed) / 3)
    assert mixed.ci_high - mixed.ci_low > one.ci_high - one.ci_low
    assert mixed.ci_low < mixed.delta < mixed.ci_high


def test_over_seeds_refuses_mismatched_runs() -> None:
    from retrofit.evaluation.metrics import paired_delta_over_seeds

    with pytest.raises(ValueError, match="seeds"):
        paired_delta_over_seeds([_flags(5, 0)], [])
    with pytest.raises(ValueError, match="same samples"):
        paired_delta_over_seeds([_flags(5, 0), _flags(6, 0)], [_flags(5, 0), _flags(5, 0)])
