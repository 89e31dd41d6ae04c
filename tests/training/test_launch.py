"""``cadrelu retrofit --nproc-per-node N``: the workers' outcome as one documented exit code and
at most one line, where torchrun turns every failure into 1 and a traceback; and the rule that
only rank 0 prints an error (every rank exits with its code)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

import retrofit.training.distributed
from retrofit.errors import ExitCode, UsageError
from retrofit.training.launch import outcome_of, record_failure, worker_argv
from tests.conftest import REPO, SAMPLES, no_partial_files, run_cli

MODEL = SAMPLES / "models" / "digits_mlp.pt2"
GATE = "error: gate failed: min_gain"
BAD = "error: labels in x.npz go up to 14 but the model has 10 outputs"


# --------------------------------------------------------------------------- the mapping


def failures(tmp_path: Path, monkeypatch, ends: dict[int, tuple]) -> dict[int, ProcessFailure]:
    """elastic's failures from ``{rank: (exitcode, recorded)}``; ``recorded`` is None (the
    worker died before it could say anything) or (line, exit code, time) as the worker wrote
    it through :func:`record_failure`."""
    out = {}
    for rank, (exitcode, recorded) in ends.items():
        path = tmp_path / f"error-{rank}.json"
        if recorded is not None:
            line, code, at = recorded
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setattr(time, "time", lambda at=at: at)
            record_failure(line, code)
            monkeypatch.undo()
        out[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode,
                                   error_file=str(path))
    return out


CASES = {
    # rank 0 failed the gate; rank 1 had finished, or was stopped by the launcher
    "gate": ({0: (5, (GATE, 5, 20.0)), 1: (-15, None)}, (5, GATE)),
    # every rank refused the input; rank 1 was first, rank 0 killed while it exited
    "bad input everywhere": ({0: (-15, (BAD, 3, 10.2)), 1: (3, (BAD + "!", 3, 10.1))},
                             (3, BAD + "!")),
    # rank 0 refused first; rank 1 then lost its peer, exited first, and rank 0 was killed
    # while it exited: what rank 0 had recorded counts
    "killed after its verdict": (
        {0: (-15, (BAD, 3, 10.0)), 1: (1, ("internal error: DistBackendError: reset", 1, 10.3))},
        (3, BAD)),
    "first verdict wins": ({0: (3, ("error: three", 3, 10.5)), 1: (6, ("error: six", 6, 10.4))},
                           (6, "error: six")),
    "a tie goes to rank 0": ({0: (3, ("error: zero", 3, 10.0)), 1: (3, ("error: one", 3, 10.0))},
                             (3, "error: zero")),
    # rank 1 killed (OOM killer); rank 0 then fails in a collective and is stopped, later
    "a kill beats its aftermath": (
        {0: (1, ("internal error: DistBackendError: peer gone", 1, 9e9)), 1: (-9, None),
         2: (130, ("interrupted", 130, 9e9))},
        (1, "error: rank 1 died of signal SIGKILL")),
    # a crash on rank 1 first; rank 0 stopped by the launcher checkpointed and said so
    "a crash beats the interrupt it caused": (
        {0: (130, ("interrupted; c.ckpt was saved", 130, 11.0)),
         1: (1, ("internal error: OutOfMemoryError: CUDA out of memory", 1, 10.0))},
        (1, "internal error: OutOfMemoryError: CUDA out of memory")),
    "stopped from outside": ({0: (-15, None), 1: (-2, None)},
                             (130, "interrupted: rank 0 got SIGTERM")),
    "interrupt line kept": ({1: (130, ("interrupted; c.ckpt was saved", 130, 1.0))},
                            (130, "interrupted; c.ckpt was saved")),
    "an unknown code is a crash": ({1: (7, None)},
                                   (1, "error: rank 1 exited with code 7 (see its output above)")),
    "a documented code without a line": (
        {0: (4, None)}, (4, "error: rank 0 exited with code 4 (see its output above)")),
    "a segfault": ({0: (-11, None), 1: (-15, None)}, (1, "error: rank 0 died of signal SIGSEGV")),
}


@pytest.mark.parametrize("ends, expected", CASES.values(), ids=CASES.keys())
def test_the_root_cause_gives_the_exit_code_and_the_line(tmp_path, monkeypatch, ends, expected):
    outcome = outcome_of(failures(tmp_path, monkeypatch, ends))
    assert (outcome.code, outcome.line) == expected


def test_the_workers_run_the_command_without_the_option():
    assert worker_argv(["retrofit", "m.pt2", "--nproc-per-node", "2", "--epochs", "1",
                        "--nproc-per-node=3", "-o", "x"]) == [
        "retrofit", "m.pt2", "--epochs", "1", "-o", "x"]


# --------------------------------------------------------------------------- one line per run


@pytest.mark.parametrize("env, prints", [({}, True), ({"RANK": "1"}, False),
                                         ({"CADRELU_LAUNCHED": "1"}, False)],
                         ids=["rank 0", "rank 1", "launched"])
def test_only_rank_0_prints_an_error_and_every_rank_records_it(tmp_path, monkeypatch, env, prints):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_cli("retrofit", tmp_path / "missing.pt2")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert ("error:" in result.stderr) is prints
    recorded = json.loads(error_file.read_text())
    assert recorded["exit_code"] == ExitCode.BAD_INPUT
    assert recorded["message"].startswith("error: ") and "missing.pt2" in recorded["message"]


@pytest.mark.parametrize("args, env, says", [
    (["--nproc-per-node", "2"], {}, "needs --finetune"),
    (["--nproc-per-node", "0", "--finetune", "t.npz"], {}, ">= 1"),
    (["--nproc-per-node", "2", "--finetune", "t.npz"], {"WORLD_SIZE": "2"}, "without torchrun"),
], ids=["no fine-tune", "zero", "under torchrun"])
def test_launch_usage_errors_are_one_line_before_any_worker_starts(monkeypatch, args, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_cli("retrofit", MODEL, *args)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr


def test_more_cuda_processes_than_gpus_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(retrofit.training.distributed, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="2 processes on CUDA need a GPU each, this machine has 1"):
        retrofit.training.distributed.setup_distributed("auto")


# --------------------------------------------------------------------------- real launches


def launch_command(tmp_path: Path, train: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cadrelu", "retrofit", str(MODEL), "--finetune", str(train),
            "--device", "cpu", "--nproc-per-node", "2", "-o", str(tmp_path / "out.pt2"), *extra]


def tiny_train(tmp_path: Path, label_shift: int = 0) -> Path:
    data = np.load(SAMPLES / "data" / "digits_train.npz")
    path = tmp_path / "x"
    np.savez(path, x=data["x"][:64], y=data["y"][:64] + label_shift)
    return path.with_suffix(".npz")


def said(stderr: str) -> list[str]:
    """stderr without Python's warnings (a warning line and its indented source line)."""
    return [line for line in stderr.splitlines()
            if line.strip() and "Warning" not in line and not line.startswith("  ")]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=240,
                          check=False)


