"""``cadrelu retrofit --nproc-per-node N``: N local workers, one documented exit code.

torchrun reports any failed worker as exit code 1 with its own traceback, so a failed gate (5)
looks like a crash. :func:`launch` starts the same command, without the option, in N workers
through torch's elastic launcher (what torchrun runs), keeps the launcher's own logging quiet and
turns the workers' ends into one exit code and at most one line (:func:`outcome_of`).

The workers print no error themselves (``CADRELU_LAUNCHED`` is set for them): each records its
line and exit code in the file elastic names in ``TORCHELASTIC_ERROR_FILE``
(:func:`record_failure`), and the parent prints the root cause's. Under plain torchrun, rank 0
prints and the same file puts cadrelu's line into torchrun's failure summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrofit.training.distributed import is_main_process
from retrofit.errors import ExitCode, UsageError

LAUNCHED = "CADRELU_LAUNCHED"
"""Set in the workers' environment: the parent reports their errors."""
OPTION = "--nproc-per-node"
_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
_VERDICTS = frozenset({ExitCode.USAGE, ExitCode.BAD_INPUT, ExitCode.PARITY, ExitCode.GATE,
                       ExitCode.OUTPUT})
_DOCUMENTED = _VERDICTS | {ExitCode.INTERRUPTED}
_STOPS = frozenset({signal.SIGINT, signal.SIGTERM})
_PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""What elastic's agent catches in the parent to stop the workers (and never gives back)."""


@dataclass(frozen=True)
class Outcome:
    """How the launched run ended: the exit code and the line to print (None: nothing to say)."""

    code: int
    line: str | None = None


def prints_errors() -> bool:
    """Whether this process prints its error line: rank 0, unless a launcher reports for it."""
    return is_main_process() and not os.environ.get(LAUNCHED)


def record_failure(line: str, code: int) -> None:
    """Leave this process's error line and exit code where its launcher reads them (a no-op
    outside torchrun and :func:`launch`). The format is elastic's ``{"message": str}``."""
    path = os.environ.get(_ERROR_FILE)
    if not path:
        return
    record = {"message": line, "timestamp": time.time(), "exit_code": int(code),
              "rank": int(os.environ.get("RANK", "0"))}
    with contextlib.suppress(OSError):  # reporting must not hide the error itself
        Path(path).write_text(json.dumps(record), encoding="utf-8")


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line a worker runs: ``argv`` without ``--nproc-per-node N``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == OPTION:
            skip = True
        elif not arg.startswith(OPTION + "="):
            kept.append(arg)
    return kept


def launch(argv: Sequence[str], nproc: int, *, fine_tunes: bool) -> Outcome:
    """Run ``python -m cadrelu ARGV`` in ``nproc`` local workers (gloo on CPU, one GPU each on
    CUDA) and say how they ended. Ctrl-C here stops the workers (they checkpoint as under
    torchrun) and gives exit code 130."""
    if nproc < 1:
        raise UsageError(f"{OPTION} takes a number of processes >= 1, got {nproc}")
    if nproc > 1 and not fine_tunes:
        raise UsageError(f"{OPTION} {nproc} needs --finetune: only fine-tuning is shared "
                         "between processes")
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        raise UsageError(f"{OPTION} starts its own processes: run it without torchrun")
    from torch.distributed.elastic.multiprocessing import (
        DefaultLogsSpecs,
        SignalException,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with (tempfile.TemporaryDirectory(prefix="cadrelu-launch-") as logs, _quiet_launcher(),
          _environ(_worker_environment(nproc))):
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"cadrelu-{uuid.uuid4().hex}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "cadrelu", *argv)
        except ChildFailedError as failed:
            return outcome_of(failed.failures)
        except (SignalException, KeyboardInterrupt):
            return _interrupted(Path(logs))
    return Outcome(int(ExitCode.OK))


def outcome_of(failures: Mapping[int, Any]) -> Outcome:
    """The exit code and line of a failed run, from elastic's ``ProcessFailure`` per rank.

    When one worker fails the launcher stops the others (SIGTERM), and those stopped during
    fine-tuning checkpoint and exit 130, or fail in a collective whose peer is gone. So the root
    cause is looked for in this order: a documented verdict (2-6: usage, bad input, parity,
    gate, output); a death by a signal other than SIGINT/SIGTERM (1); any other failure (1);
    an interrupt (130). Within one kind the first failure wins, rank 0 on a tie.
    """
    rank, failure = min(failures.items(), key=lambda item: (
        _kind(_exit_code(item[1])), _recorded_time(item[1]), item[0]))
    code = _exit_code(failure)
    if code < 0:
        name = failure.signal_name()
        if -code in _STOPS:
            return Outcome(int(ExitCode.INTERRUPTED), f"interrupted: rank {rank} got {name}")
        return Outcome(int(ExitCode.INTERNAL), f"error: rank {rank} died of signal {name}")
    line = _recorded(failure.error_file_data)
    return Outcome(code if code in _DOCUMENTED else int(ExitCode.INTERNAL),
                   line or f"error: rank {rank} exited with code {code} (see its output above)")


def _kind(code: int) -> int:
    """Root-cause order of an exit code (see :func:`outcome_of`); a signal death is negative."""
    if code in _VERDICTS:
        return 0
    if code < 0 and -code not in _STOPS:
        return 1
    if code == ExitCode.INTERRUPTED or code < 0:
        return 3
    return 2


def _exit_code(failure: Any) -> int:
    """The code a worker chose (it may be killed while exiting), else the one it died with."""
    data = failure.error_file_data
    return int(data["exit_code"]) if _recorded(data) else int(failure.exitcode)


def _recorded(data: Mapping[str, Any]) -> str | None:
    """The line :func:`record_failure` left (None for a worker that died before)."""
    message = data.get("message")
    return message if isinstance(message, str) and "exit_code" in data else None


def _recorded_time(failure: Any) -> float:
    """When the worker failed: its own record (sub-second) if any, else elastic's second."""
    data = failure.error_file_data
    return float(data["timestamp"]) if _recorded(data) else float(failure.timestamp)


def _interrupted(logs: Path) -> Outcome:
    """Exit code 130 and the lowest rank's own interrupt line (it says which checkpoint was
    saved), read from the workers' error files after the launcher stopped them."""
    lines = []
    for path in logs.rglob("error.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if _recorded(data) and data["exit_code"] == ExitCode.INTERRUPTED:
                lines.append((int(data.get("rank", 0)), data["message"]))
    return Outcome(int(ExitCode.INTERRUPTED), min(lines)[1] if lines else "interrupted")


def _worker_environment(nproc: int) -> dict[str, str]:
    """What the workers find in their environment besides elastic's variables: the parent
    reports their errors, and N processes share the CPU cores as torchrun would have them."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return {LAUNCHED: "1", "OMP_NUM_THREADS": threads}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` (the workers inherit it), then as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """While the launcher runs its loggers say nothing; afterwards the signal handlers it
    installed are the previous ones again."""
    logger = logging.getLogger("torch.distributed.elastic")
    quiet, propagate = logging.NullHandler(), logger.propagate
    handlers = {sig: signal.getsignal(sig) for sig in _PARENT_SIGNALS}
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
