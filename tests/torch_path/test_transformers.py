"""Hugging Face transformers models, one tiny model per ReLU family (BERT, OPT, T5, ResNet), built
from configs (nothing is downloaded): their ``.pt2`` exports load although their outputs are
``ModelOutput`` objects, pickled modules go through the module route, every ReLU is found and the
identity retrofit computes what the original did, modules without a site are left as they were,
and a ``.pt2`` naming an unknown type is refused without importing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import fx, nn

transformers = pytest.importorskip("transformers")

from retrofit.activations.modules import CompetitiveReLU  # noqa: E402
from retrofit.pipeline.job import retrofit_file  # noqa: E402
from retrofit.pipeline.request import RetrofitRequest  # noqa: E402
from retrofit.torch_path.formats import ModelFormat  # noqa: E402
from retrofit.torch_path.io import load_torch_model  # noqa: E402
from retrofit.verify import flatten_outputs, torch_parity  # noqa: E402
from tests.conftest import REPO, one_line, run_cli  # noqa: E402
from tests.models import count_relu_calls  # noqa: E402

BATCH, SEQ, VOCAB = 2, 8, 64
Family = tuple[nn.Module, tuple[torch.Tensor, ...], list[dict[str, torch.Tensor]]]
"""A model, its positional sample inputs, and other ways to call it (optional inputs)."""


def _ids(low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, SEQ // 2:] = 0  # a padded second row: the mask changes the outputs
    return mask


def bert() -> Family:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, hidden_act="relu", max_position_embeddings=32)
    segments = torch.ones(BATCH, SEQ, dtype=torch.int64)
    other_calls = [{"attention_mask": _mask()},
                   {"attention_mask": _mask(), "token_type_ids": segments}]
    return transformers.BertForSequenceClassification(config), (_ids(),), other_calls


def opt() -> Family:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        activation_function="relu", max_position_embeddings=32, word_embed_proj_dim=16,
        pad_token_id=1, use_cache=False)  # a cache object is not a tensor output
    return transformers.OPTForSequenceClassification(config), (_ids(low=2),), [
        {"attention_mask": _mask()}]


def t5() -> Family:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_heads=2, feed_forward_proj="relu")
    return transformers.T5EncoderModel(config), (_ids(),), [{"attention_mask": _mask()}]


def resnet() -> Family:
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic", hidden_act="relu",
                                       num_labels=3)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return transformers.ResNetForImageClassification(config), (pixels,), [
        {"output_hidden_states": True}]


FAMILIES = {"bert": bert, "opt": opt, "t5": t5, "resnet": resnet}


def _build(family: str) -> Family:
    torch.manual_seed(0)
    model, inputs, other_calls = FAMILIES[family]()
    return model.eval(), inputs, other_calls


def _max_diff(expected: object, actual: object) -> float:
    pairs = list(zip(flatten_outputs(expected), flatten_outputs(actual), strict=True))
    assert pairs
    return max(float(abs(a - b).max()) for a, b in pairs)


@pytest.mark.slow  # two torch.export runs (the input, and the output's re-export): 2 to 8 s
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_model_with_model_outputs_is_retrofitted_exactly(family, tmp_path):
    model, inputs, _ = _build(family)
    source, output = tmp_path / f"{family}.pt2", tmp_path / f"{family}.carelu.pt2"
    torch.export.save(torch.export.export(model, inputs), source)
    loaded = load_torch_model(source)
    assert loaded.format is ModelFormat.EXPORTED
    assert any("transformers" in note for note in loaded.notes)
    report = retrofit_file(RetrofitRequest(source, output=output))
    assert report.verified and report.parity is not None
    assert report.parity.relative <= 1e-6
    assert len(report.sites) == count_relu_calls(model, *inputs) > 0
    assert all(site.replaced for site in report.sites)
    assert any("transformers" in note for note in report.notes)
    reloaded = torch.export.load(output).module()  # plain torch
    with torch.no_grad():
        assert _max_diff(model(*inputs), reloaded(*inputs)) <= 1e-6
    assert count_relu_calls(reloaded, *inputs) == 0


def _module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pickled_model_is_retrofitted_and_every_other_module_is_left_as_it_was(family, tmp_path):
    model, inputs, other_calls = _build(family)
    source, output = tmp_path / f"{family}.pt", tmp_path / f"{family}.carelu.pt"
    torch.save(model, source)
    report = retrofit_file(RetrofitRequest(source, output=output, trust_pickle=True))
    assert not report.verified  # no sample input: it says so (checked here instead)
    reloaded = torch.load(output, weights_only=False)  # plain torch
    assert len(report.sites) == count_relu_calls(model, *inputs) > 0
    assert all(site.replaced for site in report.sites)
    assert count_relu_calls(reloaded, *inputs) == 0
    with torch.no_grad():
        assert _max_diff(model(*inputs), reloaded(*inputs)) <= 1e-6
        for kwargs in other_calls:  # optional inputs: the code that reads them is the original
            assert _max_diff(model(*inputs, **kwargs), reloaded(*inputs, **kwargs)) <= 1e-6
    before, after = _module_types(model), _module_types(reloaded)
    swapped = {site.name for site in report.sites}
    assert {name for name, kind in before.items() if kind is nn.ReLU} == swapped
    assert all(after[name] is CompetitiveReLU for name in swapped)
    assert {name: kind for name, kind in after.items() if name not in swapped} == {
        name: kind for name, kind in before.items() if name not in swapped}
    assert not any(issubclass(kind, fx.GraphModule) for kind in after.values())
    assert [key for key in reloaded.state_dict() if key in model.state_dict()] == list(
        model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_pickled_model_with_sample_inputs_is_verified_and_nothing_runs_unreached(family, tmp_path):
    from retrofit.config import CompetitiveReLUConfig
    from retrofit.sites import SiteSelector
    from retrofit.pipeline.subjects import TorchSubject

    model, inputs, _ = _build(family)
    torch.save(model, tmp_path / "model.pt")
    loaded = load_torch_model(tmp_path / "model.pt", trust_pickle=True)
    loaded.example_inputs = inputs  # what --input-shape name:2,8:int64 will give
    subject = TorchSubject(loaded)
    result = subject.rewrite(CompetitiveReLUConfig(), SiteSelector())
    assert all(site.replaced for site in result.sites)  # no "unreached" site from the census
    assert len(result.sites) == count_relu_calls(model, *inputs)
    assert not any("ran" in note and "times" in note for note in result.notes)
    parity = subject.parity(result.model)
    assert parity is not None and parity.relative <= 1e-6


def test_cli_retrofits_a_pickled_bert_and_says_first_that_it_is_unverified(tmp_path):
    model, inputs, _ = _build("bert")
    torch.save(model, tmp_path / "bert.pt")
    result = run_cli("retrofit", tmp_path / "bert.pt", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("UNVERIFIED: ")
    reloaded = torch.load(tmp_path / "bert.carelu.pt", weights_only=False)
    with torch.no_grad():
        assert _max_diff(model(*inputs), reloaded(*inputs)) <= 1e-6


def test_bert_embeddings_keep_their_object_and_every_call_signature(tmp_path):
    from retrofit.config import CompetitiveReLUConfig
    from retrofit.torch_path.rewrite import retrofit_torch_model

    model, (ids,), other_calls = _build("bert")
    result = retrofit_torch_model(model, CompetitiveReLUConfig())
    embeddings = result.model.bert.embeddings
    assert type(embeddings) is type(model.bert.embeddings)
    with torch.no_grad():
        vectors = model.bert.embeddings.word_embeddings(ids)
        assert torch.equal(embeddings(inputs_embeds=vectors),
                           model.bert.embeddings(inputs_embeds=vectors))
        assert _max_diff(model(inputs_embeds=vectors), result.model(inputs_embeds=vectors)) <= 1e-6
    assert torch_parity(model, result.model, (ids,)).relative <= 1e-6
    with torch.no_grad():
        for kwargs in other_calls:
            assert _max_diff(model(ids, **kwargs), result.model(ids, **kwargs)) <= 1e-6
    torch.save(result.model, tmp_path / "bert.pt")
    reloaded = torch.load(tmp_path / "bert.pt", weights_only=False)
    assert type(reloaded.bert.embeddings) is type(embeddings)


# --------------------------------------------------------------------------- unknown types


@pytest.fixture(scope="module")
def bert_pt2(tmp_path_factory) -> Path:
    model, inputs, _ = _build("bert")
    path = tmp_path_factory.mktemp("bert") / "bert.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    return path


def _with_output_type(source: Path, target: Path, type_name: str) -> Path:
    """A copy of the archive whose output spec names ``type_name`` instead of the real type."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename.endswith("models/model.json"):
                record = json.loads(data)
                for entry in record["graph_module"]["module_call_graph"]:
                    spec = entry["signature"]["out_spec"] if entry.get("signature") else None
                    if spec:
                        entry["signature"]["out_spec"] = spec.replace(
                            "transformers.modeling_outputs.SequenceClassifierOutput", type_name)
                data = json.dumps(record).encode()
            copy.writestr(item, data)
    return target


