"""``torch.export`` programs (``.pt2``): checked before loading, loaded in inference mode, exported.

``torch.export.load`` unpickles some archive members without ``weights_only``, so an archive is
checked first (:func:`check_exported_archive`) unless the user trusts the file. A program
exported in training mode keeps batch-norm and dropout in that mode: loading switches them to
inference, with a note.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from retrofit.errors import BadInputError, UntrustedPickleError, first_line
from retrofit.torch_path.formats import TRAINING_MODE_NOTE, ModelFormat, TorchModel
from retrofit.verify import eval_mode


# Members of a .pt2 archive that torch.export.load reads as JSON or short text, never unpickles.
_PT2_TEXT_RECORDS = frozenset(
    {"archive_format", "archive_version", "version", "byteorder", "serialization_id",
     ".format_version", ".storage_alignment", ".data/version"}
)
_PT2_CODE_FOLDERS = ("data/aotinductor/", "data/executorch/", "data/mtia/")


def check_exported_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading would run code stored in it.

    ``torch.export.load`` unpickles some members with ``weights_only=False`` (weights and
    constants saved with ``use_pickle``, opaque and script objects, example inputs that the safe
    loader refuses, the pre-2.7 layout) and loads AOTInductor libraries. Here every member that
    is not JSON, a short text record or a raw tensor payload named by the weights/constants
    configs must load with ``weights_only=True``; a member that does not raises
    :class:`UntrustedPickleError` naming it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if not name.endswith("/")]
            raw = _raw_tensor_members(archive, names)
            for name in names:
                inner = name.partition("/")[2]  # below the archive's root folder
                if any(inner.startswith(folder) for folder in _PT2_CODE_FOLDERS):
                    raise UntrustedPickleError(
                        f"{path} holds compiled code ({name}); loading it would run that code. "
                        "Pass --trust-pickle only if you trust its source"
                    )
                if (name in raw or name.endswith(".json") or inner in _PT2_TEXT_RECORDS
                        or name.rpartition("/")[2] in _PT2_TEXT_RECORDS
                        or inner.startswith("extra/")):
                    continue
                if not _loads_weights_only(archive.read(name)):
                    raise UntrustedPickleError(
                        f"{path} holds {name}, which is not plain tensor data: loading it would "
                        "unpickle objects, which runs code stored in the file. Pass "
                        "--trust-pickle only if you trust its source"
                    )
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise BadInputError(f"{path}: damaged zip archive ({first_line(error)})") from error


def _raw_tensor_members(archive: zipfile.ZipFile, names: list[str]) -> set[str]:
    """Members the weights/constants configs name as raw tensor bytes (read, never unpickled)."""
    raw: set[str] = set()
    for name in names:
        if not name.endswith(("_weights_config.json", "_constants_config.json")):
            continue
        try:
            config = json.loads(archive.read(name))["config"]
            entries = [(entry["path_name"], entry.get("use_pickle")) for entry in config.values()]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadInputError(f"{archive.filename}: damaged torch.export record {name} "
                                f"({first_line(error)})") from error
        folder = name.rpartition("/")[0]
        for path_name, use_pickle in entries:
            if (not use_pickle and isinstance(path_name, str)
                    and path_name.startswith(("weight_", "tensor_"))):
                raw.add(f"{folder}/{path_name}")
    return raw


def _loads_weights_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any failure: torch.export.load would try again without weights_only
        return False
    return True


@contextlib.contextmanager
def torch_export_logs() -> Iterator[list[logging.LogRecord]]:
    """Keep torch's log records off stderr while a program is loaded or saved, and collect them.

    torch.export logs a failure as a multi-line warning with a traceback (then raises "check the
    warnings above"); the collected records let the error name its cause in one line. torch
    gives many of its loggers their own stderr handler, so each one's handlers are swapped.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collect = Collect(logging.DEBUG)
    swapped = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger):
            if logger.handlers:
                swapped.append((logger, logger.handlers))
                logger.handlers = [collect]
    try:
        yield records
    finally:
        for logger, handlers in swapped:
            logger.handlers = handlers


