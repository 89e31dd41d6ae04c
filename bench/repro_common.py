"""What the ``bench/repro_*.py`` scripts share: the command line, thread count, result files.

Each reproduction writes ``bench/results/repro_<name>.json`` (settings, every run's raw numbers,
the command) and ``bench/results/repro_<name>.md`` (the table, the command, a short reading).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from bench._common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def command_line() -> str:
    """The command that ran this script, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", shlex.quote(script_text), *map(shlex.quote, sys.argv[1:])])


def digits_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a reproduction on the sample digits: the data, threads and the output
    folder (added last, so the recorded settings keep that order)."""
    parser.add_argument("--train", type=Path, default=ROOT / "samples/data/digits_train.npz")
    parser.add_argument("--val", type=Path, default=ROOT / "samples/data/digits_val.npz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line, with torch's thread count set to ``--threads`` before anything runs."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def library_fingerprint() -> dict[str, Any]:
    """Which code produced the numbers: git HEAD, whether ``retrofit/`` differs from it, and a
    hash of every ``.py`` file under ``retrofit/`` (subpackages included) as it is on disk."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "retrofit").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "retrofit")
    return {"git_head": git("rev-parse", "HEAD"),
            "retrofit_uncommitted_changes": None if status is None else bool(status),
            "retrofit_sha256": digest.hexdigest()[:16]}


_START_FINGERPRINT = library_fingerprint()


def environment() -> dict[str, Any]:
    now = library_fingerprint()
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "library": _START_FINGERPRINT,
            "library_changed_during_run": now["retrofit_sha256"] != _START_FINGERPRINT["retrofit_sha256"]}


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf: non-finite numbers are written as null."""
    return value if value is not None and math.isfinite(value) else None


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in rows])


def write_results(name: str, *, title: str, settings: dict[str, Any], runs: list[dict[str, Any]],
                  header: Sequence[str], rows: Sequence[Sequence[str]], reading: str,
                  seconds: float, extra_md: str = "", out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write the JSON and Markdown results and print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command_line()
    record = {"name": name, "command": command, "seconds": round(seconds, 1),
              "environment": environment(), "settings": settings, "runs": runs}
    json_path = out_dir / f"repro_{name}.json"
    json_path.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    library = record["environment"]["library"]
    code = f"git {str(library['git_head'])[:10]}" + (
        f" + uncommitted changes (retrofit/ sha256 {library['retrofit_sha256']})"
        if library["retrofit_uncommitted_changes"] else "")
    md = [f"# {title}", "", "```bash", command, "```", "",
          f"Runtime: {seconds:.0f} s on {torch.get_num_threads()} CPU threads "
          f"(torch {torch.__version__}; code: {code}). Raw numbers: `{json_path.name}`.", "",
          markdown_table(header, rows), ""]
    if extra_md:
        md += [extra_md, ""]
    md += ["**Reading.** " + reading.strip(), ""]
    md_path = out_dir / f"repro_{name}.md"
    md_path.write_text("\n".join(md))
    print(plain_table(header, rows))
    print(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
          f" and {md_path.name} ({seconds:.0f} s)")
    return json_path, md_path


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start
