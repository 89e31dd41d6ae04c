"""ONNX I/O: clear one-line errors for bad files, atomic saves, external data, inputs, parity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from retrofit.config import CompetitiveReLUConfig
from retrofit.errors import (
    BadInputError,
    OutputError,
    ParityError,
    UsageError,
)
from retrofit.onnx_path.io import (
    check_onnx_model,
    external_data_files,
    load_onnx,
    make_onnx_inputs,
    run_onnx,
    save_onnx,
    shape_inference_view,
)
from retrofit.onnx_path.rewrite import rewrite_onnx_relus
from retrofit.verify import OutputParity, compare_outputs

F32 = TensorProto.FLOAT


def small_model(opset: int = 17) -> onnx.ModelProto:
    """x[N, 4] -> MatMul -> Add -> Relu -> y[N, 3], with a few kilobytes of weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "B"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("x", F32, ["N", 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 3])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    text = str(error.value)
    assert text and "\n" not in text and len(text) < 400


# --------------------------------------------------------------------------------------------
# Loading bad files


def test_loading_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match="empty") as error:
        load_onnx(path)
    assert_one_line(error)


def test_loading_a_truncated_file_is_a_bad_input(tmp_path):
    data = small_model().SerializeToString()
    for cut in (len(data) // 2, len(data) - 3, 10):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(BadInputError) as error:
            load_onnx(path)
        assert_one_line(error)
        assert type(error.value) is BadInputError


@pytest.mark.parametrize("seed", range(5))
def test_loading_random_bytes_is_a_bad_input(tmp_path, seed):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(2048))
    with pytest.raises(BadInputError) as error:
        load_onnx(path)
    assert_one_line(error)


def test_loading_text_a_folder_or_a_missing_file_is_a_bad_input(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    for path in (text, tmp_path, tmp_path / "missing.onnx"):
        with pytest.raises(BadInputError) as error:
            load_onnx(path)
        assert_one_line(error)


def test_a_quantized_graph_or_fused_relus_load_as_they_are(tmp_path):
    """Loading refuses only what cannot be read: a model the rewrite refuses can be scored."""
    qdq = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"]),
           helper.make_node("DequantizeLinear", ["xq", "s"], ["y"])]
    fused = [helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft",
                              activation="Relu")]  # fmt: skip
    for name, nodes in (("qdq", qdq), ("fused", fused)):
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", F32, [1, 4])],
            [helper.make_tensor_value_info("y", F32, [1, 4])],
            [numpy_helper.from_array(np.array(0.1, np.float32), "s")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        assert load_onnx(path) == model


# --------------------------------------------------------------------------------------------
# Saving and external data


def test_save_and_load_round_trip_without_external_data(tmp_path):
    model = small_model()
    path = save_onnx(model, tmp_path / "m.onnx")
    assert load_onnx(path) == model
    assert external_data_files(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def test_external_data_round_trip_keeps_data_external_and_the_input_data_untouched(tmp_path):
    model = small_model()
    source = save_onnx(model, tmp_path / "in.onnx", external_data=True, size_threshold=0)
    source_data = tmp_path / "in.onnx.data"
    assert external_data_files(source) == [source_data]
    stored = onnx.load(source, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    before = digest(source_data)

    loaded = load_onnx(source)
    assert loaded == model  # all data in memory, nothing refers to files
    result = rewrite_onnx_relus(loaded, CompetitiveReLUConfig())
    out = save_onnx(result.model, tmp_path / "out.onnx", source=source, size_threshold=0)

    assert digest(source_data) == before
    assert external_data_files(out) == [tmp_path / "out.onnx.data"]
    written = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    reread = load_onnx(out)
    assert reread == result.model
    inputs = make_onnx_inputs(reread)
    assert onnx_parity(model, reread, inputs).relative <= 1e-6
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_saving_onto_the_input_or_its_data_file_is_refused_and_writes_nothing(tmp_path):
    model = small_model()
    source = tmp_path / "in.onnx"
    onnx.save(model, source, save_as_external_data=True, location="out.onnx.data",
              size_threshold=0)  # fmt: skip
    data = tmp_path / "out.onnx.data"
    before = digest(data)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError, match="data file") as error:
        save_onnx(load_onnx(source), tmp_path / "out.onnx", source=source)
    assert_one_line(error)
    with pytest.raises(OutputError, match="input"):
        save_onnx(model, source, source=source)
    assert digest(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_saving_into_a_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_onnx(small_model(), tmp_path / "nowhere" / "m.onnx")


def test_missing_or_truncated_external_data_is_a_bad_input(tmp_path):
    source = save_onnx(small_model(), tmp_path / "m.onnx", external_data=True, size_threshold=0)
    data = tmp_path / "m.onnx.data"
    payload = data.read_bytes()
    data.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(BadInputError) as error:
        load_onnx(source)
    assert_one_line(error)
    data.unlink()
    with pytest.raises(BadInputError, match="missing") as error:
        load_onnx(source)
    assert_one_line(error)


def test_large_models_go_through_a_light_view_for_inference():
    model = small_model()
    big = numpy_helper.from_array(np.zeros((64, 64), np.float32), "big")
    model.graph.initializer.append(big)
    view = shape_inference_view(model)
    assert "big" not in {t.name for t in view.graph.initializer}
    assert "big" in {v.name for v in view.graph.input}
    assert {t.name for t in view.graph.initializer} == {"W", "B"}


# --------------------------------------------------------------------------------------------
# Checking


def test_check_passes_a_valid_model_and_reports_a_broken_one_in_one_line():
    check_onnx_model(small_model())
    broken = small_model()
    broken.graph.node[0].input[1] = "nowhere"
    with pytest.raises(ParityError, match="rewritten model") as error:
        check_onnx_model(broken)
    assert_one_line(error)
    with pytest.raises(BadInputError, match="input model") as error:
        check_onnx_model(broken, is_input=True)
    assert_one_line(error)


def test_strict_shape_inference_catches_what_the_plain_checker_misses():
    model = small_model()
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "B"))
    onnx.checker.check_model(model)  # the plain checker does not look at shapes
    with pytest.raises(ParityError):
        check_onnx_model(model)


# --------------------------------------------------------------------------------------------
# Inputs


def _model_with_inputs(*inputs: onnx.ValueInfoProto) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in inputs]
    outputs = [helper.make_tensor_value_info(f"{v.name}_out", v.type.tensor_type.elem_type, None)
               for v in inputs]  # fmt: skip
    graph = helper.make_graph(nodes, "inputs", list(inputs), outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_follow_declared_shapes_and_types_with_batch_defaulting_to_one():
    model = _model_with_inputs(
        helper.make_tensor_value_info("image", F32, ["batch", 3, 4, 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 5]),
        helper.make_tensor_value_info("half", TensorProto.FLOAT16, [3]),
    )
    inputs = make_onnx_inputs(model, seed=3)
    assert {k: (v.shape, v.dtype) for k, v in inputs.items()} == {
        "image": ((1, 3, 4, 4), np.float32),
        "ids": ((2, 5), np.int64),
        "mask": ((2, 5), np.bool_),
        "half": ((3,), np.float16),
    }
    assert set(np.unique(inputs["ids"])) <= {0, 1}
    again = make_onnx_inputs(model, seed=3)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)
    other = make_onnx_inputs(model, seed=4)
    assert not np.array_equal(inputs["image"], other["image"])
    outputs = run_onnx(model, inputs)
    assert np.array_equal(outputs[0], inputs["image"])


