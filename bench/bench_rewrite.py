"""How long the rewrite itself takes on models with many ReLU sites, torch and ONNX paths.

    python bench/bench_rewrite.py [--sites 200 1000] [--repeat 3] [--quick]

torch: ``retrofit_torch_model`` on an ``nn.Sequential`` of ``sites`` blocks
(``Linear(16, 16) -> ReLU``), half of them ``nn.ReLU`` modules and half ``F.relu`` calls inside a
small module, so both the module swap and the traced-graph rewrite are exercised. ONNX:
``rewrite_onnx_relus`` on a chain of ``sites`` ``Conv -> Relu`` blocks ([N, C, H, W], rank
known), as plain nodes and as model-local functions; the ONNX checker, which a pipeline runs once
afterwards, is timed on its own for comparison. Times are the best of ``--repeat`` runs.

Writes ``bench/results/bench_rewrite.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_results  # noqa: E402

from retrofit.config import CompetitiveReLUConfig, MRePUConfig  # noqa: E402
from retrofit.onnx_path.io import check_onnx_model  # noqa: E402
from retrofit.onnx_path.rewrite import rewrite_onnx_relus  # noqa: E402
from retrofit.torch_path.rewrite import retrofit_torch_model  # noqa: E402


class FunctionalBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.linear(x))


def relu_sequential(sites: int, width: int = 16) -> nn.Module:
    """``sites`` ReLU sites: even ones ``nn.ReLU`` modules, odd ones ``F.relu`` calls."""
    layers: list[nn.Module] = []
    for index in range(sites):
        if index % 2:
            layers.append(FunctionalBlock(width))
        else:
            layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def conv_relu_chain(sites: int, channels: int = 8, opset: int = 17) -> ModelProto:
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


def best_of(repeat: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="one repeat, 200 sites")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.device = "cpu"
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sites, args.repeat = [min(args.sites)], 1

    configs = {"carelu": CompetitiveReLUConfig(), "mrepu": MRePUConfig()}
    results: list[dict[str, Any]] = []
    rows = []
    for sites in args.sites:
        model = relu_sequential(sites)
        for label, config in configs.items():
            replaced = sum(s.replaced for s in retrofit_torch_model(model, config).sites)
            seconds = best_of(args.repeat, lambda: retrofit_torch_model(model, config))
            results.append({"path": "torch", "sites": sites, "activation": label,
                            "replaced": replaced, "rewrite_s": seconds})
            rows.append([sites, "torch", label, replaced, seconds * 1e3, "-",
                         seconds / sites * 1e6])
            print(rows[-1], flush=True)
        onnx_model = conv_relu_chain(sites)
        for label, config, as_functions in (("carelu", configs["carelu"], False),
                                            ("carelu as functions", configs["carelu"], True),
                                            ("mrepu", configs["mrepu"], False)):
            def rewrite() -> Any:
                return rewrite_onnx_relus(onnx_model, config, as_functions=as_functions)
            result = rewrite()
            seconds = best_of(args.repeat, rewrite)
            check = best_of(1, lambda: check_onnx_model(result.model))
            replaced = sum(s.replaced for s in result.sites)
            results.append({"path": "onnx", "sites": sites, "activation": label,
                            "replaced": replaced, "rewrite_s": seconds, "checker_s": check,
                            "nodes": len(result.model.graph.node)})
            rows.append([sites, "onnx", label, replaced, seconds * 1e3, check * 1e3,
                         seconds / sites * 1e6])
            print(rows[-1], flush=True)

    columns = ["sites", "path", "activation", "replaced", "rewrite ms", "checker ms",
               "µs per site"]
    notes = [f"best of {args.repeat} runs; torch: nn.Sequential of Linear+ReLU blocks (half "
             "nn.ReLU, half F.relu); onnx: Conv->Relu chain, checker timed separately"]
    write_results("bench_rewrite", args, {"results": results},
                  "Rewrite time on models with many ReLU sites", columns, rows, notes)


if __name__ == "__main__":
    main()
