"""How long the ONNX rewrite takes on models with many ReLU sites.

    python bench/bench_onnx_rewrite.py [--sites 200 1000] [--repeat 5]

Each model is a chain of ``Conv -> Relu`` blocks on a [N, C, H, W] tensor (rank known, so
CompetitiveReLU reduces over the sample's axes). The time is the best of ``--repeat`` runs of
``rewrite_onnx_relus`` alone; the ONNX checker, which a pipeline runs once afterwards, is timed
on its own for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.config import CompetitiveReLUConfig, MRePUConfig  # noqa: E402
from retrofit.onnx_io import check_onnx_model  # noqa: E402
from retrofit.onnx_rewrite import rewrite_onnx_relus  # noqa: E402


def conv_relu_chain(sites: int, channels: int = 8, opset: int = 17):
    """``sites`` Conv -> Relu blocks sharing one 1x1 kernel."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((channels, channels, 1, 1)) * 0.3).astype(np.float32)
    nodes, value = [], "x"
    for k in range(sites):
        nodes.append(helper.make_node("Conv", [value, "kernel"], [f"c{k}"], name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"))
        value = f"r{k}"
    nodes.append(helper.make_node("Identity", [value], ["y"], name="out"))
    shape = ["N", channels, 8, 8]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(kernel, "kernel")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def best_of(repeat: int, work) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cases = [
        ("carelu", CompetitiveReLUConfig(), False),
        ("carelu as functions", CompetitiveReLUConfig(), True),
        ("mrepu", MRePUConfig(), False),
    ]
    print(f"{'sites':>6}  {'activation':<20} {'rewrite':>10} {'checker':>10} {'nodes':>7}")
    for sites in args.sites:
        model = conv_relu_chain(sites)
        for label, config, as_functions in cases:
            result = rewrite_onnx_relus(model, config, as_functions=as_functions)
            rewrite = best_of(
                args.repeat,
                lambda: rewrite_onnx_relus(model, config, as_functions=as_functions),
            )
            check = best_of(1, lambda: check_onnx_model(result.model))
            nodes = len(result.model.graph.node)
            print(
                f"{sites:>6}  {label:<20} {rewrite * 1e3:>8.1f}ms {check * 1e3:>8.1f}ms {nodes:>7}"
            )


if __name__ == "__main__":
    main()