def test_dynamic_dimensions_other_than_batch_need_a_shape():
    model = _model_with_inputs(helper.make_tensor_value_info("x", F32, ["N", "seq", 8]))
    with pytest.raises(UsageError, match="'seq' at axis 1") as error:
        make_onnx_inputs(model)
    assert_one_line(error)
    assert make_onnx_inputs(model, {"x": (2, 7, 8)})["x"].shape == (2, 7, 8)
    with pytest.raises(BadInputError, match="axis 2"):  # a shape the model cannot take
        make_onnx_inputs(model, {"x": (2, 7, 9)})
    with pytest.raises(BadInputError, match="dimensions"):
        make_onnx_inputs(model, {"x": (2, 7)})
    with pytest.raises(UsageError, match="'y'"):
        make_onnx_inputs(model, {"y": (1,)})


# --------------------------------------------------------------------------------------------
# Running and parity


def onnx_parity(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, inputs: dict[str, np.ndarray]
) -> OutputParity:
    return compare_outputs(run_onnx(reference, inputs), run_onnx(candidate, inputs))


def test_run_reports_missing_and_unknown_inputs():
    model = small_model()
    with pytest.raises(UsageError, match="missing input.*'x'"):
        run_onnx(model, {})
    with pytest.raises(UsageError, match="unknown input.*'z'"):
        run_onnx(model, {"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)})


def test_parity_is_zero_for_the_same_model_and_measures_a_changed_one():
    model = small_model()
    inputs = make_onnx_inputs(model, {"x": (5, 4)})
    assert onnx_parity(model, model, inputs).max_abs_diff == 0.0
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(model.graph.initializer[1]) + 0.5, "B")
    )
    parity = onnx_parity(model, changed, inputs)
    assert parity.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert 0 < parity.relative and parity.relative > 1e-3


def test_compare_outputs_treats_matching_nans_as_equal_and_refuses_shape_mismatches():
    nan = np.array([1.0, np.nan, np.inf])
    assert compare_outputs([nan], [nan.copy()]).max_abs_diff == 0.0
    assert compare_outputs([nan], [np.array([1.0, 2.0, np.inf])]).max_abs_diff == np.inf
    assert compare_outputs([np.zeros(3)], [np.full(3, 1e-3)]).relative == pytest.approx(1e-3)
    assert compare_outputs([nan], [nan.copy()]) == OutputParity(0.0, 1.0, 2)
    with pytest.raises(ParityError, match="shape"):
        compare_outputs([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ParityError, match="outputs"):
        compare_outputs([np.zeros(3)], [])


def test_load_keeps_external_data_paths_relative_to_the_model(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    save_onnx(small_model(), folder / "m.onnx", external_data=True, size_threshold=0)
    monkeypatch.chdir(tmp_path)
    model = load_onnx(Path("models") / "m.onnx")
    assert all(not t.external_data for t in model.graph.initializer)
    assert os.path.exists(folder / "m.onnx.data")
