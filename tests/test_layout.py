"""The layout a newcomer reads the architecture from, held to its rules: subpackages that each do
one job, imports that point one way, modules small enough to read, install names that cannot
collide with other projects, and a README that needs nothing outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

LIBRARY = REPO / "retrofit"
MAX_MODULE_LINES = 700

# Which parts of the library each part must not import (prefixes of module names).
FORBIDDEN_IMPORTS: dict[str, tuple[str, ...]] = {
    "retrofit.training": ("retrofit.onnx_path", "retrofit.pipeline", "retrofit.torch_path"),
    "retrofit.evaluation": ("retrofit.training", "retrofit.pipeline", "retrofit.torch_path"),
    "retrofit.torch_path": ("retrofit.pipeline", "retrofit.training"),
    "retrofit.onnx_path": ("retrofit.pipeline", "retrofit.training", "retrofit.torch_path"),
}
CORE = ("atomic", "config", "errors", "inputs", "sites", "verify")
"""The shared vocabulary at the top of the library: it imports no subpackage."""


def _modules() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py")) + sorted((REPO / "cli").rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement is (lazy imports count);
    a relative import shows as ``"."``, which no rule allows."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.add(".")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "." or name.split(".")[0] == "retrofit"}


def _loaded_by(part: str) -> set[str]:
    """The project modules a fresh interpreter holds after importing every module of ``part``:
    what the part pulls in at run time, through other modules too."""
    root = REPO / Path(*part.split("."))
    names = sorted(_module_name(path) for path in root.rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "print(' '.join(n for n in sys.modules if n.startswith('retrofit')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return set(done.stdout.split())


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {str(path.relative_to(REPO)): n for path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize("part", sorted(FORBIDDEN_IMPORTS))
def test_imports_point_one_way(part):
    wrong = {}
    for path in LIBRARY.rglob("*.py"):
        if _within(_module_name(path), part):
            bad = {name for name in _imported(path)
                   if any(_within(name, banned) for banned in FORBIDDEN_IMPORTS[part])}
            if bad:
                wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert not wrong, f"{part} imports what it must not: {wrong}"


@pytest.mark.parametrize("part", sorted(FORBIDDEN_IMPORTS))
def test_a_part_does_not_load_what_it_must_not_import(part):
    loaded = _loaded_by(part)
    assert not {name for name in loaded
                if any(_within(name, banned) for banned in FORBIDDEN_IMPORTS[part])}


def test_activations_load_nothing_but_the_config():
    assert _loaded_by("retrofit.activations") <= {
        "retrofit", "retrofit.activations", "retrofit.activations.functional",
        "retrofit.activations.kernels", "retrofit.activations.modules",
        "retrofit.activations.registry", "retrofit.config", "retrofit.errors"}


def test_the_import_reader_sees_every_spelling(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import retrofit.errors\nfrom retrofit import sites\nfrom . import kernels\n"
                      "def f():\n    from retrofit.verify import x\nimport torch\n")
    assert _imported(source) == {"retrofit.errors", "retrofit", "retrofit.sites", ".",
                                 "retrofit.verify", "retrofit.verify.x"}


def test_the_torch_path_reaches_the_onnx_path_only_to_export():
    wrong = {str(path.relative_to(REPO)) for path in (LIBRARY / "torch_path").rglob("*.py")
             if path.name != "export.py"
             and any(_within(name, "retrofit.onnx_path") for name in _imported(path))}
    assert not wrong


def test_activations_import_nothing_of_the_project_but_config():
    wrong = {str(path.relative_to(REPO)): sorted(bad)
             for path in (LIBRARY / "activations").rglob("*.py")
             if (bad := {name for name in _imported(path)
                         if not _within(name, "retrofit.activations")
                         and not _within(name, "retrofit.config")})}
    assert not wrong


def test_the_shared_core_imports_no_subpackage():
    wrong = {}
    for name in CORE:
        inner = {imported for imported in _imported(LIBRARY / f"{name}.py")
                 if imported.count(".") and imported.split(".")[1] not in CORE}
        if inner:
            wrong[name] = sorted(inner)
    assert not wrong


def test_every_package_is_installed_and_the_cli_under_the_project_name():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {_module_name(init) for init in LIBRARY.rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"cadrelu"}
    assert setuptools["package-dir"] == {"cadrelu": "cli"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"cadrelu": "cadrelu.entry:main"}


def test_the_installed_project_has_no_top_level_cli_package(tmp_path):
    """Run from outside the checkout, so only what is installed can be found."""
    probe = ("import importlib.util as u; "
             "print(u.find_spec('cli') is None, u.find_spec('cadrelu') is not None)")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin"}, check=True)
    assert found.stdout.split() == ["True", "True"]


def test_readme_needs_nothing_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)", readme)
    local = [target for target in targets if not re.match(r"[a-z]+://", target)]
    missing = [target for target in local if not (REPO / target).resolve().is_relative_to(REPO)
               or not (REPO / target).exists()]
    assert not missing, f"README links outside the repository or to nothing: {missing}"
    assert "../shared" not in readme


def test_readme_python_example_uses_only_the_public_entry_point():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    imports = [line for block in blocks for line in block.splitlines()
               if re.match(r"\s*(from|import) retrofit", line)]
    assert imports and all(re.match(r"\s*from retrofit import ", line) for line in imports)


def test_the_public_package_loads_its_parts_only_when_asked():
    """``import retrofit.training.loop`` must not load the ONNX path or the pipeline through the
    package's public names."""
    code = ("import sys, retrofit; loaded = [n for n in sys.modules if n.startswith('retrofit.')];"
            "from retrofit import retrofit_model, FinetuneConfig; print(loaded, callable(retrofit_model))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["[]", "True"]
