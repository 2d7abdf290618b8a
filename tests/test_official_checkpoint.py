"""Checkpoints of the released RLFR code load into flowkern, and flowkern flows go back out.

Everything on the released side is re-created here from reading its source (Jinghaoleven/RLFR), never
from flowkern's own module:

- ``FlowReward`` (``openrlhf/openrlhf/models/lmm_kits/flow_simple.py``, the same network as
  ``LLaMA-Factory/.../flow_model/flow_simple.py``) holds the velocity network as ``.model``, so every key
  of its state dict starts with ``model.``. Width = target = cond channels = the LLM's hidden size D.
- The two ``TimestepEmbedder``s register ``freqs = exp(-ln(10000) * arange(128) / 128)[None]``: a
  persistent fp32 buffer of shape **[1, 128]**; the module is then cast with ``.to(model.dtype)``, so in
  a bf16 run the buffer (and every weight) is stored as bf16.
- ``actor_flow.py`` finds ``flow_model.bin`` in a directory, ``torch.load``s it and calls
  ``FlowReward.load_state_dict(state, strict=True)``.
- ``config/flow_config_3B.json`` / ``flow_config_7B.json`` hold exactly four keys.

`released_velocity` is an independent functional re-implementation of the released forward pass
(``x.to(c.dtype)``; ``y = lemb + cond + temb``; sinusoids ``cos`` then ``sin`` of ``t.float() * freqs``;
RMSNorm in fp32 cast back before the weight; adaLN chunks (shift, scale, gate)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowkern as fk
from flowkern.checkpoint import official_state_dict
from helpers import need

EPS = 1e-6
HALF = 128  # sinusoid frequencies per embedder
OFFICIAL_3B = {"num_layers_flow": 4, "hook_layers_percentile": "0.25+0.5+0.75", "flow_context_mode": "token_post",
               "flow_shift": "1"}
OFFICIAL_7B = {**OFFICIAL_3B, "num_layers_flow": 6}


# --------------------------------------------------------------------------- the released side, re-created

def released_shapes(dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Every key of the released ``FlowReward(D, D, depth, D).state_dict()`` and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        shapes[f"model.{name}.weight"], shapes[f"model.{name}.bias"] = (n_out, n_in), (n_out,)

    linear("input_proj", dim, dim)
    linear("cond_embed", dim, dim)
    for emb in ("time_embed", "layer_embed"):
        shapes[f"model.{emb}.freqs"] = (1, HALF)
        linear(f"{emb}.mlp.0", dim, 2 * HALF)
        linear(f"{emb}.mlp.2", dim, dim)
    for i in range(depth):
        shapes[f"model.res_blocks.{i}.in_ln.weight"] = (dim,)
        linear(f"res_blocks.{i}.mlp.0", dim, dim)
        linear(f"res_blocks.{i}.mlp.2", dim, dim)
        linear(f"res_blocks.{i}.adaLN_modulation.1", 3 * dim, dim)
    shapes["model.final_layer.norm_final.weight"] = (dim,)
    linear("final_layer.linear", dim, dim)
    linear("final_layer.adaLN_modulation.1", 2 * dim, dim)
    return shapes


def released_freqs() -> torch.Tensor:
    return torch.exp(-math.log(10000) * torch.arange(0, HALF, dtype=torch.float32) / HALF)[None]


def released_state_dict(dim: int, depth: int, dtype: torch.dtype = torch.float32, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """A trained-looking released state dict: random weights of Xavier-like scale, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_shapes(dim, depth).items():
        if key.endswith("freqs"):
            value = released_freqs()
        elif key.endswith("ln.weight") or key.endswith("norm_final.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2:
            value = torch.randn(shape, generator=g) * shape[1] ** -0.5
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[key] = value.to(dtype)
    return state


class ReleasedLayout(nn.Module):
    """A module with exactly the released parameter and buffer names (for ``load_state_dict(strict=True)``)."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        for key, shape in released_shapes(dim, depth).items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if leaf == "freqs":
                module.register_buffer(leaf, torch.zeros(shape))
            else:
                module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))


def released_velocity(state: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                      layer: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The released ``SimpleMLPAdaLNTimePos.forward(x, t, c, l)`` on a ``model.``-prefixed state dict."""
    def lin(name, h):
        return F.linear(h, state[f"model.{name}.weight"], state[f"model.{name}.bias"])

    def rms(name, h):
        hf = h.to(torch.float32)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        return state[f"model.{name}.weight"] * hf.to(h.dtype)

    def embed(name, s):
        args = s[:, None].float() * state[f"model.{name}.freqs"]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return lin(f"{name}.mlp.2", F.silu(lin(f"{name}.mlp.0", feats.to(state[f"model.{name}.mlp.0.weight"].dtype))))

    a = lin("input_proj", x.to(c.dtype))
    y = embed("layer_embed", layer) + lin("cond_embed", c) + embed("time_embed", t)
    depth = len({k.split(".")[2] for k in state if k.startswith("model.res_blocks.")})
    for i in range(depth):
        shift, scale, gate = lin(f"res_blocks.{i}.adaLN_modulation.1", F.silu(y)).chunk(3, dim=-1)
        h = rms(f"res_blocks.{i}.in_ln", a) * (1 + scale) + shift
        a = a + gate * lin(f"res_blocks.{i}.mlp.2", F.silu(lin(f"res_blocks.{i}.mlp.0", h)))
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(y)).chunk(2, dim=-1)
    return lin("final_layer.linear", rms("final_layer.norm_final", a) * (1 + scale) + shift)


