"""Numerics at the edges: activations on extreme inputs in every dtype, non-finite data refused
by the command line, a diverging fine-tune stopped with the last good state kept.

The contract tested here (tests/activations/test_modules.py covers zeros and 1e30/3e38 forward):

* Any *finite* input, of any magnitude (subnormal to the dtype's largest value, mixed in one
  row), gives a finite output in float32, bfloat16 and float16, for CompetitiveReLU with every
  measure and MRePU; identity-initialised CompetitiveReLU is ReLU on them.
* Gradients are finite wherever the true gradient is representable (|x| up to 1e30 for
  CompetitiveReLU, 1e10 for MRePU, whose gradient grows like x^p).
* Non-finite inputs (±inf, NaN) are outside the contract: they mean the network or the data is
  already broken. Data files with NaN/Inf are refused on loading, and a NaN/inf loss stops
  fine-tuning with TrainingDiverged. What is required is that such a value stays in its own
  sample: the other samples of the batch are computed as if it were not there.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retrofit.activations.modules import CompetitiveReLU, MRePU
from retrofit.training.checkpoint import load_checkpoint
from retrofit.errors import ExitCode
from tests.conftest import SAMPLES, no_partial_files, one_line, run_cli as cli, sha256

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MEASURES = ("energy", "l1", "count")
MLP = SAMPLES / "models" / "digits_mlp.pt2"


def modules() -> list[torch.nn.Module]:
    return [
        *(CompetitiveReLU(measure=m, reduce=r, alpha_init=a, beta_init=b)
          for m in MEASURES for r in ("sample", "channel")
          for a, b in ((0.0, None), (1.0, 0.5), (-1.0, -0.9))),
        MRePU(), MRePU(blend=0.5), MRePU(p=3.0, c=0.5),
    ]


def extreme_rows(dtype: torch.dtype) -> dict[str, list[float]]:
    info = torch.finfo(dtype)
    big, tiny = info.max, info.tiny
    sub = tiny / 4  # subnormal
    return {
        "subnormals": [sub, -sub, tiny / 8, -tiny, tiny, 0.0, sub, -sub],
        "largest": [big] * 8,
        "most negative": [-big] * 8,
        "largest and subnormal": [big, sub, -big, -sub, 1.0, -1.0, big / 2, sub],
        "one huge among small": [min(1e30, big), 1e-3, -1e-3, 2.0, -2.0, 0.5, 0.0, -0.5],
        "all equal": [3.0] * 8,
    }


@pytest.mark.parametrize("autograd", (True, False), ids=("training", "inference"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_extreme_inputs_give_finite_outputs_in_every_dtype(dtype, autograd):
    for name, row in extreme_rows(dtype).items():
        x = torch.tensor([row, row[::-1]], dtype=dtype)
        for shaped in (x, x.reshape(2, 2, 4), x.reshape(2, 2, 2, 2)):
            for module in modules():
                with torch.set_grad_enabled(autograd):
                    y = module(shaped)
                assert y.dtype == dtype and y.shape == shaped.shape
                assert not torch.isnan(y).any() and torch.isfinite(y).all(), (name, module)


@pytest.mark.parametrize("autograd", (True, False), ids=("training", "inference"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_carelu_is_relu_on_subnormals_and_extremes(dtype, autograd):
    for measure in MEASURES:
        for name, row in extreme_rows(dtype).items():
            x = torch.tensor([row], dtype=dtype)
            with torch.set_grad_enabled(autograd):
                y = CompetitiveReLU(measure=measure)(x)
            torch.testing.assert_close(y.float(), x.float().clamp_min(0), rtol=1e-2, atol=0,
                                       msg=f"{measure}, {name}")


def _gradients(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    module(x).float().sum().backward()
    return [x.grad, *(p.grad for p in module.parameters() if p.grad is not None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_finite_where_the_true_gradient_is_representable(dtype):
    big = torch.finfo(dtype).max
    for magnitude in (1e2, 1e4, 1e10, 1e19, 1e30):
        m = min(magnitude, big / 4)
        x = torch.tensor([[m, -m, 1.0, -0.5], [m / 3, 2.0, -m, 0.0]], dtype=dtype)
        for module in modules():
            if isinstance(module, MRePU) and (m > 1e10 or m ** (module.p + 1) > big / 4):
                # (p+1)·x^p overflows, or MRePU(x) itself does, and its gain b's gradient sums
                # MRePU(x): no finite answer to ask for
                continue
            for grad in _gradients(module, x.reshape(2, 2, 2)):
                assert torch.isfinite(grad).all(), (magnitude, module)


@pytest.mark.parametrize("dtype", [
    torch.float32,
    torch.bfloat16,
    torch.float16,  # computed in float32, where 65504 is not extreme
], ids=str)
def test_gradients_at_the_largest_finite_value_are_not_nan(dtype):
    """ReLU's gradient there is 1; a naive identity CompetitiveReLU gives NaN for the sample."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, 1.0, -2.0, 0.5]], dtype=dtype)
    for module in modules():
        for grad in _gradients(module, x):
            assert not torch.isnan(grad).any(), module


