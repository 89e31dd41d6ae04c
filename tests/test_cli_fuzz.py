"""Fuzz the real command line with model-side bad input: exit code 1 means a bug in cadrelu.

Hypothesis drives ``cadrelu inspect/evaluate/retrofit`` in-process with damaged model files of
every format (bytes flipped, cut short, zip members left out), ``--arch`` specs and
``--arch-kwargs`` that are wrong in every way, random ``--input-shape`` text and random
``--include``/``--exclude`` rules. Whatever the input, the answer is success or one ``error:``
line with a documented code other than 1; no traceback, no input changed, no partial file.

Option values that are the lead's area (``--device``, ``--tolerance``, gates, fine-tuning
numbers, output paths) are not fuzzed here. Examples are derandomized: CI sees the same ones.
"""

from __future__ import annotations

import io
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import SAMPLES, no_partial_files, run_cli, sha256

MODELS = SAMPLES / "models"
VAL = SAMPLES / "data" / "digits_val.npz"
ARCH = "samples.architectures:digits_mlp"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Architecture modules that fail in each way user code can: importable from the fuzz folder.
ARCH_MODULES = {
    "fuzz_syntax": "def model(:\n",
    "fuzz_raises": "raise ValueError('broken at import')\n",
    "fuzz_needs": "import a_dependency_that_is_not_installed\n",
    "fuzz_exits": "import sys\nsys.exit(4)\n",
    "fuzz_factories": (
        "import sys\nimport torch\nfrom samples.architectures import DigitsMLP\n"
        "def raises(**kw):\n    raise RuntimeError('factory failed')\n"
        "def exits():\n    sys.exit(0)\n"
        "def number():\n    return 3\n"
        "def needs(hidden):\n    return DigitsMLP(hidden)\n"
        "class Fails(DigitsMLP):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.act = torch.nn.ReLU()\n"
        "    def forward(self, x):\n        raise KeyError('the model refuses')\n"
        "NOT_CALLABLE = 3\n"
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the sample models in every format and the failing architectures."""
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("digits_mlp.pt2", "digits_cnn.onnx", "digits_mlp.state.pt"):
        shutil.copyfile(MODELS / name, folder / name)
    from safetensors.torch import save_file

    save_file(torch.load(MODELS / "digits_mlp.state.pt"), str(folder / "digits_mlp.safetensors"))
    from samples.architectures import DigitsMLP

    torch.save(DigitsMLP(), folder / "digits_mlp.module.pt")
    for name, code in ARCH_MODULES.items():
        (folder / f"{name}.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in ARCH_MODULES:
        sys.modules.pop(name, None)


SOURCES = ["digits_mlp.pt2", "digits_cnn.onnx", "digits_mlp.state.pt", "digits_mlp.safetensors",
           "digits_mlp.module.pt"]


SHAPED = [name for name in SOURCES if not name.endswith(".safetensors")]
"""One sample of each route to sample inputs: .pt2, ONNX, state dict + --arch, pickled module."""


def _needs_arch(name: str) -> list[str]:
    """The options a sample needs: its architecture, or trust for the pickled module."""
    if "module" in name:
        return ["--trust-pickle"]
    return ["--arch", ARCH] if "state" in name or name.endswith(".safetensors") else []


def _check(result, watched: dict[Path, str], folder: Path) -> None:
    """The contract for any input: never exit 1, one error line, inputs intact, no partials."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code != 1, result.output
    if result.exit_code != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert {path: sha256(path) for path in watched} == watched
    assert no_partial_files(folder)


def _watch(*paths: Path) -> dict[Path, str]:
    return {path: sha256(path) for path in paths}


# ------------------------------------------------------------------- damaged model files


def _zip_without(data: bytes, index: int) -> bytes:
    """The archive with its ``index``-th member (modulo their number) left out."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = source.infolist()
        dropped = members[index % len(members)].filename
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for info in members:
                if info.filename != dropped:
                    target.writestr(info, source.read(info.filename))
    return out.getvalue()


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, str, int, list[int]]:
    """(source, how, position, values): a source damaged by ``how`` at ``position``."""
    source = draw(st.sampled_from(SOURCES))
    how = draw(st.sampled_from(["flip", "truncate", "zero", "drop member"]))
    return (source, how, draw(st.integers(0, 2**31)),
            draw(st.lists(st.integers(1, 255), min_size=1, max_size=8)))


def _damage(data: bytes, how: str, position: int, values: list[int]) -> bytes:
    at = position % len(data)
    if how == "truncate":
        return data[:at]
    if how == "drop member" and zipfile.is_zipfile(io.BytesIO(data)):
        return _zip_without(data, position)
    damaged = bytearray(data)
    for offset, value in enumerate(values):
        index = (at + offset * 7919) % len(data)  # spread over the file, reproducibly
        damaged[index] = 0 if how == "zero" else damaged[index] ^ value
    return bytes(damaged)


@FUZZ
@given(case=damaged(), command=st.sampled_from(["inspect", "evaluate", "retrofit"]))
def test_damaged_model_files_never_exit_1(corpus: Path, case, command: str) -> None:
    source, how, position, values = case
    path = corpus / f"damaged_{source}"
    path.write_bytes(_damage((corpus / source).read_bytes(), how, position, values))
    args: list[object] = [command, path, *_needs_arch(source)]
    if command == "evaluate":
        args += ["--data", VAL, "--device", "cpu"]
    if command == "retrofit":
        args += ["-o", corpus / f"out_{source}", "--force"]
    result = run_cli(*args)
    _check(result, _watch(path), corpus)
    (corpus / f"out_{source}").unlink(missing_ok=True)


# ---------------------------------------------------------------------- --arch and kwargs

_SPEC_PARTS = ["samples.architectures", "samples", "digits_mlp", "DigitsMLP", "fuzz_syntax",
               "fuzz_raises", "fuzz_needs", "fuzz_exits", "fuzz_factories", "raises", "exits",
               "number", "needs", "Fails", "NOT_CALLABLE", "nowhere", ":", ".", "..", "", " ",
               "a:b:c", "pkg.", "1x", "-", "/", "\\", "é"]
_KWARG_PARTS = ["hidden", "classes", "x", "=", "==", "1", "64", "(1", "None", "'text'",
                "[", "1e400", "-3", " ", "", "__class__", "lambda: 0"]


@FUZZ
@given(spec=st.lists(st.sampled_from(_SPEC_PARTS), min_size=0, max_size=4).map("".join),
       kwargs=st.lists(st.lists(st.sampled_from(_KWARG_PARTS), max_size=4).map("".join),
                       max_size=2),
       source=st.sampled_from(["digits_mlp.state.pt", "digits_mlp.safetensors"]))
def test_arch_specs_and_kwargs_never_exit_1(corpus: Path, spec: str, kwargs: list[str],
                                            source: str) -> None:
    path = corpus / source
    args: list[object] = ["inspect", path, "--arch", spec]
    for item in kwargs:
        args += ["--arch-kwargs", item]
    result = run_cli(*args)
    _check(result, _watch(path), corpus)


@pytest.mark.parametrize("spec, kwargs, code, fragment", [
    ("fuzz_syntax:model", [], 3, "SyntaxError"),
    ("fuzz_raises:model", [], 3, "broken at import"),
    ("fuzz_needs:model", [], 3, "a_dependency_that_is_not_installed"),
    ("fuzz_exits:model", [], 3, "SystemExit"),
    ("fuzz_factories:raises", [], 3, "factory failed"),
    ("fuzz_factories:exits", [], 3, "SystemExit"),
    ("fuzz_factories:number", [], 3, "returned int, not an nn.Module"),
    ("fuzz_factories:Fails", [], 3, "KeyError: 'the model refuses'"),
    ("fuzz_factories:needs", [], 2, "missing a required argument: 'hidden'"),
    ("fuzz_factories:needs", ["hidden=64", "depth=3"], 2, "unexpected keyword argument 'depth'"),
    ("fuzz_factories:NOT_CALLABLE", [], 2, "not a class or function"),
    ("fuzz_factories:nowhere", [], 2, "has no 'nowhere'"),
    ("nowhere_at_all:model", [], 2, "no module 'nowhere_at_all'"),
    ("a:b:c", [], 2, "must look like package.module:factory"),
    (":x", [], 2, "must look like"),
    ("pkg.", [], 2, "must look like"),
    (ARCH, ["=1"], 2, "name=value"),
    (ARCH, ["x"], 2, "name=value"),
])
def test_arch_failures_have_their_code_and_name_the_spec(corpus: Path, spec: str,
                                                         kwargs: list[str], code: int,
                                                         fragment: str) -> None:
    """Typed wrong (malformed, names nothing, keywords it does not take): 2. Code that exists
    but fails (import, factory, forward): 3."""
    args: list[object] = ["inspect", corpus / "digits_mlp.state.pt", "--arch", spec,
                          "--input-shape", "2,64"]
    for item in kwargs:
        args += ["--arch-kwargs", item]
    result = run_cli(*args)
    _check(result, _watch(corpus / "digits_mlp.state.pt"), corpus)
    line = result.stderr.strip()
    assert result.exit_code == code, result.output
    assert fragment in line and ("--arch" in line or "digits_mlp.state.pt" in line), line


# ---------------------------------------------------------------------------- --input-shape

# Sizes, names, types and separators: mostly sensible, so that the odd one is what is tested.
_SIZES = st.sampled_from([1, 2, 3, 8, 64] * 4 + [0, -1, 10**9, 10**20])
_NAMES = st.sampled_from([""] * 8 + ["image:", "x:", "ids:", ":", "nothing:", "x:y:"])
_TYPES = st.sampled_from([""] * 8 + [":int64", ":float16", ":bool", ":float64", ":int8",
                                     ":float", ":"])
_SEPARATORS = st.sampled_from([","] * 8 + ["x", ",,", " , ", ";"])
_SHAPE_JUNK = st.text(alphabet="0123456789,:x-+. a٣", max_size=12)


@st.composite
def shape_texts(draw: st.DrawFn) -> str:
    """Mostly well-formed ``[name:]d,d,...[:type]`` text with odd sizes, names and types;
    now and then plain junk."""
    if draw(st.integers(0, 5)) == 0:
        return draw(_SHAPE_JUNK)
    sizes = draw(st.lists(_SIZES, min_size=1, max_size=5))
    separator = draw(_SEPARATORS)
    return draw(_NAMES) + separator.join(str(size) for size in sizes) + draw(_TYPES)


@settings(FUZZ, max_examples=60)
@given(shapes=st.lists(shape_texts(), min_size=1, max_size=2),
       source=st.sampled_from(SHAPED))
@example(shapes=["100000,100000,100000"], source="digits_mlp.pt2")
@example(shapes=["1,1,100000,100000"], source="digits_mlp.state.pt")
@example(shapes=["image:100000000000000000000,1,8,8"], source="digits_cnn.onnx")
@example(shapes=["1,64", "1,64"], source="digits_mlp.state.pt")
def test_input_shapes_never_exit_1(corpus: Path, shapes: list[str], source: str) -> None:
    path = corpus / source
    args: list[object] = ["inspect", path, *_needs_arch(source)]
    for text in shapes:
        args += ["--input-shape", text]
    result = run_cli(*args)
    _check(result, _watch(path), corpus)


@pytest.mark.parametrize("source", SHAPED)
@pytest.mark.parametrize("text, code", [
    ("1,a", 2), ("0,3", 2), ("-1,3", 2), ("", 2), ("1,,3", 2), ("1,3,", 2), ("1,64:int8", 2),
    ("nothing:1,64", 2), ("100000,100000,100000", 3), ("99999999999999999999,3", 3),
    ("1,3,32,32", 3), ("2,63", 3), ("3", 3),
])
def test_input_shape_text_is_2_and_shapes_the_model_cannot_take_are_3(
        corpus: Path, source: str, text: str, code: int) -> None:
    path = corpus / source
    result = run_cli("inspect", path, *_needs_arch(source), "--input-shape", text)
    _check(result, _watch(path), corpus)
    assert result.exit_code == code, result.output


# ------------------------------------------------------------------------ --include/--exclude

_RULE_PARTS = ["fc1", "fc2", "F.relu", "torch.relu", "relu", ".", "*", "(", ")", "[", "]",
               "{", "}", "?", "+", "\\", "#", "|", "^", "$", "[/]", ":smile:", "[red]", "1"]


@FUZZ
@given(include=st.lists(st.lists(st.sampled_from(_RULE_PARTS), min_size=1, max_size=5)
                        .map("".join), max_size=2),
       exclude=st.lists(st.lists(st.sampled_from(_RULE_PARTS), min_size=1, max_size=5)
                        .map("".join), max_size=2),
       source=st.sampled_from(SOURCES[:2]))
def test_selection_rules_never_exit_1(corpus: Path, include: list[str], exclude: list[str],
                                      source: str) -> None:
    path = corpus / source
    args: list[object] = ["inspect", path]
    for rule in include:
        args += ["--include", rule]
    for rule in exclude:
        args += ["--exclude", rule]
    result = run_cli(*args)
    _check(result, _watch(path), corpus)
    assert result.exit_code in (0, 2), result.output


def test_an_invalid_regex_matching_nothing_says_so(corpus: Path) -> None:
    result = run_cli("inspect", corpus / "digits_mlp.pt2", "--include", "fc1(")
    assert result.exit_code == 2
    assert "not a valid regular expression" in result.stderr and "fc1(" in result.stderr


@pytest.mark.parametrize("rule", ["[red]x", "[/]", ":smile:"])
def test_error_lines_print_user_text_as_typed(corpus: Path, rule: str) -> None:
    """Messages quote paths and options: rich markup or emoji codes in them are not styling."""
    result = run_cli("inspect", corpus / "digits_mlp.pt2", "--include", rule)
    assert result.exit_code == 2 and repr(rule) in result.stderr, result.output
