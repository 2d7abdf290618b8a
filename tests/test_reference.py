"""Parity of the torch reference with an independent float64 re-derivation (tests/reference64.py)."""

import pytest
import torch

import flowkern as fk
import reference64 as ref
from helpers import random_field

NORMS = ("minmax", "minmax-bil", "mean", "none")


def test_velocity_matches_formula():
    torch.manual_seed(1)
    field = random_field(24, 3, seed=1)
    n = 7
    x, c = torch.randn(n, 24, dtype=torch.float64), torch.randn(n, 24, dtype=torch.float64)
    t = torch.rand(n, dtype=torch.float64)
    layer = torch.tensor([0.25, 0.5, 0.5, 0.75, 0.25, 0.75, 0.5], dtype=torch.float64)
    got = field(x, t, c, layer)
    want = ref.velocity(field.state_dict(), x, t, c, layer)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a float t and layer broadcast like a constant tensor
    torch.testing.assert_close(field(x, 0.3, c, 0.5), field(x, torch.full((n,), 0.3, dtype=torch.float64), c,
                                                            torch.full((n,), 0.5, dtype=torch.float64)))


def test_default_init_gives_zero_velocity():
    field = fk.VelocityField(16, 2)
    v = field(torch.randn(5, 16), 0.4, torch.randn(5, 16), 0.5)
    assert torch.count_nonzero(v) == 0
    assert sum(p.abs().sum() for p in field.final_layer.linear.parameters()) == 0


def test_layer_table_embeds_each_value_once_and_per_row_tensors_never_dedupe(monkeypatch):
    """A `LayerRows` table embeds each of its values once; an [N] tensor is embedded row by row (finding its
    distinct values would need torch.unique, a host sync); both give the same velocities."""
    from flowkern.field import LayerRows

    field = random_field(8, 1, dtype=torch.float32)
    seen = []
    original = field.layer_embed.embed_values
    monkeypatch.setattr(field.layer_embed, "embed_values", lambda v: (seen.append(v.numel()), original(v))[1])
    monkeypatch.setattr(torch, "unique", lambda *a, **k: pytest.fail("torch.unique syncs the host"))
    x_t, cond = torch.randn(5, 8), torch.randn(5, 8)
    table = LayerRows(torch.tensor([0.25, 0.75]), torch.tensor([0, 1, 0, 0, 1]))
    by_table = field(x_t, 0.5, cond, table)
    by_row = field(x_t, 0.5, cond, table.per_row())
    assert seen == [2, 5]
    torch.testing.assert_close(by_table, by_row, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared_noise", [True, False])
def test_flow_scores_matches_formula(shared_noise):
    torch.manual_seed(2)
    field = random_field(16, 2, seed=2)
    n, taus = 11, (0.3, 0.8)
    x1, c = torch.randn(n, 16, dtype=torch.float64), torch.randn(n, 16, dtype=torch.float64)
    layer = torch.rand(n, dtype=torch.float64)
    noise = torch.randn(n, 16, dtype=torch.float64) if shared_noise else torch.randn(2, n, 16, dtype=torch.float64)
    got = fk.flow_scores(field, x1, c, layer, timesteps=taus, noise=noise, backend="torch")
    want = ref.scores(field.state_dict(), x1, c, layer, taus, noise.expand(2, n, 16) if shared_noise else noise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_flow_scores_generator_is_deterministic():
    field = random_field(8, 1, dtype=torch.float32)
    x = torch.randn(6, 8)
    a = fk.flow_scores(field, x, x, 0.5, generator=torch.Generator().manual_seed(3))
    b = fk.flow_scores(field, x, x, 0.5, generator=torch.Generator().manual_seed(3))
    c = fk.flow_scores(field, x, x, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("repeats", [1, 3])
def test_flow_matching_loss_and_every_gradient(repeats):
    torch.manual_seed(3)
    field = random_field(12, 2, seed=3)
    B, T, D = 2, 5, 12
    x1, c = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    layer = torch.rand(B, T, dtype=torch.float64)
    weights = torch.rand(B, T, dtype=torch.float64)
    weights[1] = 0.0  # an empty row
    t = torch.rand(repeats, B, T, dtype=torch.float64)
    noise = torch.randn(repeats, B, T, D, dtype=torch.float64)
    loss = fk.flow_matching_loss(field, x1, c, layer, weights, t=t, noise=noise, repeats=repeats, backend="torch")
    loss.backward()
    state = {k: v.detach().clone().requires_grad_(v.is_floating_point() and "freqs" not in k)
             for k, v in field.state_dict().items()}
    want = ref.fm_loss(state, x1.reshape(-1, D), c.reshape(-1, D), layer.reshape(-1), weights.reshape(-1),
                              t.reshape(repeats, -1), noise.reshape(repeats, -1, D))
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-8)
    for name, p in field.named_parameters():
        torch.testing.assert_close(p.grad, state[name].grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_flow_matching_loss_empty_mask_is_zero_and_differentiable():
    field = random_field(8, 1, dtype=torch.float32)
    x = torch.randn(4, 8)
    loss = fk.flow_matching_loss(field, x, x, 0.5, torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in field.parameters())


def test_flow_matching_loss_inputs_detached_unless_asked():
    field = random_field(8, 1, dtype=torch.float32)
    x = torch.randn(4, 8, requires_grad=True)
    fk.flow_matching_loss(field, x, x, 0.5).backward()
    assert x.grad is None
    fk.flow_matching_loss(field, x, x, 0.5, input_grad=True).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_flow_matching_loss_samples_logit_normal_t():
    field = random_field(4, 1, dtype=torch.float32)
    seen = {}
    original = field.time_embed.forward

    def spy(value, n_rows):
        seen["t"] = value
        return original(value, n_rows)

    field.time_embed.forward = spy
    x = torch.randn(4000, 4)
    fk.flow_matching_loss(field, x, x, 0.5, generator=torch.Generator().manual_seed(0))
    logits = torch.logit(seen["t"])
    assert abs(logits.mean()) < 0.08 and abs(logits.std() - 1) < 0.08


@pytest.mark.parametrize("mode,shift", [("token_pre", 1), ("token_pre", 2), ("token_post", 1), ("identity", 0)])
def test_flow_pairs(mode, shift):
    h = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    cond, target, valid = fk.flow_pairs(h, mode, shift)
    positions = valid.nonzero().squeeze(-1)
    torch.testing.assert_close(target, h[:, positions])
    if mode == "token_pre":
        torch.testing.assert_close(cond, h[:, positions + shift])
        assert valid.sum() == 6 - shift and not valid[-shift:].any()
    elif mode == "token_post":
        torch.testing.assert_close(cond, h[:, positions - shift])
        assert not valid[:shift].any()
    else:
        assert cond is h and valid.all()


def _shape_reference(scores, action, cfg):
    return torch.tensor([ref.shape_row(scores[b].double(), action[b], cfg.norm, cfg.threshold, cfg.topk, cfg.coef)
                         for b in range(scores.shape[0])], dtype=torch.float64)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("topk", [0, 2, 5])
def test_shape_rewards_matches_loops(norm, topk):
    torch.manual_seed(4)
    B, T = 5, 17
    scores = torch.rand(B, T) * 3
    action = torch.rand(B, T) > 0.3
    action[0] = False  # no action token at all
    scores[1] = 0.7  # constant row
    action[2, :] = False
    action[2, 4] = True  # a single action token
    cfg = fk.FlowConfig(norm=norm, topk=topk, threshold=0.2 if norm != "none" else 1.0, coef=0.05)
    got = fk.shape_rewards(scores, action, cfg, backend="torch")
    torch.testing.assert_close(got.double(), _shape_reference(scores, action, cfg), rtol=1e-6, atol=1e-7)
    assert (got[~action] == 0).all() and (got[0] == 0).all()
    if norm != "none":
        assert (got[1] == 0).all() and (got[2] == 0).all()


def test_topk_larger_than_survivors_keeps_all():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    action = torch.ones(1, 5, dtype=torch.bool)
    cfg = fk.FlowConfig(norm="minmax", threshold=0.3, topk=15, coef=1.0)
    got = fk.shape_rewards(scores, action, cfg)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, -0.5, -0.75, -1.0]]))


