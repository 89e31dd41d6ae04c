"""retrofit.evaluation.evaluate: hand-checked accuracies, ONNX equals torch, bad data is one clear line."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from retrofit.evaluation.datasets.load import load_dataset
from retrofit.errors import BadInputError, UnsupportedModelError
from retrofit.evaluation.datasets.base import TensorClassificationData
from retrofit.evaluation.evaluate import (
    BatchLogits, device_kept, evaluate, onnx_predictor, torch_predictor,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX")


def _npz(tmp_path: Path, x: np.ndarray, y: np.ndarray, name: str = "d.npz") -> Path:
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def ranked_data(tmp_path: Path):
    """Five samples whose logits (through the model below) are the inputs themselves, so the
    hand count is: top-1 right for samples 0 and 3 (40 %), top-5 right for 0, 1, 3 (60 %)."""
    descending = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    ascending = descending[::-1]
    x = np.array([descending, descending, descending, ascending, ascending])
    y = np.array([0, 1, 5, 5, 0])
    return load_dataset(_npz(tmp_path, x, y))


def _scaled_identity(outputs: int = 6) -> nn.Linear:
    model = nn.Linear(outputs, outputs)
    with torch.no_grad():
        model.weight.copy_(2.0 * torch.eye(outputs))
        model.bias.fill_(-1.0)
    return model


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))


def _export(model: nn.Module, *, batch: int, dynamic: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(batch, 3, 8, 8),),
        buffer,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
    )
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture
def image_batch_data(tmp_path: Path):
    generator = np.random.default_rng(0)
    x = generator.normal(size=(10, 3, 8, 8)).astype(np.float32)
    y = generator.integers(0, 7, size=10)
    return load_dataset(_npz(tmp_path, x, y, "images.npz"))


def test_top1_and_top5_match_a_hand_count(ranked_data) -> None:
    result = evaluate(torch_predictor(_scaled_identity()), ranked_data, batch_size=2)
    assert result.n == 5 and result.num_outputs == 6
    assert result.top1 == pytest.approx(40.0)
    assert result.top5 == pytest.approx(60.0)
    assert result.correct1.tolist() == [True, False, False, True, False]
    assert result.correct5 is not None
    assert result.correct5.tolist() == [True, True, False, True, False]


def test_top5_is_absent_with_five_outputs_or_fewer(tmp_path: Path) -> None:
    data = load_dataset(_npz(tmp_path, np.eye(3), np.array([0, 1, 1])))
    result = evaluate(torch_predictor(_scaled_identity(3)), data)
    assert result.top1 == pytest.approx(200 / 3)
    assert result.top5 is None and result.correct5 is None


def test_labels_beyond_the_outputs_are_refused_before_scoring(tmp_path: Path) -> None:
    data = load_dataset(_npz(tmp_path, np.zeros((4, 6)), np.array([0, 1, 6, 2])))
    with pytest.raises(BadInputError, match="go up to 6 but the model has 6 outputs"):
        evaluate(torch_predictor(_scaled_identity()), data)


def test_data_of_the_wrong_shape_is_one_clear_line(ranked_data) -> None:
    message = r"data samples of shape \(6,\) do not fit the model"
    with pytest.raises(BadInputError, match=message) as info:
        evaluate(torch_predictor(nn.Linear(4, 6)), ranked_data)
    assert "\n" not in str(info.value)


def test_broken_image_is_named_even_from_a_worker_process(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not a png")
    data = load_dataset(tmp_path)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    for workers in (0, 1):
        with pytest.raises(BadInputError, match=r"b/1\.png") as info:
            evaluate(torch_predictor(model), data, num_workers=workers)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_onnx_predictor_equals_torch_predictor(image_batch_data) -> None:
    model = _conv_model()
    batch = torch.stack([image_batch_data[i][0] for i in range(10)])
    via_torch = torch_predictor(model)(batch)
    via_onnx = onnx_predictor(_export(model, batch=2, dynamic=True))(batch)
    assert via_onnx.dtype == torch.float32 and via_onnx.shape == (10, 7)
    torch.testing.assert_close(via_onnx, via_torch, atol=1e-5, rtol=1e-5)
    by_torch = evaluate(torch_predictor(model), image_batch_data, batch_size=4)
    exported = onnx_predictor(_export(model, batch=2, dynamic=True))
    by_onnx = evaluate(exported, image_batch_data, batch_size=4)
    assert torch.equal(by_onnx.correct1, by_torch.correct1)
    assert by_onnx.top5 == by_torch.top5


def test_onnx_with_a_fixed_batch_is_fed_padded_batches(image_batch_data) -> None:
    model = _conv_model()
    predictor = onnx_predictor(_export(model, batch=4, dynamic=False))
    assert predictor.fixed_batch == 4
    batch = torch.stack([image_batch_data[i][0] for i in range(10)])
    expected = torch_predictor(model)(batch)
    torch.testing.assert_close(predictor(batch), expected, atol=1e-5, rtol=1e-5)
    result = evaluate(predictor, image_batch_data, batch_size=3)
    assert result.n == 10


def test_onnx_shape_mismatch_is_bad_input(tmp_path: Path) -> None:
    predictor = onnx_predictor(_export(_conv_model(), batch=2, dynamic=True))
    data = load_dataset(_npz(tmp_path, np.zeros((3, 1, 8, 8)), np.array([0, 1, 2])))
    with pytest.raises(BadInputError, match=r"\(1, 8, 8\) do not fit the model: .*\(N, 3, 8, 8\)"):
        evaluate(predictor, data)


def test_onnx_model_with_two_inputs_is_unsupported() -> None:
    x = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 2])
    z = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 2])
    out = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 2])
    add = onnx.helper.make_node("Add", ["a", "b"], ["c"])
    graph = onnx.helper.make_graph([add], "g", [x, z], [out])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        onnx_predictor(model)


def test_progress_bar_is_silent_off_a_terminal_and_shown_when_forced(ranked_data, capsys) -> None:
    evaluate(torch_predictor(_scaled_identity()), ranked_data)
    assert capsys.readouterr().err == ""
    result = evaluate(torch_predictor(_scaled_identity()), ranked_data, progress=True)
    assert result.top1 == pytest.approx(40.0)


def test_batch_logits_keep_the_model_output_and_turn_what_does_not_fit_into_one_line() -> None:
    """The one call that evaluation and every fine-tuning step make: (batch, classes, 1, 1)
    logits are squeezed with autograd kept, and every later batch is checked like the first."""
    data = TensorClassificationData(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 4]),
                                    source="d.npz", preprocessing={})
    conv = nn.Conv2d(3, 5, 8)
    batch_logits = BatchLogits(conv, data)
    logits, labels = batch_logits(data.x[:2], [0, 1])
    assert logits.shape == (2, 5) and logits.requires_grad and labels.dtype == torch.int64
    with pytest.raises(BadInputError, match=r"samples of shape \(1, 8, 8\) do not fit") as info:
        batch_logits(torch.zeros(2, 1, 8, 8), [0, 1])  # not the first batch: still one line
    assert "\n" not in str(info.value)
    widths = iter([5, 6])
    growing = BatchLogits(lambda x: torch.zeros(x.shape[0], next(widths)), data)
    growing(data.x[:2], [0, 1])
    with pytest.raises(BadInputError, match="gave 6 outputs for one batch and 5 for an earlier"):
        growing(data.x[2:], [2, 4])
    with pytest.raises(BadInputError, match="labels in d.npz go up to 4 but the model has 4"):
        BatchLogits(nn.Conv2d(3, 4, 8), data)(data.x[:2], [0, 1])


class _MovesRecorded(nn.Linear):
    """Records where it is moved: the only device here is the CPU, so a move to a GPU is seen
    as the call, not as tensors on another device."""

    def __init__(self) -> None:
        super().__init__(4, 3)
        self.moves: list[object] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.moves.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)


@pytest.mark.parametrize("fails", [False, True])
def test_a_scored_module_goes_back_to_its_device(fails) -> None:
    """Scoring on a GPU moves the module there in place; what runs next (the overflow probe,
    saving, export) feeds it CPU inputs, so scoring must give it back where it was."""
    module = _MovesRecorded()
    data = TensorClassificationData(torch.randn(8, 4), torch.randint(0, 3, (8,)), source="d.npz",
                                    preprocessing={})
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with device_kept(module):
            evaluate(torch_predictor(module, device="cpu"), data, batch_size=4)
            if fails:
                raise RuntimeError("scoring failed")
    assert module.moves[-1] == torch.device("cpu")
    assert len(module.moves) == 2  # onto the scoring device, and back


def test_device_kept_passes_other_models_through() -> None:
    with device_kept(onnx.ModelProto()):
        pass
