"""The torch rewrite: every spelling is a site, each call site gets its own parameters, the
identity-init retrofit computes what the original did, and the input model is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from retrofit.activations.modules import CompetitiveReLU, MRePU
from retrofit.torch_path.census import take_census
from retrofit.config import CompetitiveReLUConfig, MRePUConfig
from retrofit.errors import SelectionError, UnsupportedModelError
from retrofit.sites import SiteSelector
from retrofit.torch_path.rewrite import retrofit_torch_model
from retrofit.verify import torch_parity
from tests import models

CARELU = CompetitiveReLUConfig()


def _parity(original: nn.Module, rewritten: nn.Module, *inputs: torch.Tensor) -> float:
    return torch_parity(original, rewritten, inputs).relative


def test_reused_relu_module_is_two_sites_with_their_own_parameters():
    model = models.TinyResNet().eval()
    result = retrofit_torch_model(model, CARELU)
    names = [site.name for site in result.sites]
    assert names == ["F.relu", "layer1.0.relu#1", "layer1.0.relu#2",
                     "layer1.1.relu#1", "layer1.1.relu#2"]
    assert all(site.replaced for site in result.sites)
    block = result.model.get_submodule("layer1.0.relu")
    assert isinstance(block, nn.ModuleList) and len(block) == 2
    assert block[0].alpha is not block[1].alpha
    params = {p for site in result.sites for p in site.parameters}
    assert len(params) == 2 * len(result.sites)
    assert params <= set(result.model.state_dict())


def test_identity_retrofit_keeps_outputs_and_site_count_matches_relu_calls():
    model = models.TinyResNet().eval()
    x = torch.randn(3, 3, 6, 6)
    result = retrofit_torch_model(model, CARELU)
    assert len(result.sites) == models.count_relu_calls(model, x)
    assert _parity(model, result.model, x) <= 1e-5
    assert models.count_relu_calls(result.model, x) == 0


def test_identity_retrofit_is_exact_in_float64():
    model = models.TinyResNet().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    result = retrofit_torch_model(model, CARELU)
    assert _parity(model, result.model, x) <= 1e-12


def test_every_spelling_is_a_site_and_other_activations_are_left_alone():
    model = models.AllSpellings().eval()
    x = torch.randn(4, 6)
    result = retrofit_torch_model(model, CARELU)
    kinds = [site.kind for site in result.sites]
    assert kinds == ["nn.ReLU", "nn.ReLU(inplace)", "F.relu", "F.relu(inplace)", "torch.relu",
                     "Tensor.relu", "Tensor.relu_"]
    assert len(result.sites) == models.count_relu_calls(model, x)
    assert _parity(model, result.model, x) <= 1e-5
    assert isinstance(result.model.get_submodule("others.0"), nn.GELU)
    assert isinstance(result.model.get_submodule("others.1"), nn.ReLU6)


def test_in_place_relu_whose_input_is_read_again_keeps_its_meaning():
    model = models.InplaceReadAgain().eval()
    x = torch.randn(3, 5)
    config = CompetitiveReLUConfig(alpha_init=0.7, beta_init=-0.2)  # s < 0 for most inputs
    result = retrofit_torch_model(model, config)
    activation = result.model.get_submodule(result.sites[0].parameters[0].rpartition(".")[0])
    expected = 2 * activation(model.lin(x))
    assert torch.allclose(result.model(x), expected)


def test_in_place_sites_may_overwrite_their_input_in_inference_and_keep_their_meaning():
    model = models.AllSpellings().eval()
    result = retrofit_torch_model(model, CARELU)
    inplace = {site.kind: result.model.get_submodule(
        site.parameters[0].rpartition(".")[0]).inplace for site in result.sites}
    assert inplace == {"nn.ReLU": False, "nn.ReLU(inplace)": True, "F.relu": False,
                       "F.relu(inplace)": True, "torch.relu": False, "Tensor.relu": False,
                       "Tensor.relu_": True}
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert _parity(model, result.model, x) <= 1e-6
        read_again = models.InplaceReadAgain().eval()
        rewritten = retrofit_torch_model(read_again, CARELU).model
        assert torch.equal(rewritten(x[:, :5]), read_again(x[:, :5]))


def test_transformer_encoder_layer_functional_relu_is_reached():
    model = models.Encoder().eval()
    x = torch.randn(2, 5, 8)
    result = retrofit_torch_model(model, CARELU)
    assert [site.name for site in result.sites] == ["layer.activation"]
    assert isinstance(result.model.get_submodule("layer.activation"), CompetitiveReLU)
    with torch.no_grad():  # eval + no_grad is where the fused fast path would run
        assert _parity(model, result.model, x) <= 1e-5
    changed = retrofit_torch_model(model, CompetitiveReLUConfig(alpha_init=2.0, beta_init=-1.0))
    with torch.no_grad():
        assert _parity(model, changed.model, x) > 1e-3


def test_exported_program_sites_are_named_from_the_source_modules():
    model = models.TinyResNet().eval()
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    result = retrofit_torch_model(program.module(), CARELU)
    assert [site.name for site in result.sites] == ["F.relu", "layer1.0.relu#1", "layer1.0.relu#2",
                                                   "layer1.1.relu#1", "layer1.1.relu#2"]
    assert [site.kind for site in result.sites][:2] == ["F.relu", "nn.ReLU(inplace)"]
    assert _parity(model, result.model, x) <= 1e-5
    reexported = torch.export.export(result.model, (x,))
    assert not any("relu" in str(node.target) for node in reexported.graph.nodes
                   if node.op == "call_function")


def test_untraceable_module_falls_back_to_module_swap_and_census_finds_the_rest():
    model = models.WithUntraceable().eval()
    x = torch.randn(2, 6)
    result = retrofit_torch_model(model, CARELU)
    assert {site.name for site in result.sites} == {"inner.act", "torch.relu"}
    assert any("inner does not trace" in note for note in result.notes)
    assert _parity(model, result.model, x) <= 1e-5
    census = take_census(result.model, (x,))
    assert census.unreached == {"inner": 1}


def test_selection_include_exclude_and_strictness():
    model = models.TinyResNet().eval()
    x = torch.randn(2, 3, 6, 6)
    result = retrofit_torch_model(model, CARELU, SiteSelector(include=("layer1.0",),
                                                              exclude=("layer1.0.relu#2",)))
    replaced = {site.name: site.replaced for site in result.sites}
    assert replaced == {"F.relu": False, "layer1.0.relu#1": True, "layer1.0.relu#2": False,
                        "layer1.1.relu#1": False, "layer1.1.relu#2": False}
    assert _parity(model, result.model, x) <= 1e-5
    assert models.count_relu_calls(result.model, x) == 4
    regex = retrofit_torch_model(model, CARELU, SiteSelector(include=(r"layer1\.\d\.relu#1",)))
    assert [site.name for site in regex.replaced] == ["layer1.0.relu#1", "layer1.1.relu#1"]
    with pytest.raises(SelectionError, match="layer9"):
        retrofit_torch_model(model, CARELU, SiteSelector(exclude=("layer9",)))


def test_model_without_relu_is_refused():
    with pytest.raises(UnsupportedModelError, match="no ReLU site"):
        retrofit_torch_model(models.NoRelu(), CARELU)


def test_input_model_is_not_modified():
    model = models.AllSpellings().eval()
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    retrofit_torch_model(model, CARELU)
    assert [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mrepu_retrofit_changes_the_function_and_keeps_mode():
    model = models.TinyResNet().eval()
    x = torch.randn(2, 3, 6, 6)
    result = retrofit_torch_model(model, MRePUConfig())
    assert all(isinstance(result.model.get_submodule(p), MRePU) for p in
               ["layer1.0.relu.0", "layer1.0.relu.1"])
    assert _parity(model, result.model, x) > 1e-3
    assert not result.model.training


def test_modules_without_a_site_keep_their_object_and_code():
    model = models.Specialising().eval()
    result = retrofit_torch_model(model, CARELU)
    traced = [name for name, module in result.model.named_modules()
              if isinstance(module, torch.fx.GraphModule)]
    assert traced == ["reused"]  # the one module whose own code needs a graph rewrite
    embed = result.model.embed
    assert type(embed) is models.TokenEmbedding
    assert torch.equal(embed(embeds=torch.ones(1, 6)), torch.ones(1, 6))  # its other branch
    assert type(result.model) is models.Specialising


def test_forward_that_tracing_would_specialise_is_kept_and_its_relu_calls_listed():
    model = models.Specialising().eval()
    result = retrofit_torch_model(model, CARELU)
    kept = {site.name: site.reason for site in result.sites if not site.replaced}
    assert set(kept) == {"masked.F.relu", "mode.F.relu", "typed.F.relu"}
    assert "optional arguments: mask" in kept["masked.F.relu"]
    assert "reads training" in kept["mode.F.relu"]
    assert "reads isinstance" in kept["typed.F.relu"]
    assert [site.name for site in result.replaced] == ["reused.act#1", "reused.act#2", "head.1"]
    ids, mask = torch.randint(0, 10, (2, 4)), torch.rand(2, 4, 6)
    assert _parity(model, result.model, ids) == 0.0
    assert _parity(model, result.model, ids, mask) == 0.0
    result.model.train()
    assert result.model.mode.training  # the mode is the module's again, not the trace's


def test_traced_copy_keeps_every_name_of_the_state_dict():
    model = models.Specialising().eval()
    result = retrofit_torch_model(model, CARELU)
    original = list(model.state_dict())
    rewritten = list(result.model.state_dict())
    assert [key for key in rewritten if key in original] == original  # same names, same order
    new = {p for site in result.sites for p in site.parameters}
    assert set(rewritten) - set(original) == new


@pytest.mark.parametrize("build, shape", [(models.TinyResNet, (2, 3, 6, 6)),
                                          (models.AllSpellings, (2, 6))])
def test_retrofitted_module_survives_a_pickle_round_trip(build, shape, tmp_path):
    model = build().eval()
    x = torch.randn(*shape)
    result = retrofit_torch_model(model, CARELU)
    torch.save(result.model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert models.count_relu_calls(loaded, x) == 0


def test_census_does_not_count_a_listed_kept_relu_call_twice(tmp_path):
    from retrofit.torch_path.formats import ModelFormat, TorchModel
    from retrofit.pipeline.subjects import TorchSubject

    model = models.Specialising().eval()
    ids = torch.randint(0, 10, (2, 4))
    loaded = TorchModel(model, ModelFormat.PICKLED_MODULE, tmp_path / "m.pt", example_inputs=(ids,))
    result = TorchSubject(loaded).rewrite(CARELU, SiteSelector())
    assert sorted(site.name for site in result.sites if not site.replaced) == [
        "masked.F.relu", "mode.F.relu", "typed.F.relu"]
    assert models.count_relu_calls(result.model, ids) == 3
