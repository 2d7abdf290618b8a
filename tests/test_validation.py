"""Bad input gives a clear error naming the argument; defined edge cases behave as documented."""

import pytest
import torch

import flowkern as fk
from flowkern import backend
from helpers import random_field

B, T, D = 2, 6, 8


@pytest.fixture
def setup():
    field = random_field(D, 1, dtype=torch.float32)
    latents = [torch.randn(B, T, D) for _ in range(2)]
    action = torch.ones(B, T, dtype=torch.bool)
    return field, latents, action, fk.FlowConfig(depth=1)


def _reward(field, latents, action, cfg, **kw):
    return fk.flow_reward(field, latents, action, cfg, layer_fracs=kw.pop("fracs", [0.25, 0.75]), **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents(setup, bad):
    field, latents, action, cfg = setup
    latents[1][0, 2, 3] = bad
    with pytest.raises(ValueError, match=r"latents\[1\].*NaN or Inf"):
        _reward(field, latents, action, cfg)


def test_mismatched_shapes(setup):
    field, latents, action, cfg = setup
    with pytest.raises(ValueError, match=r"latents\[1\]"):
        _reward(field, [latents[0], torch.randn(B, T + 1, D)], action, cfg)
    with pytest.raises(ValueError, match="hidden size"):
        _reward(field, [torch.randn(B, T, D + 1)] * 2, action, cfg)
    with pytest.raises(ValueError, match="layer_fracs"):
        _reward(field, latents, action, cfg, fracs=[0.5])
    with pytest.raises(ValueError, match=r"latents\[0\] must be \[B, T, D\]"):
        _reward(field, [torch.randn(T, D)] * 2, action, cfg)


def test_non_floating_latents(setup):
    field, latents, action, cfg = setup
    with pytest.raises(TypeError, match=r"latents\[0\] must be a floating"):
        _reward(field, [torch.ones(B, T, D, dtype=torch.long)] * 2, action, cfg)


def test_bad_mask(setup):
    field, latents, action, cfg = setup
    with pytest.raises(ValueError, match="action_mask must have shape"):
        _reward(field, latents, action[:, :-1], cfg)
    with pytest.raises(TypeError, match="action_mask must be a bool"):
        _reward(field, latents, action.float(), cfg)


def test_shift_not_below_t(setup):
    field, latents, action, _ = setup
    with pytest.raises(ValueError, match="shift"):
        _reward(field, latents, action, fk.FlowConfig(depth=1, shift=T))


def test_timesteps_outside_unit_interval(setup):
    field, latents, _, _ = setup
    x = latents[0][0]
    for bad in (0.0, 1.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="timesteps"):
            fk.FlowConfig(timesteps=(bad,))
        with pytest.raises(ValueError, match="timesteps"):
            fk.flow_scores(field, x, x, 0.5, timesteps=(0.5, bad))


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size"):
        fk.shape_advantages(torch.zeros(6), torch.zeros(6, 4), torch.ones(6, 4, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="group_size"):
        fk.shape_advantages(torch.zeros(6), torch.zeros(6, 4), torch.ones(6, 4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="outcome must have shape"):
        fk.shape_advantages(torch.zeros(5), torch.zeros(6, 4), torch.ones(6, 4, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="gamma"):
        fk.shape_advantages(torch.zeros(6), torch.zeros(6, 4), torch.ones(6, 4, dtype=torch.bool), 3, gamma=1.5)


def test_mixed_devices(setup):
    field, latents, action, cfg = setup
    with pytest.raises(ValueError, match="one device"):
        _reward(field, latents, action.to("meta"), cfg)
    with pytest.raises(ValueError, match="one device"):
        fk.shape_advantages(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool, device="meta"), 2)


def test_noise_shapes_are_checked(setup):
    field, latents, action, cfg = setup
    with pytest.raises(ValueError, match=r"noise\[0\]"):
        _reward(field, latents, action, cfg, noise=[torch.randn(B, T, D - 1), torch.randn(B, T, D)])
    x = latents[0][0]
    with pytest.raises(ValueError, match="noise must be"):
        fk.flow_scores(field, x, x, 0.5, noise=torch.randn(3, T, D), timesteps=(0.5, 0.8))


def test_loss_argument_errors(setup):
    field, latents, _, _ = setup
    x = latents[0]
    with pytest.raises(ValueError, match="repeats"):
        fk.flow_matching_loss(field, x, x, 0.5, repeats=0)
    with pytest.raises(ValueError, match="t must have shape"):
        fk.flow_matching_loss(field, x, x, 0.5, t=torch.rand(3), repeats=2)
    with pytest.raises(ValueError, match="t must lie"):
        fk.flow_matching_loss(field, x, x, 0.5, t=torch.full((B, T), 1.5))
    with pytest.raises(ValueError, match="mask weights"):
        fk.flow_matching_loss(field, x, x, 0.5, -torch.ones(B, T))
    with pytest.raises(ValueError, match="layer must be"):
        fk.flow_matching_loss(field, x, x, torch.rand(3), None)
    with pytest.raises(TypeError, match="field must be"):
        fk.flow_matching_loss(torch.nn.Linear(D, D), x, x, 0.5)


def test_no_action_tokens_give_zero_rewards(setup):
    field, latents, action, cfg = setup
    action[1] = False
    out = _reward(field, latents, action, cfg)
    assert (out[1] == 0).all() and out.shape == (B, T)
    assert (_reward(field, latents, torch.zeros_like(action), cfg) == 0).all()


@pytest.mark.parametrize("field_name,value,match", [
    ("context_mode", "token_mid", "context_mode"), ("norm", "zscore", "norm"), ("shift", 0, "shift"),
    ("depth", 0, "depth"), ("topk", -1, "topk"), ("threshold", -0.5, "threshold"), ("coef", float("nan"), "coef"),
    ("eps", 0.0, "eps"), ("hook_layers", (), "hook_layers"), ("hook_layers", (1.2,), "hook_layers"),
    ("topk", 1, "topk"), ("timesteps", "abc", "timesteps"),
])
def test_config_errors_name_the_field(field_name, value, match):
    with pytest.raises(ValueError, match=match):
        fk.FlowConfig(**{field_name: value})


def test_config_round_trip():
    cfg = fk.FlowConfig(hook_layers=[0.5], timesteps=0.7, norm="mean")
    assert cfg.hook_layers == (0.5,) and cfg.timesteps == (0.7,)
    assert fk.FlowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        fk.FlowConfig.from_dict({"nrom": "mean"})


def test_backend_selection(setup, monkeypatch):
    field, latents, action, cfg = setup
    x = latents[0][0]
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.flow_scores(field, x, x, 0.5, backend="cutlass")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for flow_scores"):
        fk.flow_scores(field, x, x, 0.5, backend="cuda")
    assert "torch" in fk.available_backends("flow_scores", torch.device("cpu"))
    assert backend.resolve("flow_scores", "auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("FLOWKERN_BACKEND", "torch")
    assert backend.resolve("flow_scores", "cuda", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("FLOWKERN_BACKEND", "triton")
    with pytest.raises(ValueError, match="FLOWKERN_BACKEND"):
        backend.resolve("flow_scores", "auto", torch.device("cpu"))


# --------------------------------------------------------------------------- NaN/Inf: checked once, on the result

@pytest.mark.parametrize("arg", ["target", "cond", "noise", "layer"])
def test_flow_scores_names_the_non_finite_argument(setup, arg):
    field = setup[0]
    n = 5
    args = dict(target=torch.randn(n, D), cond=torch.randn(n, D), noise=torch.randn(n, D), layer=torch.rand(n))
    args[arg][1] = float("nan") if arg != "noise" else float("inf")
    call = dict(timesteps=(0.8,), noise=args["noise"])
    with pytest.raises(ValueError, match=f"^{arg} contains NaN or Inf"):
        fk.flow_scores(field, args["target"], args["cond"], args["layer"], **call)
    out = fk.flow_scores(field, args["target"], args["cond"], args["layer"], check_finite=False, **call)
    assert not torch.isfinite(out[1]) and torch.isfinite(out[[0, 2, 3, 4]]).all()  # the bad row only


def test_non_finite_field_is_reported_as_such(setup):
    field = setup[0]
    with torch.no_grad():
        field.input_proj.bias[0] = float("nan")
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="flow_scores contains NaN or Inf although every input is finite"):
        fk.flow_scores(field, x, x, 0.5)


def test_flow_reward_checks_what_it_reads(setup):
    """A NaN where a scored token or its context sits is named; one where nothing is read is harmless."""
    field, latents, action, cfg = setup  # token_pre, shift 1: target k reads positions k and k + 1
    action[:, :3] = False
    latents[0][1, 1, 0] = float("nan")  # position 1: neither a scored target nor the context of one
    out = _reward(field, latents, action, cfg)
    assert torch.isfinite(out).all()
    latents[0][1, 3, 0] = float("nan")  # position 3: a scored target
    with pytest.raises(ValueError, match=r"^latents\[0\] contains NaN or Inf"):
        _reward(field, latents, action, cfg)
    assert _reward(field, latents, action, cfg, check_finite=False).shape == (B, T)
    latents[0][1, 3, 0] = 0.0
    noise = [torch.randn(B, T, D) for _ in latents]
    noise[1][0, T - 1, 2] = float("inf")  # the last position has no context: never scored under token_pre
    _reward(field, latents, action, cfg, noise=noise)
    noise[1][0, T - 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^noise\[1\] contains NaN or Inf"):
        _reward(field, latents, action, cfg, noise=noise)


def test_flow_reward_checks_contexts(setup):
    field, latents, action, cfg = setup
    action[:, 2:] = False  # targets 0 and 1, whose contexts are positions 1 and 2
    latents[1][0, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^latents\[1\] contains NaN or Inf"):
        _reward(field, latents, action, cfg)


def test_shaping_checks_can_be_skipped():
    scores = torch.rand(6, 4)
    action = torch.ones(6, 4, dtype=torch.bool)
    scores[2, 1] = float("nan")
    cfg = fk.FlowConfig()
    with pytest.raises(ValueError, match="^scores contains NaN or Inf"):
        fk.shape_rewards(scores, action, cfg)
    fk.shape_rewards(scores, action, cfg, check_finite=False)
    with pytest.raises(ValueError, match="^token_rewards contains NaN or Inf"):
        fk.shape_advantages(torch.zeros(6), scores, action, 3)
    with pytest.raises(ValueError, match="^outcome contains NaN or Inf"):
        fk.shape_advantages(torch.tensor([0.0, 1, float("inf"), 0, 1, 0]), torch.zeros(6, 4), action, 3)
    fk.shape_advantages(torch.zeros(6), scores, action, 3, check_finite=False)


def test_loss_checks_its_result(setup):
    field, latents, _, cfg = setup
    x = latents[0].clone()
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^target contains NaN or Inf"):
        fk.flow_matching_loss(field, x, latents[1], 0.5)
    with pytest.raises(ValueError, match="^t contains NaN or Inf"):
        fk.flow_matching_loss(field, latents[0], latents[1], 0.5, t=torch.full((B, T), float("nan")))
    with pytest.raises(ValueError, match=r"^latents\[1\] contains NaN or Inf"):
        fk.latent_flow_loss(field, [latents[0], x], torch.ones(B, T, dtype=torch.bool), cfg, layer_fracs=(0.2, 0.4))
    with pytest.raises(ValueError, match="^mask contains NaN or Inf"):
        fk.flow_matching_loss(field, latents[0], latents[1], 0.5, torch.full((B, T), float("nan")))


def test_available_backends_takes_strings_and_names_the_ops():
    assert fk.available_backends("flow_scores", "cpu") == fk.available_backends("flow_scores", torch.device("cpu"))
    assert "torch" in fk.available_backends("shape_rewards", "cpu")
    with pytest.raises(ValueError, match=r"unknown op 'flow_score'.*'flow_matching_loss'.*'flow_scores'"):
        fk.available_backends("flow_score", "cpu")
