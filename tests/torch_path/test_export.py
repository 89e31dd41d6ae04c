"""--export-onnx: torch.export + the dynamo exporter, a dynamic batch wherever the graph allows it,
and a file that plain onnxruntime runs to torch's outputs."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrofit.onnx_path import io as onnx_io
from retrofit.config import CompetitiveReLUConfig, MRePUConfig
from retrofit.errors import BadInputError, OutputError, ParityError
from retrofit.pipeline.job import retrofit_file
from retrofit.pipeline.request import RetrofitRequest
from retrofit.torch_path.formats import TorchModel
from retrofit.torch_path.io import load_torch_model
from retrofit.torch_path.export import export_onnx
from retrofit.sites import SiteSelector
from retrofit.torch_path.rewrite import retrofit_torch_model
from tests.conftest import no_partial_files, run_cli, sha256
from tests.models import TinyResNet

from tests.conftest import SAMPLES
SCALED = {"alpha_init": 1.3, "beta_init": -0.4}  # not the identity: the sites compute something

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


def saved_program(folder: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...],
                  dynamic_shapes=None) -> TorchModel:
    """``module`` exported (static batch unless told), saved as .pt2 and loaded as the tool does."""
    program = torch.export.export(module.eval(), inputs, dynamic_shapes=dynamic_shapes)
    path = folder / "source.pt2"
    torch.export.save(program, path)
    return load_torch_model(path)


def run_file(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    """The written file in plain onnxruntime, inputs fed in order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})


def batch_axes(path: Path) -> list[str | int]:
    """Axis 0 of each graph input: a name when dynamic, a size when fixed."""
    firsts = [value.type.tensor_type.shape.dim[0] for value in onnx.load(str(path)).graph.input]
    return [dim.dim_param or dim.dim_value for dim in firsts]


def assert_matches(got: list[np.ndarray], expected, tol: float = 1e-5) -> None:
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(got) == len(expected)
    for array, tensor in zip(got, expected):
        np.testing.assert_allclose(array, tensor.detach().numpy(), rtol=tol, atol=tol)


class ConvNet(nn.Module):
    """Two ReLU sites on 4-D activations, one on 2-D features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(F.relu(x.mean((2, 3))))


class FixedBatchView(nn.Module):
    """Eager code that fixes the batch: ``view(2, -1)`` then a layer sized for it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x.view(2, -1)))


class FlattenByBatch(nn.Module):
    """The usual flatten: exported with a static batch, it becomes ``view(2, -1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).view(x.size(0), -1)


class BatchMixing(nn.Module):
    """A graph that still runs at any batch but mixes samples (it reverses the batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).flip(0) * x


