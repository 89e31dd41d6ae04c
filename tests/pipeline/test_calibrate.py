"""The calibrated MRePU swap: the gain fit, the graph-order calibration, and the job around it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from retrofit.activations.functional import mrepu
from retrofit.activations.modules import MRePU
from retrofit.pipeline.calibrate import calibrate_gains, fit_gains, site_modules
from retrofit.config import MRePUConfig
from retrofit.errors import ParityError
from retrofit.pipeline.job import retrofit_file
from retrofit.pipeline.request import DataOptions, RetrofitRequest
from retrofit.onnx_path.io import run_onnx
from retrofit.torch_path.rewrite import retrofit_torch_model
from retrofit.training.config import FinetuneConfig
from tests.conftest import SAMPLES

VAL = SAMPLES / "data" / "digits_val.npz"


def test_a_gained_relu_fitted_to_relu_is_exact():
    """The identity case: a family that holds the target fits it with no error."""
    x = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    a, b, error = fit_gains(x, x.clamp_min(0.0), lambda u: u.clamp_min(0.0))
    assert error < 1e-12 and a * b == pytest.approx(1.0, rel=1e-12)


def test_the_fit_recovers_the_gains_that_made_an_mrepu_target():
    x = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = 0.8 * mrepu(0.3 * x)
    a, b, error = fit_gains(x, target, mrepu)
    assert error < 1e-8
    assert a == pytest.approx(0.3, rel=1e-5) and b == pytest.approx(0.8, rel=1e-5)


def test_an_all_zero_target_is_fitted_by_a_zero_output_gain():
    x = -torch.rand(100, dtype=torch.float64)
    assert fit_gains(x, x.clamp_min(0.0), mrepu) == (1.0, 0.0, 0.0)


def scaled_mlp(scale: float, depth: int = 4) -> nn.Sequential:
    """A ReLU MLP whose pre-activations are ``scale`` times larger than MRePU tolerates."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(16, 16)
        nn.init.normal_(linear.weight, std=scale * math.sqrt(2.0 / 16))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 3)).eval()


def test_calibration_lowers_every_site_error_and_brings_the_outputs_back():
    original = scaled_mlp(3.0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    result = retrofit_torch_model(original, MRePUConfig())
    with torch.no_grad():
        plain_gap = (result.model(x) - original(x)).norm() / original(x).norm()
    calibration = calibrate_gains(result.model, site_modules(result),
                                  [(x[:128],), (x[128:],)], "test")
    assert [fit.site for fit in calibration.fits] == [s.name for s in result.sites]
    for fit in calibration.fits:
        assert fit.error_after < fit.error_before
    with torch.no_grad():
        calibrated_gap = (result.model(x) - original(x)).norm() / original(x).norm()
    assert not plain_gap < 10  # NaN here: the plain swap overflows
    assert calibrated_gap < 1
    assert calibration.samples == 256 and not calibration.unreached


class CalledOutOfOrder(nn.Module):
    """Defines its ReLUs in one order and calls them in the other."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.ReLU()
        self.early = nn.ReLU()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.second(self.early(self.first(x))))


def test_sites_are_fitted_in_the_order_the_forward_pass_reaches_them():
    result = retrofit_torch_model(CalledOutOfOrder().eval(), MRePUConfig())
    sites = {**site_modules(result), "unused": MRePU()}
    for module in sites.values():
        module.blend = 0.3
    result.model.train()
    calibration = calibrate_gains(result.model, sites, [(torch.randn(32, 4),)], "test")
    assert [fit.site for fit in calibration.fits] == ["early", "late"]
    assert calibration.unreached == ("unused",) and "unused" in calibration.summary()
    assert all(module.blend == 0.3 for module in sites.values()) and result.model.training
    assert sites["unused"].gain_in.item() == 1.0


def test_each_site_is_fitted_against_the_original_relu_output_not_its_own_drifted_input():
    """A site downstream of a miscalibrated one is fitted to what the original computed
    there: the gains take up the drift (a plain per-site fit would copy it)."""
    original = scaled_mlp(2.0, depth=2)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(3))
    result = retrofit_torch_model(original, MRePUConfig())
    sites = site_modules(result)
    calibrate_gains(result.model, sites, [(x,)], "test")  # 8192 elements a site: all of them
    second = sites["3"]
    with torch.no_grad():
        drifted = result.model[:3](x)  # the second site's input, the first one calibrated
        want = fit_gains(drifted, original[:4](x), mrepu)[:2]
        own = fit_gains(drifted, drifted.clamp_min(0.0), mrepu)[:2]
    got = (second.gain_in.item(), second.gain_out.item())
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(own, rel=1e-2)


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    target = tmp_path / "cnn.pt2"
    target.write_bytes((SAMPLES / "models" / "digits_cnn.pt2").read_bytes())
    return target


@pytest.mark.slow
def test_the_calibrated_cnn_swap_keeps_most_of_its_accuracy_and_is_written_with_its_gains(cnn):
    report = retrofit_file(RetrofitRequest(cnn, MRePUConfig(), data=DataOptions(val=VAL),
                                           device="cpu"))
    before, swapped = (stage.result.top1 for stage in report.stages)
    assert swapped >= 75.0, swapped  # the plain swap: ~10% (chance)
    assert "validation" in report.calibration.source
    # finite on digits scaled by 2, not by 4: said first, since it is where the model breaks
    assert report.overflow_scale == 4.0 and report.notes[0].startswith("mrepu overflows")
    loaded = torch.export.load(str(report.output)).module()
    gains = {name: value.item() for name, value in loaded.state_dict().items()
             if name.endswith(("gain_in", "gain_out"))}
    fitted = sorted(v for fit in report.calibration.fits for v in (fit.gain_in, fit.gain_out))
    assert sorted(gains.values()) == pytest.approx(fitted, rel=1e-6)


@pytest.mark.slow
def test_an_onnx_mrepu_retrofit_carries_the_fitted_gains_as_initializers(tmp_path):
    source = tmp_path / "cnn.onnx"
    source.write_bytes((SAMPLES / "models" / "digits_cnn.onnx").read_bytes())
    report = retrofit_file(RetrofitRequest(source, MRePUConfig(), data=DataOptions(val=VAL),
                                           device="cpu"))
    assert report.stages[1].result.top1 >= 75.0
    written = onnx.load(str(report.output))
    values = {t.name: float(onnx.numpy_helper.to_array(t)) for t in written.graph.initializer
              if t.name.endswith((".gain_in", ".gain_out"))}
    for fit in report.calibration.fits:
        assert any(name.endswith(".gain_in") and value == pytest.approx(fit.gain_in, rel=1e-6)
                   for name, value in values.items())
    x = np.load(VAL)["x"][:8].astype(np.float32)
    (logits,) = run_onnx(written, {written.graph.input[0].name: x})
    assert np.isfinite(logits).all()


def exploding_mlp(path: Path) -> Path:
    """Weights that push MRePU (no calibration) past float32 and on to inf - inf = NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(400.0)
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), str(path))
    return path


