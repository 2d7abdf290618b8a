"""Checkpoints: the official state-dict layout, flowkern safetensors + sidecar, and their errors."""

import json

import pytest
import torch

import flowkern as fk
from flowkern.checkpoint import official_state_dict, sidecar_path
from helpers import random_field

OFFICIAL_KEYS = {
    "input_proj.weight", "input_proj.bias", "cond_embed.weight", "cond_embed.bias",
    "time_embed.freqs", "time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight",
    "time_embed.mlp.2.bias", "layer_embed.freqs", "layer_embed.mlp.0.weight", "layer_embed.mlp.0.bias",
    "layer_embed.mlp.2.weight", "layer_embed.mlp.2.bias",
    "final_layer.norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}


def _block_keys(i):
    return {f"res_blocks.{i}.in_ln.weight", f"res_blocks.{i}.mlp.0.weight", f"res_blocks.{i}.mlp.0.bias",
            f"res_blocks.{i}.mlp.2.weight", f"res_blocks.{i}.mlp.2.bias",
            f"res_blocks.{i}.adaLN_modulation.1.weight", f"res_blocks.{i}.adaLN_modulation.1.bias"}


def _outputs(field):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5, field.dim, generator=g), torch.randn(5, field.dim, generator=g)
    return field(x, torch.rand(5, generator=g), c, 0.5)


def test_state_dict_keys_are_official():
    field = fk.VelocityField(8, 3)
    assert set(field.state_dict()) == OFFICIAL_KEYS | _block_keys(0) | _block_keys(1) | _block_keys(2)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_flowkern_state_dict_saved_as_bin_loads(tmp_path, prefix):
    """flowkern's own state dict (freqs [128]) written with torch.save; the released layout itself is
    re-created from the released source in test_official_checkpoint.py."""
    field = random_field(12, 2, dtype=torch.float32)
    path = tmp_path / "flow_model.bin"
    torch.save({prefix + k: v for k, v in field.state_dict().items()}, path)
    loaded, config = fk.load_flow_field(path)
    assert config is None and (loaded.dim, loaded.depth) == (12, 2)
    torch.testing.assert_close(_outputs(loaded), _outputs(field), rtol=1e-5, atol=1e-6)
    loaded_dir, _ = fk.load_flow_field(tmp_path)  # a directory holding flow_model.bin
    torch.testing.assert_close(_outputs(loaded_dir), _outputs(field), rtol=1e-5, atol=1e-6)


def test_safetensors_round_trip_carries_config(tmp_path):
    field = random_field(16, 3, dtype=torch.float32)
    cfg = fk.FlowConfig(depth=3, context_mode="token_post", norm="minmax", topk=7)
    path = fk.save_flow_field(field, tmp_path / "flow.safetensors", cfg)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["dim"] == 16 and meta["depth"] == 3 and meta["config"]["context_mode"] == "token_post"
    loaded, loaded_cfg = fk.load_flow_field(path)
    assert loaded_cfg == cfg
    torch.testing.assert_close(_outputs(loaded), _outputs(field), rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_into_directory_and_bf16(tmp_path):
    field = random_field(8, 1, dtype=torch.bfloat16)
    path = fk.save_flow_field(field, tmp_path, fk.FlowConfig(depth=1))
    assert path.name == "flow.safetensors"
    loaded, _ = fk.load_flow_field(tmp_path)
    assert loaded.input_proj.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), field.state_dict().values()))


def test_save_rejects_depth_mismatch(tmp_path):
    with pytest.raises(ValueError, match="config.depth"):
        fk.save_flow_field(fk.VelocityField(8, 2), tmp_path / "f.safetensors", fk.FlowConfig(depth=4))


def test_errors_name_missing_unexpected_and_misshaped_keys(tmp_path):
    state = official_state_dict(fk.VelocityField(8, 2))
    del state["model.res_blocks.1.mlp.0.bias"]
    state["model.extra.weight"] = torch.zeros(3)
    state["model.cond_embed.weight"] = torch.zeros(8, 9)
    path = tmp_path / "flow_model.bin"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        fk.load_flow_field(path)
    msg = str(err.value)
    assert "res_blocks.1.mlp.0.bias" in msg and "model.extra.weight" in msg and "model.cond_embed.weight" in msg


def test_nan_weights_and_missing_files_are_refused(tmp_path):
    state = fk.VelocityField(8, 1).state_dict()
    state["input_proj.bias"] = torch.full((8,), float("nan"))
    torch.save(state, tmp_path / "flow_model.bin")
    with pytest.raises(ValueError, match="input_proj.bias"):
        fk.load_flow_field(tmp_path / "flow_model.bin")
    with pytest.raises(FileNotFoundError):
        fk.load_flow_field(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError):
        fk.load_flow_field(tmp_path / "empty_dir_that_does_not_exist")


def test_no_res_blocks_is_an_error(tmp_path):
    state = {k: v for k, v in fk.VelocityField(8, 1).state_dict().items() if not k.startswith("res_blocks")}
    torch.save(state, tmp_path / "flow_model.bin")
    with pytest.raises(ValueError, match="depth"):
        fk.load_flow_field(tmp_path / "flow_model.bin")
