"""Faults outside the model: outputs that are not regular files, write errors and full disks,
interrupts at any moment, a finished fine-tune that must survive them, options that would lie,
and names cut by a narrow pipe. Each is one line, its documented exit code, inputs intact and
no partial file."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from retrofit.errors import ExitCode
from tests.conftest import REPO, SAMPLES, no_partial_files, one_line, run_cli as cli, sha256

MLP = SAMPLES / "models" / "digits_mlp.pt2"
MLP_STATE = SAMPLES / "models" / "digits_mlp.state.pt"
CNN_ONNX = SAMPLES / "models" / "digits_cnn.onnx"
VAL = SAMPLES / "data" / "digits_val.npz"
TRAIN = SAMPLES / "data" / "digits_train.npz"
MLP_ARCH = "samples.architectures:digits_mlp"


def _error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    line = one_line(result)
    assert line.startswith("error: "), line
    return line


# ------------------------------------------------------------------ outputs are regular files


def _device_link(path: Path) -> None:
    path.symlink_to("/dev/null")


def _full_link(path: Path) -> None:
    path.symlink_to("/dev/full")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere"))


SPECIALS: dict[str, Callable[[Path], None]] = {
    "link to /dev/null": _device_link, "link to /dev/full": _full_link, "FIFO": _fifo,
    "socket": _socket, "dangling link": _dangling_link,
}

# Each output option: (the special file's name in the folder, the command around it).
OUTPUTS: dict[str, tuple[str, Callable[[Path, Path], list[object]]]] = {
    "-o": ("out.pt2", lambda folder, p: ["retrofit", MLP, "-o", p, "--force"]),
    "--export-onnx": ("out.onnx", lambda folder, p: [
        "retrofit", MLP, "--export-onnx", p, "-o", folder / "m.pt2", "--force"]),
    "--markdown": ("report.md", lambda folder, p: [
        "retrofit", MLP, "--markdown", p, "-o", folder / "m.pt2", "--force"]),
    "--plot": ("curves.png", lambda folder, p: [
        "retrofit", MLP, "--finetune", TRAIN, "--plot", p, "-o", folder / "m.pt2", "--force"]),
    "--checkpoint": ("run.ckpt", lambda folder, p: [
        "retrofit", MLP, "--finetune", TRAIN, "--checkpoint", p, "-o", folder / "m.pt2"]),
    "ONNX external data": ("out.onnx.data", lambda folder, p: [
        "retrofit", CNN_ONNX, "-o", folder / "out.onnx", "--force"]),
    "--export-onnx external data": ("out.onnx.data", lambda folder, p: [
        "retrofit", MLP, "--export-onnx", folder / "out.onnx", "-o", folder / "m.pt2",
        "--force"]),
}


def _kind(path: Path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("special", SPECIALS, ids=list(SPECIALS))
@pytest.mark.parametrize("output", OUTPUTS, ids=list(OUTPUTS))
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(
        tmp_path, output, special):
    name, command = OUTPUTS[output]
    path = tmp_path / name
    SPECIALS[special](path)
    kind = _kind(path)
    result = cli(*command(tmp_path, path))
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert name in _error_line(result)
    assert _kind(path) == kind  # still the FIFO, socket or link it was
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing else written
    assert no_partial_files(tmp_path)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_a_device_node_as_output_is_never_replaced(tmp_path, device):
    before = os.stat(device)
    result = cli("retrofit", MLP, "-o", device, "--force")
    assert result.exit_code == ExitCode.OUTPUT and "character device" in _error_line(result)
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


# ------------------------------------------------------------------ ONNX external data and --force


@pytest.mark.parametrize("route", ["ONNX input", "--export-onnx"])
def test_an_existing_external_data_file_needs_force(tmp_path, route):
    data = tmp_path / "out.onnx.data"
    data.write_bytes(b"someone's weights")
    args = (["retrofit", CNN_ONNX, "-o", tmp_path / "out.onnx"] if route == "ONNX input" else
            ["retrofit", MLP, "--export-onnx", tmp_path / "out.onnx", "-o", tmp_path / "m.pt2"])
    result = cli(*args)
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert "out.onnx.data" in _error_line(result) and "--force" in _error_line(result)
    assert data.read_bytes() == b"someone's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx.data"]
    assert cli(*args, "--force").exit_code == 0


# ------------------------------------------------------------------ full disks and write errors


def _safetensors_copy(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "mlp.safetensors"
    save_file(torch.load(MLP_STATE, weights_only=True), str(path))
    return path


WRITES: dict[str, Callable[[Path], list[object]]] = {
    "pt2": lambda folder: [shutil.copy(MLP, folder), "-o", folder / "out.pt2"],
    "state dict": lambda folder: [shutil.copy(MLP_STATE, folder), "--arch", MLP_ARCH,
                                  "-o", folder / "out.pt"],
    "safetensors": lambda folder: [_safetensors_copy(folder), "--arch", MLP_ARCH,
                                   "-o", folder / "out.safetensors"],
    "onnx": lambda folder: [shutil.copy(CNN_ONNX, folder), "-o", folder / "out.onnx"],
    "--export-onnx": lambda folder: [shutil.copy(MLP, folder), "--export-onnx",
                                     folder / "out.onnx", "-o", folder / "out.pt2"],
}


def _limit_file_size(limit: int) -> Callable[[], None]:
    """In the child: files may not grow past ``limit`` bytes, as on a full disk; a write past
    it fails with EFBIG (SIGXFSZ ignored) instead of killing the process."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(
            resource.RLIMIT_FSIZE)[1]))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("output", WRITES, ids=list(WRITES))
