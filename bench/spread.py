"""The spread of the benchmark ratios over repeated runs: median, lowest and highest per ratio.

    python bench/spread.py --tags r1 r2 r3

Reads ``bench/results/{bench_inference,bench_training,bench_floor}_<tag>.json`` for each tag
(runs made with ``--tag``; a missing file is skipped and said so) and writes
``bench/results/spread.json`` and ``.md``. One run's ratio on a shared machine can be off by
tens of percent; the README quotes the median with the range over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, markdown_table  # noqa: E402

Ratio = tuple[str, str, float]
"""(what was measured, which ratio, its value) from one run."""


def inference_ratios(document: dict[str, Any]) -> Iterator[Ratio]:
    for result in document["results"]:
        if "summary" not in result:
            continue
        where = f"{result['model']} batch {result['batch']} {result['backend']}"
        for variant in ("carelu", "mrepu"):
            summary = result["summary"][variant]
            yield where, f"{variant} time ×relu", summary["ratio"]
            if summary.get("memory_ratio") is not None:
                yield where, f"{variant} peak memory ×relu", summary["memory_ratio"]


def training_ratios(document: dict[str, Any]) -> Iterator[Ratio]:
    for result in document["results"]:
        where = f"{result['model']} training batch {result['batch']}"
        for variant, summary in result["summary"].items():
            if variant != "relu":
                yield where, f"{variant} throughput ×relu", summary["throughput_ratio"]
                yield where, f"{variant} peak memory ×relu", summary["memory_ratio"]


def floor_ratios(document: dict[str, Any]) -> Iterator[Ratio]:
    for group in document["groups"]:
        where = "floor, " + "×".join(map(str, group["shape"]))
        for variant in ("activation", "relu"):
            yield where, f"{variant} ×floor", group["summary"][variant]["ratio"]


READERS = {"bench_inference": inference_ratios, "bench_training": training_ratios,
           "bench_floor": floor_ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    values: dict[tuple[str, str], list[float]] = {}
    runs: dict[str, list[str]] = {}
    for name, read in READERS.items():
        for tag in args.tags:
            path = args.out / f"{name}_{tag}.json"
            if not path.exists():
                print(f"skipped: no {path.name}")
                continue
            document = json.loads(path.read_text())
            runs.setdefault(name, []).append(document["environment"]["date"])
            for where, ratio, value in read(document):
                values.setdefault((where, ratio), []).append(value)
    rows = [[where, ratio, len(vs), statistics.median(vs), min(vs), max(vs)]
            for (where, ratio), vs in values.items()]
    payload = {"tags": args.tags, "runs": runs,
               "ratios": [dict(zip(("where", "ratio", "runs", "median", "low", "high"), row))
                          for row in rows]}
    (args.out / "spread.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(["measured", "ratio", "runs", "median", "lowest", "highest"], rows)
    when = "; ".join(f"{name}: {', '.join(dates)}" for name, dates in runs.items())
    text = (f"# Benchmark ratios over repeated runs\n\nruns ({', '.join(args.tags)}) started "
            f"at {when}\n\n{table}\n")
    (args.out / "spread.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