def test_mrepu_gradient_overflows_to_inf_not_nan():
    x = torch.tensor([1e30, -1e30, 1.0], requires_grad=True)
    MRePU()(x).sum().backward()
    assert not torch.isnan(x.grad).any(), x.grad


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_non_finite_value_stays_in_its_own_sample(dtype, bad):
    clean = torch.randn(3, 2, 4).to(dtype)
    dirty = torch.cat([clean[:1].clone(), clean])
    dirty[0, 1, 2] = bad
    for module in modules():
        if getattr(module, "reduce", "sample") == "last":
            continue
        torch.testing.assert_close(module(dirty)[1:], module(clean), rtol=0, atol=0,
                                   msg=str(module))


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("where", ["--data", "--finetune"])
@pytest.mark.parametrize("kind, bad", [("npz", np.nan), ("pt", np.inf), ("pt", -np.inf)],
                         ids=["npz-nan", "pt-inf", "pt-minus-inf"])
def test_non_finite_data_is_refused_naming_the_sample(tmp_path, where, kind, bad):
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = np.arange(30) % 10
    x[11, 0, 2, 5] = bad
    path = tmp_path / f"data.{kind}"
    if kind == "npz":
        np.savez(path, x=x, y=y)
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    digest = sha256(path)
    epochs = ["--epochs", "1"] if where == "--finetune" else []
    result = cli("retrofit", MLP, where, path, *epochs, "--device", "cpu",
                 "-o", tmp_path / "out.pt2")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert f"sample 11 in {path} contains NaN or Inf" in one_line(result)
    assert sha256(path) == digest and not (tmp_path / "out.pt2").exists()
    assert no_partial_files(tmp_path)


def test_a_diverging_finetune_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    """The loss turns NaN in epoch 2: exit 3, the message names the kept epoch, no model is
    written, the checkpoint holds epoch 1 with finite best weights, and the report of what was
    measured before (here as JSON) is still printed."""
    import retrofit.training.loop as train

    real_finetune = train.finetune

    def poison_after_first_epoch(model, data, val, config, **kwargs):
        real_getitem = type(data).__getitem__
        poisoned = {"on": False}

        class Poisoned(type(data)):
            def __getitem__(self, index):
                x, y = real_getitem(self, index)
                return (x * float("nan") if poisoned["on"] else x), y

        data.__class__ = Poisoned
        return real_finetune(model, data, val, config,
                             on_epoch=lambda record: poisoned.update(on=True), **kwargs)

    monkeypatch.setattr(train, "finetune", poison_after_first_epoch)
    output = tmp_path / "out.pt2"
    result = cli("retrofit", MLP, "--finetune", SAMPLES / "data" / "digits_train.npz",
                 "--epochs", "2", "--device", "cpu", "-o", output, "--json")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    line = one_line(result)
    assert "NaN or infinite at epoch 2" in line and "kept the weights of epoch 1" in line
    report = json.loads(result.stdout)
    assert list(report["accuracy"]) == ["before", "after swap"]
    assert report["deltas"]["swap"]["delta"] == 0.0
    assert any("fine-tuning stopped" in note for note in report["notes"])
    assert report["output"] is None and report["written"] == [] and report["failure"]
    assert not output.exists() and no_partial_files(tmp_path)
    table = cli("retrofit", MLP, "--finetune", SAMPLES / "data" / "digits_train.npz",
                "--epochs", "2", "--device", "cpu", "-o", tmp_path / "table.pt2")
    assert table.exit_code == ExitCode.BAD_INPUT and "wrote" not in table.stdout
    assert "the model was not written" in table.stdout
    state = load_checkpoint(tmp_path / "out.pt2.ckpt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["best"]["state"].values()
               if v.is_floating_point())
