"""Load and save models in every supported format, found from the file's content.

Formats: ``torch.export`` programs (``.pt2``), state dicts (``torch.save`` or safetensors) with
an architecture factory (``--arch package.module:factory``), pickled ``nn.Module`` files, and
ONNX. Loading never unpickles arbitrary objects unless the caller passes ``trust_pickle=True``:
unpickling runs code from the file. That includes ``.pt2`` archives: ``torch.export.load`` unpickles
some members without ``weights_only``, so an archive is checked first (:func:`check_exported_archive`).
Saving never touches the input and is atomic.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import logging
import pickle
import re
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from retrofit.atomic import write_bytes_atomic
from retrofit.errors import BadInputError, UntrustedPickleError, UsageError, first_line
from retrofit.torch_path.record import METADATA_KEY, RetrofitRecord
from retrofit.verify import eval_mode


class ModelFormat(str, Enum):
    """How a model is stored; the value is what reports and ``--format`` use."""

    EXPORTED = "pt2"
    STATE_DICT = "state-dict"
    SAFETENSORS = "safetensors"
    PICKLED_MODULE = "pickled-module"
    ONNX = "onnx"


@dataclass
class TorchModel:
    """A loaded PyTorch model and what is needed to save it back in its format.

    ``example_inputs`` come from the file where the format keeps them (``.pt2``); otherwise
    from the caller (``--input-shape`` or a dataset). ``dynamic_dims`` lists, per input, the
    axes that were dynamic in the exported program so a re-export keeps them dynamic.
    ``record`` is the retrofit history a weights file carried (None for a plain file), and
    ``notes`` what loading changed that the user must hear (a module saved in training mode,
    the package imported to read its output types).
    ``program`` is the loaded ``torch.export`` program (``.pt2`` only), for a re-export with a
    dynamic batch (:func:`retrofit.evaluation.batching.reexport_dynamic_batch`).
    """

    module: nn.Module
    format: ModelFormat
    path: Path
    example_inputs: tuple[torch.Tensor, ...] | None = None
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    record: RetrofitRecord | None = None
    notes: list[str] = field(default_factory=list)
    program: Any = None


_PICKLE_PROTOCOL_OPS = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}


def detect_format(path: Path) -> ModelFormat:
    """Tell the format from the bytes of the file, the suffix only breaking ties.

    A zip archive is a ``torch.export`` program when it holds export's ``archive_format``
    record, else a ``torch.save`` file; a safetensors file starts with its JSON header length;
    anything else that parses as an ONNX ``ModelProto`` is ONNX.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(f"{path}: the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise BadInputError(f"{path}: damaged zip archive ({error})") from error
        if any(name.endswith("archive_format") for name in names):
            return ModelFormat.EXPORTED
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            raise BadInputError(
                f"{path} is TorchScript (torch.jit.save), whose compiled code cadrelu cannot "
                "rewrite site by site; it reads torch.export programs, state dicts, pickled "
                "modules and ONNX. From the model's Python code, save "
                "torch.export.export(model, example_inputs) with torch.export.save as .pt2, or "
                "torch.save(model.state_dict()) and pass --arch"
            )
        if any(name.endswith("data.pkl") for name in names):
            return _torch_save_kind(path)
        raise BadInputError(f"{path}: a zip archive that is neither torch.save nor torch.export")
    if head[:4] == b"PK\x03\x04":
        raise BadInputError(f"{path}: truncated or damaged zip archive (torch file?)")
    if _looks_like_safetensors(head, size):
        return ModelFormat.SAFETENSORS
    if head[:2] in _PICKLE_PROTOCOL_OPS:
        return _torch_save_kind(path)
    if _looks_like_onnx(path):
        return ModelFormat.ONNX
    raise BadInputError(
        f"{path}: not a model file cadrelu can read (expected .pt2, torch.save, safetensors "
        "or ONNX content; a truncated or damaged file reads like this too)"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 0 < header_length <= size - 8 and head[8:9] == b"{"


def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several types for bytes that are not a ModelProto
        return False
    return model.HasField("graph") and (model.ir_version > 0 or len(model.opset_import) > 0)


def _torch_save_kind(path: Path) -> ModelFormat:
    """A ``torch.save`` file holds tensors only (a state dict) or pickled objects (a module).

    ``weights_only`` loading tells them apart without running the file's code.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return ModelFormat.PICKLED_MODULE
    except Exception as error:
        raise BadInputError(f"{path}: cannot read this torch.save file ({first_line(error)})") from error
    return ModelFormat.STATE_DICT


def parse_arch_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["num_classes=10", "act=relu"]`` → ``{"num_classes": 10, "act": "relu"}``.

    timm's ``--model-kwargs`` convention: each value is read as a Python literal (numbers,
    booleans, None, tuples, lists, quoted strings) and kept as text when it is not one.
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--arch-kwargs {item!r} must look like name=value")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            kwargs[key] = text.strip()
    return kwargs


def _import_from_current_folder() -> None:
    """Make the current folder importable, as ``python -m`` does, so a project's own model
    classes resolve (an ``--arch`` factory, the classes a pickled module names)."""
    if "" not in sys.path:
        sys.path.insert(0, "")


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a fresh module from ``package.module:factory`` (a class or a function, or a
    dotted attribute such as ``Class.from_config``), called with ``kwargs``.

    The current folder is importable, as with ``python -m``, so a project's own models work.
    What the user typed wrong (a malformed spec, a module or attribute that does not exist, a
    keyword the factory does not take) is a :class:`UsageError`; code that exists but fails
    (a syntax error, a failing import of its own, a factory that raises or returns something
    else than a module) is the architecture's fault: :class:`BadInputError`.
    """
    module_name, _, factory_name = spec.partition(":")
    if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(factory_name)):
        raise UsageError(f"--arch {spec!r} must look like package.module:factory")
    factory = _arch_factory(spec, module_name, factory_name)
    _check_arch_kwargs(spec, factory, dict(kwargs or {}))
    try:
        model = factory(**dict(kwargs or {}))
    except (Exception, SystemExit) as error:  # user code: any failure is reported as one line
        raise BadInputError(f"--arch {spec!r}: calling it failed ({_described(error)})") from error
    if not isinstance(model, nn.Module):
        raise BadInputError(f"--arch {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _described(error: BaseException) -> str:
    return first_line(error, typed=True)


def _arch_factory(spec: str, module_name: str, factory_name: str) -> Any:
    """The object ``spec`` names: a missing module or attribute is the spec's fault, any other
    failure while importing is the module's."""
    _import_from_current_folder()
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(f"--arch {spec!r}: there is no module {missing!r} to import "
                             "(run cadrelu where it is importable: its folder, or PYTHONPATH)"
                             ) from error
        raise BadInputError(f"--arch {spec!r}: importing {module_name} failed: it needs "
                            f"{missing!r}, which is not installed here") from error
    except (Exception, SystemExit) as error:  # user code: a syntax error or any import failure
        raise BadInputError(f"--arch {spec!r}: importing {module_name} failed "
                            f"({_described(error)})") from error
    for part in factory_name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as error:
            raise UsageError(f"--arch {spec!r}: {module_name} has no {factory_name!r}") from error
        except (Exception, SystemExit) as error:  # a property or module __getattr__ of user code
            raise BadInputError(f"--arch {spec!r}: reading {factory_name} failed "
                                f"({_described(error)})") from error
    if not callable(found):
        raise UsageError(f"--arch {spec!r} names a {type(found).__name__}, not a class or function")
    return found


def _check_arch_kwargs(spec: str, factory: Any, kwargs: dict[str, Any]) -> None:
    """Keywords the factory does not take (or required ones missing) are the command line's
    fault, told apart from a failure inside the factory by binding them to its signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and C extensions may have none: the call tells
        return
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise UsageError(f"--arch {spec!r} does not take these --arch-kwargs ({error})") from error


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the usual checkpoint wrappers around one; anything else is
    refused saying what the file holds instead."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        odd = next(((key, value) for key, value in obj.items()
                    if not isinstance(value, torch.Tensor)), None)
        if obj and odd is None:
            return obj  # as loaded: a state dict's _metadata may hold a retrofit record
        found = ("an empty mapping" if not obj else
                 f"a mapping whose entry {odd[0]!r} is {_a(type(odd[1]).__name__)}")
    else:
        found = _a(type(obj).__name__)
    raise BadInputError(f"{path}: holds {found}, not a state dict (a mapping of names to tensors)")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


# Prefixes that wrappers put before every key: DistributedDataParallel/DataParallel, Lightning's
# LightningModule attribute, torch.compile's OptimizedModule.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def _unwrapped_keys(model: nn.Module, state: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state with a wrapper's prefix removed when that, and only that, makes its keys the
    architecture's; the prefix removed (None when the keys are used as they are)."""
    expected = set(model.state_dict())
    if set(state) == expected:
        return state, None
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            stripped = {key[len(prefix):]: value for key, value in state.items()}
            if set(stripped) == expected:
                return stripped, prefix
    return state, None


def _load_state_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                     arch: str) -> str | None:
    """Load strictly; a mismatch names the first missing, unexpected and mis-shaped keys.
    Returns a note when a wrapper's key prefix had to be removed."""
    state, prefix = _unwrapped_keys(model, state)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shared = [key for key in state if key in expected]
    misshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                 for key in shared if state[key].shape != expected[key].shape]
    mistyped = [f"{key} {_dtype_text(state[key])} vs {_dtype_text(expected[key])}"
                for key in shared if _kind(state[key]) != _kind(expected[key])]
    problems = []
    for label, keys in (("shapes differ (file vs --arch)", misshaped),
                        ("types differ (file vs --arch)", mistyped), ("missing", missing),
                        ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise BadInputError(f"{path}: the state dict does not fit --arch {arch}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # e.g. a dtype that cannot be copied into the parameter
        raise BadInputError(f"{path}: the state dict does not load into --arch {arch} "
                            f"({first_line(error)})") from error
    if prefix is None:
        return None
    return (f"{path.name}: every key began with {prefix!r} (a wrapper's prefix), which was removed "
            "to load the weights into --arch; the written weights have the architecture's own keys")


def _kind(tensor: torch.Tensor) -> str:
    """What a value means, not its precision: float16 weights load into float32 parameters,
    integer or complex ones would change (truncate, drop) what they hold."""
    dtype = tensor.dtype
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "integer"


def _dtype_text(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def load_torch_model(
    path: Path, *, arch: str | None = None, arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False, model_format: ModelFormat | None = None,
) -> TorchModel:
    """Load a PyTorch model of any supported format (ONNX is :mod:`retrofit.onnx_path.io`'s job).

    The module comes back in eval mode, which is how it is verified, scored and saved; a module
    saved in training mode gets a note saying so. A weights file written by a retrofit is
    rebuilt: its recorded rewrite is applied to ``arch`` before the weights load.
    """
    path = Path(path)
    model_format = model_format or detect_format(path)
    if model_format is ModelFormat.EXPORTED:
        return _load_exported(path, trust_pickle)
    if model_format is ModelFormat.PICKLED_MODULE:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a pickled module: loading it runs code stored in the file; "
                "pass --trust-pickle only if you trust its source (or save a state dict / .pt2)"
            )
        _import_from_current_folder()
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)  # trusted by flag
        except (AttributeError, ImportError) as error:
            missing = getattr(error, "name", None) or ""
            remedy = ("install it: pip install transformers" if missing.partition(".")[0]
                      == "transformers" else "run cadrelu where the model's own package is "
                      "importable (its folder, or PYTHONPATH)")
            raise BadInputError(
                f"{path}: cannot unpickle the module: it names code that cannot be imported "
                f"here ({first_line(error)}); {remedy}, or save a .pt2 or a state dict instead"
            ) from error
        except Exception as error:
            raise BadInputError(f"{path}: cannot unpickle the module ({first_line(error)})") from error
        module, notes = _module_in(module, path)
        if _in_training_mode(module):
            notes.append(_TRAINING_MODE_NOTE)
        return TorchModel(module.eval(), model_format, path, notes=notes)
    if model_format in (ModelFormat.STATE_DICT, ModelFormat.SAFETENSORS):
        state, record = _read_state(path, model_format)
        if arch is None:
            made_from = f" (it was retrofitted from --arch {record.arch})" if record and record.arch else ""
            raise UsageError(
                f"{path} holds only weights ({model_format.value}){made_from}; "
                "say which architecture they belong to with --arch package.module:factory"
            )
        module = load_arch(arch, arch_kwargs)
        notes = []
        if record is not None:
            module = record.rebuild(module, path)
            notes.append(f"{path.name} was written by a cadrelu retrofit ({record.summary()}); "
                         "the retrofit was applied to --arch before loading its weights")
        unwrapped = _load_state_into(module, state, path, arch)
        notes += [unwrapped] if unwrapped else []
        return TorchModel(module.eval(), model_format, path, arch=arch,
                          arch_kwargs=dict(arch_kwargs or {}), record=record, notes=notes)
    raise BadInputError(f"{path}: {model_format.value} is not a PyTorch format")


# Keys under which training checkpoints keep the module itself (YOLO-style, EMA checkpoints).
_MODULE_KEYS = ("model", "module", "net", "network", "ema")


def _module_in(obj: Any, path: Path) -> tuple[nn.Module, list[str]]:
    """The unpickled module, also from a checkpoint dict that holds one under a usual key."""
    if isinstance(obj, nn.Module):
        return obj, []
    if isinstance(obj, dict):
        for key in _MODULE_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key], [f"{path.name} is a checkpoint: its {key!r} entry is the model; "
                                  "the written file holds that module alone"]
    raise BadInputError(f"{path}: the pickle holds {type(obj).__name__}, not an nn.Module")


