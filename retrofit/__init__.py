"""cadrelu's library: retrofit trained ReLU networks with CompetitiveReLU or MRePU.

``retrofit_model(model, config, select, filter_fn)`` rewrites a module, an exported program or
an ONNX graph; :func:`finetune`, :func:`evaluate` and :func:`compare` run what the command line
runs. Everything listed in ``__all__`` is the public API.

Names load on first use (PEP 562): ``import retrofit.training.loop`` must not pull in the ONNX
path or the pipeline, which the layering promises (tests/test_layout.py), and a torchrun worker
or the CLI pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC: dict[str, tuple[str, ...]] = {
    # the rewrite, and what runs after it
    "retrofit.api": ("retrofit_model", "finetune", "evaluate", "compare"),
    "retrofit.torch_path.io": ("load_model",),
    # configs and requests
    "retrofit.config": ("CompetitiveReLUConfig", "MRePUConfig", "RePUConfig"),
    "retrofit.training.config": ("FinetuneConfig",),
    "retrofit.sites": ("SiteSelector", "RetrofitResult", "ReluSite"),
    "retrofit.pipeline.compare": ("CompareRequest", "CompareReport", "ComparisonFailed",
                                  "candidates"),
    "retrofit.pipeline.request": ("RetrofitRequest", "DataOptions", "Gates"),
    # activation modules
    "retrofit.activations.modules": ("CompetitiveReLU", "MRePU", "RePU"),
    # results
    "retrofit.training.results": ("FinetuneResult", "TrainingDiverged", "TrainingInterrupted"),
    "retrofit.evaluation.evaluate": ("EvalResult",),
    # errors
    "retrofit.errors": ("RetrofitError", "UsageError", "SelectionError", "BadInputError",
                        "UnsupportedModelError", "UntrustedPickleError", "ParityError",
                        "GateError", "OutputError", "ExitCode"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from retrofit.activations.modules import CompetitiveReLU, MRePU, RePU  # noqa: F401
    from retrofit.api import compare, evaluate, finetune, retrofit_model  # noqa: F401
    from retrofit.config import CompetitiveReLUConfig, MRePUConfig, RePUConfig  # noqa: F401
    from retrofit.errors import (  # noqa: F401
        BadInputError, ExitCode, GateError, OutputError, ParityError, RetrofitError,
        SelectionError, UnsupportedModelError, UntrustedPickleError, UsageError,
    )
    from retrofit.evaluation.evaluate import EvalResult  # noqa: F401
    from retrofit.pipeline.compare import CompareReport, CompareRequest, ComparisonFailed, candidates  # noqa: F401
    from retrofit.pipeline.request import DataOptions, Gates, RetrofitRequest  # noqa: F401
    from retrofit.sites import ReluSite, RetrofitResult, SiteSelector  # noqa: F401
    from retrofit.torch_path.io import load_model  # noqa: F401
    from retrofit.training.config import FinetuneConfig  # noqa: F401
    from retrofit.training.results import FinetuneResult, TrainingDiverged, TrainingInterrupted  # noqa: F401