def test_a_write_error_is_exit_6_after_the_report_with_no_partial_file(tmp_path, output):
    """A real write failure (a file-size limit: the same EFBIG/ENOSPC path as a full disk) for
    every output format: no abort, one line naming the file, the report printed first."""
    args = WRITES[output](tmp_path)
    inputs = {path: sha256(path) for path in tmp_path.iterdir()}
    completed = subprocess.run(
        [sys.executable, "-m", "cadrelu", "retrofit", *map(str, args)], cwd=REPO,
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(16_000),
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert completed.returncode == ExitCode.OUTPUT, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), completed.stderr
    assert os.strerror(errno.EFBIG) in lines[0]
    assert "ReLU sites" in completed.stdout and "wrote" not in completed.stdout
    assert {path: sha256(path) for path in inputs} == inputs
    assert sorted(tmp_path.iterdir()) == sorted(inputs) and no_partial_files(tmp_path)


# ------------------------------------------------------------------ options checked before work


OPTION_ERRORS: list[tuple[list[object], str]] = [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--device", "cuda:x"], "unknown device"),
    (["--tolerance", "-1"], "--tolerance must be a finite positive number"),
    (["--tolerance", "0"], "--tolerance must be a finite positive number"),
    (["--tolerance", "nan"], "--tolerance must be a finite positive number"),
    (["--tolerance", "inf"], "--tolerance must be a finite positive number"),
    (["--seed", "-1"], "--seed must lie in"),
    (["--to", "mrepu", "--k", "3"], "--k applies to --to carelu, not to --to mrepu"),
    (["--to", "mrepu", "--measure", "l1"], "--measure applies to --to carelu"),
    (["--to", "repu", "--c", "0.5"], "--c applies to --to mrepu"),
    (["--p", "3"], "--p applies to --to mrepu or repu, not to --to carelu"),
    (["--k", "nan"], "K must be a finite number greater than 1"),
    (["--k", "1"], "K must be a finite number greater than 1"),
    (["--to", "mrepu", "--p", "inf"], "p must be a finite number greater than 1"),
    (["--to", "mrepu", "--c", "nan"], "c must be a finite number"),
    (["--max-drop", "1"], "a gate needs data to score on"),
    (["--min-gain", "0"], "a gate needs data to score on"),
    (["--data", VAL, "--max-drop", "nan"], "--max-drop must be a finite number"),
    (["--data", VAL, "--min-gain", "inf"], "--min-gain must be a finite number"),
    (["--epochs", "3"], "--epochs applies to fine-tuning"),
    (["--lr", "0.1"], "--lr applies to fine-tuning"),
    (["--control"], "--control applies to fine-tuning"),
    (["--resume"], "--resume applies to fine-tuning"),
    (["--data", VAL, "--plot", "p.png"], "--plot applies to fine-tuning"),
    (["--data", VAL, "--blend-ramp", "0.1"], "--blend-ramp applies to fine-tuning"),
    (["--finetune", TRAIN, "--blend-ramp", "0.1"], "--blend-ramp applies to --to mrepu"),
    (["--finetune", TRAIN, "--data", VAL, "--val-fraction", "0.3"], "--val-fraction"),
    (["--finetune", TRAIN, "--lr", "nan"], "learning rate must be a finite positive number"),
    (["--finetune", TRAIN, "--lr", "-1"], "learning rate must be a finite positive number"),
    (["--finetune", TRAIN, "--epochs", "0"], "epochs must be at least 1"),
    (["--finetune", TRAIN, "--warmup", "nan"], "warmup fraction"),
    (["--finetune", TRAIN, "--grad-clip", "inf"], "gradient clip"),
    (["--finetune", TRAIN, "--val-fraction", "1"], "--val-fraction must lie strictly"),
    (["--finetune", TRAIN, "--to", "mrepu", "--blend-ramp", "2"], "ramp_fraction"),
    (["--batch-size", "8"], "--batch-size needs data to score on"),
    (["--data", VAL, "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data", VAL, "--std", "0"], "--std values divide the data"),
    (["--data", VAL, "--mean", "nan"], "--mean must be a finite number"),
    (["--data", VAL, "--image-size", "0"], "--image-size must be at least 1"),
    (["--onnx-functions"], "--onnx-functions applies to ONNX models"),
    # Click's own usage errors: one line too
    (["--bogus"], "No such option: --bogus"),
    (["--to", "relu6"], "'relu6' is not one of"),
    (["--epochs", "three"], "Invalid value for '--epochs'"),
    (["--include"], "requires an argument"),
]


