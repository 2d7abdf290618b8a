"""`bash benchmarks/gpu_check.sh --dry-run`: every step on CPU at toy size, in the GPU window's order and budget."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import ROOT, subprocess_env

ORDER = ["install", "versions", "cuda-tests", "scores-7B", "scores-1.5B", "train-7B", "train-1.5B", "shaping",
         "compile-scores", "compile-train", "targets"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=subprocess_env(PYTHON=__import__("sys").executable, **env))


def test_dry_run_runs_every_step_in_order_within_budget():
    proc = _run("--dry-run")
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    planned = re.findall(r"^    (\S+)  cap (\d+)s", text, flags=re.M)
    assert [name for name, _ in planned] == ORDER
    mandatory = sum(int(cap) for name, cap in planned if not name.startswith("compile"))
    assert f"planned caps: {mandatory}s of 420s" in text and mandatory <= 420
    ran = re.findall(r"^=== (\S+)(?: \(limit (\d+)s\)|: SKIPPED \(dry run)", text, flags=re.M)
    assert [name for name, _ in ran] == ORDER
    for name in ORDER:
        if not name.startswith("compile"):
            assert re.search(rf"^=== {re.escape(name)}: exit 0 after \d+s$", text, flags=re.M), name
    assert "triton" in text and "GEMM chain" in text and "written to" in text  # rows were measured and judged


def test_budget_logic_skips_what_no_longer_fits():
    proc = _run("--dry-run", FLOWKERN_GPU_BUDGET_S="5")
    assert proc.returncode == 1
    assert re.search(r"^=== install: SKIPPED, \d+s of the 5s budget left", proc.stdout, flags=re.M)
    assert "exit 0 after" not in proc.stdout
    assert _run("--bogus").returncode == 2
