"""Layering: fine-tuning is a library of its own, which neither the ONNX path nor the pipeline
(the job, the reports) is loaded for."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_training_loads_no_onnx_path_and_no_pipeline() -> None:
    modules = sorted(path.stem for path in (REPO / "retrofit" / "training").glob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module('retrofit.training.' + name)\n"
            "print(sorted(n for n in sys.modules "
            "if n.startswith(('retrofit.onnx_path', 'retrofit.pipeline'))))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
