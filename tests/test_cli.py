"""The command line as a user meets it: exit codes, one-line errors, files left intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrofit.errors import ExitCode
from retrofit.torch_path.io import load_torch_model
from retrofit.verify import torch_parity
from tests import models
from tests.conftest import REPO, SAMPLES, no_partial_files, one_line, run_cli as _cli, sha256

def _copy(path: Path, folder: Path) -> Path:
    target = folder / path.name
    target.write_bytes(path.read_bytes())
    return target


def test_retrofit_every_sample_model_keeps_outputs_and_counts_sites(sample_models, tmp_path):
    assert len(sample_models) >= 2
    for sample in sample_models:
        source = _copy(sample, tmp_path)
        digest = sha256(source)
        result = _cli("retrofit", source, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        original = load_torch_model(source)
        calls = models.count_relu_calls(original.module, *original.example_inputs)
        assert len(report["sites"]) == report["replaced"] == calls
        assert report["parity"]["relative"] <= 1e-5
        written = load_torch_model(Path(report["output"]))
        x = torch.rand(7, 1, 8, 8)
        assert torch_parity(original.module, written.module, (x,)).relative <= 1e-5
        assert sha256(source) == digest
    assert no_partial_files(tmp_path)


def test_retrofit_prints_sites_and_parity(tmp_path):
    source = _copy(SAMPLES / "models" / "digits_cnn.pt2", tmp_path)
    result = _cli("retrofit", source)
    assert result.exit_code == 0, result.output
    assert "layer1.relu#2" in result.output and "identity parity" in result.output
    assert (tmp_path / "digits_cnn.carelu.pt2").exists()
    again = _cli("retrofit", source)
    assert again.exit_code == ExitCode.OUTPUT and "already exists" in again.output
    assert _cli("retrofit", source, "--force").exit_code == 0


def test_a_failed_gate_is_exit_5_after_the_report_and_the_written_model(tmp_path):
    source = _copy(SAMPLES / "models" / "digits_cnn.pt2", tmp_path)
    result = _cli("retrofit", source, "--to", "mrepu", "--data",
                  SAMPLES / "data" / "digits_val.npz", "--device", "cpu", "--max-drop", "1",
                  "--min-gain", "-100", "--json")
    assert result.exit_code == ExitCode.GATE, result.output
    assert one_line(result) == "error: gate failed: max_drop"
    report = json.loads(result.stdout)
    assert [(gate["name"], gate["passed"]) for gate in report["gates"]] == [
        ("max_drop", False), ("min_gain", True)]
    assert Path(report["output"]).exists()


def test_evaluate_json_is_the_library_s_versioned_report(tmp_path):
    result = _cli("evaluate", SAMPLES / "models" / "digits_mlp.pt2", "--data",
                  SAMPLES / "data" / "digits_val.npz", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == ["version", "model", "dataset", "n", "top1", "top5", "notes"]
    assert report["version"] == 1 and report["n"] == 450 and report["top1"] > 90
    text = _cli("evaluate", SAMPLES / "models" / "digits_mlp.pt2", "--data",
                SAMPLES / "data" / "digits_val.npz", "--device", "cpu")
    assert f"top-1 {report['top1']:.2f}%" in text.stdout and "on 450 samples of" in text.stdout


def test_inspect_writes_nothing(tmp_path):
    source = _copy(SAMPLES / "models" / "digits_mlp.pt2", tmp_path)
    result = _cli("inspect", source, "--json")
    assert result.exit_code == 0, result.output
    assert [site["kind"] for site in json.loads(result.output)["sites"]] == ["torch.relu", "F.relu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_mlp.pt2"]


def test_state_dict_with_arch_and_input_shape(tmp_path):
    source = _copy(SAMPLES / "models" / "digits_cnn.state.pt", tmp_path)
    out = tmp_path / "out.pt"
    result = _cli("retrofit", source, "--arch", "samples.architectures:digits_cnn",
                  "--input-shape", "2,1,8,8", "-o", out, "--exclude", "stem")
    assert result.exit_code == 0, result.output
    assert "4 of 5 ReLU sites replaced" in result.output
    assert "stem.2.alpha" not in torch.load(out, weights_only=True)


def test_model_without_relu_exits_with_bad_input(tmp_path):
    path = tmp_path / "norelu.pt2"
    torch.export.save(torch.export.export(models.NoRelu(), (torch.randn(2, 4),)), path)
    result = _cli("retrofit", path)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "no ReLU site" in result.output and f"{path}: " in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norelu.pt2"]


def test_unmatched_selection_rule_is_a_usage_error(tmp_path):
    source = _copy(SAMPLES / "models" / "digits_mlp.pt2", tmp_path)
    result = _cli("retrofit", source, "--include", "nothing.here")
    assert result.exit_code == ExitCode.USAGE and "match no ReLU site" in result.output


def test_pickle_without_trust_is_refused_and_not_run(malicious_pickle):
    path, marker = malicious_pickle
    digest = sha256(path)
    result = _cli("retrofit", path)
    assert result.exit_code == ExitCode.BAD_INPUT and "--trust-pickle" in result.output
    assert not marker.exists() and sha256(path) == digest


def test_errors_are_one_line_without_traceback_from_the_real_command(tmp_path):
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"definitely not a model")
    completed = subprocess.run([sys.executable, "-m", "cadrelu", "retrofit", str(bad)],
                               capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == ExitCode.BAD_INPUT
    assert completed.stderr.strip().count("\n") == 0 and "Traceback" not in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize("args", [["retrofit"], ["retrofit", "x.pt2", "--to", "sigmoid"]])
def test_usage_errors_exit_2(args):
    assert _cli(*args).exit_code == ExitCode.USAGE