def released_score(state, x1, c, layer_frac, noise, tau):
    """The released ``FlowReward.forward`` score for one rewarding timestep, with its noise supplied."""
    n = x1.shape[0]
    t = torch.full((n,), tau)
    xt, ut = t[:, None] * x1 + (1 - t[:, None]) * noise, x1 - noise
    v = released_velocity(state, xt, t, c, torch.ones(n) * layer_frac)
    return tau / (1 - tau) * ((v.float() - ut.float()) ** 2).mean(-1)


def _inputs(dim: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, dim, generator=g).to(dtype) for _ in range(3))


def _save(state, directory):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "flow_model.bin")
    return directory / "flow_model.bin"


# --------------------------------------------------------------------------- loading what the released code writes

# fp16/bf16 agree bit for bit on a plain CPU; the tolerances only leave room for other BLAS builds. In fp32 the
# embedders' GEMMs differ in shape (flowkern embeds each distinct t or layer once, the released module once per
# row), which moves velocities by ~5e-7 of their scale: as much as the released module moves between batch sizes.
TOL = {torch.float32: dict(rtol=1e-6, atol=4e-6), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def assert_velocities_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Elementwise rtol, plus an atol relative to the velocities' scale (for entries near zero)."""
    tol = TOL[want.dtype]
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prefix", ["model.", ""], ids=["model.", "bare"])
@pytest.mark.parametrize("freqs_shape", [(1, HALF), (HALF,)], ids=["freqs1x128", "freqs128"])
def test_released_state_dict_loads_and_gives_its_velocities(tmp_path, dtype, prefix, freqs_shape):
    dim, depth, n = 48, 2, 33
    state = released_state_dict(dim, depth, dtype)
    on_disk = {(prefix + k[len("model."):]): (v.reshape(freqs_shape) if k.endswith("freqs") else v)
               for k, v in state.items()}
    path = _save(on_disk, tmp_path)
    field, config = fk.load_flow_field(tmp_path)  # a directory, as the released loader takes it
    assert config is None and (field.dim, field.depth) == (dim, depth)
    for key, value in field.state_dict().items():  # every tensor kept bit for bit, in its dtype
        assert value.dtype == dtype and torch.equal(value.reshape(state["model." + key].shape), state["model." + key])
    assert tuple(field.time_embed.freqs.shape) == (HALF,)
    x, c, _ = _inputs(dim, n, dtype)
    t, layer = torch.rand(n, generator=torch.Generator().manual_seed(2)), torch.full((n,), 9 / 28)
    with torch.no_grad():
        got = field(x, t, c, layer)
        want = released_velocity(state, x, t, c, layer)
    assert got.dtype == want.dtype == dtype
    assert_velocities_close(got, want)
    loaded_file, _ = fk.load_flow_field(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded_file.state_dict().values(), field.state_dict().values()))


def test_conditioning_is_summed_in_the_released_order():
    field = fk.checkpoint.field_from_state_dict(released_state_dict(32, 1, torch.bfloat16))
    _, c, _ = _inputs(32, 16, torch.bfloat16)
    with torch.no_grad():
        lemb, cemb, temb = field.layer_embed(0.25, 16), field.cond_embed(c), field.time_embed(0.8, 16)
        assert torch.equal(field.conditioning(c, 0.8, 0.25), (lemb + cemb) + temb)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("timesteps", [(0.8,), (0.6, 0.8)])
