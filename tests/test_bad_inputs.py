"""Bad input through the real command line: one line, the documented exit code, inputs intact,
no partial output; and pickled code never runs without ``--trust-pickle``.

The corpus is built by the tests themselves (:data:`CORPUS`): each row names a bad input, how
to make it, the command that meets it, the exit code the README promises and a fragment of the
one-line message. ``python -m tests.test_bad_inputs`` prints what the tool answers to each.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from retrofit.errors import ExitCode
from retrofit.torch_path.formats import ModelFormat, detect_format
from tests.conftest import SAMPLES, _WritesMarker, no_partial_files, run_cli as cli, sha256

MLP = SAMPLES / "models" / "digits_mlp.pt2"
CNN_ONNX = SAMPLES / "models" / "digits_cnn.onnx"
VAL = SAMPLES / "data" / "digits_val.npz"
TRAIN = SAMPLES / "data" / "digits_train.npz"


def copy(source: Path, folder: Path, name: str | None = None) -> Path:
    target = folder / (name or source.name)
    shutil.copyfile(source, target)
    return target


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    data = bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    data[0] = 0x17  # not a zip, pickle, numpy or safetensors header by chance
    return bytes(data)


def small_data(folder: Path, n: int = 40, classes: int = 10, name: str = "data.npz") -> Path:
    rng = np.random.default_rng(0)
    path = folder / name
    np.savez(path, x=rng.random((n, 1, 8, 8), dtype=np.float32),
             y=np.arange(n, dtype=np.int64) % classes)
    return path


def onnx_file(path: Path, nodes: list[onnx.NodeProto], opset: int = 17) -> Path:
    """x[N, 4] through ``nodes`` to y[N, 4]; W is a 4x4 initializer."""
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path.write_bytes(model.SerializeToString())  # not onnx.save: it may refuse a broken graph
    return path


# ------------------------------------------------------------------------------ the corpus


@dataclass(frozen=True)
class BadInput:
    """``build(folder)`` makes the files and returns the command's arguments."""

    name: str
    build: Callable[[Path], list[object]]
    code: ExitCode
    fragment: str


def _empty(folder: Path) -> list[object]:
    (folder / "empty.pt2").write_bytes(b"")
    return ["retrofit", folder / "empty.pt2"]


