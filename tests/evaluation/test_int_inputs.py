"""Integer inputs (token ids): ``--input-shape ...:int64``, integer ``.npz`` data fed as int64 to
models that take ids (torch and ONNX, scoring and fine-tuning), and uint8 images fed to float
models as pixels scaled to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from retrofit.errors import UsageError
from retrofit.evaluation.evaluate import onnx_predictor
from retrofit.inputs import (
    InputShape, embedding_bound, embedding_inputs, random_inputs, table_bounds,
)
from retrofit.onnx_path.io import gather_bound, make_onnx_inputs
from tests.conftest import one_line, run_cli

VOCAB, LENGTH, CLASSES = 50, 16, 3


class EmbeddingClassifier(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):  # unannotated: see the note on pickled fx graphs in the report
        return self.head(self.relu(self.hidden(self.embed(x).mean(1))))


def _model() -> EmbeddingClassifier:
    torch.manual_seed(0)
    return EmbeddingClassifier().eval()


def _ids(path: Path, n: int = 10, seed: int = 0, dtype: type = np.int64) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, VOCAB, (n, LENGTH)).astype(dtype),
             y=rng.integers(0, CLASSES, n))
    return path


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return _ids(tmp_path / "val.npz"), _ids(tmp_path / "train.npz", seed=1)


def _top1(result) -> float:
    return float(result.stdout.split("top-1 ")[1].split("%")[0])


def _reference_top1(path: Path) -> float:
    with np.load(path) as arrays:
        x, y = torch.from_numpy(arrays["x"]).long(), torch.from_numpy(arrays["y"])
    with torch.no_grad():
        return 100.0 * float((_model()(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("text, expected", [
    ("2,16", InputShape((2, 16))),
    ("2,16:int64", InputShape((2, 16), None, torch.int64)),
    ("input_ids:2,16:int64", InputShape((2, 16), "input_ids", torch.int64)),
    ("image:1,3,8,8", InputShape((1, 3, 8, 8), "image")),
    ("mask:2,16:bool", InputShape((2, 16), "mask", torch.bool)),
    ("input:0:1,4:bfloat16", InputShape((1, 4), "input:0", torch.bfloat16)),
])
def test_input_shape_parses_name_dims_and_type(text: str, expected: InputShape) -> None:
    assert InputShape.parse(text) == expected


@pytest.mark.parametrize("text", ["2,16:int", "2,16:uint7", "ids::int64", "2,a:int64"])
def test_input_shape_with_a_bad_type_or_shape_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        InputShape.parse(text)


def test_integer_sample_inputs_stay_inside_the_smallest_embedding_table() -> None:
    model = _model()
    assert embedding_bound(model) == VOCAB
    exported = torch.export.export(model, (torch.zeros(2, LENGTH, dtype=torch.int64),))
    assert embedding_bound(exported.module()) == VOCAB
    (ids,) = random_inputs([InputShape((64, LENGTH), dtype=torch.int64)], index_bound=VOCAB)
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    assert int(ids.max()) > 1  # not just 0 and 1
    assert embedding_inputs(model, (torch.randn(2, LENGTH),)) == {0}
    assert embedding_inputs(nn.Linear(LENGTH, 2), (torch.randn(2, LENGTH),)) == set()


class _TwoTables(nn.Module):
    """BERT's pattern: token ids index a large vocabulary, segment ids a table of two."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(50, 4)
        self.segments = nn.Embedding(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.words(ids) + self.segments(segments)).mean(1))


def test_each_integer_input_is_bounded_by_the_table_it_indexes() -> None:
    model = _TwoTables()
    inputs = (torch.zeros(2, LENGTH, dtype=torch.int64), torch.zeros(2, LENGTH, dtype=torch.int64))
    assert embedding_bound(model) == 2
    assert table_bounds(model, inputs) == [50, 2]
    assert table_bounds(torch.export.export(model, inputs).module(), inputs) == [50, 2]
    ids, segments = random_inputs([InputShape((8, LENGTH), dtype=torch.int64)] * 2,
                                  index_bound=[50, 2])
    assert int(ids.max()) > 1 and int(ids.max()) < 50 and int(segments.max()) <= 1


