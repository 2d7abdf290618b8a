"""The fused Triton scoring pass (`flowkern.ops.scores`) against the torch reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in fp32 and
fp16 only: the interpreter's bf16 is wrong. bf16 parity is checked by the cuda-marked test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from csv import DictReader
from pathlib import Path

import pytest
import torch

from helpers import need, random_field

need("triton")  # before flowkern.ops.scores, which imports it
import flowkern as fk
from flowkern.ops import _triton, scores
from flowkern.ops._triton import draw_seed
from flowkern.testing import assert_close

ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS = torch.tensor([0.25, 0.5, 0.75])


def _field(dim: int, depth: int, dtype: torch.dtype, seed: int = 0) -> fk.VelocityField:
    """Random weights of Xavier-like scale, so that activations stay O(1) through the blocks."""
    return random_field(dim, depth, seed=seed, dtype=dtype, scale=dim ** -0.5).to(DEVICE)


def _inputs(n: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, dim, generator=g).to(DEVICE, dtype)
    cond = torch.randn(n, dim, generator=g).to(DEVICE, dtype)
    layer = LAYERS[torch.randint(0, 3, (n,), generator=g)].to(DEVICE)
    return x1, cond, layer


def _both(field, x1, cond, layer, **kw):
    got = fk.flow_scores(field, x1, cond, layer, backend="triton", **kw)
    want = fk.flow_scores(field, x1, cond, layer, backend="torch", **kw)
    return got, want


# --------------------------------------------------------------------------- parity with supplied noise

CASES = [  # (dim, depth, n, timesteps, per-timestep noise)
    (64, 1, 37, (0.8,), False),
    (96, 2, 130, (0.3, 0.8), True),   # D not a power of two; two row tiles of 128
    (96, 3, 5, (0.5, 0.7, 0.9), False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim,depth,n,timesteps,per_step", CASES, ids=[f"D{c[0]}-K{c[1]}-N{c[2]}" for c in CASES])
def test_parity_with_supplied_noise(dtype, dim, depth, n, timesteps, per_step):
    field = _field(dim, depth, dtype)
    x1, cond, layer = _inputs(n, dim)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((len(timesteps), n, dim) if per_step else (n, dim), generator=g).to(DEVICE)
    got, want = _both(field, x1, cond, layer, timesteps=timesteps, noise=noise)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert want.abs().min() > 0  # a trivial (all-zero) comparison would prove nothing
    assert_close(got, want, dtype)


def test_parity_scalar_layer_strided_and_mixed_dtype_inputs():
    """A float layer; target a row-strided view, cond non-unit column stride, fp32 latents into an fp16 field."""
    dim, n = 64, 21
    field = _field(dim, 2, torch.float16)
    wide = torch.randn(n, 3 * dim, device=DEVICE)
    x1, cond = wide[:, :dim], wide[:, dim::2]
    assert x1.stride() == (3 * dim, 1) and cond.stride(1) == 2
    noise = torch.randn(n, dim, device=DEVICE)
    got, want = _both(field, x1, cond, 0.5, timesteps=(0.6,), noise=noise)
    assert_close(got, want, torch.float16)


def test_chunked_streaming_matches_one_pass(monkeypatch):
    """Rows streamed in several chunks (ragged last one) give the same scores as a single chunk."""
    dim, n, taus = 96, 50, (0.4, 0.8)
    field = _field(dim, 2, torch.float32)
    x1, cond, layer = _inputs(n, dim, seed=3)
    noise = torch.randn(len(taus), n, dim, device=DEVICE)
    one = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="triton")
    per_token = len(taus) * (scores._N_BUFFERS * dim * 4 + 4 * 2)
    monkeypatch.setattr(scores, "MAX_CHUNK_BYTES", 16 * per_token)
    assert scores._chunk_bounds(n, len(taus), dim, 4) == [0, 12, 25, 37, 50]  # at most 16 tokens each
    chunked = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="triton")
    assert_close(chunked, one, torch.float32)
    want = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="torch")
    assert_close(chunked, want, torch.float32)


def test_empty_input():
    field = _field(64, 1, torch.float32)
    x = torch.zeros(0, 64, device=DEVICE)
    out = fk.flow_scores(field, x, x, 0.5, backend="triton")
    assert out.shape == (0,) and out.dtype == torch.float32


# --------------------------------------------------------------------------- flow_reward, every context mode

def _reward_setup(dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 23
    latents = [torch.randn(B, T, dim, generator=g).to(DEVICE, dtype) for _ in range(2)]
    action = torch.zeros(B, T, dtype=torch.bool)
    for b, start in enumerate((4, 9, 15)):  # ragged responses
        action[b, start:T - b] = True
    noise = [torch.randn(B, T, dim, generator=g).to(DEVICE) for _ in latents]
    return latents, action.to(DEVICE), noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode,shift", [("token_pre", 1), ("token_post", 2), ("identity", 0)])
def test_flow_reward_context_modes(dtype, mode, shift):
    """Rewards with a continuous shaping (raw scores, all kept) so that score errors show as reward errors."""
    dim = 96
    field = _field(dim, 2, dtype, seed=2)
    latents, action, noise = _reward_setup(dim, dtype)
    cfg = fk.FlowConfig(context_mode=mode, shift=shift, norm="none", threshold=0.0, topk=0, coef=1.0,
                        timesteps=(0.5, 0.8))
    kw = dict(layer_fracs=(0.25, 0.75), noise=noise)
    got = fk.flow_reward(field, latents, action, cfg, backend="triton", **kw)
    want = fk.flow_reward(field, latents, action, cfg, backend="torch", **kw)
    assert torch.count_nonzero(want) > action.sum() // 2
    assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flow_reward_streams_its_gathered_copies(monkeypatch, backend):
    """flow_reward scores its tokens in bounded chunks: the result does not depend on the chunk size."""
    dim = 64
    field = _field(dim, 1, torch.float32, seed=3)
    latents, action, noise = _reward_setup(dim, torch.float32, seed=3)
    cfg = fk.FlowConfig(norm="none", threshold=0.0, topk=0, coef=1.0)
    kw = dict(layer_fracs=(0.25, 0.75), noise=noise, backend=backend)
    whole = fk.flow_reward(field, latents, action, cfg, **kw)
    per_token = 2 * (2 * 4 * dim) + 2 * 4 * dim  # two latents (target + cond copies) and two noises, fp32
    monkeypatch.setattr(fk.reward, "SCORE_GATHER_BYTES", 7 * per_token)  # chunks of at most 7 tokens
    calls = []
    score = fk.reward.score_rows
    monkeypatch.setattr(fk.reward, "score_rows", lambda fn, f, t, *a: calls.append(len(t) // 2) or score(fn, f, t, *a))
    assert_close(fk.flow_reward(field, latents, action, cfg, **kw), whole, torch.float32)
    assert len(calls) > 2 and max(calls) <= 7 and max(calls) - min(calls) <= 1  # near-equal chunks


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode,shift,draws", [("token_pre", 1, 1), ("token_post", 2, 2), ("identity", 0, 1)])
def test_flow_reward_sync_free_path_matches(monkeypatch, backend, mode, shift, draws):
    """check_finite=False lists a fixed number of rows (no host sync); the extra rows are discarded, so the
    rewards equal the default path's, also in several chunks and with K noise draws."""
    dim = 64
    field = _field(dim, 1, torch.float32, seed=5)
    latents, action, noise = _reward_setup(dim, torch.float32, seed=5)
    if draws > 1:
        noise = [torch.stack([nz, nz.flip(0)]) for nz in noise]
    cfg = fk.FlowConfig(context_mode=mode, shift=shift, norm="none", threshold=0.0, topk=0, coef=1.0,
                        noise_draws=draws)
    kw = dict(layer_fracs=(0.25, 0.75), noise=noise, backend=backend)
    want = fk.flow_reward(field, latents, action, cfg, **kw)
    monkeypatch.setattr(fk.reward, "SCORE_GATHER_BYTES", 7 * draws * 3 * 2 * 4 * dim)  # chunks of <= 7 tokens
    got = fk.flow_reward(field, latents, action, cfg, check_finite=False, **kw)
    assert torch.count_nonzero(want) > action.sum() // 2
    assert_close(got, want, torch.float32)
    assert torch.equal(got != 0, want != 0)