@pytest.mark.parametrize("type_name, expected", [
    ("cadrelu_planted_module.Output", "cadrelu_planted_module.Output objects, a type cadrelu"),
    ("transformers.commands.planted.Output", "not a transformers model output type"),
    ("transformers.models.bert.modeling_bert.BertModel", "not a model output type"),
    ("transformers.models.nosuch.modeling_nosuch.NoOutput", "does not have"),
])
def test_archive_naming_an_unknown_type_is_refused_in_one_line_without_importing_it(
        bert_pt2, tmp_path, monkeypatch, type_name, expected):
    planted = tmp_path / "cadrelu_planted_module.py"  # importing it would leave a marker
    planted.write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Output: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    archive = _with_output_type(bert_pt2, tmp_path / "edited.pt2", type_name)
    result = run_cli("retrofit", archive, "-o", tmp_path / "out.pt2")
    assert result.exit_code == 3
    line = one_line(result)
    assert type_name in line and expected in line and str(archive) in line
    assert "cadrelu_planted_module" not in sys.modules and not (tmp_path / "imported").exists()
    assert not (tmp_path / "out.pt2").exists()


def test_archive_of_a_local_pytree_type_is_refused_by_name(tmp_path):
    import torch.utils._pytree as pytree

    class LocalOutput(dict):
        pass

    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> LocalOutput:
            return LocalOutput(out=torch.relu(x))

    pytree.register_pytree_node(
        LocalOutput, lambda d: (list(d.values()), list(d)),
        lambda values, keys: LocalOutput(zip(keys, values)),
        serialized_type_name="cadrelu_tests.LocalOutput")
    try:
        program = torch.export.export(Model(), (torch.randn(2, 3),))
        torch.export.save(program, tmp_path / "local.pt2")
    finally:
        pytree._deregister_pytree_node(LocalOutput)
    result = run_cli("retrofit", tmp_path / "local.pt2")
    assert result.exit_code == 3 and "cadrelu_tests.LocalOutput" in one_line(result)


