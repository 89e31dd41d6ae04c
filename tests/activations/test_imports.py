"""The activations are the bottom of the project: ``retrofit/activations/*`` import nothing of
``retrofit`` but :mod:`retrofit.config` (and each other), so every path can build on them."""

from __future__ import annotations

import ast
from pathlib import Path

import retrofit.activations

PACKAGE = Path(retrofit.activations.__file__).parent


def project_imports(source: str) -> set[str]:
    """The modules of ``retrofit`` a file's import statements name (relative ones as '.')."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module or "")
    return {name for name in names if name == "." or name.split(".")[0] == "retrofit"}


def test_project_imports_sees_every_spelling():
    source = ("import retrofit.errors\nfrom retrofit import sites\nfrom . import kernels\n"
              "def f():\n    from retrofit.verify import x\nimport torch\n")
    assert project_imports(source) == {"retrofit.errors", "retrofit", ".", "retrofit.verify"}


def test_activations_import_only_the_config_and_each_other():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"functional.py", "kernels.py", "modules.py", "registry.py"}
    for path in files:
        for name in project_imports(path.read_text()):
            assert name == "retrofit.config" or name.startswith("retrofit.activations."), (
                f"{path.name} imports {name}")