@pytest.mark.slow
def test_two_workers_keep_the_gate_and_bad_input_exit_codes_and_succeed_with_0(tmp_path):
    passing = run(launch_command(tmp_path, tiny_train(tmp_path), "--epochs", "1"))
    assert passing.returncode == 0, passing.stderr[-3000:]
    assert said(passing.stderr) == [] and passing.stdout.count("wrote ") == 1

    gated = run(launch_command(tmp_path, tiny_train(tmp_path), "--epochs", "1", "--force",
                               "--min-gain", "1000"))
    assert gated.returncode == ExitCode.GATE, gated.stderr[-3000:]
    assert said(gated.stderr) == [GATE]
    assert gated.stdout.count("gate min_gain 1000 pp") == 1 and gated.stdout.count("wrote ") == 1

    (tmp_path / "out.pt2").unlink()
    bad_train = tiny_train(tmp_path, label_shift=5)
    bad = run(launch_command(tmp_path, bad_train, "--epochs", "1"))
    assert bad.returncode == ExitCode.BAD_INPUT, bad.stderr[-3000:]
    assert said(bad.stderr) == [BAD.replace("x.npz", str(bad_train))]
    assert bad.stdout == "" and not (tmp_path / "out.pt2").exists()
    assert no_partial_files(tmp_path)


@pytest.mark.slow
def test_two_workers_fine_tune_a_calibrated_mrepu_through_its_blend_ramp(tmp_path):
    """At lam = 0 the gains get no gradient: DDP must not wait for them at the next step."""
    done = run(launch_command(tmp_path, tiny_train(tmp_path), "--epochs", "2", "--to", "mrepu",
                              "--blend-ramp", "0.5", "--batch-size", "8"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "MRePU gains fitted" in done.stdout


@pytest.mark.slow
def test_ctrl_c_in_the_parent_stops_the_workers_with_130_and_one_line(tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    args = launch_command(tmp_path, SAMPLES / "data" / "digits_train.npz", "--epochs", "30",
                          "--batch-size", "16", "--checkpoint", str(checkpoint))
    # A stopped worker can linger in interpreter shutdown after it has recorded its line; the
    # launcher kills it after this many seconds (default 30), and the recorded code still counts.
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.INTERRUPTED, stderr[-3000:]
    assert said(stderr) == [
        f"interrupted; {checkpoint} was saved: run the same command with --resume to go on"]
    assert stdout == "" and not (tmp_path / "out.pt2").exists() and no_partial_files(tmp_path)
