"""The ``cadrelu`` console script. It imports nothing heavy until SIGINT and SIGTERM are
handled: importing torch takes seconds, and Ctrl-C (or a scheduler's SIGTERM) in that time
must still be one line and exit code 130, not a traceback or a silent kill.

While the command's modules import, a signal ends the process at once: there is nothing to
save yet, and a KeyboardInterrupt raised inside a C extension's import (numpy, torch) leaves it
half-loaded and surfaces as an ImportError instead. Once they are imported, SIGINT and SIGTERM
raise KeyboardInterrupt, so a fine-tune saves its checkpoint before the command stops.
"""

from __future__ import annotations

import os
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


def _stop_at_once(signum: int, frame: object) -> None:
    """During start-up: the one line, and exit without unwinding a half-finished import."""
    name = signal.Signals(signum).name
    sys.stderr.write(interrupted_line(KeyboardInterrupt(name) if signum != signal.SIGINT
                                      else KeyboardInterrupt()) + "\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def main() -> None:
    """Run the command line; Ctrl-C or SIGTERM at any moment gives one line and exit code 130."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_at_once)
    from cadrelu.main import run

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = run()
    except KeyboardInterrupt as interrupt:  # outside the command's own handling
        sys.stderr.write(interrupted_line(interrupt) + "\n")
        code = INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
