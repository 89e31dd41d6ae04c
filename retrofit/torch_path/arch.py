"""Architectures named by the user: ``--arch package.module:factory`` and its keyword arguments.

A state dict holds tensors only; the module they fit comes from the user's own code. The factory
is imported (the current folder first, as ``python -m`` would) and called with timm-style
``--arch-kwarg name=value`` arguments, each checked against the factory's signature first.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from typing import Any, Mapping, Sequence

from torch import nn

from retrofit.errors import BadInputError, UsageError, first_line


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



def import_from_current_folder() -> None:
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
    import_from_current_folder()
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
