"""Atomic output files: a reader sees the old file or the complete new one, never a half.

Everything the tool writes (models, checkpoints, reports) goes through :func:`atomic_output`:
the data is written to a temporary file in the target folder, flushed to disk, then renamed
over the target. On any error the temporary file is removed and the target is untouched.
Outputs are regular files: a device, FIFO or socket at an output path (or a symbolic link to
one, or to nothing) is refused, with or without ``force``, before any work and again before the
rename, since renaming over ``/dev/null`` would replace the device node with a file.
The new file gets the permissions an ordinary ``open(path, "w")`` would give it (those of the file
it replaces, else ``0o666`` less the umask), not the private ``0o600`` of a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
    refuse_special_file(path)
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved or _same_file(path, Path(source)):
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


def refuse_special_file(path: Path) -> None:
    """Raise :class:`OutputError` unless ``path`` is missing, a regular file, or a symbolic link
    to a regular file."""
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror}") from error
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise OutputError(f"output {path} is a symbolic link to nothing "
                          f"({os.readlink(path)}); give a file path") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a folder is refused by its own message
        return
    via = f" through the link {path} -> {os.readlink(path)}" if stat.S_ISLNK(link.st_mode) else ""
    raise OutputError(f"output {path} is a {_kind(mode)}{via}, not a regular file; outputs are "
                      "always regular files, even with --force: give a file path")


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")]
    return next((name for test, name in kinds if test(mode)), "special file")


def _same_file(a: Path, b: Path) -> bool:
    """True when both paths exist and are one file (a hard link of the input, say)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _new_file_mode(target: Path) -> int:
    """The mode a file written in place at ``target`` would have."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The caller writes the whole file to the yielded path (by name, so libraries that insist on a
    path work). Side files the writer puts next to it are the caller's business.
    """
    target = Path(path)
    try:
        handle, temp_name = tempfile.mkstemp(  # short enough for any name the target may have
            prefix=f".{target.stem[:64]}.", suffix=f".partial{target.suffix[:16]}",
            dir=target.parent,
        )
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror}") from error
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temp, _new_file_mode(target))
        refuse_special_file(target)  # it may have appeared while the work ran
        os.replace(temp, target)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        temp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file atomically. Serialisers write to memory and this writes the bytes:
    torch's and safetensors' own file writers turn a full disk into a RuntimeError or an abort,
    where a Python write raises the OSError that becomes one line naming the path."""
    with atomic_output(path) as temp:
        temp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a whole text file atomically (reports, JSON)."""
    write_bytes_atomic(path, text.encode("utf-8"))