def test_flow_reward_default_shaping_keeps_the_same_tokens():
    """The released shaping (minmax-bil, η=0.6, top-k 15) selects the same tokens in fp32."""
    dim = 64
    field = _field(dim, 2, torch.float32, seed=4)
    latents, action, noise = _reward_setup(dim, torch.float32, seed=4)
    cfg = fk.FlowConfig(topk=4)
    kw = dict(layer_fracs=(0.25, 0.75), noise=noise)
    got = fk.flow_reward(field, latents, action, cfg, backend="triton", **kw)
    want = fk.flow_reward(field, latents, action, cfg, backend="torch", **kw)
    assert torch.equal(got != 0, want != 0) and torch.count_nonzero(want) > 0
    assert_close(got, want, torch.float32)


# --------------------------------------------------------------------------- seeded (in-kernel Philox) mode

def _seed_of(generator_seed: int) -> torch.Tensor:
    return draw_seed(torch.Generator(device=DEVICE).manual_seed(generator_seed), DEVICE)


def test_seeded_scores_use_exactly_seeded_noise(monkeypatch):
    """noise=None draws ε in-kernel; the same ε supplied to the torch reference gives the same scores.

    Run over several chunks, so the noise must follow the global row, not the chunk; the interpolation
    and score kernels split D into different column tiles, so their column layouts must agree.
    """
    dim, n, taus = 160, 70, (0.3, 0.8)
    widths = (scores._NOISE_TILE[1], scores._SCORE_CONFIGS[0].kwargs["BN"])
    assert widths[0] != widths[1] and dim > min(widths)
    field = _field(dim, 2, torch.float32, seed=5)
    x1, cond, layer = _inputs(n, dim, seed=5)
    monkeypatch.setattr(scores, "MAX_CHUNK_BYTES", 32 * len(taus) * (scores._N_BUFFERS * dim * 4 + 8))
    got = fk.flow_scores(field, x1, cond, layer, timesteps=taus, backend="triton",
                         generator=torch.Generator(device=DEVICE).manual_seed(11))
    noise = scores.seeded_noise(_seed_of(11), n, dim, DEVICE)
    want = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="torch")
    assert_close(got, want, torch.float32)


