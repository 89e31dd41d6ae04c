"""Project exceptions, each carrying the exit code the CLI turns it into.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``; library users can
catch :class:`RetrofitError` and branch on the subclass.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (README, "Exit codes")."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_INPUT = 3
    PARITY = 4
    GATE = 5
    OUTPUT = 6
    INTERRUPTED = 130


class RetrofitError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(RetrofitError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = ExitCode.USAGE


class SelectionError(UsageError):
    """An include/exclude rule matched no ReLU site (selection is strict)."""


class BadInputError(RetrofitError):
    """A model or data file that cannot be read, or does not fit the job."""

    exit_code = ExitCode.BAD_INPUT


class UnsupportedModelError(BadInputError):
    """A model the tool cannot rewrite or run (no ReLU, unsupported op, quantized graph)."""


class UntrustedPickleError(BadInputError):
    """A pickled model given without the explicit trust option."""


class ParityError(RetrofitError):
    """The rewritten model does not reproduce what it must (identity init, ONNX vs torch)."""

    exit_code = ExitCode.PARITY


class GateError(RetrofitError):
    """A CI gate such as ``--max-drop`` was not met."""

    exit_code = ExitCode.GATE


class OutputError(RetrofitError):
    """An output cannot be written where asked (missing folder, exists, equals the input)."""

    exit_code = ExitCode.OUTPUT


def first_line(error: BaseException | str, *, typed: bool = False, limit: int = 300) -> str:
    """The first non-blank line of an error's message, for a one-line report: library errors
    (torch, onnx, PIL) span many lines. ``typed`` prefixes the exception's class name, where the
    message alone does not say what failed; ``limit`` caps the line's length."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    text = (f"{name}: {lines[0]}" if typed and name else lines[0]) if lines else name
    return text if len(text) <= limit else text[: limit - 3] + "..."
