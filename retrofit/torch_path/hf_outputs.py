"""Make the output types a ``.pt2`` archive names known to torch before it is loaded.

A ``torch.export`` program records how its inputs and outputs nest as pytree specs that name
Python types (``transformers.modeling_outputs.SequenceClassifierOutput``); ``torch.export.load``
can read a spec only when its types are registered with pytree, and registering a type means
importing the module that defines it. A file must not choose what is imported, so the names are
read from the archive's JSON first and only types of a package known here are made available:
transformers' ``ModelOutput`` classes, which register themselves with pytree when their module
is imported (transformers 4.x and 5.x alike, under the name ``module.ClassName``). Any other type
that is not registered is refused by its name, without importing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch.utils._pytree as pytree

from retrofit.errors import BadInputError

# Modules transformers defines ModelOutput classes in; nothing else a file names is imported.
_TRANSFORMERS_OUTPUT_MODULE = re.compile(
    r"transformers\.(modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)"
)
_SPEC_KEYS = ("in_spec", "out_spec")


def spec_type_names(archive: zipfile.ZipFile) -> set[str]:
    """Every type name the program specs of the archive mention (namedtuples by their name).

    Every JSON member is read, whatever layout the torch version that wrote it used; only the
    ``in_spec``/``out_spec`` values in them are specs."""
    names: set[str] = set()
    for member in archive.namelist():
        if member.endswith(".json"):
            try:
                record = json.loads(archive.read(member))
            except ValueError as error:
                raise BadInputError(f"{archive.filename}: damaged torch.export record {member} "
                                    f"({error})") from error
            for spec in _specs(record):
                names.update(_types_of(spec))
    return names


def _specs(record: Any) -> Iterator[Any]:
    """The decoded treespecs in a program record (each stored as a JSON string)."""
    if isinstance(record, dict):
        for key, value in record.items():
            if key in _SPEC_KEYS and isinstance(value, str):
                try:
                    yield json.loads(value)
                except ValueError:
                    continue  # torch reports a spec it cannot read itself
            else:
                yield from _specs(value)
    elif isinstance(record, list):
        for value in record:
            yield from _specs(value)


def _types_of(spec: Any) -> Iterator[str]:
    if isinstance(spec, list):  # [protocol, node] at the top, or a list of children
        for item in spec:
            yield from _types_of(item)
    elif isinstance(spec, dict):
        kind = spec.get("type")
        if isinstance(kind, str):
            yield kind
            if kind == "collections.namedtuple" and isinstance(spec.get("context"), str):
                try:
                    context = json.loads(spec["context"])
                except ValueError:
                    context = None
                if isinstance(context, str):
                    yield context
        yield from _types_of(spec.get("children_spec"))


def register_output_types(path: Path) -> list[str]:
    """Make every type the archive's specs name known to pytree, or refuse the file.

    Returns notes saying which package was imported for which types. Raises
    :class:`BadInputError` naming a type that is not registered and not a transformers
    ``ModelOutput``, or when transformers is needed and not installed.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = spec_type_names(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise BadInputError(f"{path}: damaged zip archive ({error})") from error
    missing = sorted(name for name in names if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)
    foreign = [name for name in missing if name.partition(".")[0] != "transformers"]
    if foreign:
        raise BadInputError(
            f"{path}: its inputs or outputs are {foreign[0]} objects, a type cadrelu does not "
            "know and does not import (the file names it); export the model with outputs that "
            "are tensors, tuples or dicts"
        )
    ours = sorted(name for name in names if name.partition(".")[0] == "transformers")
    if not ours:
        return []
    version = _transformers_version(path, ours[0])
    modules = sorted({_import_output_type(path, name, version) for name in missing})
    imported = f"imported {', '.join(modules)}" if modules else "already imported"
    return [f"{path.name}: its outputs are transformers types ({', '.join(n.rpartition('.')[2] for n in ours)}):"
            f" read with transformers {version} ({imported})"]


def _transformers_version(path: Path, name: str) -> str:
    if importlib.util.find_spec("transformers") is None:
        raise BadInputError(f"{path}: its outputs are {name} objects: pip install transformers "
                            "to read this file")
    import transformers

    return str(transformers.__version__)


def _import_output_type(path: Path, name: str, version: str) -> str:
    """Import the transformers module that defines ``name``; returns the module's name."""
    module_name, _, class_name = name.rpartition(".")
    if not _TRANSFORMERS_OUTPUT_MODULE.fullmatch(module_name):
        raise BadInputError(f"{path}: its outputs are {name} objects, which is not a transformers "
                            "model output type; cadrelu does not import it")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BadInputError(
            f"{path}: its outputs are {name} objects, which transformers {version} does not "
            f"have ({error}); install the version it was exported with"
        ) from error
    from transformers.utils import ModelOutput

    found = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, ModelOutput)):
        raise BadInputError(f"{path}: its outputs are {name} objects, which is not a model output "
                            f"type of transformers {version}; cadrelu does not read it")
    if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        raise BadInputError(f"{path}: transformers {version} does not register {name} with "
                            "torch's pytree; install transformers 4.40 or later")
    return module_name