def _truncated_pt2(folder: Path) -> list[object]:
    data = MLP.read_bytes()
    (folder / "cut.pt2").write_bytes(data[: len(data) // 2])
    return ["retrofit", folder / "cut.pt2"]


def _truncated_onnx(folder: Path) -> list[object]:
    data = CNN_ONNX.read_bytes()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    return ["retrofit", folder / "cut.onnx"]


def _random_model(suffix: str) -> Callable[[Path], list[object]]:
    def build(folder: Path) -> list[object]:
        path = folder / f"noise{suffix}"
        path.write_bytes(random_bytes())
        return ["retrofit", path]

    return build


def _random_data(suffix: str) -> Callable[[Path], list[object]]:
    def build(folder: Path) -> list[object]:
        path = folder / f"noise{suffix}"
        path.write_bytes(random_bytes(seed=1))
        return ["evaluate", copy(MLP, folder), "--data", path]

    return build


def _onnx_cycle(folder: Path) -> list[object]:
    nodes = [helper.make_node("Add", ["x", "r"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")]
    return ["retrofit", onnx_file(folder / "cycle.onnx", nodes)]


def _onnx_dangling(folder: Path) -> list[object]:
    nodes = [helper.make_node("Add", ["x", "nobody_makes_this"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")]
    return ["retrofit", onnx_file(folder / "dangling.onnx", nodes)]


def _onnx_out_of_order(folder: Path) -> list[object]:
    nodes = [helper.make_node("MatMul", ["r", "W"], ["y"], name="mm"),
             helper.make_node("Relu", ["x"], ["r"], name="relu")]
    return ["retrofit", onnx_file(folder / "unsorted.onnx", nodes)]


def _labels_beyond_outputs(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data", small_data(folder, classes=13)]


def _broken_image(folder: Path) -> list[object]:
    for label in ("a", "b"):
        (folder / "images" / label).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(np.full((8, 8), 40 * i, np.uint8))
            image.save(folder / "images" / label / f"{i}.png")
    (folder / "images" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return ["evaluate", copy(MLP, folder), "--data", folder / "images"]


def _csv_missing_label(folder: Path) -> list[object]:
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    rows = [",".join(["0.5"] * 64 + [str(i % 10)]) for i in range(5)]
    rows[2] = ",".join(["0.5"] * 64 + [""])
    (folder / "data.csv").write_text("\n".join([header, *rows]) + "\n")
    return ["evaluate", copy(MLP, folder), "--data", folder / "data.csv"]


def _nan_in_data(folder: Path) -> list[object]:
    path = small_data(folder)
    with np.load(path) as stored:
        x, y = stored["x"], stored["y"]
    x[7, 0, 3, 3] = np.nan
    np.savez(path, x=x, y=y)
    return ["retrofit", copy(MLP, folder), "--data", path, "-o", folder / "out.pt2"]


def _class_folders(root: Path, names: list[str], per_class: int = 2) -> Path:
    """8x8 grayscale images (the sample MLP's input) in one folder per name."""
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _names_for_other_outputs(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data",
            _class_folders(folder / "images", ["cat", "dog", "emu"])]


def _mixed_names_for_other_outputs(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data",
            _class_folders(folder / "images", ["3", "7", "other"])]


def _csv_text_labels_for_other_outputs(folder: Path) -> list[object]:
    rows = [f"0.5,0.5,0.5,0.5,{('cat', 'dog')[i % 2]}" for i in range(4)]
    (folder / "data.csv").write_text("\n".join(["a,b,c,d,label", *rows]) + "\n")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return ["evaluate", onnx_file(folder / "four.onnx", nodes), "--data", folder / "data.csv"]


def _npz_text_labels_for_other_outputs(folder: Path) -> list[object]:
    np.savez(folder / "names.npz", x=np.zeros((4, 1, 8, 8), np.float32),
             y=np.array(["cat", "dog", "cat", "dog"]))
    return ["evaluate", copy(MLP, folder), "--data", folder / "names.npz"]


def _two_names_for_one_class(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data", _class_folders(folder / "images", ["1", "01"])]


def _integer_folder_beyond_outputs(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data", _class_folders(folder / "images", ["3", "12"])]


def _train_and_val_name_different_classes(folder: Path) -> list[object]:
    val = _class_folders(folder / "val", ["cat", "dog"])
    train = _class_folders(folder / "train", ["cat", "emu"], per_class=3)
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2", "--data", val, "--finetune",
            train, "--epochs", "1", "--device", "cpu"]


def _wide_integers_for_a_float_model(folder: Path) -> list[object]:
    path = small_data(folder)
    with np.load(path) as stored:
        np.savez(path, x=np.round(stored["x"] * 255).astype(np.int16), y=stored["y"])
    return ["evaluate", copy(MLP, folder), "--data", path]


def _uint8_with_mean_in_0_255_units(folder: Path) -> list[object]:
    path = small_data(folder)
    with np.load(path) as stored:
        np.savez(path, x=np.round(stored["x"] * 255).astype(np.uint8), y=stored["y"])
    return ["evaluate", copy(MLP, folder), "--data", path, "--mean", "123.675", "--std", "58.395"]


def _folder_with_mean_in_0_255_units(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data",
            _class_folders(folder / "images", [str(i) for i in range(10)]), "--mean", "127.5"]


def _missing_output_folder(folder: Path) -> list[object]:
    return ["retrofit", copy(MLP, folder), "-o", folder / "missing" / "out.pt2"]


def _read_only_output_folder(folder: Path) -> list[object]:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return ["retrofit", copy(MLP, folder), "-o", locked / "out.pt2"]


def _output_is_input(folder: Path) -> list[object]:
    source = copy(MLP, folder)
    return ["retrofit", source, "-o", source, "--force"]


def _output_is_input_by_another_name(folder: Path) -> list[object]:
    source = copy(MLP, folder)
    os.link(source, folder / "hardlink.pt2")
    return ["retrofit", source, "-o", folder / "hardlink.pt2", "--force"]


def _existing_output(folder: Path) -> list[object]:
    (folder / "out.pt2").write_bytes(b"an earlier result")
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2"]


def _export_onnx_existing(folder: Path) -> list[object]:
    (folder / "out.onnx").write_bytes(b"an earlier export")
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2",
            "--export-onnx", folder / "out.onnx"]


def _markdown_in_missing_folder(folder: Path) -> list[object]:
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2",
            "--markdown", folder / "missing" / "report.md"]


def _plot_in_missing_folder(folder: Path) -> list[object]:
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2", "--finetune", TRAIN,
            "--epochs", "1", "--device", "cpu", "--plot", folder / "missing" / "curves.png"]


def _checkpoint_in_missing_folder(folder: Path) -> list[object]:
    return ["retrofit", copy(MLP, folder), "-o", folder / "out.pt2", "--finetune", TRAIN,
            "--epochs", "1", "--device", "cpu", "--checkpoint", folder / "missing" / "run.ckpt"]


def _state_dict_without_arch(folder: Path) -> list[object]:
    return ["retrofit", copy(SAMPLES / "models" / "digits_mlp.state.pt", folder)]


def _pickled_module(folder: Path) -> list[object]:
    torch.save(_WritesMarker(folder / "marker.txt"), folder / "module.pt")  # the snapshot
    return ["retrofit", folder / "module.pt"]  # check fails if the marker gets written


def _data_missing(folder: Path) -> list[object]:
    return ["evaluate", copy(MLP, folder), "--data", folder / "nowhere.npz"]


def _samples_do_not_fit(folder: Path) -> list[object]:
    path = folder / "wide.npz"
    np.savez(path, x=np.zeros((8, 3, 5, 5), np.float32), y=np.zeros(8, np.int64))
    return ["evaluate", copy(MLP, folder), "--data", path]


STATE = SAMPLES / "models" / "digits_mlp.state.pt"
ARCH = "samples.architectures:digits_mlp"


def _state_dict(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], list[object]]:
    def build(folder: Path) -> list[object]:
        torch.save(change(torch.load(STATE)), folder / "weights.pt")
        return ["inspect", folder / "weights.pt", "--arch", ARCH]

    return build


def _with_options(source: Path, *options: str) -> Callable[[Path], list[object]]:
    def build(folder: Path) -> list[object]:
        path = copy(source, folder)
        arch = ["--arch", ARCH] if source == STATE else []
        return ["inspect", path, *arch, *options]

    return build


def _arch_with_syntax_error(folder: Path) -> list[object]:
    (folder / "syntax_error_arch.py").write_text("def model(:\n")  # no bytecode is written
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return ["inspect", copy(STATE, folder), "--arch", "syntax_error_arch:model"]


CORPUS = [
    BadInput("empty file", _empty, ExitCode.BAD_INPUT, "empty"),
    BadInput("truncated .pt2", _truncated_pt2, ExitCode.BAD_INPUT, "cut.pt2"),
    BadInput("truncated .onnx", _truncated_onnx, ExitCode.BAD_INPUT, "truncated"),
    *[BadInput(f"random bytes as model {suffix}", _random_model(suffix), ExitCode.BAD_INPUT,
               f"noise{suffix}")
      for suffix in (".pt2", ".pt", ".pth", ".safetensors", ".onnx", ".npz", ".csv")],
    *[BadInput(f"random bytes as data {suffix}", _random_data(suffix), ExitCode.BAD_INPUT,
               f"noise{suffix}")
      for suffix in (".npz", ".csv", ".pt", ".pt2", ".onnx")],
    BadInput("state dict without --arch", _state_dict_without_arch, ExitCode.USAGE, "--arch"),
    BadInput("pickled module without --trust-pickle", _pickled_module, ExitCode.BAD_INPUT,
             "--trust-pickle"),
    BadInput("ONNX graph with a cycle", _onnx_cycle, ExitCode.BAD_INPUT,
             "cycle.onnx: the input model is not a runnable graph: it has a cycle"),
    BadInput("ONNX node input nobody produces", _onnx_dangling, ExitCode.BAD_INPUT,
             "node 'add' (Add) reads 'nobody_makes_this', which no node"),
    BadInput("ONNX nodes out of order (no cycle)", _onnx_out_of_order, ExitCode.BAD_INPUT,
             "topologically sorted"),
    BadInput("labels beyond the model's outputs", _labels_beyond_outputs, ExitCode.BAD_INPUT,
             "go up to 12 but the model has 10 outputs"),
    BadInput("samples that do not fit the model", _samples_do_not_fit, ExitCode.BAD_INPUT,
             "do not fit the model"),
    BadInput("class folder names sorted for a model with other outputs",
             _names_for_other_outputs, ExitCode.BAD_INPUT,
             "names 3 classes (cat, dog, emu), sorted into indices 0 to 2, but the model has 10 "
             "outputs, so which output each name stands for is a guess"),
    BadInput("class folders mixing numbers and names", _mixed_names_for_other_outputs,
             ExitCode.BAD_INPUT, "names 3 classes (3, 7, other), sorted into indices 0 to 2"),
    BadInput("CSV text labels for a model with other outputs",
             _csv_text_labels_for_other_outputs, ExitCode.BAD_INPUT,
             "names 2 classes (cat, dog), sorted into indices 0 to 1, but the model has 4 outputs"),
    BadInput(".npz text labels for a model with other outputs",
             _npz_text_labels_for_other_outputs, ExitCode.BAD_INPUT,
             "name the classes by their index (0 to 9)"),
    BadInput("two class folders for one class index", _two_names_for_one_class,
             ExitCode.BAD_INPUT, "class names 01 and 1 in"),
    BadInput("integer class folder beyond the model's outputs", _integer_folder_beyond_outputs,
             ExitCode.BAD_INPUT, "go up to 12 but the model has 10 outputs"),
    BadInput("validation and training data naming different classes",
             _train_and_val_name_different_classes, ExitCode.BAD_INPUT,
             "name different classes (dog only in"),
    BadInput("int16 samples for a float model", _wide_integers_for_a_float_model,
             ExitCode.BAD_INPUT, "holds int16 values but the model takes floats"),
    BadInput("uint8 samples with --mean/--std in 0..255 units", _uint8_with_mean_in_0_255_units,
             ExitCode.USAGE, "scaled to [0, 1] first: divide 0..255 values by 255"),
    BadInput("image folder with --mean in 0..255 units", _folder_with_mean_in_0_255_units,
             ExitCode.USAGE, "scaled to [0, 1] first: divide 0..255 values by 255"),
    BadInput("image folder with a broken image", _broken_image, ExitCode.BAD_INPUT, "1.png"),
    BadInput("CSV row without a label", _csv_missing_label, ExitCode.BAD_INPUT, "line 4"),
    BadInput("NaN in the data", _nan_in_data, ExitCode.BAD_INPUT, "sample 7"),
    BadInput("data path that does not exist", _data_missing, ExitCode.BAD_INPUT, "nowhere.npz"),
    BadInput("output in a missing folder", _missing_output_folder, ExitCode.OUTPUT,
             "does not exist"),
    BadInput("output in a read-only folder", _read_only_output_folder, ExitCode.OUTPUT,
             "not writable"),
    BadInput("output equal to the input", _output_is_input, ExitCode.OUTPUT, "is the input"),
    BadInput("output a hard link of the input", _output_is_input_by_another_name,
             ExitCode.OUTPUT, "is the input"),
    BadInput("existing output without --force", _existing_output, ExitCode.OUTPUT,
             "already exists"),
    BadInput("--markdown in a missing folder", _markdown_in_missing_folder, ExitCode.OUTPUT,
             "does not exist"),
    BadInput("--plot in a missing folder", _plot_in_missing_folder, ExitCode.OUTPUT,
             "does not exist"),
    BadInput("--checkpoint in a missing folder", _checkpoint_in_missing_folder, ExitCode.OUTPUT,
             "does not exist"),
    BadInput("existing --export-onnx without --force", _export_onnx_existing, ExitCode.OUTPUT,
             "already exists"),
    BadInput("state dict of the wrong shapes for --arch",
             _state_dict(lambda state: {key: torch.zeros(3, 3) for key in state}),
             ExitCode.BAD_INPUT, "shapes differ (file vs --arch): fc1.weight (3, 3) vs (64, 64)"),
    BadInput("state dict of integer tensors for float parameters",
             _state_dict(lambda state: {key: value.long() for key, value in state.items()}),
             ExitCode.BAD_INPUT, "types differ (file vs --arch): fc1.weight int64 vs float32"),
    BadInput("a list of tensors instead of a state dict",
             _state_dict(lambda state: list(state.values())), ExitCode.BAD_INPUT,
             "weights.pt: holds a list, not a state dict"),
    BadInput("a state dict with a non-tensor entry",
             _state_dict(lambda state: {**state, "epoch": 3}), ExitCode.BAD_INPUT,
             "entry 'epoch' is an int"),
    BadInput("--arch module with a syntax error", _arch_with_syntax_error, ExitCode.BAD_INPUT,
             "--arch 'syntax_error_arch:model': importing syntax_error_arch failed (SyntaxError"),
    BadInput("--arch spec a:b:c", _with_options(STATE, "--arch", "a:b:c"), ExitCode.USAGE,
             "--arch 'a:b:c' must look like package.module:factory"),
    BadInput("--arch module that does not exist",
             _with_options(STATE, "--arch", "no_such_package.models:net"), ExitCode.USAGE,
             "no module 'no_such_package'"),
    BadInput("--arch-kwargs the factory does not take",
             _with_options(STATE, "--arch-kwargs", "depth=3"), ExitCode.USAGE,
             "does not take these --arch-kwargs (got an unexpected keyword argument 'depth')"),
    BadInput("--input-shape 1,,3", _with_options(MLP, "--input-shape", "1,,3"), ExitCode.USAGE,
             "--input-shape '1,,3' must look like"),
    BadInput("--input-shape too large to allocate",
             _with_options(MLP, "--input-shape", "100000,100000,100000"), ExitCode.BAD_INPUT,
             "1,000,000,000,000,000 elements"),
    BadInput("--input-shape the module cannot take",
             _with_options(STATE, "--input-shape", "1,3,32,32"), ExitCode.BAD_INPUT,
             "fails on its sample inputs (mat1 and mat2 shapes cannot be multiplied"),
    BadInput("--input-shape the .pt2's guards refuse",
             _with_options(MLP, "--input-shape", "2,63"), ExitCode.BAD_INPUT,
             "digits_mlp.pt2 fails on its sample inputs (Guard failed"),
    BadInput("--input-shape of another rank than the ONNX input",
             _with_options(CNN_ONNX, "--input-shape", "1,64"), ExitCode.BAD_INPUT,
             "digits_cnn.onnx: input 'image' has 4 dimensions, --input-shape gives 2"),
    BadInput("--input-shape for an ONNX input that does not exist",
             _with_options(CNN_ONNX, "--input-shape", "pixels:1,1,8,8"), ExitCode.USAGE,
             "names 'pixels', which is not an input of"),
    BadInput("--input-shape given twice for a one-input model",
             _with_options(STATE, "--input-shape", "1,64", "--input-shape", "1,64"),
             ExitCode.USAGE, "--input-shape is given 2 times"),
    BadInput("--include that is an invalid regex", _with_options(MLP, "--include", "fc1("),
             ExitCode.USAGE, "not a valid regular expression"),
]


def _snapshot(folder: Path) -> dict[Path, str]:
    return {path: sha256(path) for path in folder.rglob("*") if path.is_file()}


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_bad_input_is_one_line_with_its_exit_code_and_touches_nothing(case, tmp_path):
    if case.build is _read_only_output_folder and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    args = case.build(tmp_path)
    before = _snapshot(tmp_path)
    result = cli(*args)
    assert "Traceback" not in result.output
    line = _error_line(result)
    assert result.exit_code == case.code, result.output
    assert line.startswith("error: ") and case.fragment in line, line
    assert _snapshot(tmp_path) == before  # inputs unchanged and nothing written
    assert all(no_partial_files(folder) for folder in [tmp_path, *tmp_path.rglob("*")]
               if folder.is_dir())


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """The read-only case for root too: the check asks the OS whether the folder is writable."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kw)))
    result = cli("retrofit", copy(MLP, tmp_path), "-o", locked / "out.pt2")
    assert result.exit_code == ExitCode.OUTPUT and "not writable" in _error_line(result)
    assert list(locked.iterdir()) == []


# --------------------------------------------------------------------------- wrong suffix


def test_onnx_content_named_pt2_is_read_as_onnx(tmp_path):
    """README: "The format is read from the file's content, not its suffix"."""
    source = copy(CNN_ONNX, tmp_path, "really_onnx.pt2")
    digest = sha256(source)
    result = cli("retrofit", source, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "onnx" and report["replaced"] == 5
    written = Path(report["output"])
    assert written.name == "really_onnx.carelu.pt2"
    assert detect_format(written) is ModelFormat.ONNX
    onnx.checker.check_model(onnx.load(str(written)), full_check=True)
    assert sha256(source) == digest and no_partial_files(tmp_path)


def test_pt2_content_named_onnx_is_read_as_pt2(tmp_path):
    source = copy(MLP, tmp_path, "really_pt2.onnx")
    result = cli("retrofit", source, "--json", "-o", tmp_path / "out.bin")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "pt2" and report["replaced"] == 2
    assert detect_format(tmp_path / "out.bin") is ModelFormat.EXPORTED


def test_npz_content_named_csv_is_read_as_npz(tmp_path):
    source = copy(VAL, tmp_path, "val.csv")
    result = cli("evaluate", copy(MLP, tmp_path), "--data", source)
    assert result.exit_code == 0, result.output
    assert "450 samples" in result.output


# ------------------------------------------------------------------------- untrusted pickles


def _pt2_with_pickled_member(folder: Path, marker: Path, member: str) -> Path:
    """The sample .pt2 with ``member`` replaced by a pickle whose loading writes ``marker``.

    For a weight, the weights config is changed to say ``use_pickle`` so that torch.export.load
    unpickles it without ``weights_only``.
    """
    evil = folder / "evil_member.pt"
    torch.save({"x": _WritesMarker(marker)}, evil)
    path = folder / "evil.pt2"
    with zipfile.ZipFile(MLP) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith(member):
                data = evil.read_bytes()
            elif member.startswith("weights/") and info.filename.endswith("weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            target.writestr(info, data)
    evil.unlink()
    return path


@pytest.mark.parametrize("member", ["sample_inputs/model.pt", "weights/weight_0"])
def test_pt2_with_a_pickled_member_is_refused_by_every_command(tmp_path, member):
    marker = tmp_path / "marker.txt"
    path = _pt2_with_pickled_member(tmp_path, marker, member)
    digest = sha256(path)
    for args in (["retrofit", path], ["inspect", path], ["evaluate", path, "--data", VAL]):
        result = cli(*args)
        assert result.exit_code == ExitCode.BAD_INPUT, (args, result.output)
        assert "--trust-pickle" in _error_line(result) and "Traceback" not in result.output
        assert not marker.exists(), args
    assert sha256(path) == digest and no_partial_files(tmp_path)
    # The file is truly dangerous: with the trust option torch.export.load runs its code.
    cli("inspect", path, "--trust-pickle")
    assert marker.exists()


def test_pickled_module_is_refused_by_inspect_and_evaluate(malicious_pickle):
    path, marker = malicious_pickle
    digest = sha256(path)
    for args in (["inspect", path], ["evaluate", path, "--data", VAL],
                 ["retrofit", path, "--arch", "samples.architectures:digits_mlp"]):
        result = cli(*args)
        assert result.exit_code == ExitCode.BAD_INPUT, (args, result.output)
        assert "--trust-pickle" in _error_line(result)
    assert not marker.exists() and sha256(path) == digest


def test_pickled_module_named_pt2_is_still_a_pickle(malicious_pickle, tmp_path):
    path, marker = malicious_pickle
    disguised = copy(path, tmp_path, "model.pt2")
    result = cli("retrofit", disguised)
    assert result.exit_code == ExitCode.BAD_INPUT and "--trust-pickle" in _error_line(result)
    assert not marker.exists()


@pytest.mark.parametrize("option", ["--data", "--finetune"])
def test_pickle_as_a_dataset_is_never_unpickled_even_with_trust(malicious_pickle, tmp_path, option):
    """Data is read without unpickling; --trust-pickle is about models, not data."""
    path, marker = malicious_pickle
    digest = sha256(path)
    epochs = ["--epochs", "1"] if option == "--finetune" else []
    result = cli("retrofit", copy(MLP, tmp_path), option, path, "--trust-pickle", *epochs,
                 "-o", tmp_path / "out.pt2")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "not unpickled" in _error_line(result)
    result = cli("evaluate", copy(MLP, tmp_path, "m2.pt2"), "--data", path, "--trust-pickle")
    assert result.exit_code == ExitCode.BAD_INPUT and "not unpickled" in _error_line(result)
    assert not marker.exists() and sha256(path) == digest
    assert not (tmp_path / "out.pt2").exists() and no_partial_files(tmp_path)


def test_pickle_as_a_resume_checkpoint_is_never_unpickled(malicious_pickle, tmp_path):
    path, marker = malicious_pickle
    digest = sha256(path)
    result = cli("retrofit", copy(MLP, tmp_path), "--finetune", TRAIN, "--data", VAL,
                 "--epochs", "1", "--device", "cpu", "--checkpoint", path, "--resume",
                 "--trust-pickle", "-o", tmp_path / "out.pt2")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert str(path) in _error_line(result)
    assert not marker.exists() and sha256(path) == digest
    assert not (tmp_path / "out.pt2").exists() and no_partial_files(tmp_path)


def main() -> None:
    """Print what the tool answers to each bad input (for release notes)."""
    import tempfile

    for case in CORPUS:
        if case.build is _read_only_output_folder and os.geteuid() == 0:
            print(f"- {case.name}: not run as root (root writes anywhere)")
            continue
        with tempfile.TemporaryDirectory() as folder:
            args = case.build(Path(folder))
            result = cli(*args)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            text = " | ".join(lines).replace(folder, "…")
            print(f"- {case.name}: exit {result.exit_code}: {text}")
            Path(folder).chmod(0o755)
            for sub in Path(folder).rglob("*"):
                if sub.is_dir():
                    sub.chmod(0o755)


if __name__ == "__main__":
    main()
