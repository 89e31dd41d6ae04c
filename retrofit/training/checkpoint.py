"""Fine-tuning checkpoints: written atomically, read without unpickling, and interrupts that wait
for a step boundary so that what is written is a consistent state.

A checkpoint is a plain ``dict`` of tensors, numbers, strings, lists, tuples and dicts, so
``torch.load(path, weights_only=True)`` reads it and a checkpoint file cannot run code. What it
holds is the run's state (:mod:`retrofit.training.state`); this module writes, reads and checks
the envelope, and captures the random number generators.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from retrofit.atomic import write_bytes_atomic
from retrofit.errors import BadInputError, first_line

CHECKPOINT_FORMAT = "cadrelu.finetune-checkpoint/1"
"""The ``format`` entry of every checkpoint; a file without it is not one of ours."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically: a reader, or a resumed run
    after a crash, sees the previous checkpoint or this one, never a half-written file."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; anything else is a one-line
    BadInputError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise BadInputError(f"checkpoint {path} does not exist") from error
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise BadInputError(
            f"cannot read checkpoint {path}: {first_line(error)}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BadInputError(f"{path} is not a cadrelu fine-tuning checkpoint")
    return state


# --------------------------------------------------------------------------- random state


def rng_state() -> dict[str, Any]:
    """The state of every generator a training step may draw from: torch (CPU and each CUDA
    device), Python's ``random`` and NumPy's global generator, as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where there are devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )


# --------------------------------------------------------------------------- interrupts


class StopRequest:
    """Set by Ctrl-C (SIGINT) or SIGTERM while :func:`deferred_interrupts` is active."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a request the training loop honours after the current
    step, so the checkpoint it writes is a consistent state; a second one raises
    KeyboardInterrupt at once. The previous handlers come back on exit.

    Signal handlers can only be set from the main thread; elsewhere the request never fires and
    Ctrl-C keeps its usual meaning.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
