"""The ``cadrelu`` console script. It imports nothing heavy until SIGINT and SIGTERM are
handled: importing torch takes seconds, and Ctrl-C (or a scheduler's SIGTERM) in that time
must still be one line and exit code 130, not a traceback or a silent kill."""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130  # retrofit.errors.ExitCode.INTERRUPTED, which this module may not import yet


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM takes Ctrl-C's path: a fine-tune saves its checkpoint, the rest stops cleanly."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupted_line(interrupt: KeyboardInterrupt) -> str:
    """What Ctrl-C or SIGTERM prints, at start-up or later: the signal, and the checkpoint
    ``--resume`` goes on from."""
    signal_name = str(interrupt.args[0]) if interrupt.args else ""
    by = f" by {signal_name}" if signal_name.startswith("SIG") else ""
    saved = getattr(interrupt, "checkpoint", None)
    hint = f"; {saved} was saved: run the same command with --resume to go on" if saved else ""
    return f"interrupted{by}{hint}"


def main() -> None:
    """Run the command line; Ctrl-C or SIGTERM at any moment gives one line and exit code 130."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from cli.main import run

        code = run()
    except KeyboardInterrupt as interrupt:  # before the command's own handling began
        sys.stderr.write(interrupted_line(interrupt) + "\n")
        code = INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
