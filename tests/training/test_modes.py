"""retrofit.training.modes: what fine-tuning switches on torch and on the model comes back."""

from __future__ import annotations

import torch
from torch import nn

from retrofit.training.modes import buffers_kept, determinism


def test_deterministic_kernels_are_on_inside_and_the_callers_settings_come_back():
    torch.backends.cudnn.benchmark = True
    try:
        with determinism(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert not torch.backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_batchnorm_statistics_a_forward_pass_updates_are_put_back():
    norm = nn.BatchNorm1d(3).train()
    with buffers_kept(norm):
        norm(torch.randn(8, 3) + 5)
        assert norm.running_mean.abs().sum() > 0
    assert torch.equal(norm.running_mean, torch.zeros(3))
    assert int(norm.num_batches_tracked) == 0
