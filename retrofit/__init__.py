"""cadrelu's library: retrofit trained ReLU networks with CompetitiveReLU or MRePU.

``retrofit_model(model, config, select, filter_fn)`` rewrites a module, an exported program or
an ONNX graph; :func:`finetune`, :func:`evaluate` and :func:`compare` run what the command line
runs. Everything listed in ``__all__`` is the public API.
"""

from retrofit.activations.modules import MRePU, CompetitiveReLU, RePU
from retrofit.api import compare, evaluate, finetune, retrofit_model
from retrofit.config import CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import (
    BadInputError, ExitCode, GateError, OutputError, ParityError, RetrofitError, SelectionError,
    UnsupportedModelError, UntrustedPickleError, UsageError,
)
from retrofit.evaluation.evaluate import EvalResult
from retrofit.pipeline.compare import CompareReport, CompareRequest, ComparisonFailed, candidates
from retrofit.pipeline.request import DataOptions, Gates, RetrofitRequest
from retrofit.sites import ReluSite, RetrofitResult, SiteSelector
from retrofit.torch_path.io import load_model
from retrofit.training.loop import FinetuneConfig, FinetuneResult, TrainingDiverged, TrainingInterrupted

__all__ = [
    # the rewrite, and what runs after it
    "retrofit_model", "finetune", "evaluate", "compare", "load_model",
    # configs
    "CompetitiveReLUConfig", "MRePUConfig", "RePUConfig", "FinetuneConfig", "SiteSelector",
    "CompareRequest", "RetrofitRequest", "DataOptions", "Gates", "candidates",
    # activation modules
    "CompetitiveReLU", "MRePU", "RePU",
    # results
    "RetrofitResult", "ReluSite", "FinetuneResult", "EvalResult", "CompareReport",
    # errors
    "RetrofitError", "UsageError", "SelectionError", "BadInputError", "UnsupportedModelError",
    "UntrustedPickleError", "ParityError", "GateError", "OutputError", "TrainingDiverged",
    "ComparisonFailed", "TrainingInterrupted", "ExitCode",
]
