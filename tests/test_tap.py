"""LatentTap on tiny HF decoders built from config (no download)."""

import pytest
import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from flowkern import LatentTap
from flowkern.tap import layer_index

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
MODELS = [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM), (Qwen3Config, Qwen3ForCausalLM),
          (MistralConfig, MistralForCausalLM)]


def _model(config_cls, model_cls):
    torch.manual_seed(0)
    extra = {"head_dim": 8} if config_cls is Qwen3Config else {}
    return model_cls(config_cls(**TINY, **extra)).eval()


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("config_cls,model_cls", MODELS, ids=[m.__name__ for _, m in MODELS])
def test_tap_matches_output_hidden_states(config_cls, model_cls):
    model = _model(config_cls, model_cls)
    ids = torch.randint(0, 64, (2, 9))
    before = _hook_count(model)
    with torch.no_grad():
        with LatentTap(model) as tap:
            assert _hook_count(model) == before + 3
            model(input_ids=ids)
        assert _hook_count(model) == before
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert tap.indices == [2, 4, 6] and tap.layer_fracs == [0.25, 0.5, 0.75]
    for idx, latent in zip(tap.indices, tap.latents):
        assert latent.shape == (2, 9, 32)
        torch.testing.assert_close(latent, reference[idx + 1])  # hidden_states[0] is the embedding


def test_layer_index_rounding_and_clamp():
    assert [layer_index(p, 28) for p in (0.25, 0.5, 0.75)] == [7, 14, 21]
    assert layer_index(1.0, 8) == 7
    with pytest.raises(ValueError):
        layer_index(1.5, 8)


class _TupleLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        return (self.lin(x), None)


class ToyDecoderLayer(_TupleLayer):
    """A decoder layer that returns a tuple, as older HF layers do."""


class VisionBlock(_TupleLayer):
    pass


class _Toy(nn.Module):
    """A VL-style wrapper: a vision tower with its own `layers`, and a nested text decoder."""

    def __init__(self, dim=6, n=4):
        super().__init__()
        self.visual = nn.Module()
        self.visual.layers = nn.ModuleList(VisionBlock(dim) for _ in range(2))
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList(ToyDecoderLayer(dim) for _ in range(n))

    def forward(self, x):
        for layer in self.model.language_model.layers:
            x = layer(x)[0]
        return x


def test_tap_nested_text_decoder_with_tuple_outputs():
    model = _Toy()
    x = torch.randn(2, 3, 6)
    with LatentTap(model, layers=(0.5,)) as tap:
        model(x)
    expected = x
    for layer in model.model.language_model.layers[:3]:
        expected = layer(expected)[0]
    assert tap.indices == [2]
    torch.testing.assert_close(tap.latents[0], expected)
    assert _hook_count(model) == 0


def test_tap_errors():
    with pytest.raises(ValueError, match="decoder_layers"):
        LatentTap(nn.Linear(2, 2))
    tap = LatentTap(_Toy())
    with pytest.raises(RuntimeError, match="captured nothing"):
        tap.latents
    with pytest.raises(ValueError, match="at least one"):
        LatentTap(_Toy(), layers=())