def test_a_swap_that_computes_nan_or_inf_is_a_parity_failure_and_writes_nothing(tmp_path):
    source = exploding_mlp(tmp_path / "mlp.pt2")
    output = tmp_path / "out.pt2"
    with pytest.raises(ParityError, match="NaN or inf"):
        retrofit_file(RetrofitRequest(source, MRePUConfig(calibrate=False), output=output,
                                      device="cpu"))
    assert not output.exists() and sorted(tmp_path.iterdir()) == [source]


@pytest.mark.slow
def test_an_onnx_mrepu_fine_tune_is_written_and_checked_on_real_samples(tmp_path):
    """The fine-tuned MRePU computes inf on random normal inputs, not on digits: the NaN/inf
    check must run on the data's samples, or a working model would be refused."""
    source = tmp_path / "cnn.onnx"
    source.write_bytes((SAMPLES / "models" / "digits_cnn.onnx").read_bytes())
    report = retrofit_file(RetrofitRequest(
        source, MRePUConfig(), data=DataOptions(val=VAL, train=SAMPLES / "data" / "digits_train.npz"),
        device="cpu", finetune=FinetuneConfig(epochs=1)))
    assert report.failure is None and report.output in report.written
    assert report.stages[-1].result.top1 > report.stages[1].result.top1


def test_the_overflow_probe_names_the_smallest_scale_at_which_outputs_turn_nan_or_inf():
    from retrofit.verify import OVERFLOW_SCALES, overflow_scale

    def outputs_at(limit):
        return lambda scale: [np.array([1.0, np.inf if scale >= limit else 2.0])]

    assert overflow_scale(outputs_at(1.5)) == 1.5
    assert overflow_scale(outputs_at(1.0)) == OVERFLOW_SCALES[0]
    assert overflow_scale(outputs_at(100.0)) is None


def test_relu_like_retrofits_are_not_probed_for_overflow(tmp_path):
    from retrofit.config import CompetitiveReLUConfig

    source = exploding_mlp(tmp_path / "mlp.pt2")  # ReLU is homogeneous: scale changes nothing
    report = retrofit_file(RetrofitRequest(source, CompetitiveReLUConfig(), device="cpu"))
    assert report.overflow_scale is None and report.written


def test_the_cli_refuses_a_swap_that_computes_nan_or_inf_with_exit_4_and_one_line(tmp_path):
    from retrofit.errors import ExitCode
    from tests.conftest import one_line, run_cli

    source = exploding_mlp(tmp_path / "mlp.pt2")
    output = tmp_path / "out.pt2"
    result = run_cli("retrofit", source, "--to", "mrepu", "--no-calibrate", "-o", output)
    assert result.exit_code == ExitCode.PARITY
    assert "NaN or inf" in one_line(result) and not output.exists()
    calibrated = run_cli("retrofit", source, "--to", "mrepu", "-o", output)
    assert calibrated.exit_code == 0 and output.exists()  # the gains keep it finite


def test_data_the_model_cannot_take_is_bad_input_when_calibrating_too(tmp_path):
    """A token id beyond the embedding table fails in the calibration passes, which run before
    the data is scored: the same one line and exit code 3 as scoring gives, not a bug's 1."""
    from retrofit.errors import ExitCode
    from tests.conftest import one_line, run_cli
    from tests.evaluation.test_int_inputs import LENGTH, VOCAB, _model

    source = tmp_path / "tokens.pt2"
    torch.export.save(torch.export.export(_model(), (torch.randint(0, VOCAB, (2, LENGTH)),)),
                      str(source))
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(10, LENGTH))
    ids[5, 0] = VOCAB + 100
    data = tmp_path / "ids.npz"
    np.savez(data, x=ids, y=np.zeros(10, dtype=np.int64))
    output = tmp_path / "out.pt2"
    result = run_cli("retrofit", source, "--to", "mrepu", "--data", data, "--device", "cpu",
                     "-o", output)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "do not fit the model" in one_line(result) and not output.exists()
