"""Layering: scoring a model on data loads neither fine-tuning, nor the pipeline, nor the torch
rewrite, so that each of those can use evaluation without a cycle."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_evaluation_loads_no_training_pipeline_or_torch_rewrite() -> None:
    root = REPO / "retrofit" / "evaluation"
    modules = sorted(".".join(path.relative_to(root).with_suffix("").parts)
                     for path in root.rglob("*.py") if path.name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module('retrofit.evaluation.' + name)\n"
            "print(sorted(n for n in sys.modules if n.startswith(("
            "'retrofit.training', 'retrofit.pipeline', 'retrofit.torch_path.rewrite'))))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
