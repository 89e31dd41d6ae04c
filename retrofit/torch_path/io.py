"""Load and save PyTorch models in every supported format, found from the file's content.

Formats: ``torch.export`` programs (``.pt2``), state dicts (``torch.save`` or safetensors) with
an architecture factory (``--arch package.module:factory``), pickled ``nn.Module`` files, and
ONNX. Loading never unpickles arbitrary objects unless the caller passes ``trust_pickle=True``:
unpickling runs code from the file. That includes ``.pt2`` archives: ``torch.export.load``
unpickles some members without ``weights_only``, so an archive is checked first
(:func:`~retrofit.torch_path.exported.check_exported_archive`). Saving never touches the input
and is atomic.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from retrofit.atomic import write_bytes_atomic
from retrofit.errors import BadInputError, UntrustedPickleError, UsageError, first_line
from retrofit.torch_path.arch import import_from_current_folder, load_arch
from retrofit.torch_path.exported import export_program, load_exported, torch_export_logs
from retrofit.torch_path.formats import TRAINING_MODE_NOTE, ModelFormat, TorchModel, detect_format
from retrofit.torch_path.record import METADATA_KEY, RetrofitRecord


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
        return load_exported(path, trust_pickle)
    if model_format is ModelFormat.PICKLED_MODULE:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a pickled module: loading it runs code stored in the file; "
                "pass --trust-pickle only if you trust its source (or save a state dict / .pt2)"
            )
        import_from_current_folder()
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
            notes.append(TRAINING_MODE_NOTE)
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
        with torch_export_logs():
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
