"""Shared fixtures: sample paths and a malicious pickle."""

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



