"""Model formats: found from content, loaded safely, saved atomically and reloadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from retrofit.atomic import check_output_path
from retrofit.errors import BadInputError, OutputError, UntrustedPickleError, UsageError
from retrofit.torch_path.formats import ModelFormat, default_output_path, detect_format
from retrofit.torch_path.io import load_torch_model, save_torch_model
from retrofit.verify import torch_parity
from tests import models
from tests.conftest import no_partial_files

ARCH = "tests.models:TinyResNet"


@pytest.fixture
def resnet_files(tmp_path: Path) -> dict[str, Path]:
    model = models.TinyResNet().eval()
    x = torch.randn(2, 3, 6, 6)
    files = {
        "pt2": tmp_path / "model.pt2",
        "state": tmp_path / "weights.bin",  # suffix says nothing: content decides
        "safetensors": tmp_path / "model.safetensors",
        "pickle": tmp_path / "module.pt",
    }
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), files["pt2"])
    torch.save(model.state_dict(), files["state"])
    save_file(model.state_dict(), str(files["safetensors"]))
    torch.save(model, files["pickle"])
    return files


def test_format_is_found_from_content(resnet_files, tmp_path):
    assert detect_format(resnet_files["pt2"]) is ModelFormat.EXPORTED
    assert detect_format(resnet_files["state"]) is ModelFormat.STATE_DICT
    assert detect_format(resnet_files["safetensors"]) is ModelFormat.SAFETENSORS
    assert detect_format(resnet_files["pickle"]) is ModelFormat.PICKLED_MODULE
    renamed = tmp_path / "actually_pt2.onnx"
    renamed.write_bytes(resnet_files["pt2"].read_bytes())
    assert detect_format(renamed) is ModelFormat.EXPORTED


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"not a model at all", b"PK\x03\x04junk"])
def test_bad_files_are_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt2"
    path.write_bytes(content)
    with pytest.raises(BadInputError) as caught:
        load_torch_model(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_truncated_pt2_is_bad_input(resnet_files, tmp_path):
    truncated = tmp_path / "cut.pt2"
    truncated.write_bytes(resnet_files["pt2"].read_bytes()[:3000])
    with pytest.raises(BadInputError):
        load_torch_model(truncated)


def test_pickled_module_needs_trust_and_its_code_does_not_run(malicious_pickle):
    path, marker = malicious_pickle
    assert detect_format(path) is ModelFormat.PICKLED_MODULE
    with pytest.raises(UntrustedPickleError, match="runs code"):
        load_torch_model(path)
    with pytest.raises(UntrustedPickleError):
        load_torch_model(path, arch=ARCH)  # an --arch does not make a pickle a state dict
    assert not marker.exists()


def test_trusted_pickle_loads(resnet_files):
    loaded = load_torch_model(resnet_files["pickle"], trust_pickle=True)
    assert isinstance(loaded.module, models.TinyResNet)


def test_state_dicts_need_an_arch_and_must_fit_it(resnet_files):
    with pytest.raises(UsageError, match="--arch"):
        load_torch_model(resnet_files["state"])
    for key in ("state", "safetensors"):
        loaded = load_torch_model(resnet_files[key], arch=ARCH)
        assert isinstance(loaded.module, models.TinyResNet)
    with pytest.raises(BadInputError, match="does not fit"):
        load_torch_model(resnet_files["state"], arch="tests.models:AllSpellings")
    with pytest.raises(UsageError, match="no module 'no_such_module'"):
        load_torch_model(resnet_files["state"], arch="no_such_module:factory")


def test_pt2_keeps_example_inputs_and_dynamic_batch(resnet_files, tmp_path):
    loaded = load_torch_model(resnet_files["pt2"])
    assert loaded.example_inputs[0].shape == (2, 3, 6, 6)
    assert loaded.dynamic_dims == ((0,),)
    out = tmp_path / "copy.pt2"
    save_torch_model(loaded, loaded.module, out)
    again = load_torch_model(out)
    x = torch.randn(5, 3, 6, 6)
    assert torch_parity(loaded.module, again.module, (x,)).relative <= 1e-6


@pytest.mark.parametrize("key", ["state", "safetensors", "pickle"])
def test_saved_models_reload(resnet_files, tmp_path, key):
    loaded = load_torch_model(resnet_files[key], arch=ARCH, trust_pickle=True)
    out = default_output_path(resnet_files[key], "carelu", loaded.format)
    assert out.name.split(".")[-2] == "carelu" and out != resnet_files[key]
    save_torch_model(loaded, loaded.module, out)
    again = load_torch_model(out, arch=ARCH, trust_pickle=True)
    assert again.format is loaded.format
    assert no_partial_files(tmp_path)


def test_output_checks(resnet_files, tmp_path):
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(resnet_files["pt2"], inputs=[resnet_files["pt2"]])
    with pytest.raises(OutputError, match="already exists"):
        check_output_path(resnet_files["state"])
    assert check_output_path(resnet_files["state"], force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.pt2")


def test_failed_save_leaves_nothing_behind(resnet_files, tmp_path):
    loaded = load_torch_model(resnet_files["state"], arch=ARCH)
    loaded.example_inputs = None
    target = tmp_path / "never.pt2"
    with pytest.raises(UsageError):
        save_torch_model(loaded, loaded.module, target, ModelFormat.EXPORTED)
    assert not target.exists() and no_partial_files(tmp_path)
