"""The CUDA extension flowkern._C: fused reward shaping and advantages (csrc/shaping.cu).

CPU (runs in CI): the extension is built and importable when FLOWKERN_EXPECT_CUDA_EXT=1; every
entry point validates dtype, shape and device with errors that name the argument; the build
switches of setup.py skip with one line; the benchmark runs at a toy size.

GPU (marked cuda): agreement with the torch backend on random batches and on the edge cases
(empty and length-1 rows, constant rows, ties at the k-th value, k > survivors, one-sided
survivors in the two-sided modes, zero-std groups, γ < 1), for every norm mode, through both the
shared-memory and the global-scratch paths, and the one-launch fused op.
"""

from __future__ import annotations

import os
import subprocess
import sys
from csv import DictReader
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowkern
from flowkern import FlowConfig, backend
from flowkern.config import NORM_MODES
from flowkern.reward import _normalise, shape_advantages, shape_rewards
from flowkern.testing import assert_close

ROOT = Path(__file__).resolve().parent.parent

try:
    from flowkern import _C
except ImportError as exc:  # not built: the CPU build tests skip unless CI expects it
    _C = None
    _IMPORT_ERROR = str(exc)

needs_ext = pytest.mark.skipif(_C is None, reason="flowkern._C is not built")
DEVICE = "cuda"


def _expect_ext() -> bool:
    return os.environ.get("FLOWKERN_EXPECT_CUDA_EXT", "") == "1"


# --------------------------------------------------------------------------- CPU: build and import

def test_extension_is_built_when_expected():
    if _C is None:
        if _expect_ext():
            pytest.fail(f"FLOWKERN_EXPECT_CUDA_EXT=1 but flowkern._C does not import: {_IMPORT_ERROR}")
        pytest.skip("flowkern._C is not built (set FLOWKERN_EXPECT_CUDA_EXT=1 to require it)")
    import flowkern.ops  # noqa: F401  (registers the fused backends)

    assert dict(_C.NORM_CODES).keys() == set(NORM_MODES)
    for name in ("shape_rewards", "shape_advantages", "shape_rewards_and_advantages", "kernel_unavailable_reason"):
        assert callable(getattr(_C, name))
    # the ops module registered the cuda backend of both ops
    assert "cuda" in backend._REGISTRY["shape_rewards"] and "cuda" in backend._REGISTRY["shape_advantages"]
    assert ("shape_rewards", "cuda") not in backend._LOAD_ERRORS