def test_seeded_mode_is_deterministic():
    dim, n = 64, 40
    field = _field(dim, 1, torch.float32, seed=6)
    x1, cond, layer = _inputs(n, dim, seed=6)

    def run(seed: int) -> torch.Tensor:
        return fk.flow_scores(field, x1, cond, layer, backend="triton",
                              generator=torch.Generator(device=DEVICE).manual_seed(seed))

    first = run(3)
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))
    torch.manual_seed(9)  # generator=None: the seed comes from the global generator
    global_a = fk.flow_scores(field, x1, cond, layer, backend="triton")
    torch.manual_seed(9)
    assert torch.equal(global_a, fk.flow_scores(field, x1, cond, layer, backend="triton"))


def test_seeded_noise_statistics():
    n, dim = 512, 96
    eps = scores.seeded_noise(1234, n, dim, DEVICE).cpu().double()
    count = eps.numel()
    assert abs(eps.mean()) < 4 / count ** 0.5
    assert abs(eps.var() - 1) < 5 * (2 / count) ** 0.5
    lanes = eps.view(n, dim // 4, 4)  # the four outputs of one Philox call
    for q in range(4):
        lane = lanes[..., q]
        assert abs(lane.mean()) < 4 / lane.numel() ** 0.5
        assert abs(lane.var() - 1) < 5 * (2 / lane.numel()) ** 0.5
    corr = torch.corrcoef(torch.stack([eps[:, :-1].reshape(-1), eps[:, 1:].reshape(-1)]))[0, 1]
    assert abs(corr) < 4 / (n * (dim - 1)) ** 0.5  # neighbouring columns (incl. Box–Muller pairs)
    corr_rows = torch.corrcoef(torch.stack([eps[:-1].reshape(-1), eps[1:].reshape(-1)]))[0, 1]
    assert abs(corr_rows) < 4 / ((n - 1) * dim) ** 0.5
    # a prefix of rows does not depend on how many rows are drawn; another seed gives other noise
    assert torch.equal(scores.seeded_noise(1234, 100, dim, DEVICE).cpu().double(), eps[:100])
    other = scores.seeded_noise(1235, n, dim, DEVICE).cpu().double()
    assert abs(torch.corrcoef(torch.stack([eps.reshape(-1), other.reshape(-1)]))[0, 1]) < 4 / count ** 0.5


def test_seeded_scores_of_a_zero_field_measure_the_noise():
    """v ≡ 0 and x1 = 0 give score = τ/(1-τ) · mean_D ε²: the score kernel's own ε has unit variance."""
    dim, n, tau = 64, 256, 0.8
    field = fk.VelocityField(dim, 1).to(DEVICE)  # default init: v ≡ 0
    x = torch.zeros(n, dim, device=DEVICE)
    got = fk.flow_scores(field, x, x, 0.5, timesteps=(tau,), backend="triton",
                         generator=torch.Generator(device=DEVICE).manual_seed(2))
    second_moment = (got * (1 - tau) / tau).double()
    assert abs(second_moment.mean() - 1) < 5 * (2 / (n * dim)) ** 0.5
    assert second_moment.min() > 0


# --------------------------------------------------------------------------- plumbing

def test_producer_tiles_align_with_partial_slots():
    """Row reductions are written per 64-column slot: every producer tile must cover whole slots."""
    for config in scores._GEMM_CONFIGS + scores._SCORE_CONFIGS:
        assert config.kwargs["BN"] % scores._SLOT == 0, config
    for configs in (scores._GEMM_CONFIGS, scores._MODULATE_CONFIGS, scores._SCORE_CONFIGS):
        assert scores._prune(configs, {"w_ptr": torch.zeros(1)}) == configs[-1:]
        assert scores._prune(configs, {"w_ptr": torch.zeros(1, dtype=torch.float16)}) == configs
    assert scores._NOISE_TILE[1] % 4 == 0


def test_pinned_configs_choose_without_timing(monkeypatch):
    """Deterministic mode: one fixed config per kernel (nothing to time, so every rank runs the same tiles)."""
    half = {"w_ptr": torch.zeros(1, dtype=torch.bfloat16)}
    monkeypatch.delenv("FLOWKERN_DETERMINISTIC", raising=False)
    assert not _triton.pinned_configs()
    for configs in (scores._GEMM_CONFIGS, scores._MODULATE_CONFIGS, scores._SCORE_CONFIGS):
        assert len(scores._prune(configs, half)) > 1
        monkeypatch.setenv("FLOWKERN_DETERMINISTIC", "1")
        assert scores._prune(configs, half) == configs[:1]
        monkeypatch.delenv("FLOWKERN_DETERMINISTIC")
        torch.use_deterministic_algorithms(True)
        try:
            assert _triton.pinned_configs() and scores._prune(configs, half) == configs[:1]
        finally:
            torch.use_deterministic_algorithms(False)


def test_chunk_size_bounds_memory():
    for n_tok, n_t, width in [(196608, 1, 1536), (98304, 1, 3584), (10**6, 3, 4096), (7, 2, 64)]:
        bounds = scores._chunk_bounds(n_tok, n_t, width, 2)
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        assert bounds[0] == 0 and bounds[-1] == n_tok and min(sizes) >= 1
        assert n_t * max(sizes) * scores._N_BUFFERS * width * 2 <= scores.MAX_CHUNK_BYTES
        # the fewest chunks that fit, equal in size: no mostly empty last chunk
        limit = scores.MAX_CHUNK_BYTES // (n_t * (scores._N_BUFFERS * width * 2 + 4 * -(-width // 64)))
        assert len(sizes) == -(-n_tok // limit) and max(sizes) - min(sizes) <= 1


def test_unavailable_without_interpreter_names_the_fix(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("the interpreter requirement applies to CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    field = _field(64, 1, torch.float32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fk.flow_scores(field, x, x, 0.5, backend="triton")
    with pytest.raises(RuntimeError, match="seeded_noise: .*TRITON_INTERPRET=1"):
        scores.seeded_noise(0, 3, 64, "cpu")


def test_benchmark_runs_on_cpu(tmp_path):
    csv = tmp_path / "scores.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scores.py"), "--device", "cpu",
                           "--csv", str(csv)], capture_output=True, text=True, env=env, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(csv, newline="") as fh:
        rows = list(DictReader(fh))
    for column in ("date", "device", "impl", "ms", "TFLOP/s", "% peak", "extra GiB", "x chain", "rel err"):
        assert column in rows[0]
    impls = [row["impl"] for row in rows]
    assert len(impls) == 8 and "triton" in impls and any(i.startswith("GEMM chain") for i in impls)
    assert {"triton fused", "triton gemm-route", "fp8", "fp8 GEMM chain (_scaled_mm)"} <= set(impls)
    assert all(float(row["ms"]) > 0 for row in rows)
    for impl in ("triton", "triton fused", "triton gemm-route"):
        assert float(rows[impls.index(impl)]["rel err"]) < 1e-4
    assert 0 < float(rows[impls.index("fp8")]["rel err"]) < 0.1
    assert "triton" in proc.stdout and "GEMM chain" in proc.stdout


# --------------------------------------------------------------------------- GPU: bf16

@pytest.mark.cuda
def test_bf16_parity_and_topk_agreement_cuda():
    """bf16 on the GPU: scores within 2e-2 relative error; the shaped top-k sets agree on ≥ 95% of tokens."""
    dim, depth = 512, 4
    field = _field(dim, depth, torch.bfloat16, seed=7)
    x1, cond, layer = _inputs(4096, dim, seed=7, dtype=torch.bfloat16)
    noise = torch.randn(4096, dim, device=DEVICE)
    got, want = _both(field, x1, cond, layer, timesteps=(0.8,), noise=noise)
    rel = float((got - want).norm() / want.norm())
    assert rel <= 2e-2, rel
    assert float(((got - want).abs() / want.abs()).median()) <= 2e-2

    g = torch.Generator(device=DEVICE).manual_seed(8)
    B, T = 16, 384
    latents = [torch.randn(B, T, dim, device=DEVICE, generator=g, dtype=torch.bfloat16) for _ in range(3)]
    action = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    action[:, 64:] = True
    noise = [torch.randn(B, T, dim, device=DEVICE, generator=g) for _ in latents]
    cfg = fk.FlowConfig()
    kw = dict(layer_fracs=(0.25, 0.5, 0.75), noise=noise)
    kept_triton = fk.flow_reward(field, latents, action, cfg, backend="triton", **kw) != 0
    kept_torch = fk.flow_reward(field, latents, action, cfg, backend="torch", **kw) != 0
    both = (kept_triton & kept_torch).sum().item()
    assert kept_torch.sum() > 0
    assert both / max(kept_triton.sum().item(), kept_torch.sum().item()) >= 0.95


# --------------------------------------------------------------------------- GPU: the real widths

REAL = [  # (dim, depth, n): the 1.5B and 7B widths and an odd one; n spans several chunks at MAX_CHUNK_BYTES / 8
    (1536, 4, 6000), (3584, 6, 2500), (1000, 2, 5000),
]


@pytest.mark.cuda
@pytest.mark.parametrize("field_dtype", [torch.bfloat16, torch.float32], ids=["bf16-field", "fp32-field"])
@pytest.mark.parametrize("seeded", [False, True], ids=["supplied", "seeded"])
@pytest.mark.parametrize("dim,depth,n", REAL, ids=[f"D{d}" for d, _, _ in REAL])
def test_real_widths_cuda(monkeypatch, dim, depth, n, seeded, field_dtype):
    """J = 2, several chunks, seeded and supplied noise; an fp32 field scores through its bf16 copy ("auto")."""
    monkeypatch.setattr(scores, "MAX_CHUNK_BYTES", scores.MAX_CHUNK_BYTES // 8)
    taus = (0.6, 0.8)
    assert len(scores._chunk_bounds(n, len(taus), dim, 2)) > 2
    field = _field(dim, depth, field_dtype, seed=dim)
    x1, cond, layer = _inputs(n, dim, seed=dim, dtype=torch.bfloat16)
    if seeded:
        seed = _seed_of(dim)
        got = fk.flow_scores(field, x1, cond, layer, timesteps=taus, backend="triton",
                             generator=torch.Generator(device=DEVICE).manual_seed(dim))
        noise = scores.seeded_noise(seed, n, dim, DEVICE)
    else:
        noise = torch.randn(len(taus), n, dim, device=DEVICE)
        got = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="triton")
    want = fk.flow_scores(field, x1, cond, layer, timesteps=taus, noise=noise, backend="torch")
    rel = float((got - want).norm() / want.norm())
    assert rel <= 2e-2, rel


@pytest.mark.cuda
def test_pinned_configs_are_repeatable_across_processes_cuda(tmp_path):
    """FLOWKERN_DETERMINISTIC=1: two processes score the same tokens bitwise identically."""
    script = (
        "import sys, torch, flowkern as fk\n"
        "from helpers import random_field\n"
        "f = random_field(1536, 2, dtype=torch.bfloat16, scale=1536 ** -0.5).cuda()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(4096, 1536, generator=g).cuda().bfloat16()\n"
        "s = fk.flow_scores(f, x, x.flip(0), 0.5, backend='triton', generator=torch.Generator('cuda').manual_seed(1))\n"
        "torch.save(s.cpu(), sys.argv[1])\n")
    outs = []
    for i in range(2):
        path = tmp_path / f"s{i}.pt"
        env = {**os.environ, "FLOWKERN_DETERMINISTIC": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=ROOT, timeout=300)
        outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1])
