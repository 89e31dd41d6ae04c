"""Atomic outputs: a write that fails half-way leaves the old file as it was and no temporary
file; an existing output is replaced only with ``--force``, and then completely."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil

import pytest
import torch

from retrofit.atomic import atomic_output, write_text_atomic
from retrofit.training.checkpoint import load_checkpoint, save_checkpoint
from retrofit.errors import ExitCode, OutputError
from retrofit.torch_path.formats import ModelFormat, detect_format
from tests.conftest import SAMPLES, no_partial_files, one_line, run_cli as cli, sha256

MLP = SAMPLES / "models" / "digits_mlp.pt2"
CNN_ONNX = SAMPLES / "models" / "digits_cnn.onnx"
OLD = b"the previous, complete output"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("failure", [
    Boom("serializer bug"), OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
], ids=["bug", "disk-full", "ctrl-c"])
def test_a_write_failing_half_way_keeps_the_target_and_removes_the_temporary_file(
        tmp_path, failure):
    target = tmp_path / "model.pt2"
    target.write_bytes(OLD)
    with pytest.raises((type(failure), OutputError)) as caught:
        with atomic_output(target) as temp:
            assert temp.parent == tmp_path and ".partial" in temp.name
            temp.write_bytes(b"half of the new")
            raise failure
    if isinstance(failure, OSError):  # an OS failure is an output error naming the file
        assert caught.type is OutputError and "No space left" in str(caught.value)
    else:
        assert caught.type is type(failure)
    assert target.read_bytes() == OLD and no_partial_files(tmp_path)


def test_a_successful_write_replaces_the_whole_file_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("x" * 1000)
    target.chmod(0o640)
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}" and (target.stat().st_mode & 0o777) == 0o640
    write_text_atomic(tmp_path / "new.txt", "y")
    umask = os.umask(0)
    os.umask(umask)
    assert ((tmp_path / "new.txt").stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600
    assert no_partial_files(tmp_path)


def test_a_checkpoint_write_failing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    with monkeypatch.context() as failing:
        _fail_writing_partial_files(failing, OSError(errno.EIO, "Input/output error"))
        with pytest.raises(OutputError, match="run.ckpt"):
            save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert no_partial_files(tmp_path)


def _fail_writing_partial_files(monkeypatch, error: BaseException) -> None:
    """Every write to a ``.partial`` temporary file writes half its bytes, then raises (every
    output's bytes are made in memory and written by ``Path.write_bytes``)."""
    real_write_bytes = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if ".partial" in self.name:
            real_write_bytes(self, data[: len(data) // 2])
            raise error
        return real_write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("model", [MLP, CNN_ONNX], ids=["pt2", "onnx"])
@pytest.mark.parametrize("error, code, fragment", [
    (OSError(errno.ENOSPC, "No space left on device"), ExitCode.OUTPUT, "No space left on device"),
    (Boom("serializer bug"), ExitCode.INTERNAL, "internal error: Boom: serializer bug"),
], ids=["disk-full", "bug"])
def test_a_model_save_failing_half_way_through_the_cli_keeps_the_old_output(
        tmp_path, monkeypatch, model, error, code, fragment):
    source = tmp_path / model.name
    shutil.copyfile(model, source)
    output = tmp_path / f"out{model.suffix}"
    output.write_bytes(OLD)
    digest = sha256(source)
    _fail_writing_partial_files(monkeypatch, error)
    result = cli("retrofit", source, "-o", output, "--force")
    assert result.exit_code == code, result.output
    assert fragment in one_line(result)
    assert output.read_bytes() == OLD and sha256(source) == digest
    assert no_partial_files(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [source.name, output.name])


@pytest.mark.parametrize("model", [MLP, CNN_ONNX], ids=["pt2", "onnx"])
def test_an_existing_output_needs_force_and_is_then_replaced_whole(tmp_path, model):
    source = tmp_path / model.name
    shutil.copyfile(model, source)
    output = tmp_path / f"out{model.suffix}"
    output.write_bytes(OLD)
    output.chmod(0o640)
    refused = cli("retrofit", source, "-o", output)
    assert refused.exit_code == ExitCode.OUTPUT and "--force" in one_line(refused)
    assert output.read_bytes() == OLD
    replaced = cli("retrofit", source, "-o", output, "--force", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["output"] == str(output)
    expected = ModelFormat.ONNX if model is CNN_ONNX else ModelFormat.EXPORTED
    assert detect_format(output) is expected
    assert (output.stat().st_mode & 0o777) == 0o640
    assert no_partial_files(tmp_path)


def test_an_existing_report_needs_force_and_is_then_replaced_atomically(tmp_path):
    source = tmp_path / MLP.name
    shutil.copyfile(MLP, source)
    report = tmp_path / "report.md"
    report.write_bytes(OLD)
    args = ("retrofit", source, "-o", tmp_path / "out.pt2", "--markdown", report)
    refused = cli(*args)
    assert refused.exit_code == ExitCode.OUTPUT, refused.output
    assert "already exists" in refused.output and report.read_bytes() == OLD
    assert not (tmp_path / "out.pt2").exists()
    result = cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert report.read_text().startswith("#") and no_partial_files(tmp_path)
