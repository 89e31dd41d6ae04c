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


def main() -> None:
    """Run the command line; Ctrl-C or SIGTERM at any moment gives one line and exit code 130."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from cli.main import run

        code = run()
    except KeyboardInterrupt as interrupt:  # before the command's own handling began
        by = f" by {interrupt.args[0]}" if interrupt.args else ""
        sys.stderr.write(f"interrupted{by}\n")
        code = INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
