"""Atomic output files: a reader sees the old file or the complete new one, never a half.

Everything the tool writes (models, checkpoints, reports) goes through :func:`atomic_output`:
the data is written to a temporary file in the target folder, flushed to disk, then renamed
over the target. On any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from retrofit.errors import OutputError


def check_output_path(
    path: Path, *, inputs: Iterable[Path] = (), force: bool = False
) -> Path:
    """Refuse an output that would overwrite an input, an existing file (without ``force``),
    or that lies in a folder that does not exist or cannot be written."""
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise OutputError(f"output {path} is the input file; choose another path with -o")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file path")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists; pass --force to replace it")
    folder = resolved.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The caller writes the whole file to the yielded path (by name, so libraries that insist on a
    path work). Side files the writer puts next to it are the caller's business.
    """
    target = Path(path)
    try:
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{target.stem}.", suffix=f".partial{target.suffix}", dir=target.parent
        )
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror}") from error
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a whole text file atomically (reports, JSON)."""
    with atomic_output(path) as temp:
        temp.write_text(text, encoding="utf-8")
