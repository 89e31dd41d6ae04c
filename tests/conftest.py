"""Shared fixtures and helpers: sample paths, a malicious pickle, running the CLI in-process."""

from __future__ import annotations

import os

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


class _WritesMarker:
    """Unpickling this calls os.system-like code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture
def malicious_pickle(tmp_path: Path) -> tuple[Path, Path]:
    """A torch-loadable file whose unpickling writes ``marker``; returns (file, marker)."""
    import torch

    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": _WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture
def sample_models() -> list[Path]:
    return sorted((SAMPLES / "models").glob("*.pt2"))


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def no_partial_files(folder: Path) -> bool:
    return not [name for name in os.listdir(folder) if ".partial" in name]


def run_cli(*args: object):
    """``cadrelu ARGS`` run in-process (paths may be given as Path objects)."""
    from typer.testing import CliRunner

    from cadrelu.main import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line(result) -> str:
    """The one non-empty stderr line of a command; fails on a traceback or on several lines."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]