class _ViewedIds(nn.Module):
    """OPT's and GPT-2's pattern: the ids are reshaped (a view) before the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.view(-1, ids.shape[-1])
        return self.fc(torch.relu(self.embed(flat)).mean(1))


def test_ids_viewed_before_their_lookup_are_still_found_as_token_ids() -> None:
    model = _ViewedIds()
    assert embedding_inputs(model, (torch.randn(2, LENGTH),)) == {0}
    assert table_bounds(model, (torch.zeros(2, LENGTH, dtype=torch.int64),)) == [40]


def _pt2(tmp_path: Path) -> Path:
    path = tmp_path / "embed.pt2"
    torch.export.save(torch.export.export(_model(), (torch.zeros(2, LENGTH, dtype=torch.int64),)),
                      path)
    return path


def _onnx(tmp_path: Path) -> Path:
    path = tmp_path / "embed.onnx"
    torch.onnx.export(_model(), (torch.zeros(2, LENGTH, dtype=torch.int64),), str(path),
                      dynamo=False, input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.mark.parametrize("make", [_pt2, _onnx], ids=["pt2", "onnx"])
def test_embedding_classifier_is_scored_and_fine_tuned_on_integer_data(
        tmp_path: Path, data: tuple[Path, Path], make) -> None:
    model, (val, train) = make(tmp_path), data
    scored = run_cli("evaluate", model, "--data", val, "--batch-size", "4", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert _top1(scored) == pytest.approx(_reference_top1(val))
    out = tmp_path / f"out{model.suffix}"
    result = run_cli("retrofit", model, "--data", val, "--finetune", train, "--epochs", "1",
                     "--batch-size", "4", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_onnx_token_inputs_are_bounded_by_the_table_they_index(tmp_path: Path) -> None:
    model = onnx.load(str(_onnx(tmp_path)))
    assert gather_bound(model, "input_ids") == VOCAB
    ids = make_onnx_inputs(model, {"input_ids": (64, LENGTH)})["input_ids"]
    assert ids.dtype == np.int64 and ids.max() < VOCAB and ids.max() > 1
    logits = onnx_predictor(model)(torch.from_numpy(ids[:4]))
    assert logits.shape == (4, CLASSES)


def test_pickled_embedding_model_takes_an_int64_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "embed.pt"
    torch.save(_model(), path)
    given = run_cli("inspect", path, "--trust-pickle", "--input-shape", f"x:2,{LENGTH}:int64")
    assert given.exit_code == 0, given.output
    inferred = run_cli("inspect", path, "--trust-pickle", "--input-shape", f"2,{LENGTH}")
    assert inferred.exit_code == 0, inferred.output
    assert "goes straight into an embedding" in inferred.output
    assert "add :int64" in inferred.output


def test_pickled_embedding_model_fine_tunes_on_integer_data_without_a_shape(
        tmp_path: Path, data: tuple[Path, Path]) -> None:
    path = tmp_path / "embed.pt"
    torch.save(_model(), path)
    result = run_cli("retrofit", path, "--trust-pickle", "--data", data[0], "--finetune",
                     data[1], "--epochs", "1", "--device", "cpu", "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result.output
    assert "identity parity" in result.output


def test_float_data_for_a_token_id_model_is_one_line(tmp_path: Path) -> None:
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.random.default_rng(0).random((6, LENGTH)).astype(np.float32),
             y=np.zeros(6, np.int64))
    result = run_cli("evaluate", _pt2(tmp_path), "--data", floats, "--device", "cpu")
    assert result.exit_code == 3
    line = one_line(result)
    assert "floats.npz" in line and "store x as integers" in line


def test_mean_and_std_with_token_ids_is_a_usage_error(tmp_path: Path, data) -> None:
    result = run_cli("evaluate", _onnx(tmp_path), "--data", data[0], "--mean", "0.5",
                     "--device", "cpu")
    assert result.exit_code == 2
    assert "--mean/--std apply to float inputs" in one_line(result)


def test_input_shape_type_that_contradicts_the_model_is_bad_input(tmp_path: Path) -> None:
    result = run_cli("inspect", _onnx(tmp_path), "--input-shape", f"input_ids:2,{LENGTH}:float32")
    assert result.exit_code == 3
    assert "int64" in one_line(result)


def test_uint8_images_are_fed_to_a_float_model_as_pixels_over_255(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, 2, 2),)), path)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 3, 2, 2)).astype(np.uint8)
    labels = np.random.default_rng(1).integers(0, 3, 10)
    np.savez(tmp_path / "u8.npz", x=pixels, y=labels)
    np.savez(tmp_path / "f32.npz", x=pixels.astype(np.float32) / 255, y=labels)
    as_uint8 = run_cli("evaluate", path, "--data", tmp_path / "u8.npz", "--device", "cpu")
    as_float = run_cli("evaluate", path, "--data", tmp_path / "f32.npz", "--device", "cpu")
    assert as_uint8.exit_code == 0 and as_float.exit_code == 0, as_uint8.output
    assert _top1(as_uint8) == _top1(as_float)
    assert "u8.npz is uint8: fed as pixels scaled to [0, 1]" in as_uint8.stdout


@pytest.mark.parametrize("elem_type", [onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                       onnx.TensorProto.BOOL], ids=["int64", "int32", "bool"])
def test_onnx_predictor_feeds_the_integer_type_the_graph_declares(elem_type: int) -> None:
    from onnx import helper, numpy_helper

    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=onnx.TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["logits"])], "cast_matmul",
        [helper.make_tensor_value_info("ids", elem_type, ["batch", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    batch = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.int64)
    logits = onnx_predictor(model)(batch)
    assert torch.allclose(logits, batch.float() @ torch.from_numpy(weights))