def test_scores_of_a_released_checkpoint_match_the_released_formula(tmp_path, timesteps, backend):
    """fp32, rtol 1e-6. Each timestep carries its own debias weight τ/(1-τ) (DESIGN.md); with several
    timesteps the released ``FlowReward.forward`` applies the last one's weight to all of them."""
    if backend == "triton":
        need("triton")
    dim, depth, n = 64, 3, 70
    state = released_state_dict(dim, depth, seed=3)
    field, _ = fk.load_flow_field(_save(state, tmp_path))
    x1, c, noise = _inputs(dim, n, seed=4)
    layer = 14 / 28
    got = fk.flow_scores(field, x1, c, layer, timesteps=timesteps, noise=noise, backend=backend)
    want = sum(released_score(state, x1, c, layer, noise, tau) for tau in timesteps) / len(timesteps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_extra_non_flow_keys_are_named(tmp_path):
    state = released_state_dict(16, 1)
    state["model.value_head.weight"] = torch.zeros(1, 16)
    state.update({f"pretrained_model.layers.{i}.mlp.weight": torch.zeros(2) for i in range(20)})
    with pytest.raises(ValueError, match="unexpected") as err:
        fk.load_flow_field(_save(state, tmp_path))
    msg = str(err.value)
    assert "model.value_head.weight" in msg and "pretrained_model.layers.0.mlp.weight" in msg and "more]" in msg


def test_both_prefixed_and_bare_copies_of_a_key_are_refused():
    state = released_state_dict(16, 1)
    state["input_proj.bias"] = state["model.input_proj.bias"]
    with pytest.raises(ValueError, match="'input_proj.bias'"):
        fk.checkpoint.field_from_state_dict(state)


def test_misshaped_freqs_name_the_official_shape():
    state = released_state_dict(16, 1)
    state["model.time_embed.freqs"] = torch.zeros(2, HALF)
    with pytest.raises(ValueError, match=r"model.time_embed.freqs: expected \[1, 128\], got \[2, 128\]"):
        fk.checkpoint.field_from_state_dict(state)


# --------------------------------------------------------------------------- the official config JSON

def test_official_configs_map_to_flowconfig(tmp_path):
    for official, depth in ((OFFICIAL_3B, 4), (OFFICIAL_7B, 6)):
        path = tmp_path / f"flow_config_{depth}.json"
        path.write_text(json.dumps(official, indent=2))
        for source in (official, path, str(path)):
            cfg = fk.FlowConfig.from_official(source)
            assert (cfg.depth, cfg.hook_layers, cfg.context_mode, cfg.shift) == (depth, (0.25, 0.5, 0.75),
                                                                                 "token_post", 1)
            assert cfg.to_official() == official
    cfg = fk.FlowConfig.from_official(OFFICIAL_3B, eps=1e-5, norm="minmax", timesteps=(0.8,))
    assert (cfg.eps, cfg.norm) == (1e-5, "minmax")


BAD = [
    ({"num_layers_flow": 0}, "num_layers_flow"),
    ({"num_layers_flow": "4"}, "num_layers_flow"),
    ({"hook_layers_percentile": "all"}, "hook_layers_percentile"),
    ({"hook_layers_percentile": "0.25+half"}, "hook_layers_percentile"),
    ({"hook_layers_percentile": "0.5+1.5"}, "hook_layers_percentile"),
    ({"flow_context_mode": "layer_post"}, "flow_context_mode"),
    ({"flow_context_mode": "token_pre+token_post", "flow_shift": "1+1"}, "flow_context_mode"),
    ({"flow_shift": "one"}, "flow_shift"),
    ({"flow_shift": "0"}, "flow_shift"),
    ({"flow_shift": ""}, "flow_shift"),
    ({"extra": 1}, "extra"),
]


@pytest.mark.parametrize("change,key", BAD, ids=[f"{next(iter(c))}={c[next(iter(c))]!r}" for c, _ in BAD])
def test_bad_official_config_values_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        fk.FlowConfig.from_official({**OFFICIAL_3B, **change})


def test_official_config_needs_all_four_keys_and_no_clashing_overrides(tmp_path):
    with pytest.raises(ValueError, match="flow_shift"):
        fk.FlowConfig.from_official({k: v for k, v in OFFICIAL_3B.items() if k != "flow_shift"})
    with pytest.raises(ValueError, match="depth"):
        fk.FlowConfig.from_official(OFFICIAL_3B, depth=6)
    with pytest.raises(TypeError, match="path_or_dict"):
        fk.FlowConfig.from_official(4)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        fk.FlowConfig.from_official(tmp_path / "list.json")


def test_load_takes_a_config_or_the_official_json(tmp_path):
    state = released_state_dict(16, 4)
    path = _save(state, tmp_path / "ckpt")
    json_path = tmp_path / "flow_config_3B.json"
    json_path.write_text(json.dumps(OFFICIAL_3B))
    _, cfg = fk.load_flow_field(path, config=json_path)
    assert cfg == fk.FlowConfig.from_official(OFFICIAL_3B)
    field, cfg = fk.load_flow_field(path, config=fk.FlowConfig(depth=4, eps=1e-5))
    assert cfg.eps == 1e-5 and field.eps == 1e-5  # the policy's rms_norm_eps reaches the field
    (tmp_path / "ckpt" / "flow_config.json").write_text(json.dumps(OFFICIAL_3B))
    _, cfg = fk.load_flow_field(tmp_path / "ckpt")  # the JSON beside flow_model.bin is picked up
    assert cfg == fk.FlowConfig.from_official(OFFICIAL_3B)
    with pytest.raises(ValueError, match="config has depth 6"):
        fk.load_flow_field(path, config=fk.FlowConfig(depth=6))
    with pytest.raises(TypeError, match="config must be"):
        fk.load_flow_field(path, config=OFFICIAL_3B)


# --------------------------------------------------------------------------- exporting flowkern flows

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_is_the_released_layout_and_round_trips_bit_exactly(tmp_path, dtype):
    dim, depth = 24, 3
    field = fk.checkpoint.field_from_state_dict(released_state_dict(dim, depth, seed=5))
    field = field.to(dtype)
    config = fk.FlowConfig(depth=depth, hook_layers=(0.25, 0.5, 0.75), context_mode="token_pre", shift=1)
    path = fk.save_flow_field(field, tmp_path, config, format="official")
    assert path == tmp_path / "flow_model.bin"
    assert json.loads((tmp_path / "flow_config.json").read_text()) == {
        "num_layers_flow": 3, "hook_layers_percentile": "0.25+0.5+0.75", "flow_context_mode": "token_pre",
        "flow_shift": "1"}
    on_disk = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == released_shapes(dim, depth)
    assert all(v.dtype == torch.float32 for v in on_disk.values())
    ReleasedLayout(dim, depth).load_state_dict(on_disk, strict=True)  # what actor_flow.py does
    back, back_cfg = fk.load_flow_field(tmp_path)
    assert back_cfg == config
    for (key, a), (key_b, b) in zip(field.state_dict().items(), back.state_dict().items()):
        assert key == key_b and torch.equal(b.to(dtype), a), key
    x, c, _ = _inputs(dim, 9)
    with torch.no_grad():
        assert_velocities_close(field.float()(x, 0.8, c, 0.5),
                                released_velocity(on_disk, x, torch.full((9,), 0.8), c, torch.full((9,), 0.5)))
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(back(x, 0.8, c, 0.5), field(x, 0.8, c, 0.5))


def test_official_state_dict_and_export_errors(tmp_path):
    field = fk.VelocityField(8, 1)
    state = official_state_dict(field)
    assert state["model.layer_embed.freqs"].shape == (1, HALF)
    assert state["model.input_proj.weight"].data_ptr() != field.input_proj.weight.data_ptr()
    with pytest.raises(ValueError, match="format"):
        fk.save_flow_field(field, tmp_path / "f.bin", fk.FlowConfig(depth=1), format="pickle")
    path = fk.save_flow_field(field, tmp_path / "out" / "flow_model.bin", fk.FlowConfig(depth=1), format="official")
    assert path.exists() and (tmp_path / "out" / "flow_config.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    # a path without .bin is the directory the released loader is given
    path = fk.save_flow_field(field, tmp_path / "export", fk.FlowConfig(depth=1), format="official")
    assert path == tmp_path / "export" / "flow_model.bin" and (tmp_path / "export" / "flow_config.json").exists()