@pytest.mark.parametrize("options, fragment", OPTION_ERRORS,
                         ids=[" ".join(map(str, o)).replace(str(SAMPLES), "") for o, _ in
                              OPTION_ERRORS])
def test_an_option_that_would_lie_is_a_usage_error_before_any_work(tmp_path, options, fragment):
    result = cli("retrofit", MLP, "-o", tmp_path / "out.pt2", *options)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert fragment in _error_line(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["evaluate", MLP, "--data", VAL, "--device", "tpu"], "unknown device"),
    (["evaluate", MLP, "--data", VAL, "--batch-size", "0"], "--batch-size must be at least 1"),
    (["evaluate", MLP], "Missing option '--data'"),
    (["inspect"], "Missing argument"),
    (["frobnicate"], "No such command"),
])
def test_other_commands_check_their_options_the_same_way(args, fragment):
    result = cli(*args)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert fragment in _error_line(result)


# ------------------------------------------------------------------ interrupts at start-up


@pytest.mark.slow
@pytest.mark.parametrize("signum, by", [(signal.SIGINT, ""), (signal.SIGTERM, " by SIGTERM")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line_and_exit_130(tmp_path, signum, by):
    """Sent while Python imports torch: the console script handles both before it imports."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cadrelu", "retrofit", str(MLP), "-o", str(tmp_path / "out.pt2")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [f"interrupted{by}"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ a finished fine-tune is kept


def _finetune_args(output: Path) -> list[object]:
    return ["retrofit", MLP, "--finetune", TRAIN, "--epochs", "1", "--control", "--device", "cpu",
            "-o", output, "--json"]


def _interrupt_control_before_it_starts(monkeypatch) -> None:
    import retrofit.training.loop as train

    real, calls = train.finetune, []

    def finetune(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "finetune", finetune)


def _interrupt_the_model_write(monkeypatch) -> None:
    from retrofit.pipeline.subjects import TorchSubject

    def save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchSubject, "save", save)


def _fail_the_model_write(monkeypatch) -> None:
    from retrofit.pipeline.subjects import TorchSubject

    def save(self, model, path, step=None):
        from retrofit.errors import OutputError

        raise OutputError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(TorchSubject, "save", save)


@pytest.mark.slow
@pytest.mark.parametrize("fault, code", [
    (_interrupt_control_before_it_starts, ExitCode.INTERRUPTED),
    (_interrupt_the_model_write, ExitCode.INTERRUPTED),
    (_fail_the_model_write, ExitCode.OUTPUT),
], ids=["Ctrl-C before the control arm", "Ctrl-C while writing", "disk full while writing"])
def test_a_finished_finetune_survives_a_fault_and_resume_finishes_the_job(
        tmp_path, monkeypatch, fault, code):
    reference = tmp_path / "reference.pt2"
    assert cli(*_finetune_args(reference)).exit_code == 0
    output = tmp_path / "out.pt2"
    checkpoint = tmp_path / "out.pt2.ckpt"
    with monkeypatch.context() as patched:
        fault(patched)
        failed = cli(*_finetune_args(output))
    assert failed.exit_code == code, failed.output
    line = one_line(failed)
    assert checkpoint.exists() and not output.exists() and no_partial_files(tmp_path)
    if code == ExitCode.INTERRUPTED:
        assert line == (f"interrupted; {checkpoint} was saved: run the same command with "
                        "--resume to go on")
    else:
        assert json.loads(failed.stdout)["written"] == []
    resumed = cli(*_finetune_args(output), "--resume")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert report["resumed"] and report["output"] == str(output)
    assert any(note.startswith(f"resumed from {checkpoint}") for note in report["notes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt2", "reference.pt2"]
    from retrofit.torch_path.io import load_torch_model

    weights = [load_torch_model(path).module.state_dict() for path in (reference, output)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# ------------------------------------------------------------------ names are never cut


class _LongNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone_feature_extractor_stage_one_block_activation_first = nn.ReLU()
        self.backbone_feature_extractor_stage_one_block_activation_second = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone_feature_extractor_stage_one_block_activation_first(x)
        return self.head(self.backbone_feature_extractor_stage_one_block_activation_second(x))


@pytest.mark.parametrize("command", ["inspect", "retrofit"])
def test_site_names_are_whole_when_the_output_is_not_a_terminal(tmp_path, command):
    path = tmp_path / "long.pt2"
    torch.export.save(torch.export.export(_LongNames().eval(), (torch.randn(2, 4),)), path)
    extra = ["-o", tmp_path / "out.pt2"] if command == "retrofit" else []
    result = cli(command, path, *extra)  # CliRunner's stdout is not a terminal: 80 columns
    assert result.exit_code == 0, result.output
    for name in ("backbone_feature_extractor_stage_one_block_activation_first",
                 "backbone_feature_extractor_stage_one_block_activation_second"):
        assert name in result.stdout
    assert "…" not in result.stdout


def test_paths_and_notes_with_brackets_print_as_they_are(tmp_path):
    """Rich markup never eats text that comes from the user: a folder named like a style."""
    folder = tmp_path / "[bold]runs"
    folder.mkdir()
    output = folder / "out[1].pt2"
    result = cli("retrofit", MLP, "-o", output)
    assert result.exit_code == 0, result.output
    assert f"wrote {output}" in result.stdout


@pytest.mark.slow
def test_a_reader_that_leaves_the_pipe_does_not_stop_the_job_or_change_its_exit_code(tmp_path):
    """`cadrelu retrofit ... | head`: the report's rest goes nowhere, the model is written."""
    output = tmp_path / "out.pt2"
    for extra in ([], ["--json"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "cadrelu", "retrofit", str(MLP), "--data",
             str(SAMPLES / "data" / "digits_val.npz"), "-o", str(output), "--force", *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        process.stdout.close()  # gone before the first line: every write meets EPIPE
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert output.exists() and b"Traceback" not in stderr
        output.unlink()