def test_archive_of_transformers_outputs_needs_transformers_installed(bert_pt2, tmp_path,
                                                                       monkeypatch):
    import importlib.util

    archive = _with_output_type(bert_pt2, tmp_path / "edited.pt2",
                                "transformers.models.nosuch.modeling_nosuch.NoOutput")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    result = run_cli("retrofit", archive)
    assert result.exit_code == 3 and "pip install transformers" in one_line(result)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (about 5 s)
def test_a_fresh_process_imports_only_the_output_module_it_needs(bert_pt2):
    script = (
        "import sys\n"
        "from retrofit.torch_path.io import load_torch_model\n"
        "assert 'transformers' not in sys.modules\n"
        f"model = load_torch_model({str(bert_pt2)!r})\n"
        "print(model.notes[0])\n"
        "print(type(model.module(*model.example_inputs)).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    note, output_type = done.stdout.strip().splitlines()[-2:]
    assert "imported transformers.modeling_outputs" in note
    assert output_type == "SequenceClassifierOutput"


@pytest.mark.slow  # a fine-tune, its ReLU control and an ONNX export: about 10 s
def test_pickled_bert_on_token_data_is_verified_fine_tuned_and_exported(tmp_path):
    """The whole route a user takes with a saved classifier (in training mode, as most are):
    int64 sample inputs from --input-shape verify it, integer data scores and fine-tunes it,
    and the ONNX export runs in plain onnxruntime with a dynamic batch."""
    import numpy as np
    import onnxruntime

    model, _, _ = _build("bert")
    torch.save(model.train(), tmp_path / "bert.pt")
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, size=(40, SEQ)).astype(np.int64)
    np.savez(tmp_path / "tokens.npz", x=x, y=x[:, 0] % 2)
    out, exported = tmp_path / "bert.carelu.pt", tmp_path / "bert.carelu.onnx"
    result = run_cli("retrofit", tmp_path / "bert.pt", "--trust-pickle", "--input-shape",
                     f"input_ids:{BATCH},{SEQ}:int64", "--data", tmp_path / "tokens.npz",
                     "--finetune", tmp_path / "tokens.npz", "--epochs", "1", "--control",
                     "--export-onnx", exported, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verified"] and report["parity"]["max_abs_diff"] == 0
    assert report["replaced"] == 2 and set(report["accuracy"]) == {
        "before", "after swap", "after fine-tune", "control"}
    assert any("training mode" in note for note in report["notes"])

    trained = torch.load(out, weights_only=False)
    ids = torch.from_numpy(x[:5])  # a batch size the export never saw
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        expected = trained(ids).logits
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-5)
    scored = run_cli("evaluate", exported, "--data", tmp_path / "tokens.npz", "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["top1"] == report["accuracy"]["after fine-tune"]["top1"]


def test_pickled_transformers_model_without_transformers_says_how_to_get_it(tmp_path, monkeypatch):
    model, _, _ = _build("bert")
    torch.save(model, tmp_path / "bert.pt")
    for name in [name for name in sys.modules if name.partition(".")[0] == "transformers"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    result = run_cli("inspect", tmp_path / "bert.pt", "--trust-pickle")
    assert result.exit_code == 3
    assert "pip install transformers" in one_line(result)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_an_mrepu_retrofit_is_calibrated_on_the_sample_inputs_and_written_finite(family, tmp_path):
    from retrofit.config import MRePUConfig

    model, inputs, _ = _build(family)
    source, output = tmp_path / f"{family}.pt2", tmp_path / f"{family}.mrepu.pt2"
    torch.export.save(torch.export.export(model, inputs), source)
    report = retrofit_file(RetrofitRequest(source, MRePUConfig(), output=output))
    assert report.calibration.source == "random sample inputs"
    assert [fit.site for fit in report.calibration.fits] == [s.name for s in report.replaced]
    assert all(fit.error_after <= fit.error_before for fit in report.calibration.fits)
    assert report.parity.nonfinite_candidate == 0
    reloaded = torch.export.load(output).module()  # plain torch
    with torch.no_grad():
        outputs = reloaded(*inputs)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    assert torch.isfinite(logits).all()
