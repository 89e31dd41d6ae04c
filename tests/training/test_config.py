"""retrofit.training.config: bad settings are usage errors, and only settings that change the
result must match on resume."""

from __future__ import annotations

import pytest

from retrofit.errors import UsageError
from retrofit.training.config import FinetuneConfig, changed_settings


@pytest.mark.parametrize(("changes", "message"), [
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'; choose one of: adamw, sgd"),
    ({"lr": float("nan")}, "the learning rate must be a finite positive number, got nan"),
    ({"amp": "fp16"}, "unknown amp mode 'fp16'; choose one of: auto, bf16, off"),
])
def test_bad_settings_are_one_usage_error(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        FinetuneConfig(**changes)


def test_a_resume_compares_the_settings_that_change_the_result_and_defaults_fill_new_ones():
    stored = FinetuneConfig(lr=1e-3).as_dict()
    assert changed_settings(FinetuneConfig(lr=1e-3, device="cpu", num_workers=4), stored) == []
    assert changed_settings(FinetuneConfig(lr=2e-3), stored) == ["lr 0.001 -> 0.002"]
    del stored["exact_batches"]  # written before the field existed: it meant the default
    assert changed_settings(FinetuneConfig(lr=1e-3), stored) == []
    assert changed_settings(FinetuneConfig(lr=1e-3, exact_batches=True), stored) == [
        "exact_batches False -> True"]
