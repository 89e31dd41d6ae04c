"""Tests for retrofit/activations/registry.py: one module per site from a config or a name,
placed on the model's device and dtype; and the configs' own checks, which it relies on."""

from __future__ import annotations

import math

import pytest
import torch

from retrofit.activations.modules import ACTIVATION_MODULES, CompetitiveReLU, MRePU, RePU
from retrofit.activations.registry import ACTIVATIONS, make_activation
from retrofit.config import CONFIGS, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import UsageError


def test_registry_builds_each_config_with_its_values():
    assert set(ACTIVATIONS) == set(CONFIGS) == {"carelu", "mrepu", "repu"}
    assert set(ACTIVATIONS.values()) == set(ACTIVATION_MODULES)

    carelu = make_activation(
        CompetitiveReLUConfig(measure="l1", k=3.0, eps=1e-4, reduce="channel", alpha_init=0.5,
                              beta_init=0.1)
    )
    assert type(carelu) is CompetitiveReLU
    assert (carelu.measure, carelu.k, carelu.eps, carelu.reduce) == ("l1", 3.0, 1e-4, "channel")
    assert carelu.alpha.item() == pytest.approx(0.5) and carelu.beta.item() == pytest.approx(0.1)
    assert carelu.alpha.shape == () and isinstance(carelu.alpha, torch.nn.Parameter)

    fresh = make_activation(CompetitiveReLUConfig(k=4.0))
    assert fresh.beta.item() == pytest.approx(math.atanh(0.25)) and fresh.alpha.item() == 0.0

    mre = make_activation(MRePUConfig(p=3.0, c=0.5, blend=0.25))
    assert type(mre) is MRePU and (mre.p, mre.c, mre.blend) == (3.0, 0.5, 0.25)
    assert [(name, p.item()) for name, p in mre.named_parameters()] == [("gain_in", 1.0),
                                                                        ("gain_out", 1.0)]

    re = make_activation(RePUConfig(p=3.0))
    assert type(re) is RePU and re.p == 3.0

    assert type(make_activation("mrepu")) is MRePU
    assert "measure=energy" in repr(make_activation("carelu"))


def test_parameters_are_made_in_the_dtype_asked_for():
    identity = make_activation(CompetitiveReLUConfig(), dtype=torch.float64)
    assert identity.beta.dtype == torch.float64
    assert identity.beta.item() == math.atanh(0.5)  # rounded once, in float64
    x = torch.randn(3, 5, 9, dtype=torch.float64) * 5
    torch.testing.assert_close(identity(x), torch.relu(x), rtol=1e-12, atol=0)
    gains = make_activation("mrepu", device="cpu", dtype=torch.float64)
    assert {p.dtype for p in gains.parameters()} == {torch.float64}
    assert list(make_activation("repu", device="cpu", dtype=torch.float64).parameters()) == []


def test_unknown_names_and_configs_raise_a_usage_error():
    with pytest.raises(UsageError, match="unknown activation 'gelu'; choose one of: carelu"):
        make_activation("gelu")
    with pytest.raises(UsageError, match="no activation for config"):
        make_activation(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [("measure", "l2"), ("reduce", "tokens")])
def test_configs_refuse_an_unknown_measure_or_reduce(field, value):
    with pytest.raises(UsageError, match=f"unknown {field} '{value}'; choose one of"):
        CompetitiveReLUConfig(**{field: value})