def load_model(path: Path, *, arch: str | None = None, arch_kwargs: Mapping[str, Any] | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """The one-call loader for any file cadrelu reads or writes, ONNX aside: a ``.pt2``, a
    pickled module (``trust_pickle``), or a state dict / safetensors file with its architecture,
    retrofitted ones included. Returns the module in eval mode."""
    return load_torch_model(path, arch=arch, arch_kwargs=arch_kwargs,
                            trust_pickle=trust_pickle).module


_TRAINING_MODE_NOTE = (
    "the model was saved in training mode; it is verified, scored and written in eval mode "
    "(BatchNorm uses its running statistics, Dropout is off)"
)


def _in_training_mode(module: nn.Module) -> bool:
    return any(sub.training for sub in module.modules())


def _read_state(path: Path, model_format: ModelFormat) -> tuple[dict[str, torch.Tensor], RetrofitRecord | None]:
    """The tensors and, when a retrofit wrote the file, its record."""
    try:
        if model_format is ModelFormat.SAFETENSORS:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:  # one read: header and tensors
                text = (handle.metadata() or {}).get(METADATA_KEY)
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            state = _state_dict_from(torch.load(path, map_location="cpu", weights_only=True), path)
            metadata = getattr(state, "_metadata", None)  # where save_torch_model puts the record
            root = metadata.get("") if isinstance(metadata, Mapping) else None
            text = root.get(METADATA_KEY) if isinstance(root, Mapping) else None
    except BadInputError:
        raise
    except Exception as error:
        raise BadInputError(f"{path}: cannot read the weights ({first_line(error)})") from error
    return state, (RetrofitRecord.from_json(text, path) if isinstance(text, str) else None)


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
def _torch_export_logs() -> Iterator[list[logging.LogRecord]]:
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


def _load_exported(path: Path, trust_pickle: bool = False) -> TorchModel:
    from retrofit.torch_path.hf_outputs import register_output_types

    if not trust_pickle:
        check_exported_archive(path)
    notes = register_output_types(path)
    records: list[logging.LogRecord] = []
    try:
        # An open file, not a path: torch.export wants a name ending in .pt2 otherwise.
        with _torch_export_logs() as records, open(path, "rb") as handle:
            program = torch.export.load(handle)
    except Exception as error:
        cause = _logged_cause(records, error)
        raise BadInputError(f"{path}: cannot load the torch.export program ({cause})") from error
    try:
        example, dynamic = program_inputs(program)
        # On the program itself, so that every module made from it (a re-export too) is in eval mode.
        if _exported_to_eval(program.graph_module):
            notes.append(_TRAINING_MODE_NOTE)
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


def default_output_path(path: Path, activation: str, model_format: ModelFormat) -> Path:
    """``model.pt2`` → ``model.carelu.pt2``: beside the input, never over it."""
    suffix = path.suffix or {
        ModelFormat.EXPORTED: ".pt2", ModelFormat.ONNX: ".onnx",
        ModelFormat.SAFETENSORS: ".safetensors",
    }.get(model_format, ".pt")
    return path.with_name(f"{path.stem}.{activation}{suffix}")


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


def save_torch_model(model: TorchModel, module: nn.Module, path: Path,
                     model_format: ModelFormat | None = None,
                     record: RetrofitRecord | None = None) -> None:
    """Write ``module`` to ``path`` atomically in ``model_format`` (default: the input's).

    Weights files get ``record`` (the retrofit history) in their metadata, so that
    :func:`load_torch_model` can rebuild the module they fit; see :mod:`retrofit.torch_path.record`.
    """
    model_format = model_format or model.format
    write_bytes_atomic(path, _serialized(model, module, model_format, record or model.record))


def _serialized(model: TorchModel, module: nn.Module, model_format: ModelFormat,
                record: RetrofitRecord | None) -> bytes:
    """The file's bytes, made in memory (see :func:`~retrofit.atomic.write_bytes_atomic`; on a
    full disk ``torch.export.save``'s own zip writer aborts the process)."""
    buffer = io.BytesIO()
    if model_format is ModelFormat.EXPORTED:
        if model.example_inputs is None:
            raise UsageError("saving a .pt2 needs sample inputs: pass --input-shape or --data")
        program = export_program(module, model.example_inputs, model.dynamic_dims)
        with _torch_export_logs():
            torch.export.save(program, buffer)
    elif model_format is ModelFormat.SAFETENSORS:
        from safetensors.torch import save

        state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
        return save(state, metadata={METADATA_KEY: record.to_json()} if record else None)
    elif model_format is ModelFormat.STATE_DICT:
        state = module.state_dict()
        if record is not None:
            state._metadata.setdefault("", {})[METADATA_KEY] = record.to_json()  # type: ignore[attr-defined]
        torch.save(state, buffer)
    elif model_format is ModelFormat.PICKLED_MODULE:
        torch.save(module, buffer)
    else:
        raise UsageError(f"cannot save a PyTorch model as {model_format.value}")
    return buffer.getvalue()
