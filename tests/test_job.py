"""The job: scores before and after the swap with a paired interval, reports every key it
documents, honours gates, and never writes over or beside the input by surprise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrofit.config import CompetitiveReLUConfig, MRePUConfig
from retrofit.errors import OutputError, UsageError
from retrofit.job import DataOptions, Gates, RetrofitRequest, evaluate_file, retrofit_file
from retrofit.model_io import ModelFormat
from retrofit.report import report_to_dict, report_to_markdown
from tests.conftest import SAMPLES

VAL = SAMPLES / "data" / "digits_val.npz"
DOCUMENTED_KEYS = {
    "version", "model", "format", "activation", "config", "output", "sites", "replaced", "kept",
    "parity", "dataset", "accuracy", "deltas", "gates", "gates_passed", "finetune",
    "trained_onnx_parity", "onnx_export", "onnx_export_parity", "notes",
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
    from retrofit.report import append_step_summary

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    report = retrofit_file(RetrofitRequest(cnn, data=DataOptions(val=VAL), device="cpu"))
    markdown = report_to_markdown(report)
    assert "| before |" in markdown and "after swap vs before" in markdown
    append_step_summary(markdown)
    assert summary.read_text() == "earlier step\n" + markdown


def test_evaluate_any_format(tmp_path):
    result, dataset = evaluate_file(SAMPLES / "models" / "digits_mlp.pt2", DataOptions(val=VAL),
                                    device="cpu")
    assert result.n == 450 and 90 < result.top1 <= 100 and result.top5 >= result.top1
    state, _ = evaluate_file(SAMPLES / "models" / "digits_mlp.state.pt", DataOptions(val=VAL),
                             arch="samples.architectures:digits_mlp", device="cpu")
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
