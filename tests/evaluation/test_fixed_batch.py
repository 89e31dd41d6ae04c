"""Models that take one batch size only: static-batch ``.pt2`` programs (re-exported with a
dynamic batch where their code allows, else run in chunks), ONNX graphs that declare a batch,
and graphs with a dynamic batch axis that reshape to a fixed ``[1, N]`` inside."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from retrofit.evaluation.batching import probe_fixed_batch, run_in_batches, torch_forward
from retrofit.training.distributed import epoch_batches, steps_per_epoch
from tests.conftest import one_line, run_cli

CLASSES = 3


class SmallConv(nn.Module):
    """Conv, ReLU, Linear; ``fixed`` reshapes with ``view(4, -1)``, so only batches of 4 run."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4 * 6 * 6, CLASSES)
        self.fixed = fixed

    def forward(self, x):  # unannotated: a string annotation breaks pickling the fx rewrite
        h = self.relu(self.conv(x))
        return self.head(h.view(4, -1) if self.fixed else h.flatten(1))


def _model(fixed: bool = False) -> SmallConv:
    torch.manual_seed(0)
    return SmallConv(fixed).eval()


def _data(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, CLASSES, n))
    return path


def _one_at_a_time_top1(model: nn.Module, path: Path) -> float:
    """Top-1 of the batch-flexible twin, one sample per call: the reference for padding."""
    with np.load(path) as data:
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    with torch.no_grad():
        predicted = torch.stack([model(x[i:i + 1]).argmax(1)[0] for i in range(len(y))])
    return 100.0 * float((predicted == y).float().mean())


def _top1(result) -> float:
    return float(result.stdout.split("top-1 ")[1].split("%")[0])


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return _data(tmp_path / "val.npz", 10), _data(tmp_path / "train.npz", 10, seed=1)


def _static_pt2(tmp_path: Path, fixed: bool) -> Path:
    path = tmp_path / ("fixed.pt2" if fixed else "static.pt2")
    torch.export.save(torch.export.export(_model(fixed), (torch.randn(4, 3, 8, 8),)), path)
    return path