class TwoInputs(nn.Module):
    """Two inputs sharing the batch, one with a sequence axis; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.relu(self.lin(x)) * y.unsqueeze(1), torch.relu(y).sum(-1)


def retrofitted(module: nn.Module, config=CompetitiveReLUConfig()) -> nn.Module:
    return retrofit_torch_model(module, config, SiteSelector()).model


@pytest.mark.slow  # a whole retrofit job: rewrite, .pt2 and ONNX export
def test_static_batch_program_gets_a_dynamic_batch_checked_per_sample(tmp_path):
    torch.manual_seed(0)
    original = TinyResNet().eval()
    source = saved_program(tmp_path, original, (torch.randn(2, 3, 6, 6),))
    assert source.dynamic_dims == ((),)
    out = tmp_path / "model.onnx"
    report = retrofit_file(RetrofitRequest(source.path, output=tmp_path / "out.pt2",
                                           export_onnx=out, device="cpu"))
    assert report.onnx_export == out and report.onnx_export_parity.relative <= 1e-5
    assert [note for note in report.notes if "fixed it at 2" in note and "to be sure" in note]
    assert isinstance(batch_axes(out)[0], str)
    for batch in (2, 5, 1):  # identity init: the file computes what the original computes
        x = torch.randn(batch, 3, 6, 6)
        assert_matches(run_file(out, x), original(x))


@pytest.mark.parametrize("case,why", [
    ("eager view(2, -1)", "code fixes that axis"),
    ("static program, flatten by batch", "code fixes that axis"),
    ("static program mixing samples", "mixes samples"),
])
def test_model_that_fixes_its_batch_keeps_it_and_says_why(tmp_path, case, why):
    x = torch.randn(2, 3, 4)
    if case == "eager view(2, -1)":
        module, dims = retrofitted(FixedBatchView()), None
    else:
        kind = FlattenByBatch if "flatten" in case else BatchMixing
        source = saved_program(tmp_path, kind(), (x,))
        module, dims = retrofitted(source.module), source.dynamic_dims
    result = export_onnx(module, (x,), tmp_path / "fixed.onnx", dynamic_dims=dims)
    assert not result.dynamic_batch
    assert "fixed batch of 2 (input)" in result.note and why in result.note
    assert batch_axes(result.path) == [2]
    assert_matches(run_file(result.path, x), module(x))


CONFIGS = [
    *(CompetitiveReLUConfig(measure=measure, reduce=reduce, **SCALED)
      for measure in ("energy", "l1", "count") for reduce in ("sample", "channel", "last")),
    CompetitiveReLUConfig(),
    MRePUConfig(),
    MRePUConfig(blend=0.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-" + "-".join(
    str(getattr(c, key)) for key in ("measure", "reduce", "blend") if hasattr(c, key)))
def test_every_activation_config_exports_and_matches_onnxruntime(tmp_path, config):
    torch.manual_seed(1)
    module = retrofitted(ConvNet().eval(), config)
    result = export_onnx(module, (torch.randn(2, 2, 5, 5),), tmp_path / "act.onnx")
    assert result.dynamic_batch and result.note is None
    assert result.parity.relative <= 1e-5
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert "Relu" not in ops  # every site is the new activation, not ReLU
    x = torch.randn(3, 2, 5, 5) * 3
    with torch.no_grad():
        assert_matches(run_file(result.path, x), module(x))


@pytest.mark.parametrize("measure", ["energy", "l1"])
def test_competitive_relu_exports_in_few_passes_and_each_branch_matches(tmp_path, measure):
    """The exported sites are the ONNX emission's form: the two sums, one If for sums out of
    range (the rescaled measurement), one for a negative s (the clamp), no rescaling pass on
    the main path."""
    torch.manual_seed(3)
    config = CompetitiveReLUConfig(measure=measure, alpha_init=8.0, beta_init=-4.0)
    module = retrofitted(ConvNet().eval(), config)  # s = 2 tanh(8 p - 4): either sign
    result = export_onnx(module, (torch.randn(2, 2, 5, 5),), tmp_path / "few.onnx")
    ops = Counter(node.op_type for node in onnx.load(str(result.path)).graph.node)
    assert ops["If"] == 2 * 3 and not ops["ReduceMax"] and not ops["Div"], ops
    x = torch.randn(4, 2, 5, 5)
    x[1] *= -1.0  # a mostly negative sample
    for batch in (x, x * 1e20):  # 1e20: the squares overflow float32, the rescaled branch runs
        with torch.no_grad():  # ds/dp = 16 (1 - tanh^2) multiplies p's float32 rounding
            assert_matches(run_file(result.path, batch), module(batch), tol=1e-4)


def test_multiple_inputs_and_outputs_keep_the_source_axes_and_gain_the_batch(tmp_path):
    torch.manual_seed(2)
    original = TwoInputs().eval()
    inputs = (torch.randn(2, 3, 4), torch.randn(2, 4))
    source = saved_program(tmp_path, original, inputs,
                           dynamic_shapes=({1: torch.export.Dim.DYNAMIC}, None))
    assert source.dynamic_dims == ((1,), ())
    result = export_onnx(retrofitted(source.module), source.example_inputs,
                         tmp_path / "two.onnx", dynamic_dims=source.dynamic_dims)
    assert result.dynamic_batch
    model = onnx.load(str(result.path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input]
    assert isinstance(dims[0][0], str) and isinstance(dims[0][1], str) and dims[0][2] == 4
    assert dims[1][0] == dims[0][0]  # one batch for both inputs
    assert [v.name for v in model.graph.output] == ["output_0", "output_1"]
    x, y = torch.randn(5, 7, 4), torch.randn(5, 4)
    assert_matches(run_file(result.path, x, y), original(x, y))


def test_sample_batch_of_one_still_gives_a_dynamic_batch(tmp_path):
    module = retrofitted(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval())
    result = export_onnx(module, (torch.randn(1, 4),), tmp_path / "one.onnx")
    assert result.dynamic_batch and result.note is None
    for batch in (1, 6):
        x = torch.randn(batch, 4)
        assert_matches(run_file(result.path, x), module(x))


def test_export_uses_the_dynamo_exporter_and_prints_nothing(tmp_path, monkeypatch, capsys):
    from torch.onnx._internal.torchscript_exporter import utils as torchscript

    def refuse(*args, **kwargs):
        raise AssertionError("the deprecated TorchScript-based exporter was called")

    monkeypatch.setattr(torchscript, "export", refuse)
    module = retrofitted(ConvNet().eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(module, (torch.randn(2, 2, 5, 5),), tmp_path / "quiet.onnx")
    assert not [str(w.message) for w in caught]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if x.sum() > 0 else x


class Untranslatable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.linalg.eigh(x @ x.mT)[0])


@pytest.mark.parametrize("module,x", [(DataDependent(), torch.randn(2, 3)),
                                      (Untranslatable(), torch.randn(2, 3, 3))],
                         ids=["torch.export refuses", "no ONNX translation"])
def test_export_failure_is_one_line_and_writes_nothing(tmp_path, module, x):
    with pytest.raises(BadInputError, match="cannot export the model to ONNX") as error:
        export_onnx(module, (x,), tmp_path / "bad.onnx")
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    import retrofit.torch_path.export as onnx_export

    def off_by_one(model, feeds):
        return [array + 1 for array in onnx_io.run_onnx(model, feeds)]

    monkeypatch.setattr(onnx_export, "run_onnx", off_by_one)
    module = retrofitted(ConvNet().eval())
    with pytest.raises(ParityError, match="disagrees with torch"):
        export_onnx(module, (torch.randn(2, 2, 5, 5),), tmp_path / "off.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # three exports
def test_weights_over_the_protobuf_limit_go_to_one_data_file_replaced_only_with_force(
        tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "_SAFE_PROTO_SIZE", 4096)  # a small model counts as large
    module = retrofitted(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval())
    x = torch.randn(2, 64)
    path = tmp_path / "big.onnx"
    data = tmp_path / "big.onnx.data"
    export_onnx(module, (x,), path)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert_matches(run_file(path, x), module(x))
    path.unlink()
    before = sha256(data)
    with pytest.raises(OutputError, match="--force"):
        export_onnx(module, (x,), path)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx.data"] and sha256(data) == before
    export_onnx(module, (x,), path, force=True)
    assert_matches(run_file(path, x), module(x))
    assert no_partial_files(tmp_path)


@pytest.mark.slow
def test_cli_export_onnx_of_the_sample_cnn_runs_in_plain_onnxruntime(tmp_path):
    source = SAMPLES / "models" / "digits_cnn.pt2"
    out = tmp_path / "cnn.onnx"
    result = run_cli("retrofit", source, "-o", tmp_path / "cnn.pt2", "--export-onnx", out)
    assert result.exit_code == 0, result.output
    assert "[torch.onnx]" not in result.output and "arning" not in result.output
    assert f"wrote {out}" in result.output and "onnxruntime vs torch" in result.output
    original = load_torch_model(source)
    (x,) = original.example_inputs
    for batch in (x, torch.cat([x, x, x[:1]])):  # identity init: the original's outputs
        assert_matches(run_file(out, batch), original.module(batch))


def test_file_names_its_batch_axis_and_holds_no_source_paths(tmp_path):
    module = retrofitted(ConvNet().eval())
    result = export_onnx(module, (torch.randn(2, 2, 5, 5),), tmp_path / "named.onnx")
    model = onnx.load(str(result.path))
    values = [*model.graph.input, *model.graph.output]
    assert [v.type.tensor_type.shape.dim[0].dim_param for v in values] == ["batch", "batch"]
    keys = {prop.key for node in model.graph.node for prop in node.metadata_props}
    assert "namespace" in keys and "pkg.torch.onnx.stack_trace" not in keys
    assert __file__.encode() not in result.path.read_bytes()


class FixedBatchOfOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x.view(1, -1)))


def test_sample_batch_of_one_that_the_code_fixes_stays_one(tmp_path):
    module = retrofitted(FixedBatchOfOne().eval())
    x = torch.randn(1, 3, 4)
    result = export_onnx(module, (x,), tmp_path / "one.onnx")
    assert not result.dynamic_batch and "fixed batch of 1 (input)" in result.note
    assert batch_axes(result.path) == [1]
    assert_matches(run_file(result.path, x), module(x))


@pytest.mark.parametrize("to", ["carelu", "mrepu"])
def test_cli_export_onnx_computes_what_the_written_pt2_computes(tmp_path, to):
    """The success path end to end: the .pt2 and the ONNX export that one command writes are
    the same function (MRePU, calibrated on the data, is not the original's: only the two
    written files can be compared), on real samples, in torch.export.load and onnxruntime."""
    import json

    val = SAMPLES / "data" / "digits_val.npz"
    model, export = tmp_path / "out.pt2", tmp_path / "out.onnx"
    result = run_cli("retrofit", SAMPLES / "models" / "digits_cnn.pt2", "--to", to, "--data",
                     val, "--device", "cpu", "-o", model, "--export-onnx", export, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] == [str(export), str(model)] and report["onnx_export"] == str(export)
    assert report["onnx_export_parity"]["relative"] <= 1e-5
    program = torch.export.load(str(model))
    batch = program.example_inputs[0][0].shape[0]
    x = torch.from_numpy(np.load(val)["x"][:batch])
    with torch.no_grad():
        expected = program.module()(x)
    assert_matches(run_file(export, x), expected, tol=1e-4)
    if to == "mrepu":  # a different function from the original's: the comparison means something
        with torch.no_grad():
            original = load_torch_model(SAMPLES / "models" / "digits_cnn.pt2").module(x)
        assert not torch.allclose(original, expected, atol=1e-3)
