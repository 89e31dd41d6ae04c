"""The job: scores before and after the swap with a paired interval, reports every key it
documents, honours gates, and never writes over or beside the input by surprise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrofit.config import CompetitiveReLUConfig, MRePUConfig
from retrofit.errors import GateError, OutputError, UsageError
from retrofit.pipeline.job import evaluate_file, retrofit_file
from retrofit.pipeline.request import DataOptions, Gates, RetrofitRequest
from retrofit.torch_path.formats import ModelFormat
from retrofit.pipeline.report import report_to_dict, report_to_markdown
from tests.conftest import SAMPLES

VAL = SAMPLES / "data" / "digits_val.npz"
DOCUMENTED_KEYS = {
    "verified", "unverified_reason",
    "version", "model", "format", "activation", "config", "output", "sites", "replaced", "kept",
    "parity", "dataset", "accuracy", "deltas", "gates", "gates_passed", "finetune",
    "trained_onnx_parity", "onnx_export", "onnx_export_parity", "notes", "written", "failure",
    "resumed", "calibration", "overflow_scale",
}


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    target = tmp_path / "cnn.pt2"
    target.write_bytes((SAMPLES / "models" / "digits_cnn.pt2").read_bytes())
    return target


def test_identity_swap_scores_the_same_with_a_zero_interval(cnn):
    report = retrofit_file(RetrofitRequest(cnn, data=DataOptions(val=VAL), device="cpu"))
    before, after = (stage.result for stage in report.stages)
    assert before.n == after.n == 450
    assert before.top1 == after.top1 > 90
    swap = report.deltas["swap"]
    assert (swap.delta, swap.ci_low, swap.ci_high, swap.discordant) == (0, 0, 0, 0)


def test_mrepu_swap_reports_the_drop_and_fails_a_max_drop_gate(cnn):
    report = retrofit_file(RetrofitRequest(
        cnn, MRePUConfig(), data=DataOptions(val=VAL), device="cpu", gates=Gates(max_drop=1.0)))
    assert report.deltas["swap"].delta < -10
    assert report.deltas["swap"].ci_high < 0
    assert [(gate.name, gate.passed) for gate in report.gates] == [("max_drop", False)]
    assert not report.gates_passed
    assert report.output.exists()
    with pytest.raises(GateError, match="^gate failed: max_drop$") as failed:
        report.raise_for_outcome()
    assert failed.value.exit_code == 5


def test_json_report_has_exactly_the_documented_keys(cnn):
    report = retrofit_file(RetrofitRequest(cnn, data=DataOptions(val=VAL), device="cpu",
                                           gates=Gates(max_drop=0.5, min_gain=0.0)))
    data = json.loads(json.dumps(report_to_dict(report), default=str))
    assert set(data) == DOCUMENTED_KEYS
    assert set(data["accuracy"]) == {"before", "after swap"}
    assert set(data["deltas"]["swap"]) >= {"delta", "ci_low", "ci_high", "mcnemar_p", "n"}
    assert data["gates_passed"] is True
    assert data["dataset"]["preprocessing"] is not None


def test_markdown_report_is_appended_to_the_step_summary(cnn, tmp_path, monkeypatch):
    from retrofit.pipeline.report import append_step_summary

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    report = retrofit_file(RetrofitRequest(cnn, data=DataOptions(val=VAL), device="cpu"))
    markdown = report_to_markdown(report)
    assert "| before |" in markdown and "after swap vs before" in markdown
    append_step_summary(markdown)
    assert summary.read_text() == "earlier step\n" + markdown


def test_evaluate_any_format(tmp_path):
    result = evaluate_file(SAMPLES / "models" / "digits_mlp.pt2", DataOptions(val=VAL),
                           device="cpu").result
    assert result.n == 450 and 90 < result.top1 <= 100 and result.top5 >= result.top1
    state = evaluate_file(SAMPLES / "models" / "digits_mlp.state.pt", DataOptions(val=VAL),
                          arch="samples.architectures:digits_mlp", device="cpu").result
    assert state.top1 == result.top1
    with pytest.raises(UsageError):
        evaluate_file(SAMPLES / "models" / "digits_mlp.pt2", DataOptions(), device="cpu")


def test_state_dict_sample_inputs_come_from_the_data(tmp_path):
    source = tmp_path / "cnn.state.pt"
    source.write_bytes((SAMPLES / "models" / "digits_cnn.state.pt").read_bytes())
    report = retrofit_file(RetrofitRequest(
        source, CompetitiveReLUConfig(measure="count"), arch="samples.architectures:digits_cnn",
        data=DataOptions(val=VAL), device="cpu"))
    assert report.format is ModelFormat.STATE_DICT
    assert report.parity is not None and report.parity.relative <= 1e-5


def test_outputs_are_checked_before_any_work(cnn):
    with pytest.raises(OutputError, match="is the input"):
        retrofit_file(RetrofitRequest(cnn, output=cnn))
    with pytest.raises(UsageError, match="same file"):
        retrofit_file(RetrofitRequest(cnn, output=cnn.with_name("x.pt2"),
                                      export_onnx=cnn.with_name("x.pt2")))


def test_readme_documents_every_json_key():
    readme = (SAMPLES.parent / "README.md").read_text()
    table = readme[readme.index("## JSON report"):readme.index("## Layout")]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            documented |= {part.strip("` ") for part in row.split("|")[1].split(",")}
    assert documented == DOCUMENTED_KEYS


def _finetune_config(**fields):
    from retrofit.training.config import FinetuneConfig

    return FinetuneConfig(**{"epochs": 1, "batch_size": 64, "lr": 1e-3, "activation_lr": 1e-2,
                             "device": "cpu", **fields})


TRAIN = SAMPLES / "data" / "digits_train.npz"


def test_finetune_torch_with_control_and_no_checkpoint_left(cnn):
    report = retrofit_file(RetrofitRequest(
        cnn, data=DataOptions(val=VAL, train=TRAIN), device="cpu",
        finetune=_finetune_config(), control=True))
    names = [stage.name for stage in report.stages]
    assert names == ["before", "after swap", "after fine-tune"]
    assert report.control is not None and set(report.deltas) == {"swap", "finetune", "vs_control"}
    assert report.finetune.best_val_top1 == report.stages[-1].result.top1
    assert not list(cnn.parent.glob("*.ckpt")) and report.output.exists()


def test_finetune_onnx_round_trip_keeps_the_graph(tmp_path):
    import onnx

    source = tmp_path / "cnn.onnx"
    source.write_bytes((SAMPLES / "models" / "digits_cnn.onnx").read_bytes())
    config = CompetitiveReLUConfig(measure="l1")
    swapped = retrofit_file(RetrofitRequest(source, config, output=tmp_path / "swap.onnx",
                                            device="cpu"))
    report = retrofit_file(RetrofitRequest(
        source, config, data=DataOptions(val=VAL, train=TRAIN),
        device="cpu", finetune=_finetune_config(activation_lr=0.1)))
    original, result = onnx.load(str(source)), onnx.load(str(report.output))
    plain = onnx.load(str(swapped.output))
    assert [i.name for i in result.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in result.graph.output] == [o.name for o in original.graph.output]
    assert result.opset_import == original.opset_import
    assert not any(node.op_type == "Relu" for node in result.graph.node)
    untouched = [n for n in original.graph.node if n.op_type != "Relu"]
    assert [n.name for n in result.graph.node if n.name in {u.name for u in untouched}] == \
        [n.name for n in untouched]
    assert len(result.graph.node) == len(plain.graph.node)
    assert report.trained_parity is not None and report.trained_parity.relative <= 1e-4
    trained_alpha = [t for t in result.graph.initializer if t.name.endswith(".alpha")]
    assert len(trained_alpha) == 5 and any(onnx.numpy_helper.to_array(t) != 0 for t in trained_alpha)


def test_calibrated_mrepu_keeps_the_mlp_and_its_blend_fine_tune_ends_as_mrepu(tmp_path):
    from retrofit.activations.modules import MRePU

    source = tmp_path / "mlp.pt2"
    source.write_bytes((SAMPLES / "models" / "digits_mlp.pt2").read_bytes())
    report = retrofit_file(RetrofitRequest(
        source, MRePUConfig(), data=DataOptions(val=VAL, train=TRAIN), device="cpu",
        finetune=_finetune_config(epochs=3, blend_ramp_fraction=0.5)))
    before, swapped, tuned = (stage.result.top1 for stage in report.stages)
    assert swapped > before - 5 and tuned >= swapped  # the plain swap fell to ~50% here
    assert report.deltas["finetune"].ci_high > -3
    tuned_modules = [m for m in report.finetune.model.modules() if isinstance(m, MRePU)]
    assert tuned_modules and all(m.blend == 1.0 for m in tuned_modules)
    assert {fit.site for fit in report.calibration.fits} == {s.name for s in report.replaced}


def test_a_result_without_sample_inputs_says_first_that_it_is_unverified(tmp_path):
    from rich.console import Console

    from retrofit.pipeline.report import print_report, report_to_json

    source = tmp_path / "cnn.state.pt"
    source.write_bytes((SAMPLES / "models" / "digits_cnn.state.pt").read_bytes())
    report = retrofit_file(RetrofitRequest(source, arch="samples.architectures:digits_cnn"))
    assert report.parity is None and not report.verified
    data = json.loads(report_to_json(report))
    assert list(data)[:2] == ["verified", "unverified_reason"]
    assert data["verified"] is False and "--input-shape" in data["unverified_reason"]
    console = Console(record=True, width=200)
    print_report(report, console)
    assert console.export_text().splitlines()[0].startswith("UNVERIFIED: ")
    assert "UNVERIFIED" in report_to_markdown(report).splitlines()[2]
    verified = retrofit_file(RetrofitRequest(source, arch="samples.architectures:digits_cnn",
                                             data=DataOptions(val=VAL), device="cpu", force=True))
    assert verified.verified and json.loads(report_to_json(verified))["unverified_reason"] is None


@pytest.mark.parametrize("name", ["digits_cnn.pt2", "digits_cnn.onnx"])
def test_sample_inputs_taken_from_the_data_are_the_data_as_the_model_is_fed_it(name, tmp_path):
    """uint8 pixels are fed /255: the outputs checked for parity and NaN/inf are those of the
    real, scaled samples, not of raw 0..255 values (or, for ONNX, random ones)."""
    import numpy as np
    import torch

    from retrofit.pipeline.swap import open_model

    data = np.load(VAL)
    pixels = tmp_path / "pixels.npz"
    np.savez(pixels, x=(np.clip(data["x"], 0, 1) * 255).astype(np.uint8), y=data["y"])
    opened = open_model(RetrofitRequest(SAMPLES / "models" / name,
                                        data=DataOptions(val=pixels), device="cpu"))
    (sample,) = opened.subject.sample_tensors
    want = torch.stack([opened.val[i][0] for i in range(sample.shape[0])])
    assert sample.dtype == torch.float32 and float(sample.max()) <= 1.0
    torch.testing.assert_close(sample, want, rtol=0, atol=0)


def _counted(monkeypatch, function) -> list[int]:
    """Count the calls of ``function`` wherever it was imported (every module that holds it)."""
    import sys

    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, counted)
    return calls


@pytest.mark.parametrize("name, config", [
    ("digits_cnn.onnx", CompetitiveReLUConfig()), ("digits_cnn.onnx", MRePUConfig()),
    ("digits_cnn.pt2", MRePUConfig()),
], ids=["onnx-carelu", "onnx-mrepu", "pt2-mrepu"])
def test_a_finetune_with_control_rewrites_and_translates_once(name, config, tmp_path,
                                                               monkeypatch):
    """The swap's rewrite, its torch form and the original's torch form are each made once and
    passed on: the calibration, the fine-tune, the write-back of its values and the control
    reuse them (an ONNX CAReLU job made 2 ONNX rewrites, 3 translations and 2 torch rewrites;
    an MRePU one 3, 4 and 3; a .pt2 MRePU one 4 torch rewrites)."""
    from retrofit.onnx_path.rewrite import rewrite_onnx_relus
    from retrofit.onnx_path.to_torch.builder import onnx_to_torch
    from retrofit.torch_path.rewrite import retrofit_torch_model

    counts = {label: _counted(monkeypatch, function) for label, function in (
        ("onnx rewrite", rewrite_onnx_relus), ("onnx to torch", onnx_to_torch),
        ("torch rewrite", retrofit_torch_model))}
    source = tmp_path / name
    source.write_bytes((SAMPLES / "models" / name).read_bytes())
    report = retrofit_file(RetrofitRequest(
        source, config, data=DataOptions(val=VAL, train=TRAIN), device="cpu",
        finetune=_finetune_config(), control=True))
    assert report.failure is None and report.control is not None
    onnx = name.endswith(".onnx")
    if onnx:
        assert report.trained_parity is not None and report.trained_parity.relative <= 1e-4
    assert {label: len(calls) for label, calls in counts.items()} == {
        "onnx rewrite": int(onnx), "onnx to torch": int(onnx), "torch rewrite": 1}