def test_run_in_batches_pads_the_last_chunk_and_drops_its_outputs() -> None:
    calls = []

    def forward(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(chunk.shape[0])
        return chunk.sum(1, keepdim=True)

    batch = torch.arange(20.0).view(10, 2)
    assert torch.equal(run_in_batches(forward, batch, 4), batch.sum(1, keepdim=True))
    assert calls == [4, 4, 4]


def test_exact_batches_leave_out_the_remainder_and_reach_every_sample_over_epochs() -> None:
    seen: set[int] = set()
    for epoch in range(6):
        batches = epoch_batches(10, 4, seed=0, epoch=epoch, drop_last=True)
        assert [len(b.indices) for b in batches] == [4, 4]
        seen.update(i for b in batches for i in b.indices)
    assert seen == set(range(10))
    assert steps_per_epoch(10, 4, drop_last=True) == 2 and steps_per_epoch(10, 4) == 3


def test_probe_tells_a_fixed_batch_from_a_free_one() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert probe_fixed_batch(torch_forward(_model()), (x,)).fixed is None
    assert probe_fixed_batch(torch_forward(_model(fixed=True)), (x,)).fixed == 4


def test_static_pt2_is_reexported_with_a_dynamic_batch_and_written_back_static(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    model, (val, train) = _static_pt2(tmp_path, fixed=False), data
    out = tmp_path / "out.pt2"
    result = run_cli("retrofit", model, "--data", val, "--finetune", train, "--epochs", "1",
                     "--batch-size", "3", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "re-exported with a dynamic batch" in result.output
    assert "keeps the static batch of 4" in result.output
    written = torch.export.load(out).module()
    assert written(torch.randn(4, 3, 8, 8)).shape == (4, CLASSES)
    with pytest.raises(AssertionError):  # the original's interface: batch 4 only
        written(torch.randn(5, 3, 8, 8))
    scored = run_cli("evaluate", model, "--data", val, "--batch-size", "3", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert _top1(scored) == pytest.approx(_one_at_a_time_top1(_model(), val))


def test_pt2_whose_code_fixes_the_batch_is_scored_and_trained_in_chunks(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    model, (val, train) = _static_pt2(tmp_path, fixed=True), data
    scored = run_cli("evaluate", model, "--data", val, "--batch-size", "3", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert "takes batches of exactly 4" in scored.output
    # the flexible twin computes the same rows: padding changed no prediction
    assert _top1(scored) == pytest.approx(_one_at_a_time_top1(_model(), val))
    out = tmp_path / "out.pt2"
    result = run_cli("retrofit", model, "--data", val, "--finetune", train, "--epochs", "1",
                     "--control", "--device", "cpu", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("in batches of 4 instead of --batch-size 64" in note for note in report["notes"])
    assert any("leaves out the last 2 of 10 training samples" in n for n in report["notes"])
    assert report["accuracy"]["before"]["top1"] == pytest.approx(_top1(scored))
    assert report["accuracy"]["control"]["n"] == 10
    assert torch.export.load(out).module()(torch.randn(4, 3, 8, 8)).shape == (4, CLASSES)


def _onnx_fixed(tmp_path: Path, batch: int) -> Path:
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(_model(), (torch.randn(batch, 3, 8, 8),), str(path), dynamo=False,
                      input_names=["data_0"], output_names=["logits"])
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    return path


def test_onnx_graph_with_a_fixed_batch_of_3_is_scored_fine_tuned_and_saved(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    model, (val, train) = _onnx_fixed(tmp_path, 3), data
    scored = run_cli("evaluate", model, "--data", val, "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert _top1(scored) == pytest.approx(_one_at_a_time_top1(_model(), val))
    out = tmp_path / "out.onnx"
    result = run_cli("retrofit", model, "--data", val, "--finetune", train, "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "takes batches of exactly 3" in result.output
    assert "in batches of 3 instead of --batch-size 4" in result.output
    assert "leaves out the last 1 of 10" in result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"data_0": np.zeros((3, 3, 8, 8), np.float32)})[0].shape == (3, 3)


def test_onnx_graph_with_a_fixed_batch_of_1_is_scored_from_data_without_a_shape(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    scored = run_cli("evaluate", _onnx_fixed(tmp_path, 1), "--data", data[0], "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert _top1(scored) == pytest.approx(_one_at_a_time_top1(_model(), data[0]))


def _onnx_reshape_to_one(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Input ``x: [batch, 6]`` (dynamic), reshaped to ``[1, 6]``: only batch 1 runs."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(
        np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "reshape_to_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.array([1, 6], np.int64), "shape"),
         numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "reshape_one.onnx"
    onnx.save(model, str(path))
    return path, w1, w2


def _tabular(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((n, 6)).astype(np.float32), y=rng.integers(0, 3, n))
    return path


def test_onnx_graph_that_reshapes_a_dynamic_batch_to_one_runs_one_sample_at_a_time(
        tmp_path: Path) -> None:
    model, w1, w2 = _onnx_reshape_to_one(tmp_path)
    val, train = _tabular(tmp_path / "val.npz", 10, 0), _tabular(tmp_path / "train.npz", 7, 1)
    scored = run_cli("evaluate", model, "--data", val, "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert "takes batches of exactly 1" in scored.output
    with np.load(val) as arrays:
        expected = (np.maximum(arrays["x"] @ w1, 0) @ w2).argmax(1) == arrays["y"]
    assert _top1(scored) == pytest.approx(100.0 * expected.mean())
    out = tmp_path / "out.onnx"
    result = run_cli("retrofit", model, "--data", val, "--finetune", train, "--epochs", "1",
                     "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "in batches of 1 instead of --batch-size 64" in result.output
    assert "no sample is left out" in result.output
    assert out.exists()


def test_too_few_training_samples_for_the_fixed_batch_is_one_line(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    model = _onnx_fixed(tmp_path, 3)
    small = _data(tmp_path / "small.npz", 2)
    result = run_cli("retrofit", model, "--data", data[0], "--finetune", small, "--epochs", "1",
                     "--device", "cpu", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 3
    assert "fewer than one batch of exactly 3" in one_line(result)


@pytest.mark.parametrize("fixed", [True, False], ids=["chunked", "reexported"])
def test_input_shape_with_another_batch_than_a_static_pt2_is_bad_input(
        tmp_path: Path, fixed: bool) -> None:
    model = _static_pt2(tmp_path, fixed=fixed)
    result = run_cli("inspect", model, "--input-shape", "2,3,8,8")
    assert result.exit_code == 3
    assert "static batch of 4" in one_line(result)
    assert run_cli("inspect", model, "--input-shape", "4,3,8,8").exit_code == 0


def fixed_model() -> SmallConv:
    """``--arch`` factory: the batch-4-only model."""
    return _model(fixed=True)


def test_eager_module_with_a_fixed_batch_is_probed_from_its_input_shape(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    path = tmp_path / "fixed.state.pt"
    torch.save(_model(fixed=True).state_dict(), path)
    arch = "tests.evaluation.test_fixed_batch:fixed_model"
    (val, train), out = data, tmp_path / "out.pt"
    result = run_cli("retrofit", path, "--arch", arch, "--input-shape", "4,3,8,8", "--data",
                     val, "--finetune", train, "--epochs", "1", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "takes batches of exactly 4 (at one more it fails" in result.output
    assert "in batches of 4 instead of --batch-size 64" in result.output
    assert set(torch.load(out, weights_only=True)) >= set(_model().state_dict())
    # from data alone (batches of 2 and 1) nothing runs: the line says so, not "bad samples"
    scored = run_cli("evaluate", path, "--arch", arch, "--data", val, "--device", "cpu")
    assert scored.exit_code == 3
    line = one_line(scored)
    assert "in batches of 2 or 1" in line and "--input-shape N,3,8,8" in line


class OnlyBatchOf(nn.Module):
    """A linear classifier that refuses any batch but ``size``, in training and validation."""

    def __init__(self, size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.size, self.linear, self.relu = size, nn.Linear(6, 3), nn.ReLU()

    def forward(self, x):
        if x.shape[0] != self.size:
            raise RuntimeError(f"batch {x.shape[0]}")
        return self.relu(self.linear(x))


def _tensors(n: int, seed: int):
    from retrofit.evaluation.datasets.base import TensorClassificationData

    generator = torch.Generator().manual_seed(seed)
    return TensorClassificationData(torch.randn(n, 6, generator=generator),
                                    torch.randint(0, 3, (n,), generator=generator),
                                    source=f"synthetic-{seed}", preprocessing={})


def test_exact_batches_train_and_validate_a_model_that_takes_one_batch_size(tmp_path) -> None:
    from retrofit.training.config import FinetuneConfig
    from retrofit.training.loop import finetune

    config = FinetuneConfig(epochs=2, batch_size=5, exact_batches=True, device="cpu",
                            checkpoint=tmp_path / "a.ckpt")
    result = finetune(OnlyBatchOf(5), _tensors(13, 1), _tensors(7, 2), config)
    assert result.steps == 2 * 2 and result.history[-1].val_top1 is not None


def test_a_checkpoint_from_before_exact_batches_still_resumes(tmp_path) -> None:
    from retrofit.training.checkpoint import load_checkpoint, save_checkpoint
    from retrofit.training.config import FinetuneConfig
    from retrofit.training.loop import finetune

    path = tmp_path / "old.ckpt"
    config = FinetuneConfig(epochs=1, batch_size=4, device="cpu", checkpoint=path)
    finetune(nn.Sequential(nn.Linear(6, 3), nn.ReLU()), _tensors(8, 1), None, config)
    state = load_checkpoint(path)
    del state["config"]["exact_batches"]
    state.pop("format")
    save_checkpoint(path, state)
    resumed = replace(config, resume=True)
    result = finetune(nn.Sequential(nn.Linear(6, 3), nn.ReLU()), _tensors(8, 1), None, resumed)
    assert len(result.history) == 1


def test_exact_batches_note_counts_what_each_epoch_leaves_out() -> None:
    from retrofit.evaluation.batching import exact_batches_note

    assert "last 2 of 10" in exact_batches_note(4, 64, 10)
    assert "last 2 of 10" in exact_batches_note(4, 4, 10, processes=2)  # steps of 8 samples
    assert "no sample is left out" in exact_batches_note(5, 64, 10)