def _logged_cause(records: list[logging.LogRecord], error: BaseException) -> str:
    """The error's first line, or the exception torch.export logged before raising its own
    "check the warnings above"."""
    for record in reversed(records):
        if record.exc_info and record.exc_info[1] is not None:
            return first_line(record.exc_info[1])
    return first_line(error)


def load_exported(path: Path, trust_pickle: bool = False) -> TorchModel:
    from retrofit.torch_path.hf_outputs import register_output_types

    if not trust_pickle:
        check_exported_archive(path)
    notes = register_output_types(path)
    records: list[logging.LogRecord] = []
    try:
        # An open file, not a path: torch.export wants a name ending in .pt2 otherwise.
        with torch_export_logs() as records, open(path, "rb") as handle:
            program = torch.export.load(handle)
    except Exception as error:
        cause = _logged_cause(records, error)
        raise BadInputError(f"{path}: cannot load the torch.export program ({cause})") from error
    try:
        example, dynamic = program_inputs(program)
        # On the program itself, so that every module made from it (a re-export too) is in eval mode.
        if _exported_to_eval(program.graph_module):
            notes.append(TRAINING_MODE_NOTE)
        module = program.module()
    except Exception as error:  # a damaged or hand-made program
        raise BadInputError(f"{path}: the torch.export program is not usable ({first_line(error)})") from error
    if len(example) != len(dynamic) or not all(isinstance(t, torch.Tensor) for t in example):
        raise BadInputError(
            f"{path}: the program's example inputs are not {len(dynamic)} tensor(s), one per "
            "model input; the file is damaged"
        )
    return TorchModel(module, ModelFormat.EXPORTED, path, example, dynamic, notes=notes,
                      program=program)


def program_inputs(program: torch.export.ExportedProgram
                   ) -> tuple[tuple[Any, ...], tuple[tuple[int, ...], ...]]:
    """A program's example inputs (random ones of its inputs' shapes when it kept none) and,
    per input, its dynamic axes: what a re-export of its module needs to keep them dynamic."""
    placeholders = [
        node for node in program.graph_module.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    dynamic = tuple(
        tuple(i for i, dim in enumerate(node.meta["val"].shape) if not isinstance(dim, int))
        for node in placeholders
    )
    example = program.example_inputs[0] if program.example_inputs else None
    if example is None:
        example = tuple(
            torch.randn(_concrete_shape(node.meta["val"].shape), dtype=node.meta["val"].dtype)
            for node in placeholders
        )
    return tuple(example), dynamic


_aten = torch.ops.aten


# Ops of programs exported in training mode, with the position of their ``training`` flag.
_TRAINING_FLAGS = {
    _aten.batch_norm.default: 5,
    _aten.native_batch_norm.default: 5,
    _aten._native_batch_norm_legit.default: 5,
    _aten.dropout.default: 2,
    _aten.native_dropout.default: 2,
    _aten.feature_dropout.default: 2,
    _aten.alpha_dropout.default: 2,
    _aten.feature_alpha_dropout.default: 2,
}


def _exported_to_eval(module: torch.fx.GraphModule) -> bool:
    """Switch the batch-norm and dropout calls of a program exported in training mode to
    inference, in place; True when there were any.

    The module of a ``torch.export`` program refuses ``.eval()``: its mode is baked into each
    call's ``training`` argument, so that argument is what changes.
    """
    changed = False
    for node in module.graph.nodes:
        index = _TRAINING_FLAGS.get(node.target)
        if node.op == "call_function" and index is not None and len(node.args) > index \
                and node.args[index] is True:
            node.update_arg(index, False)
            changed = True
    if changed:
        module.recompile()
    return changed


def _concrete_shape(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) else int(dim.node.hint or 2) for dim in shape)


def export_program(
    module: nn.Module, example_inputs: tuple[torch.Tensor, ...],
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` the module, keeping the dynamic axes the original program had."""
    shapes = None
    if dynamic_dims and any(dynamic_dims):
        shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dims} for dims in dynamic_dims)
    try:
        with eval_mode(module):
            return torch.export.export(module, tuple(example_inputs), dynamic_shapes=shapes)
    except Exception as error:
        raise BadInputError(f"cannot export the model with torch.export ({first_line(error)})") from error
