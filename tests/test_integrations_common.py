"""The online flow update shared by the TRL and verl adapters: chunked (max_tokens) equals unchunked, and its
peak memory is bounded by the chunk, measured from the CPU allocator's own events.

Peak memory on CPU (`flowkern.testing.peak_cpu_allocated_bytes`): torch's profiler with ``profile_memory=True``
records every allocation and free of torch's CPU allocator as a ``[memory]`` event carrying its signed byte
count and time. Summing them in time order gives the bytes allocated inside the profiled call at each instant;
the maximum is the call's peak above what existed before it (inputs, the flow and its Adam state come before).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import random_field

from flowkern import FlowConfig, VelocityField, latent_flow_loss
from flowkern.integrations._common import NOISE_BLOCK, flow_update, resolve_flow, warn_if_untrained
from flowkern.testing import peak_cpu_allocated_bytes

FRACS = [0.25, 0.5, 0.75]


def batch(B=4, T=129, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(B, T, D, generator=g, dtype=dtype) for _ in FRACS]
    mask = torch.rand(B, T, generator=g) < 0.8
    return latents, mask


@pytest.mark.parametrize("repeats", [1, 2])
@pytest.mark.parametrize("context_mode", ["token_pre", "identity"])
def test_chunked_update_equals_the_unchunked_update(repeats, context_mode):
    config = FlowConfig(depth=2, context_mode=context_mode, shift=0 if context_mode == "identity" else 1)
    latents, mask = batch(D=16, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0])
    base = random_field(16, 2, dtype=torch.float64)
    results = {}
    for max_tokens in (None, 7, NOISE_BLOCK, 1000):
        field = copy.deepcopy(base)
        opt = torch.optim.SGD(field.parameters(), lr=0.1)
        loss = flow_update(field, opt, latents, FRACS, mask, weights, config, repeats=repeats,
                           generator=torch.Generator().manual_seed(3), max_tokens=max_tokens, backend="torch")
        results[max_tokens] = (loss, field.state_dict())
    ref_loss, ref_state = results[None]
    assert any(not torch.equal(ref_state[k], v) for k, v in base.state_dict().items())
    for max_tokens, (loss, state) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-6), max_tokens
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-9, msg=f"{key} at {max_tokens}")


def test_update_loss_is_the_latent_flow_loss_on_the_same_tokens():
    """The update's loss is flowkern's weighted flow-matching mean (same tokens and weights, any noise)."""
    config = FlowConfig(depth=2)
    latents, mask = batch(D=16)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0])
    field = random_field(16, 2, dtype=torch.float32)
    losses = []
    for seed in range(24):
        f = copy.deepcopy(field)
        losses.append(flow_update(f, torch.optim.SGD(f.parameters(), lr=0.0), latents, FRACS, mask, weights, config,
                                  generator=torch.Generator().manual_seed(seed), max_tokens=50))
    token_w = mask.float() * weights[:, None]
    direct = [float(latent_flow_loss(field, latents, token_w, config, layer_fracs=FRACS,
                                     generator=torch.Generator().manual_seed(100 + s)).detach()) for s in range(24)]
    mean, ref = sum(losses) / len(losses), sum(direct) / len(direct)
    assert mean == pytest.approx(ref, rel=0.05)  # same expectation over the noise


def test_chunked_update_peak_memory_is_bounded_by_the_chunk():
    D, max_tokens = 64, 32
    config = FlowConfig(depth=2)
    latents, mask = batch(B=4, T=129, D=D)
    mask[:] = True
    weights = torch.ones(4)
    peaks = {}
    for limit in (None, max_tokens):
        field = VelocityField(D, 2)
        opt = torch.optim.Adam(field.parameters(), lr=1e-3)
        flow_update(field, opt, latents, FRACS, mask, weights, config, max_tokens=limit)  # Adam state exists now
        peaks[limit] = peak_cpu_allocated_bytes(
            lambda: flow_update(field, opt, latents, FRACS, mask, weights, config, max_tokens=limit))
    # Bound: 64 fp32 vectors of width D per token-layer of a chunk (the update keeps about 47, measured), plus
    # one noise block (t and ε of NOISE_BLOCK tokens at every layer) and the flow's gradients.
    grads = sum(p.numel() for p in VelocityField(D, 2).parameters()) * 4
    bound = 64 * max_tokens * len(FRACS) * D * 4 + NOISE_BLOCK * len(FRACS) * (D + 1) * 4 + grads
    assert peaks[max_tokens] < bound, (peaks, bound)
    assert peaks[None] > 10 * peaks[max_tokens], peaks  # 512 tokens unchunked: the bound is what chunking buys


def test_a_nan_latent_is_refused_before_the_step():
    config = FlowConfig(depth=2)
    latents, mask = batch(D=16)
    latents[1][0, 3, 0] = float("nan")
    mask[0, 3] = True
    field = random_field(16, 2, dtype=torch.float32)
    before = copy.deepcopy(field.state_dict())
    with pytest.raises(ValueError, match=r"latents\[1\]"):
        flow_update(field, torch.optim.SGD(field.parameters(), lr=0.1), latents, FRACS, mask, torch.ones(4), config,
                    max_tokens=16)
    assert all(torch.equal(before[k], v) for k, v in field.state_dict().items())


def test_an_untrained_flow_warns():
    fresh = VelocityField(16, 2)
    with pytest.warns(UserWarning, match="output layer is all zero"):
        resolve_flow(fresh, FlowConfig(depth=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_untrained(random_field(16, 2)) is False


def test_trainer_online_update_with_max_tokens(tmp_path):
    """The compact trainer's bounded update (--flow-max-tokens) runs and logs its loss every RL step."""
    import json

    from helpers import need

    need("matplotlib")
    from train.config import ConfigError, tiny_config
    from train.pipeline import run_pipeline

    out = tmp_path / "run"
    run_pipeline(tiny_config(out=str(out), rl_steps=2, sft_steps=2, flow_steps=2, flow_soft=0.5, flow_max_tokens=8))
    rl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rl if r["stage"] == "rl" and r["kind"] == "train"]
    assert len(rl) == 2 and all(r["flow_loss"] > 0 for r in rl)
    with pytest.raises(ConfigError, match="--flow-max-tokens must be a positive integer"):
        tiny_config(flow_max_tokens=0).validate()
