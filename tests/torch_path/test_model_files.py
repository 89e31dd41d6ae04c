"""Files as people really save them, in and out: every output reloads with plain torch and with
cadrelu, weights files carry their retrofit, factories take arguments, training-mode modules,
TorchScript, and models with nothing to rewrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from retrofit.config import CompetitiveReLUConfig, MRePUConfig
from retrofit.errors import BadInputError, ExitCode, UsageError
from retrofit.torch_path.arch import parse_arch_kwargs
from retrofit.torch_path.io import load_model, load_torch_model
from tests.conftest import one_line, run_cli, sha256

FACTORY = "tests.torch_path.test_model_files:head_cnn"


class HeadCNN(nn.Module):
    """BatchNorm, Dropout, a reused ReLU module and a functional ReLU; text annotations
    (``from __future__ import annotations``), which fx used to make unpicklable."""

    def __init__(self, num_classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        x = self.act(self.conv2(x)) + x
        return self.fc(self.drop(F.relu(x).mean((2, 3))))


def head_cnn(num_classes: int = 4, width: int = 6) -> HeadCNN:
    torch.manual_seed(0)
    model = HeadCNN(num_classes, width)
    with torch.no_grad():  # running statistics that differ from a batch's own
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _inputs(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _data(path, n: int = 24, classes: int = 4):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
             y=np.arange(n) % classes)
    return path


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------ pickled modules


@pytest.mark.parametrize("training", [True, False], ids=["saved-in-train-mode", "saved-in-eval-mode"])
def test_pickled_module_output_reloads_with_plain_torch_and_cadrelu(tmp_path, training):
    model = head_cnn().train(training)
    source = tmp_path / "model.pt"
    torch.save(model, source)
    digest = sha256(source)
    out = tmp_path / "model.carelu.pt"
    result = run_cli("retrofit", source, "--trust-pickle", "--input-shape", "2,3,8,8", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replaced"] == 3 and report["parity"]["max_abs_diff"] == 0
    assert any("training mode" in note for note in report["notes"]) == training
    assert sha256(source) == digest

    reloaded = torch.load(out, map_location="cpu", weights_only=False)
    assert not reloaded.training
    x = _inputs()
    torch.testing.assert_close(_eval_outputs(reloaded, x), _eval_outputs(head_cnn(), x),
                               rtol=0, atol=0)
    inspected = run_cli("inspect", out, "--trust-pickle", "--input-shape", "2,3,8,8")
    assert inspected.exit_code == ExitCode.BAD_INPUT
    assert "found and left alone: 3 CompetitiveReLU" in one_line(inspected)
    data = _data(tmp_path / "val.npz")
    scored = run_cli("evaluate", out, "--trust-pickle", "--data", data, "--json")
    assert scored.exit_code == 0, scored.output


def test_pickled_module_naming_code_that_is_not_importable_is_one_line(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "vanishing_arch.py").write_text(
        "import torch\nclass Net(torch.nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("vanishing_arch")
    source = tmp_path / "model.pt"
    torch.save(module.Net(nn.Linear(2, 2), nn.ReLU()), source)
    (tmp_path / "vanishing_arch.py").unlink()
    del sys.modules["vanishing_arch"]
    result = run_cli("inspect", source, "--trust-pickle")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "cannot be imported here" in one_line(result)


# ------------------------------------------------------------------ weights files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_retrofitted_weights_carry_their_record_and_rebuild(tmp_path, suffix):
    model = head_cnn(num_classes=5).eval()
    source = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(source)) if suffix == ".safetensors" else torch.save(state, source)
    out = tmp_path / f"out{suffix}"
    result = run_cli("retrofit", source, "--arch", FACTORY, "--arch-kwargs", "num_classes=5",
                     "--input-shape", "2,3,8,8", "--exclude", "F.relu", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["replaced"] == 2

    # Plain torch reads a plain state dict: tensors only, alpha/beta included.
    plain = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    assert any(key.endswith(".alpha") for key in plain)
    # One call rebuilds the retrofitted module; it computes what the original computes.
    rebuilt = load_model(out, arch=FACTORY, arch_kwargs={"num_classes": 5})
    x = _inputs()
    torch.testing.assert_close(_eval_outputs(rebuilt, x), _eval_outputs(model, x))
    assert rebuilt.load_state_dict(plain, strict=True)  # every key has its place

    # cadrelu reads it back: evaluate, and retrofit the site it kept, keeping the history.
    data = _data(tmp_path / "val.npz", classes=5)
    scored = run_cli("evaluate", out, "--arch", FACTORY, "--arch-kwargs", "num_classes=5",
                     "--data", data)
    assert scored.exit_code == 0, scored.output
    assert "written by a cadrelu retrofit (carelu at 2 site(s))" in scored.stdout
    again = tmp_path / f"again{suffix}"
    second = run_cli("retrofit", out, "--arch", FACTORY, "--arch-kwargs", "num_classes=5",
                     "--to", "mrepu", "--input-shape", "2,3,8,8", "-o", again, "--json")
    assert second.exit_code == 0, second.output
    assert [s["name"] for s in json.loads(second.stdout)["sites"]] == ["F.relu"]
    twice = load_torch_model(again, arch=FACTORY, arch_kwargs={"num_classes": 5})
    assert [step.config.name for step in twice.record.steps] == ["carelu", "mrepu"]
    assert isinstance(twice.record.steps[1].config, MRePUConfig)


def test_retrofitted_weights_without_arch_say_where_they_came_from(tmp_path):
    source = tmp_path / "weights.pt"
    torch.save(head_cnn().state_dict(), source)
    out = tmp_path / "out.pt"
    assert run_cli("retrofit", source, "--arch", FACTORY, "-o", out).exit_code == 0
    result = run_cli("evaluate", out, "--data", _data(tmp_path / "val.npz"))
    assert result.exit_code == ExitCode.USAGE
    assert f"retrofitted from --arch {FACTORY}" in one_line(result)


@pytest.mark.parametrize("record", [
    "{not json",
    # well-formed JSON whose config is out of range: still the file's fault, not an option's
    '{"version": 1, "steps": [{"activation": "carelu", "config": {"measure": "bogus"}, '
    '"sites": ["relu"]}]}',
    '{"version": 1, "steps": [{"activation": "carelu", "config": {"k": 0.5}, "sites": []}]}',
])
def test_a_damaged_record_is_bad_input(tmp_path, record):
    state = head_cnn().state_dict()
    state._metadata[""]["cadrelu"] = record
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(BadInputError, match="damaged cadrelu record"):
        load_torch_model(path, arch=FACTORY)


def test_weights_that_do_not_fit_the_architecture_name_keys_and_shapes(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(head_cnn(num_classes=10).state_dict(), path)
    result = run_cli("inspect", path, "--arch", FACTORY)
    assert result.exit_code == ExitCode.BAD_INPUT
    line = one_line(result)
    assert "fc.weight (10, 6) vs (4, 6)" in line and "fc.bias (10,) vs (4,)" in line
    assert run_cli("inspect", path, "--arch", FACTORY, "--arch-kwargs",
                   "num_classes=10").exit_code == 0
    state = head_cnn().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv.bias"]
    torch.save(state, path)
    line = one_line(run_cli("inspect", path, "--arch", FACTORY))
    assert "missing: conv.bias" in line and "unexpected: extra.weight" in line


# ------------------------------------------------------------------ --arch and its arguments


def test_arch_kwargs_are_python_literals_else_text():
    assert parse_arch_kwargs(["num_classes=10", "widths=(1, 2)", "pretrained=False",
                              "act=relu", "name='x=y'", "scale=None"]) == {
        "num_classes": 10, "widths": (1, 2), "pretrained": False, "act": "relu",
        "name": "x=y", "scale": None}


@pytest.mark.parametrize("item", ["num_classes", "=3", "not an identifier=3"])
def test_malformed_arch_kwargs_are_usage_errors(item):
    with pytest.raises(UsageError, match="name=value"):
        parse_arch_kwargs([item])


def test_arch_code_that_fails_is_bad_input_and_a_keyword_it_lacks_a_usage_error(
        tmp_path, monkeypatch):
    (tmp_path / "broken_arch.py").write_text("def model(:\n")
    (tmp_path / "raising_arch.py").write_text(
        "def model(**kw):\n    raise KeyError('depth')\n")
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    torch.save(head_cnn().state_dict(), weights)
    for arch, expected, code in (("broken_arch:model", "SyntaxError", ExitCode.BAD_INPUT),
                                 ("raising_arch:model", "KeyError", ExitCode.BAD_INPUT),
                                 (FACTORY, "unexpected keyword argument 'depth'",
                                  ExitCode.USAGE)):
        extra = ("--arch-kwargs", "depth=3") if arch == FACTORY else ()
        result = run_cli("inspect", weights, "--arch", arch, *extra)
        assert result.exit_code == code, result.output
        assert expected in one_line(result)


# ------------------------------------------------------------------ training mode, .pt2


def test_program_exported_in_training_mode_is_verified_in_eval_mode(tmp_path):
    model = head_cnn().train()
    x = _inputs(4)
    program = torch.export.export(model, (x,))
    path = tmp_path / "train.pt2"
    torch.export.save(program, path)
    loaded = load_torch_model(path)
    assert loaded.notes and "training mode" in loaded.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), _eval_outputs(head_cnn(), x))
    out = tmp_path / "out.pt2"
    result = run_cli("retrofit", path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity"]["max_abs_diff"] < 1e-6
    with torch.no_grad():
        written = torch.export.load(out).module()(x)
    torch.testing.assert_close(written, _eval_outputs(head_cnn(), x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ TorchScript


def test_torchscript_files_are_named_with_the_way_to_a_readable_file(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(head_cnn().eval()), str(path))
    for command in (("inspect", path), ("retrofit", path, "--trust-pickle"),
                    ("evaluate", path, "--data", _data(tmp_path / "val.npz"))):
        result = run_cli(*command)
        assert result.exit_code == ExitCode.BAD_INPUT
        line = one_line(result)
        assert "TorchScript" in line and "torch.export" in line and "weights_only" not in line


# ------------------------------------------------------------------ nothing to rewrite


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(inplace=True),
                                      nn.Conv2d(4, 4, 3), nn.ReLU6(), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(x)).mean((2, 3))


def test_inspect_without_relu_lists_what_it_left_alone_and_names_the_file(tmp_path):
    model = NoRelu().eval()
    pt2 = tmp_path / "norelu.pt2"
    torch.export.save(torch.export.export(model, (_inputs(2),)), pt2)
    pickled = tmp_path / "norelu.pt"
    torch.save(model, pickled)
    for path in (pt2, pickled):
        result = run_cli("inspect", path, "--trust-pickle")
        assert result.exit_code == ExitCode.BAD_INPUT
        line = one_line(result)
        assert line.startswith(f"error: {path}: no ReLU site") and "GraphModule" not in line
        assert "found and left alone: 2 nn.ReLU6, 1 nn.GELU, 1 sigmoid" in line


def test_config_of_record_round_trips():
    from retrofit.torch_path.record import RetrofitRecord, RetrofitStep

    record = RetrofitRecord((RetrofitStep(CompetitiveReLUConfig(measure="l1", k=3.0), ("a",)),
                             RetrofitStep(MRePUConfig(p=3.0), ("b#1", "b#2"))),
                            FACTORY, {"num_classes": 5})
    back = RetrofitRecord.from_json(record.to_json(), "file")
    assert back.steps == record.steps and back.arch == FACTORY


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * mask).mean(1, keepdim=True).repeat(1, 3)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_model_taking_two_inputs_is_refused_for_one_input_data_before_any_work(tmp_path, suffix):
    example = (torch.randn(2, 4), torch.ones(2, 4))
    path = tmp_path / f"two{suffix}"
    if suffix == ".pt2":
        torch.export.save(torch.export.export(TwoInputs(), example), path)
    else:
        torch.onnx.export(TwoInputs(), example, str(path), dynamo=False,
                          input_names=["x", "mask"])
    data = tmp_path / "val.npz"
    np.savez(data, x=np.zeros((4, 4), np.float32), y=np.zeros(4, np.int64))
    for command in (("evaluate", path, "--data", data),
                    ("retrofit", path, "--data", data, "-o", tmp_path / f"out{suffix}")):
        result = run_cli(*command)
        assert result.exit_code == ExitCode.BAD_INPUT
        assert "takes 2 inputs (x, mask)" in one_line(result)
    assert not (tmp_path / f"out{suffix}").exists()


class RefusesOddBatches(nn.Module):
    """Model code that checks its input's values (as T5's classifier checks for end tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool((x < -10).any()):
            raise ValueError("every example must hold a marker value")
        return self.act(self.fc(x))


