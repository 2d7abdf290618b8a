"""Every Triton kernel compiles for real GPUs (sm_90 and sm_80), checked without a GPU.

The CPU interpreter runs the kernels' arithmetic but never lowers them: a kernel that the interpreter
accepts can still fail in ptxas, or need more shared memory than the GPU has. `kernel_report.py`
drives the real launchers with Triton's driver replaced by a compile-only stand-in.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, subprocess_env

pytest.importorskip("triton")

GEMM_KERNELS = {"_cond_kernel", "_linear_kernel", "_modulate_kernel", "_score_kernel"}


@pytest.mark.parametrize("arch, dtype, widths", [(90, "bfloat16", ["192", "3584"]), (80, "float16", ["1536"])])
def test_every_kernel_compiles_for_the_gpu(tmp_path: Path, arch: int, dtype: str, widths: list):
    out = tmp_path / "kernels.csv"
    proc = subprocess.run([sys.executable, str(Path(ROOT) / "benchmarks" / "kernel_report.py"), "--arch", str(arch),
                           "--dtype", dtype, "--csv", str(out), "--widths", *widths], capture_output=True, text=True,
                          timeout=900, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    names = {row["kernel"] for row in rows}
    assert GEMM_KERNELS <= names
    assert len(names) >= 15  # 5 scoring and 10 training kernels (the report fails if one never launched)
    assert all(row["arch"] == f"sm_{arch}" and row["dtype"] == dtype and row["fits"] == "yes" for row in rows)
    # the real widths compile their own variants (row tiles of the training kernels, RMS slots of the scoring)
    assert {row["width"] for row in rows} == set(widths)
    assert {"LAYER=0", "LAYER=1", "LAYER=2"} <= {c for row in rows for c in row["constexprs"].split()}
    # the GEMMs run on Hopper's warpgroup tensor cores on sm_90, and cannot on sm_80
    uses_wgmma = {row["wgmma"] == "True" for row in rows if row["kernel"] in GEMM_KERNELS}
    assert uses_wgmma == {arch >= 90}
    # every autotune config of the GEMMs is compiled, not only the first
    assert len({row["constexprs"] for row in rows if row["kernel"] == "_linear_kernel"}) >= 3 * 3


def test_report_refuses_an_old_arch():
    proc = subprocess.run([sys.executable, str(Path(ROOT) / "benchmarks" / "kernel_report.py"), "--arch", "70"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2 and "--arch" in proc.stderr
