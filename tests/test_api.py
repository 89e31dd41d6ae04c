"""The public API (``from retrofit import ...``): one rewrite for modules, exported programs and
ONNX graphs alike, with select and filter_fn, that computes what the original computes at
identity initialisation and leaves its input as it was; the thin fine-tune, evaluate and compare
calls; and the README's Python example, run as it is written."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import retrofit
from retrofit import (
    CompareRequest, CompetitiveReLU, CompetitiveReLUConfig, DataOptions, EvalResult,
    FinetuneConfig, MRePUConfig, RetrofitRequest, SiteSelector, compare, evaluate, finetune,
    retrofit_model,
)
from tests.conftest import REPO, SAMPLES
from tests.models import TinyResNet

VAL = SAMPLES / "data" / "digits_val.npz"
TRAIN = SAMPLES / "data" / "digits_train.npz"
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
TINY_SITES = ["F.relu", "layer1.0.relu#1", "layer1.0.relu#2", "layer1.1.relu#1",
              "layer1.1.relu#2"]


def test_every_name_in_all_imports_from_the_package():
    namespace: dict[str, object] = {}
    exec("from retrofit import *", namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(retrofit.__all__)
    assert len(set(retrofit.__all__)) == len(retrofit.__all__)
    assert {"retrofit_model", "finetune", "evaluate", "compare", "CompetitiveReLUConfig",
            "MRePUConfig", "RePUConfig", "FinetuneConfig", "SiteSelector", "CompetitiveReLU",
            "MRePU", "RePU", "RetrofitResult", "ReluSite", "RetrofitError", "GateError",
            "ExitCode"} <= set(retrofit.__all__)


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyResNet().eval()


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(_module(), (X,))


def _onnx() -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / "models" / "digits_cnn.onnx"))


def _outputs(model, x: torch.Tensor) -> np.ndarray:
    """The model's outputs on ``x``, whatever its kind."""
    if isinstance(model, onnx.ModelProto):
        session = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        return module(x).numpy()