def test_bilateral_topk_takes_half_per_side():
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0]])
    action = torch.ones(1, 7, dtype=torch.bool)
    cfg = fk.FlowConfig(norm="minmax-bil", threshold=0.1, topk=2, coef=1.0)
    got = fk.shape_rewards(scores, action, cfg)
    # s = [-1, -.8, -.6, 0, .6, .8, 1]: one most negative (-1) and one largest (1) are kept
    torch.testing.assert_close(got, torch.tensor([[1.0, 0, 0, 0, 0, 0, -1.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("T", [9, 150])
def test_shape_advantages_matches_loops(gamma, T):
    torch.manual_seed(5)
    B, n = 6, 3
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # second group has zero std
    rewards = torch.randn(B, T) * 0.1
    action = torch.rand(B, T) > 0.4
    action[3] = False
    got = fk.shape_advantages(outcome, rewards, action, n, gamma)
    want = ref.advantages(outcome, rewards, action, n, gamma)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[~action] == 0).all()


def _reward_reference(field, latents, action, cfg, fracs, noise):
    B, T, D = latents[0].shape
    scores = torch.zeros(B, T, dtype=torch.float64)
    state = field.state_dict()
    shift = cfg.shift
    for b in range(B):
        for k in range(T):
            ck = {"token_pre": k + shift, "token_post": k - shift, "identity": k}[cfg.context_mode]
            if not action[b, k] or not 0 <= ck < T:
                continue
            per_layer = [ref.scores(state, lat[b, k][None], lat[b, ck][None], torch.tensor([f]),
                                    cfg.timesteps, nz[b, k][None, None].expand(len(cfg.timesteps), 1, D))
                         for lat, nz, f in zip(latents, noise, fracs)]
            scores[b, k] = sum(float(s) for s in per_layer) / len(latents)
    scored = action.clone()
    if cfg.context_mode == "token_pre":
        scored[:, T - shift:] = False
    elif cfg.context_mode == "token_post":
        scored[:, :shift] = False
    return _shape_reference(scores, scored, cfg)


@pytest.mark.parametrize("mode", ["token_pre", "token_post", "identity"])
@pytest.mark.parametrize("norm", ["minmax-bil", "minmax"])
def test_flow_reward_matches_formula(mode, norm):
    torch.manual_seed(6)
    B, T, D = 3, 8, 8
    field = random_field(D, 2, seed=6)
    latents = [torch.randn(B, T, D, dtype=torch.float64) for _ in range(2)]
    noise = [torch.randn(B, T, D, dtype=torch.float64) for _ in range(2)]
    action = torch.zeros(B, T, dtype=torch.bool)
    action[:, 3:] = True
    action[1, 6:] = False
    cfg = fk.FlowConfig(context_mode=mode, shift=0 if mode == "identity" else 1, norm=norm, threshold=0.1,
                        topk=4, timesteps=(0.5, 0.8))
    fracs = [0.25, 0.75]
    got = fk.flow_reward(field, latents, action, cfg, layer_fracs=fracs, noise=noise, backend="torch")
    want = _reward_reference(field, latents, action, cfg, fracs, noise)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got.dtype == torch.float32 and (got[~action] == 0).all()