@needs_ext
def test_cuda_backend_needs_cuda_tensors():
    cpu = torch.device("cpu")
    assert "need CUDA tensors" in backend.unavailable_reason("shape_rewards", "cuda", cpu)
    assert backend.resolve("shape_rewards", "auto", cpu)[0] == "torch"
    assert backend.resolve("shape_advantages", "auto", cpu)[0] == "torch"
    scores, mask = torch.rand(2, 8), torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for shape_rewards on cpu: .*CUDA tensors"):
        shape_rewards(scores, mask, FlowConfig(), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for shape_advantages on cpu"):
        shape_advantages(torch.rand(2), scores, mask, 2, backend="cuda")
    from flowkern.ops.shaping import shape_rewards_and_advantages
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        shape_rewards_and_advantages(scores, mask, torch.rand(2), FlowConfig(), 2)


def _cpu_inputs(B: int = 4, T: int = 16):
    return torch.rand(B, T), torch.ones(B, T, dtype=torch.bool), torch.rand(B)


@needs_ext
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_cpu_tensors_raise_naming_the_argument(mask_dtype):
    scores, mask, outcome = _cpu_inputs()
    mask = mask.to(mask_dtype)
    with pytest.raises(RuntimeError, match=r"shape_rewards: scores must be a CUDA tensor, got a tensor on cpu"):
        _C.shape_rewards(scores, mask, 0, 0.6, 15, 0.01)
    with pytest.raises(RuntimeError, match=r"shape_advantages: outcome must be a CUDA tensor, got a tensor on cpu"):
        _C.shape_advantages(outcome, scores, mask, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"shape_rewards_and_advantages: scores must be a CUDA tensor"):
        _C.shape_rewards_and_advantages(scores, mask, outcome, 1, 0.6, 15, 0.01, 2, 1.0)


@needs_ext
def test_dtype_errors_name_the_argument():
    scores, mask, outcome = _cpu_inputs()
    cases = [
        (lambda: _C.shape_rewards(scores.double(), mask, 0, 0.6, 15, 0.01), "scores must be a float32 tensor, got dtype Double"),
        (lambda: _C.shape_rewards(scores.half(), mask, 0, 0.6, 15, 0.01), "scores must be a float32 tensor, got dtype Half"),
        (lambda: _C.shape_rewards(scores, mask.float(), 0, 0.6, 15, 0.01), "action_mask must be a bool or uint8 tensor, got dtype Float"),
        (lambda: _C.shape_rewards(scores, mask.int(), 0, 0.6, 15, 0.01), "action_mask must be a bool or uint8 tensor, got dtype Int"),
        (lambda: _C.shape_advantages(outcome.double(), scores, mask, 2), "outcome must be a float32 tensor"),
        (lambda: _C.shape_advantages(outcome, scores.bfloat16(), mask, 2), "token_rewards must be a float32 tensor"),
        (lambda: _C.shape_advantages(outcome, scores, mask.long(), 2), "action_mask must be a bool or uint8 tensor"),
        (lambda: _C.shape_rewards_and_advantages(scores, mask, outcome.long(), 0, 0.6, 15, 0.01, 2), "outcome must be a float32 tensor"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()


@needs_ext
def test_shape_and_value_errors_name_the_argument():
    scores, mask, outcome = _cpu_inputs()
    cases = [
        (lambda: _C.shape_rewards(scores[0], mask[0], 0, 0.6, 15, 0.01), r"scores must be \[B, T\], got shape \[16\]"),
        (lambda: _C.shape_rewards(scores[None], mask[None], 0, 0.6, 15, 0.01), r"scores must be \[B, T\], got shape \[1, 4, 16\]"),
        (lambda: _C.shape_rewards(scores, mask[:, :8], 0, 0.6, 15, 0.01), r"action_mask must have the shape of scores \[4, 16\], got \[4, 8\]"),
        (lambda: _C.shape_rewards(scores, mask, 4, 0.6, 15, 0.01), "norm must be a code of _C.NORM_CODES"),
        (lambda: _C.shape_rewards(scores, mask, 0, 0.6, -1, 0.01), "topk must be a non-negative int"),
        (lambda: _C.shape_rewards(scores, mask, 0, float("nan"), 15, 0.01), "threshold must not be NaN"),
        (lambda: _C.shape_rewards(scores, mask, 0, 0.6, 15, float("inf")), "coef must be finite"),
        (lambda: _C.shape_advantages(outcome[:3], scores, mask, 2), r"outcome must have shape \[4\]"),
        (lambda: _C.shape_advantages(outcome[None], scores, mask, 2), r"outcome must be \[B\]"),
        (lambda: _C.shape_advantages(outcome, scores[0], mask[0], 2), r"token_rewards must be \[B, T\]"),
        (lambda: _C.shape_advantages(outcome, scores, mask.T, 2), r"action_mask must have the shape of token_rewards"),
        (lambda: _C.shape_advantages(outcome, scores, mask, 3), r"group_size \(3\) must divide the batch size B \(4\)"),
        (lambda: _C.shape_advantages(outcome, scores, mask, 0), "group_size must be a positive int"),
        (lambda: _C.shape_advantages(outcome, scores, mask, 2, 1.5), r"gamma must lie in \[0, 1\]"),
        (lambda: _C.shape_rewards_and_advantages(scores, mask, outcome[:2], 0, 0.6, 15, 0.01, 2), r"outcome must have shape \[4\]"),
        (lambda: _C.shape_rewards_and_advantages(scores, mask, outcome, 0, 0.6, 15, 0.01, 2, -0.1), "gamma must lie"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def _run_setup(env_update: dict, hide_nvcc: bool = False) -> subprocess.CompletedProcess:
    """`python setup.py --name` in a clean environment; optionally with every nvcc made invisible."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWKERN_BUILD_CUDA"}
    env.update(env_update)
    prelude = ""
    if hide_nvcc:  # no CUDA_HOME, no nvcc on PATH, and no */bin/nvcc anywhere (/usr/local/cuda included)
        env.pop("CUDA_HOME", None)
        env.pop("CUDA_PATH", None)
        prelude = ("import os, shutil\n"
                   "_isfile = os.path.isfile\n"
                   "os.path.isfile = lambda p: False if os.path.basename(str(p)) == 'nvcc' else _isfile(p)\n"
                   "shutil.which = lambda *a, **k: None\n")
    code = prelude + "import runpy, sys\nsys.argv = ['setup.py', '--name']\nrunpy.run_path('setup.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _flowkern_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("flowkern:")]


def test_setup_skips_with_one_line_when_switched_off():
    proc = _run_setup({"FLOWKERN_BUILD_CUDA": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _flowkern_lines(proc.stderr)
    assert len(lines) == 1 and "skipping the CUDA extension flowkern._C (FLOWKERN_BUILD_CUDA=0)" in lines[0], proc.stderr


def test_setup_rejects_a_bad_switch():
    proc = _run_setup({"FLOWKERN_BUILD_CUDA": "yes"})
    assert proc.returncode != 0 and "FLOWKERN_BUILD_CUDA must be 0 or 1" in proc.stderr


def test_setup_without_nvcc_skips_or_fails_when_required():
    proc = _run_setup({}, hide_nvcc=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _flowkern_lines(proc.stderr)
    assert len(lines) == 1 and "skipping the CUDA extension" in lines[0], proc.stderr
    if torch.version.cuda:
        assert "nvcc not found" in lines[0] and "/usr/local/cuda: no bin/nvcc" in lines[0]
    proc = _run_setup({"FLOWKERN_BUILD_CUDA": "1"}, hide_nvcc=True)
    assert proc.returncode != 0
    assert "FLOWKERN_BUILD_CUDA=1 but the CUDA extension cannot be built" in proc.stderr


def test_setup_skips_when_nvcc_does_not_match_torch(tmp_path):
    if not torch.version.cuda:
        pytest.skip("torch has no CUDA: setup.py stops before looking for nvcc")
    other = int(torch.version.cuda.split(".")[0]) - 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.4, V{other}.4.99'\n")
    nvcc.chmod(0o755)
    proc = _run_setup({"CUDA_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _flowkern_lines(proc.stderr)
    assert len(lines) == 1 and f"nvcc {other}.4 in {tmp_path} does not match the CUDA {torch.version.cuda}" in lines[0]
    proc = _run_setup({"CUDA_HOME": str(tmp_path), "FLOWKERN_BUILD_CUDA": "1"})
    assert proc.returncode != 0 and "does not match" in proc.stderr


def test_benchmark_runs_on_cpu(tmp_path):
    csv = tmp_path / "shaping.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_shaping.py"), "--device", "cpu",
                           "--csv", str(csv)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(csv, newline="") as fh:
        rows = list(DictReader(fh))
    assert [row["impl"] for row in rows] == ["torch"]
    for column in ("date", "device", "B", "T", "ms", "x torch", "floor us", "% floor", "parity", "adv err"):
        assert column in rows[0]
    assert float(rows[0]["ms"]) > 0 and "torch" in proc.stdout


# --------------------------------------------------------------------------- helpers for the GPU tests

def _config(norm: str, threshold: float = 0.6, topk: int = 15, coef: float = 0.01):
    """A FlowConfig, or (for values FlowConfig refuses, e.g. η < 0) a namespace with the same fields."""
    try:
        return FlowConfig(norm=norm, threshold=threshold, topk=topk, coef=coef)
    except ValueError:
        return SimpleNamespace(norm=norm, threshold=threshold, topk=topk, coef=coef,
                               two_sided=norm in ("minmax-bil", "mean"))


def _reference_rewards(scores, mask, config):
    from flowkern.reward import _shape_rewards_torch
    return _shape_rewards_torch(scores, mask.bool(), config)


def _cuda_rewards(scores, mask, config, use_smem=True):
    return _C.shape_rewards(scores, mask, _C.NORM_CODES[config.norm], float(config.threshold), int(config.topk),
                            float(config.coef), use_smem)


def assert_rewards_match(got, scores, mask, config, exact: bool = True):
    """`got` equals the torch reference up to the choice among values tied at the k-th.

    Checked per row: every reward is either 0 or the token's own -β·s, and the multiset of the
    row's rewards equals the reference's (so exactly as many are kept per side, with the same values).
    Independently: per side, the kept count is min(K, survivors) and every kept value is ≥ every
    dropped survivor. With exact=False (mean mode on continuous data, where the fp64 row sum may differ
    from torch's fp32 sum in the last bit), values are compared at fp32 tolerance and tokens within
    1e-5 of the threshold are excused.
    """
    ref = _reference_rewards(scores, mask, config).cpu()
    got = got.cpu()
    mask = mask.bool().cpu()
    s = _normalise(scores, mask.to(scores.device), config.norm).cpu()
    own = -config.coef * s
    if exact:
        assert bool(((got == 0) | (got == own)).all()), "a reward is neither 0 nor the token's own -coef*s"
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values), \
            f"kept values differ from the reference in rows {torch.nonzero((got.sort(-1).values != ref.sort(-1).values).any(-1)).flatten().tolist()[:10]}"
    else:
        near = (s.abs() - config.threshold).abs() < 1e-5
        got, ref = got.masked_fill(near, 0), ref.masked_fill(near, 0)
        assert bool(((got == 0) | torch.isclose(got, own, rtol=1e-5, atol=1e-9)).all()), \
            "a reward is neither 0 nor close to the token's own -coef*s"
        torch.testing.assert_close(got.sort(-1).values, ref.sort(-1).values, rtol=1e-4, atol=1e-7)
        return
    if config.threshold < 0:  # a kept s == 0 gives reward 0: the rule below cannot see it
        return
    # independent check of the top-k rule on the reference's normalised values
    kept = got != 0
    if config.two_sided:
        survive = mask & (s.abs() > config.threshold)
        sides = [(survive & (s > 0), s), (survive & (s < 0), -s)]
        K = config.topk // 2
    else:
        sides = [(mask & (s > config.threshold), s)]
        K = config.topk
    for cand, val in sides:
        kept_side = kept & cand
        if config.topk:
            assert torch.equal(kept_side.sum(-1), cand.sum(-1).clamp_max(K))
            lowest_kept = torch.where(kept_side, val, torch.inf).amin(-1)
            highest_dropped = torch.where(cand & ~kept_side, val, -torch.inf).amax(-1)
            assert bool((lowest_kept >= highest_dropped).all())


def _edge_batch(T: int, seed: int = 0):
    """Rows: empty, length-1, constant, integer ties, all-negative raw, mostly-minimum (one side in bil),
    two values only, and random; mask drops ~20% of tokens at random on the random rows."""
    rng = np.random.default_rng(seed)
    rows = 8
    scores = rng.standard_normal((rows, T)).astype(np.float32)
    mask = rng.random((rows, T)) < 0.8
    mask[0] = False
    mask[1] = False
    mask[1, T // 2] = True
    scores[2] = 0.37
    scores[3] = rng.integers(0, 4, T)
    scores[4] = -np.abs(scores[4]) - 3.0
    scores[5] = np.where(rng.random(T) < 0.95, 0.0, 1.0)
    scores[6] = np.where(rng.random(T) < 0.5, 2.0, 5.0)
    return torch.from_numpy(scores).to(DEVICE), torch.from_numpy(mask).to(DEVICE)


SHAPING_CASES = [(0.6, 15), (0.0, 2), (0.2, 0), (0.1, 3), (0.6, 100_000), (0.9, 4), (0.0, 0), (-0.5, 6)]


def _advantages64(outcome, rewards, mask, group_size, gamma):
    """float64 re-derivation of DESIGN.md §1's advantages."""
    R = outcome.double().cpu().numpy().reshape(-1, group_size)
    mean = R.mean(-1, keepdims=True)
    std = R.std(-1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        hat = np.where(std > 0, (R - mean) / (std + 1e-6), 0.0).reshape(-1)
    m = mask.bool().cpu().numpy()
    r = np.where(m, rewards.double().cpu().numpy(), 0.0)
    G = np.zeros_like(r)
    carry = np.zeros(r.shape[0])
    for k in range(r.shape[1] - 1, -1, -1):
        carry = r[:, k] + gamma * carry
        G[:, k] = carry
    return torch.from_numpy(np.where(m, hat[:, None] + G, 0.0))


# --------------------------------------------------------------------------- GPU: parity

@pytest.mark.cuda
@needs_ext
def test_auto_prefers_cuda_on_cuda_tensors():
    device = torch.device(DEVICE)
    assert backend.unavailable_reason("shape_rewards", "cuda", device) is None
    assert backend.resolve("shape_rewards", "auto", device)[0] == "cuda"
    assert backend.resolve("shape_advantages", "auto", device)[0] == "cuda"
    assert "cuda" in flowkern.available_backends("shape_rewards", device)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("T", [1, 7, 512, 1000, 4100])
def test_rewards_random_batches(norm, T):
    torch.manual_seed(T)
    B = 24
    scores = (torch.rand(B, T, device=DEVICE) ** 3) * 5 - 1
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    for threshold, topk in SHAPING_CASES:
        config = _config(norm, threshold, topk)
        if config.two_sided and topk == 1:
            continue
        for use_smem in (True, False):
            got = _cuda_rewards(scores, mask, config, use_smem)
            assert got.dtype == torch.float32 and got.shape == (B, T)
            assert_rewards_match(got, scores, mask, config, exact=norm != "mean")


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("T", [1, 2, 5, 513, 2100])
def test_rewards_edge_cases(norm, T):
    scores, mask = _edge_batch(T, seed=T)
    for threshold, topk in SHAPING_CASES:
        config = _config(norm, threshold, topk)
        for use_smem in (True, False):
            got = _cuda_rewards(scores, mask, config, use_smem)
            # mean mode: continuous rows, so the fp64 row sum may differ from torch's fp32 one in the last bit
            assert_rewards_match(got, scores, mask, config, exact=norm != "mean")
            assert bool((got[0] == 0).all())  # empty row
            if norm != "none" and config.threshold >= 0:
                assert bool((got[2] == 0).all())  # a constant row normalises to 0, which η >= 0 drops


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("norm", NORM_MODES)
def test_rewards_exact_with_dyadic_ties(norm):
    """Integer scores on a small grid: normalised values and mean-mode sums are exact, and ties abound
    (across 512-token chunks), so the tie-break keeps exactly k with values ≥ the (k+1)-th."""
    torch.manual_seed(3)
    B, T = 16, 5000
    scores = torch.randint(0, 9, (B, T), device=DEVICE).float()
    mask = torch.rand(B, T, device=DEVICE) < 0.9
    for threshold, topk in [(0.6, 15), (0.2, 40), (0.0, 1000), (0.5, 0), (0.1, 3)]:
        config = _config(norm, threshold, topk)
        for use_smem in (True, False):
            assert_rewards_match(_cuda_rewards(scores, mask, config, use_smem), scores, mask, config, exact=True)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("T", [32_768, 40_000])
def test_rewards_long_rows(T):
    """T = 32,768 (staged in shared memory where it fits) and beyond (global scratch)."""
    torch.manual_seed(5)
    B = 6
    scores = torch.randn(B, T, device=DEVICE)
    scores[:, ::7] = 1.5  # a block of ties at the top
    mask = torch.rand(B, T, device=DEVICE) < 0.95
    for norm in ("minmax", "minmax-bil"):
        for threshold, topk in [(0.6, 15), (0.0, 4000)]:
            config = _config(norm, threshold, topk)
            assert_rewards_match(_cuda_rewards(scores, mask, config), scores, mask, config)


@pytest.mark.cuda
@needs_ext
def test_bilateral_one_sided_survivors():
    """minmax-bil and mean with survivors on only one side: all-positive or all-negative survivors."""
    T = 300
    base = torch.zeros(4, T, device=DEVICE)
    base[0, :5] = 1.0    # bil: 5 at +1, the rest at -1 -> negative side dominates
    base[1, :-5] = 1.0   # 5 at -1, the rest at +1
    skew = torch.floor(64 * torch.linspace(0, 1, T, device=DEVICE) ** 8) / 64  # dyadic: mean-mode sums are exact
    base[2] = skew          # mostly near the minimum
    base[3] = 1 - skew      # mostly near the maximum
    mask = torch.ones_like(base, dtype=torch.bool)
    for norm in ("minmax-bil", "mean"):
        for threshold, topk in [(0.6, 15), (0.9, 6), (0.3, 1000), (0.95, 2)]:
            config = _config(norm, threshold, topk)
            got = _cuda_rewards(base, mask, config)
            assert_rewards_match(got, base, mask, config, exact=True)
            s = _normalise(base, mask, norm)
            for row in range(4):
                pos = int(((s[row] > threshold)).sum())
                neg = int(((s[row] < -threshold)).sum())
                assert int((got[row] < 0).sum()) == min(pos, topk // 2)  # r = -β s: positive s -> negative r
                assert int((got[row] > 0).sum()) == min(neg, topk // 2)


@pytest.mark.cuda
@needs_ext
def test_rewards_public_api_uint8_mask_and_noncontiguous():
    torch.manual_seed(1)
    scores = torch.randn(64, 40, device=DEVICE).T  # non-contiguous [40, 64]
    mask = (torch.rand(64, 40, device=DEVICE) < 0.8).T
    config = FlowConfig()
    got = shape_rewards(scores, mask, config, backend="cuda")
    ref = shape_rewards(scores, mask, config, backend="torch")
    assert_rewards_match(got, scores, mask, config)
    assert torch.equal(_cuda_rewards(scores, mask.to(torch.uint8), config), got)
    assert torch.equal(_cuda_rewards(scores.half().float(), mask, config),
                       shape_rewards(scores.half(), mask, config, backend="cuda"))  # fp16 scores are upcast
    assert torch.equal(shape_rewards(scores, mask, config, backend="auto"), got)  # auto picks cuda
    assert got.shape == ref.shape == (40, 64)
    empty = _cuda_rewards(torch.empty(0, 5, device=DEVICE), torch.empty(0, 5, dtype=torch.bool, device=DEVICE), config)
    assert empty.shape == (0, 5)
    zero_t = _cuda_rewards(torch.empty(3, 0, device=DEVICE), torch.empty(3, 0, dtype=torch.bool, device=DEVICE), config)
    assert zero_t.shape == (3, 0)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("gamma", [1.0, 0.97, 0.5, 0.0])
@pytest.mark.parametrize("group_size", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 5, 512, 1300])
def test_advantages(gamma, group_size, T):
    torch.manual_seed(T + group_size)
    B = 16
    outcome = torch.randint(0, 3, (B,), device=DEVICE).float()
    outcome[:group_size] = 1.0          # a zero-std group
    outcome[-group_size:] = 0.25        # another
    rewards = torch.randn(B, T, device=DEVICE) * 0.05
    mask = torch.rand(B, T, device=DEVICE) < 0.7
    mask[0] = False                      # empty row
    got = shape_advantages(outcome, rewards, mask, group_size, gamma, backend="cuda")
    ref = shape_advantages(outcome, rewards, mask, group_size, gamma, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert_close(got, ref, torch.float32, msg=f"gamma={gamma} group_size={group_size}")
    torch.testing.assert_close(got.cpu().double(), _advantages64(outcome, rewards, mask, group_size, gamma),
                               rtol=1e-5, atol=1e-6)
    assert bool((got[~mask] == 0).all())
    zero_std = torch.zeros(B, dtype=torch.bool, device=DEVICE)
    zero_std[:group_size] = True
    zero_std[-group_size:] = True
    rtg_only = shape_advantages(torch.zeros_like(outcome), rewards, mask, group_size, gamma, backend="cuda")
    assert torch.equal(got[zero_std], rtg_only[zero_std])  # Â = 0 exactly for zero-std groups
    assert torch.equal(_C.shape_advantages(outcome, rewards, mask.to(torch.uint8), group_size, gamma), got)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("use_smem", [True, False])
def test_fused_equals_separate_ops(norm, use_smem):
    from flowkern.ops.shaping import shape_rewards_and_advantages

    torch.manual_seed(11)
    B, T, group_size = 32, 1500, 4
    scores = torch.randint(0, 17, (B, T), device=DEVICE).float()
    mask = torch.rand(B, T, device=DEVICE) < 0.85
    outcome = torch.randint(0, 2, (B,), device=DEVICE).float()
    for gamma in (1.0, 0.9):
        config = _config(norm, 0.3, 15)
        rewards, adv = shape_rewards_and_advantages(scores, mask, outcome, config, group_size, gamma, use_smem=use_smem)
        assert torch.equal(rewards, _cuda_rewards(scores, mask, config, use_smem))
        assert_rewards_match(rewards, scores, mask, config)
        assert torch.equal(adv, shape_advantages(outcome, rewards, mask, group_size, gamma, backend="cuda"))
        assert_close(adv, shape_advantages(outcome, rewards, mask, group_size, gamma, backend="torch"), torch.float32)


@pytest.mark.cuda
@needs_ext
def test_flow_reward_uses_the_cuda_shaping(monkeypatch):
    from helpers import random_field

    calls = []
    real = _C.shape_rewards

    def spy(scores, mask, *args):
        calls.append((scores.clone(), mask.clone()))
        return real(scores, mask, *args)

    monkeypatch.setattr(_C, "shape_rewards", spy)
    field = random_field(32, 2, dtype=torch.float32).to(DEVICE)
    latents = [torch.randn(4, 50, 32, device=DEVICE) for _ in range(3)]
    mask = torch.rand(4, 50, device=DEVICE) < 0.8
    config = FlowConfig(depth=2)
    got = flowkern.flow_reward(field, latents, mask, config, layer_fracs=(0.25, 0.5, 0.75), backend="cuda")
    assert len(calls) == 1
    scores, scored = calls[0]
    assert_rewards_match(got, scores, scored, config)