def test_an_original_failing_on_its_sample_inputs_is_bad_input_not_a_bug(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(RefusesOddBatches(), path)
    result = run_cli("retrofit", path, "--trust-pickle", "--input-shape", "3,4", "-o",
                     tmp_path / "out.pt")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "fails on its sample inputs (every example must hold a marker value)" in one_line(result)
    assert not (tmp_path / "out.pt").exists()


class UntraceableFunctional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if bool(x.sum() > 0) else -x


def test_no_reachable_site_in_a_forward_that_does_not_trace_says_why(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(UntraceableFunctional(), path)
    line = one_line(run_cli("inspect", path, "--trust-pickle"))
    assert "no ReLU site to replace" in line
    assert "the model's forward does not trace" in line and "cannot be reached" in line


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod."])
def test_weights_saved_through_a_wrapper_load_without_its_prefix(tmp_path, prefix):
    state = {prefix + key: value for key, value in head_cnn().state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    out = tmp_path / "out.pt"
    result = run_cli("retrofit", path, "--arch", FACTORY, "--input-shape", "2,3,8,8", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.output
    assert any(f"began with {prefix!r}" in note for note in json.loads(result.stdout)["notes"])
    written = torch.load(out, weights_only=True)
    assert not any(key.startswith(prefix) for key in written)
    x = _inputs()
    torch.testing.assert_close(_eval_outputs(load_model(out, arch=FACTORY), x),
                               _eval_outputs(head_cnn(), x))


def test_a_prefix_that_does_not_make_the_keys_fit_is_still_a_mismatch(tmp_path):
    state = {"module." + key: value for key, value in head_cnn(num_classes=7).state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    result = run_cli("inspect", tmp_path / "ddp.pt", "--arch", FACTORY)
    assert result.exit_code == ExitCode.BAD_INPUT and "does not fit" in one_line(result)


def test_a_pickled_checkpoint_dict_gives_its_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "model": head_cnn(), "optimizer": {"lr": 0.1}}, path)
    out = tmp_path / "out.pt"
    result = run_cli("retrofit", path, "--trust-pickle", "--input-shape", "2,3,8,8", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.output
    assert any("its 'model' entry is the model" in n for n in json.loads(result.stdout)["notes"])
    x = _inputs()
    torch.testing.assert_close(_eval_outputs(torch.load(out, weights_only=False), x),
                               _eval_outputs(head_cnn(), x))
