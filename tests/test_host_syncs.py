"""Host synchronisations on the fused hot path: at most one per public call, none with ``check_finite=False``.

On CPU the kernels run in Triton's interpreter (and the torch reference stands in for the CUDA shaping kernels),
so the test counts what the Python side of the path does: every `Tensor.item`, `__bool__`, `__float__`,
`__int__`, `tolist` and `nonzero` (a sync on CUDA: its output size is data-dependent) called from flowkern's
own code. On a GPU, `torch.cuda.set_sync_debug_mode` counts the real synchronisations of the same calls.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from contextlib import contextmanager

import pytest
import torch

from helpers import need, random_field

need("triton")
import flowkern as fk  # noqa: E402
from flowkern import backend as dispatch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PACKAGE = os.path.dirname(os.path.abspath(fk.__file__))
SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist", "nonzero")
D, B, T = 32, 3, 12


@contextmanager
def count_python_syncs(monkeypatch):
    """Count the syncing Tensor methods that flowkern's own frames call (not torch's or Triton's)."""
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append(f"{_name} at {os.path.relpath(caller, PACKAGE)}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield calls
    monkeypatch.undo()


def _inputs():
    field = random_field(D, 2, seed=3, dtype=torch.float32, scale=D ** -0.5).to(DEVICE)
    g = torch.Generator().manual_seed(4)
    latents = [torch.randn(B, T, D, generator=g).to(DEVICE) for _ in range(2)]
    action = torch.zeros(B, T, dtype=torch.bool)
    action[:, 4:] = True
    return field, latents, action.to(DEVICE)


def _fake_cuda_shaping(monkeypatch):
    """Run the CUDA shaping backend's Python side on CPU: its `_C` calls answered by the torch reference."""
    shaping = pytest.importorskip("flowkern.ops.shaping")
    from flowkern.reward import _shape_advantages_torch, _shape_rewards_torch

    codes = {code: norm for norm, code in shaping.NORM_CODES.items()}

    def rewards(scores, action, norm, threshold, topk, coef, use_smem):
        cfg = fk.FlowConfig(norm=codes[norm], threshold=threshold, topk=topk, coef=coef)
        return _shape_rewards_torch(scores, action, cfg)

    def both(scores, action, outcome, norm, threshold, topk, coef, group_size, gamma, use_smem):
        r = rewards(scores, action, norm, threshold, topk, coef, use_smem)
        return r, _shape_advantages_torch(outcome, r, action, group_size, gamma)

    monkeypatch.setattr(shaping, "_C", types.SimpleNamespace(shape_rewards=rewards, shape_rewards_and_advantages=both,
                                                             shape_advantages=_shape_advantages_torch))
    monkeypatch.setattr(shaping, "why_unavailable", lambda device: None)
    for op in ("shape_rewards", "shape_advantages"):
        impl = dispatch._REGISTRY[op]["cuda"]
        monkeypatch.setitem(dispatch._REGISTRY[op], "cuda", dispatch.Implementation(impl.fn, lambda device: None))


def _public_calls(check_finite: bool):
    """(name, thunk) of each public call of the fused path."""
    field, latents, action = _inputs()
    cfg = fk.FlowConfig(topk=4)
    x1, cond = latents[0][0], latents[1][0]
    layer = torch.full((T,), 0.5, device=DEVICE)
    scores = torch.rand(B, T, device=DEVICE)
    outcome = torch.rand(B, device=DEVICE)
    fused_shaping = pytest.importorskip("flowkern.ops.shaping").shape_rewards_and_advantages
    shaping = "auto" if DEVICE.type == "cuda" else "cuda"
    kw = dict(check_finite=check_finite)
    return [
        ("flow_scores", lambda: fk.flow_scores(field, x1, cond, layer, backend="triton", **kw)),
        ("flow_scores float layer, J=2", lambda: fk.flow_scores(field, x1, cond, 0.25, timesteps=(0.5, 0.8),
                                                                backend="triton", **kw)),
        ("flow_reward", lambda: fk.flow_reward(field, latents, action, cfg, layer_fracs=(0.25, 0.75),
                                               backend="triton", **kw)),
        ("shape_rewards", lambda: fk.shape_rewards(scores, action, cfg, backend=shaping, **kw)),
        ("shape_advantages", lambda: fk.shape_advantages(outcome, scores, action, 3, backend=shaping, **kw)),
        ("shape_rewards_and_advantages", lambda: fused_shaping(scores, action, outcome, cfg, 3, **kw)),
    ]


# flow_reward lists its scored tokens with one `nonzero` (a data-dependent size) and its NaN/Inf flag rides on
# that sync; with check_finite=False it lists a fixed number of rows (`nonzero_static`) and makes none.


@pytest.mark.parametrize("check_finite", [True, False])
def test_fused_path_python_side_syncs_at_most_once(monkeypatch, check_finite):
    if DEVICE.type == "cuda":
        pytest.skip("on a GPU the cuda-marked test counts the real synchronisations")
    _fake_cuda_shaping(monkeypatch)
    for name, call in _public_calls(check_finite):
        call()  # warm: first-call work (casts, compilation) is not the steady state
        with count_python_syncs(monkeypatch) as calls:
            call()
        expected = 1 if check_finite else 0
        assert len(calls) == expected, (name, calls)
        _fake_cuda_shaping(monkeypatch)  # undone by count_python_syncs' monkeypatch.undo()


def test_the_counter_sees_a_sync(monkeypatch):
    """The counter is not blind: the pre-fix check (bool(isfinite(x).all()) on every input) is counted."""
    from flowkern import _checks

    with count_python_syncs(monkeypatch) as calls:
        _checks.finite("x", torch.ones(3))
    assert len(calls) == 1 and calls[0].startswith("__bool__")


@pytest.mark.cuda
@pytest.mark.parametrize("check_finite", [True, False])
def test_fused_path_syncs_cuda(check_finite):
    for name, call in _public_calls(check_finite):
        call()  # warm: autotuning times its configs (syncs) on the first call only
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        expected = 1 if check_finite else 0
        assert len(syncs) <= expected, (name, [str(w.message) for w in syncs])


@pytest.mark.cuda
def test_cuda_shaping_at_the_target_size_cuda():
    """The CUDA extension at B = 1024, T = 4096 (the shaping target's size) agrees with the torch reference."""
    pytest.importorskip("flowkern.ops.shaping")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 1024, 4096
    scores = torch.rand(B, T, device="cuda", generator=g)
    action = torch.rand(B, T, device="cuda", generator=g) > 0.3
    outcome = torch.rand(B, device="cuda", generator=g)
    cfg = fk.FlowConfig()
    got = fk.shape_rewards(scores, action, cfg, backend="cuda")
    want = fk.shape_rewards(scores, action, cfg, backend="torch")
    torch.testing.assert_close(got, want)
    adv = fk.shape_advantages(outcome, got, action, 8, backend="cuda")
    torch.testing.assert_close(adv, fk.shape_advantages(outcome, want, action, 8, backend="torch"), rtol=1e-5,
                               atol=1e-5)
