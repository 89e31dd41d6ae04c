"""Ctrl-C and SIGTERM reaching the real ``cadrelu`` process during fine-tuning: exit code 130,
one line naming the checkpoint, no output written, and ``--resume`` ends where an
uninterrupted run with the same seed ends (resumed once, for SIGINT: after the signal both
take the same path, and tests/training/test_loop.py resumes a mid-epoch SIGTERM exactly).

tests/training/test_loop.py covers the same in-process (exact resume at epoch ends and mid-epoch);
here the signal comes from outside, as from a terminal or a job scheduler.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrofit.training.checkpoint import load_checkpoint
from retrofit.errors import ExitCode
from retrofit.torch_path.io import load_torch_model
from tests.conftest import REPO, SAMPLES, no_partial_files, sha256

pytestmark = pytest.mark.slow

MODEL = SAMPLES / "models" / "digits_mlp.pt2"
EPOCHS = 2


def command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cadrelu", "retrofit", str(MODEL),
            "--finetune", str(SAMPLES / "data" / "digits_train.npz"),
            "--data", str(SAMPLES / "data" / "digits_val.npz"),
            "--epochs", str(EPOCHS), "--device", "cpu", "--seed", "3", "--json",
            "-o", str(output), *extra]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run the resumed ones must match."""
    output = tmp_path_factory.mktemp("straight") / "out.pt2"
    done = run(command(output))
    assert done.returncode == 0, done.stderr
    return output, json.loads(done.stdout)


def interrupt_after_first_checkpoint(args: list[str], checkpoint: Path, signum: int):
    """Start the command, wait for its first checkpoint (the end of epoch 1), send ``signum``."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=240)
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_finetune_exits_130_and_resume_matches_an_uninterrupted_run(
        tmp_path, straight, signum):
    straight_output, straight_report = straight
    output = tmp_path / "out.pt2"
    checkpoint = tmp_path / "out.pt2.ckpt"
    digest = sha256(MODEL)

    code, stdout, stderr = interrupt_after_first_checkpoint(command(output), checkpoint, signum)
    assert code == ExitCode.INTERRUPTED, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert lines == [f"interrupted; {checkpoint} was saved: run the same command with --resume "
                     "to go on"], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not output.exists() and no_partial_files(tmp_path)
    state = load_checkpoint(checkpoint)  # readable without unpickling
    assert 1 <= state["epoch"] <= EPOCHS
    assert state["epoch"] < EPOCHS or state.get("batch_in_epoch", 0) > 0

    if signum == signal.SIGTERM:
        return  # the same path as SIGINT from here; test_train resumes a SIGTERM exactly
    resumed = run(command(output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert not checkpoint.exists()  # a default checkpoint goes once the run has finished
    assert report["finetune"]["epochs_run"] == straight_report["finetune"]["epochs_run"]
    for stage, scores in straight_report["accuracy"].items():
        assert report["accuracy"][stage]["top1"] == pytest.approx(scores["top1"], abs=0.5), stage
    mine = load_torch_model(output).module.state_dict()
    theirs = load_torch_model(straight_output).module.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-4, rtol=1e-4, msg=key)
    assert sha256(MODEL) == digest and no_partial_files(tmp_path)
