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


def _quantized_onnx(folder: Path) -> Path:
    """A Q/DQ classifier: int8 weights through DequantizeLinear -> MatMul, its activation
    quantized and dequantized around the Relu, then Gemm to 10 classes. Evaluation runs it as
    it is; only a rewrite must refuse it (its scales were calibrated for the ReLU)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(array, name) for name, array in (
        ("w1_q", rng.integers(-127, 128, (64, 16)).astype(np.int8)),
        ("w1_scale", np.array(0.01, np.float32)),
        ("act_scale", np.array(0.05, np.float32)), ("act_zero", np.array(0, np.int8)),
        ("w2", rng.standard_normal((16, 10)).astype(np.float32)),
        ("b2", np.zeros(10, np.float32)))]
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale"], ["w1"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "act_scale", "act_zero"], ["h_q"]),
        helper.make_node("DequantizeLinear", ["h_q", "act_scale", "act_zero"], ["h_dq"]),
        helper.make_node("Relu", ["h_dq"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = folder / "qdq.onnx"
    onnx.save(model, path)
    return path


def _digits_npz(folder: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(1)
    path = folder / "d.npz"
    np.savez(path, x=rng.random((12, 1, 8, 8), dtype=np.float32),
             y=np.arange(12, dtype=np.int64) % 10)
    return path


def test_evaluate_scores_a_quantized_onnx_model(tmp_path):
    result = _cli("evaluate", _quantized_onnx(tmp_path), "--data", _digits_npz(tmp_path),
                  "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n"] == 12 and 0.0 <= report["top1"] <= 100.0


@pytest.mark.parametrize("command", ["retrofit", "inspect"])
def test_a_quantized_onnx_model_is_refused_by_the_rewrite(tmp_path, command):
    source = _quantized_onnx(tmp_path)
    digest = sha256(source)
    result = _cli(command, source)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "the model is quantized (DequantizeLinear x2, QuantizeLinear x1)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"] and sha256(source) == digest
