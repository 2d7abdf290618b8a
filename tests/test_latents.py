"""`latent_flow_loss` and the pair gathering shared by rewards and training."""

import pytest
import torch

import flowkern as fk
from flowkern.latents import latent_flow_loss, pair_index, selected_pairs
from helpers import random_field


@pytest.mark.parametrize("mode", ["token_pre", "token_post", "identity"])
def test_latent_flow_loss_equals_hand_gathered_loss(mode):
    torch.manual_seed(0)
    field = random_field(8, 2, dtype=torch.float64)
    B, T = 3, 7
    latents = [torch.randn(B, T, 8, dtype=torch.float64) for _ in range(2)]
    weights = torch.rand(B, T, dtype=torch.float64)
    weights[0] = 0.0
    cfg = fk.FlowConfig(depth=2, context_mode=mode, shift=0 if mode == "identity" else 2)
    got = latent_flow_loss(field, latents, weights, cfg, layer_fracs=[0.25, 0.5], repeats=2,
                           generator=torch.Generator().manual_seed(1))
    targets, conds, layers, w = [], [], [], []
    for lat, frac in zip(latents, [0.25, 0.5]):
        cond, target, valid = fk.flow_pairs(lat, mode, cfg.shift)
        sel = weights[:, valid] != 0
        targets.append(target[sel]), conds.append(cond[sel])
        layers.append(torch.full((int(sel.sum()),), frac)), w.append(weights[:, valid][sel])
    want = fk.flow_matching_loss(field, torch.cat(targets), torch.cat(conds), torch.cat(layers), torch.cat(w),
                                 repeats=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)


def test_pair_index_positions():
    mask = torch.tensor([[True, True, False, True]])
    cfg = fk.FlowConfig(context_mode="token_pre", shift=1)
    idx = pair_index(selected_pairs(mask, cfg, 4), cfg)
    assert idx.pos.tolist() == [0, 1] and idx.cond_pos.tolist() == [1, 2]
    cfg = fk.FlowConfig(context_mode="token_post", shift=1)
    idx = pair_index(selected_pairs(mask, cfg, 4), cfg)
    assert idx.pos.tolist() == [1, 3] and idx.cond_pos.tolist() == [0, 2]


def test_latent_flow_loss_errors():
    field = random_field(8, 1, dtype=torch.float32)
    lat = [torch.randn(2, 5, 8)]
    cfg = fk.FlowConfig(depth=1)
    with pytest.raises(ValueError, match="mask must have shape"):
        latent_flow_loss(field, lat, torch.ones(2, 4), cfg, layer_fracs=[0.5])
    with pytest.raises(ValueError, match="hidden size"):
        latent_flow_loss(random_field(4, 1, dtype=torch.float32), lat, torch.ones(2, 5), cfg, layer_fracs=[0.5])
    loss = latent_flow_loss(field, lat, torch.zeros(2, 5), cfg, layer_fracs=[0.5])
    loss.backward()
    assert loss.item() == 0.0 and field.input_proj.weight.grad is not None
