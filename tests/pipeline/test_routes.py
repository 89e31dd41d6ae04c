"""Every route in and out, on torchvision-style classifiers: a model saved each way people save
one (pickled in training mode, state dict or safetensors with --arch and --arch-kwargs, .pt2
with a static or a dynamic batch, ONNX) is retrofitted with every ReLU found and the outputs
kept, and what cadrelu writes loads with plain torch or onnxruntime and with cadrelu again."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from retrofit.torch_path.io import load_model
from tests.conftest import run_cli
from tests.zoo import ARCHITECTURES, RELU_SITES

ROUTES = ("pickled", "state-dict", "safetensors", "pt2-static", "pt2-dynamic", "onnx")
SAMPLE_BATCH = 2


def _trained(name: str) -> torch.nn.Module:
    """A model in training mode whose BatchNorm statistics are not the initial ones."""
    torch.manual_seed(0)
    model = ARCHITECTURES[name](num_classes=10).train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))
    return model


def _save(model: torch.nn.Module, route: str, folder: Path) -> Path:
    example = (torch.randn(SAMPLE_BATCH, 3, 16, 16),)
    batch = ({0: torch.export.Dim("batch")},)
    path = folder / f"model.{route}"
    if route == "pickled":
        torch.save(model, path)
    elif route == "state-dict":
        torch.save(model.state_dict(), path)
    elif route == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    elif route.startswith("pt2"):
        dynamic = batch if route == "pt2-dynamic" else None
        torch.export.save(torch.export.export(model.eval(), example, dynamic_shapes=dynamic), path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), example, str(path), dynamo=True, dynamic_shapes=batch,
                              verbose=False)
    return path


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _reload(path: Path, route: str, arch: list[str], x: torch.Tensor) -> torch.Tensor:
    """The written model's outputs, loaded as a user of that format would load it."""
    with torch.no_grad():
        if route == "onnx":
            return _run_onnx(path, x)
        if route.startswith("pt2"):
            return torch.export.load(path).module()(x)
        if route == "pickled":
            return torch.load(path, weights_only=False)(x)
        return load_model(path, arch=arch[1], arch_kwargs={"num_classes": 10})(x)


@pytest.mark.slow  # 30 retrofits, scorings and reloads: about 1 s each
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_route_keeps_the_function_and_writes_what_loads_again(name, route, tmp_path):
    model = _trained(name)
    source = _save(model, route, tmp_path)
    rng = np.random.default_rng(0)
    data = tmp_path / "val.npz"
    np.savez(data, x=rng.standard_normal((12, 3, 16, 16)).astype(np.float32),
             y=np.arange(12) % 10)
    arch = (["--arch", f"tests.zoo:{type(model).__name__}", "--arch-kwargs", "num_classes=10"]
            if route in ("state-dict", "safetensors") else [])
    out = tmp_path / f"out.{route}"
    export = ["--export-onnx", tmp_path / "export.onnx"] if route == "pt2-dynamic" else []
    result = run_cli("retrofit", source, "--trust-pickle", "--data", data, "-o", out, "--json",
                     *arch, *export)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verified"] and report["replaced"] == RELU_SITES[name] == len(report["sites"])
    assert report["parity"]["relative"] <= 1e-6
    assert report["accuracy"]["after swap"]["top1"] == report["accuracy"]["before"]["top1"]

    x = torch.randn(SAMPLE_BATCH if route == "pt2-static" else 5, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(_reload(out, route, arch, x), expected, rtol=1e-5, atol=1e-5)
    if export:
        torch.testing.assert_close(_run_onnx(tmp_path / "export.onnx", x), expected,
                                   rtol=1e-5, atol=1e-5)
    scored = run_cli("evaluate", out, "--trust-pickle", "--data", data, "--json", *arch)
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["top1"] == report["accuracy"]["after swap"]["top1"]
