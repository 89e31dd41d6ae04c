"""The benchmark scripts' promises that need neither a GPU nor a clock: the GPU benchmark, which
is run where device time is scarce, says in one line that it has no CUDA device and stops with
exit code 2 before it measures or writes anything."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_bench_without_cuda_exits_2_with_one_line_before_any_work(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--out", str(out)],
                          cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith(
        "bench_gpu.py: --device cuda: no CUDA device")
    assert not out.exists()