def _fingerprint(model) -> object:
    """Everything that could change if the rewrite touched its input."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    graph = str(model.graph) if isinstance(model, torch.export.ExportedProgram) else ""
    return (graph, [type(m).__name__ for m in module.modules()],
            {k: v.clone() for k, v in module.state_dict().items()})


def _same(a, b) -> bool:
    if isinstance(a, bytes):
        return a == b
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


KINDS = {
    "module": (_module, X),
    "exported program": (_program, X),
    "onnx": (_onnx, torch.from_numpy(np.load(VAL)["x"][:4])),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_keeps_its_function_and_its_input(kind):
    make, x = KINDS[kind]
    original = make()
    before = _fingerprint(original)
    result = retrofit_model(original, CompetitiveReLUConfig())
    kind_of = (torch.nn.Module, torch.export.ExportedProgram, onnx.ModelProto)
    assert [isinstance(result.model, t) for t in kind_of] == \
        [isinstance(original, t) for t in kind_of] and result.model is not original
    assert result.sites and all(site.replaced for site in result.sites)
    np.testing.assert_allclose(_outputs(result.model, x), _outputs(original, x),
                               rtol=1e-5, atol=1e-5)
    assert _same(_fingerprint(original), before)


def test_an_exported_program_comes_back_as_a_program_holding_the_new_activation():
    program = _program()
    result = retrofit_model(program, CompetitiveReLUConfig(measure="l1"))
    assert isinstance(result.model, torch.export.ExportedProgram)
    alphas = [key for key in result.model.state_dict if key.endswith(".alpha")]
    assert len(alphas) == 5 and not any(k.endswith(".alpha") for k in program.state_dict)
    assert [site.name for site in result.sites] == [
        site.name for site in retrofit_model(program.module(), CompetitiveReLUConfig()).sites]


def test_a_module_keeps_its_mode_and_gets_one_activation_module_per_site():
    model = _module().train()
    result = retrofit_model(model, CompetitiveReLUConfig())
    assert result.model.training
    assert sum(isinstance(m, CompetitiveReLU) for m in result.model.modules()) == 5
    assert not any(isinstance(m, CompetitiveReLU) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_select_and_filter_fn_narrow_the_sites_and_say_why(kind):
    make, _ = KINDS[kind]
    model = make()
    names = [site.name for site in retrofit_model(model, CompetitiveReLUConfig()).sites]
    first, second, *rest = names
    seen: list[str] = []

    def keep(name: str) -> bool:
        seen.append(name)
        return name != second

    result = retrofit_model(model, CompetitiveReLUConfig(),
                            SiteSelector(exclude=(re.escape(first),)), filter_fn=keep)
    reasons = {site.name: (site.replaced, site.reason) for site in result.sites}
    assert reasons[first] == (False, "excluded")
    assert reasons[second] == (False, "filter_fn")
    assert all(reasons[name][0] for name in rest)
    assert first not in seen and second in seen  # called only on what select kept


def test_a_site_filter_fn_rejects_still_computes_relu():
    model = _module()
    result = retrofit_model(model, MRePUConfig(), filter_fn=lambda name: False)
    assert not result.replaced and {site.reason for site in result.sites} == {"filter_fn"}
    np.testing.assert_array_equal(_outputs(result.model, X), _outputs(model, X))


def test_site_names_of_the_tiny_model():
    assert [site.name for site in retrofit_model(_module(), CompetitiveReLUConfig()).sites] == \
        TINY_SITES


@pytest.mark.parametrize("call, says", [
    (lambda: retrofit_model("model.pt2", CompetitiveReLUConfig()), "cadrelu retrofit FILE"),
    (lambda: retrofit_model(_module(), "carelu"), "config must be"),
    (lambda: retrofit_model(_module(), CompetitiveReLUConfig(), ("stem",)), "SiteSelector"),
    (lambda: retrofit_model(_module(), CompetitiveReLUConfig(), filter_fn="stem"), "filter_fn"),
    (lambda: finetune(_program(), FinetuneConfig(), TRAIN), "nn.Module"),
    (lambda: evaluate(SAMPLES / "models" / "digits_cnn.pt2", [(X[0], 0)]), "data file"),
    (lambda: compare(RetrofitRequest(SAMPLES / "models" / "digits_cnn.pt2")), "CompareRequest"),
])
def test_a_wrong_type_is_a_clear_type_error(call, says):
    with pytest.raises(TypeError, match=re.escape(says)):
        call()


def test_evaluate_a_file_and_the_same_model_in_memory_agree():
    from_file = evaluate(SAMPLES / "models" / "digits_mlp.pt2", VAL, device="cpu")
    program = torch.export.load(str(SAMPLES / "models" / "digits_mlp.pt2"))
    in_memory = evaluate(program, VAL, device="cpu")
    assert isinstance(from_file, EvalResult) and from_file.n == 450
    assert in_memory.top1 == from_file.top1 > 90
    assert torch.equal(in_memory.correct1, from_file.correct1)
    swapped = retrofit_model(_onnx(), CompetitiveReLUConfig()).model
    onnx_file = evaluate(SAMPLES / "models" / "digits_cnn.onnx", VAL)
    assert evaluate(swapped, VAL).top1 == onnx_file.top1


def test_finetune_trains_a_copy_and_evaluate_leaves_the_mode_as_it_was():
    program = torch.export.load(str(SAMPLES / "models" / "digits_mlp.pt2"))
    model = retrofit_model(program.module(), CompetitiveReLUConfig()).model
    before = copy.deepcopy(model.state_dict())
    trained = finetune(model, FinetuneConfig(epochs=1, lr=1e-3, device="cpu"), TRAIN, VAL)
    assert len(trained.history) == 1 and trained.best_val_top1 is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    module = _module().train()
    dataset = [(X[i], i % 5) for i in range(2)]
    assert evaluate(module, dataset, device="cpu").n == 2 and module.training


def test_compare_runs_the_command_lines_comparison(tmp_path):
    rng = np.random.default_rng(0)
    data = np.load(TRAIN)
    rows = rng.permutation(len(data["y"]))[:160]
    small = tmp_path / "train.npz"
    np.savez(small, x=data["x"][rows], y=data["y"][rows])
    job = RetrofitRequest(SAMPLES / "models" / "digits_mlp.pt2", device="cpu",
                          data=DataOptions(train=small, batch_size=32),
                          finetune=FinetuneConfig(epochs=1, batch_size=32, device="cpu"))
    report = compare(CompareRequest(job, retrofit.candidates(
        {"carelu": CompetitiveReLUConfig()}, ["l1"]), out_dir=tmp_path / "out"))
    assert [arm.name for arm in report.ranked] == ["carelu-l1"] and report.failure is None
    report.raise_for_outcome()  # ranked and no gate: nothing to raise


def _readme_python_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("From Python"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]


def test_the_readme_python_example_runs_as_written(monkeypatch, capsys):
    code = _readme_python_example()
    imports = [line for line in code.splitlines() if re.match(r"\s*(from|import) ", line)]
    assert all(line.startswith(("from retrofit import ", "import torch")) for line in imports)
    monkeypatch.chdir(REPO)  # the example reads the shipped samples
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "stem.2 False excluded" in printed and "True" in printed


def test_the_readme_imports_the_library_only_from_its_package():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "from retrofit import load_model" in readme
    assert not re.findall(r"from retrofit\.|import retrofit\.", readme)
