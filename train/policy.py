"""The policy: a tiny Llama decoder for the embedded task, or any local HF causal LM.

Every batch shares one layout, used by SFT, flow pretraining, RL and eval::

    [ <pad>... prompt | response <eos> <pad>... ]
      left-padded (P)   right-padded (R)

Position ids are ``cumsum(attention_mask) - 1``, which is also what HF
``generate`` uses for left-padded prompts, so a rollout is scored exactly as
it was sampled. ``action_mask`` marks the response tokens up to and
including the first ``<eos>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class PolicySpec:
    """Size of the embedded tiny decoder (LlamaConfig)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 128


def build_policy(tokenizer, spec: PolicySpec, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised tiny `LlamaForCausalLM` sized by `spec` for `tokenizer` (seeded)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    set_generation_ids(model, tokenizer)
    return model


def set_generation_ids(model: PreTrainedModel, tokenizer) -> None:
    """Generation config of `model`: the tokenizer's pad and eos ids, no forced bos."""
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = None


def load_policy(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load a local HF causal LM directory and its tokenizer (no network); see `train.models.load_model`.

    A tokenizer without a pad token gets its eos token as pad. Prompts are
    left-padded.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model: {path} is not a directory holding an HF causal LM")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model: {path} has no config.json; expected an HF causal LM directory")
    from .models import load_model

    return load_model(path, device)


def save_policy(model: PreTrainedModel, tokenizer, path: str | os.PathLike) -> None:
    """Save the policy (safetensors) and its tokenizer into directory `path`."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_id, padding_side="left")


def _right_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_id, padding_side="right")


def encode_prompts(tokenizer, prompts: Sequence[str], device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, both [B, P]."""
    ids = [torch.tensor(x, dtype=torch.long) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    input_ids = _left_pad(ids, tokenizer.pad_token_id)
    mask = _left_pad([torch.ones_like(x) for x in ids], 0)
    return input_ids.to(device), mask.to(device)


def encode_traces(tokenizer, prompts: Sequence[str], responses: Sequence[str], device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """Prompt + response + eos in the shared layout: input_ids, attention_mask, action_mask [B, P+R]."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    enc = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    resp = [torch.tensor(x + [tokenizer.eos_token_id], dtype=torch.long) for x in enc]
    resp_ids = _right_pad(resp, tokenizer.pad_token_id)
    resp_mask = _right_pad([torch.ones_like(x) for x in resp], 0)
    out = {"input_ids": torch.cat([prompt_ids, resp_ids], 1),
           "attention_mask": torch.cat([prompt_mask, resp_mask], 1),
           "action_mask": torch.cat([torch.zeros_like(prompt_mask), resp_mask], 1).bool()}
    return {k: v.to(device) for k, v in out.items()}


def response_mask(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, R] bool: response tokens up to and including the first eos (all of them if none)."""
    is_eos = (response_ids == eos_id).int()
    before = is_eos.cumsum(-1) - is_eos  # eos tokens strictly before each position
    return before == 0


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: positions that skip left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 1.0, num_return_sequences: int = 1, greedy: bool = False,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sample (or greedy-decode) responses with HF ``generate`` and its KV cache.

    Returns the shared layout for the B·n rollouts (each prompt repeated n
    times, consecutively): input_ids, attention_mask, action_mask [B·n, P+R],
    and ``prompt_len`` P.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    was_training = model.training
    model.eval()
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         num_return_sequences=1 if greedy else num_return_sequences, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    model.train(was_training)
    n = 1 if greedy else num_return_sequences
    P = prompt_ids.shape[1]
    resp = out[:, P:]
    act = response_mask(resp, tokenizer.eos_token_id)
    resp = resp.masked_fill(~act, tokenizer.pad_token_id)
    pmask = prompt_mask.repeat_interleave(n, 0)
    return {"input_ids": torch.cat([out[:, :P], resp], 1),
            "attention_mask": torch.cat([pmask, act.long()], 1),
            "action_mask": torch.cat([torch.zeros_like(pmask, dtype=torch.bool), act], 1),
            "prompt_len": torch.tensor(P)}


def decode_responses(tokenizer, batch: dict[str, torch.Tensor]) -> list[str]:
    """The response text of each row of a layout batch (special tokens dropped)."""
    P = int(batch["prompt_len"]) if "prompt_len" in batch else 0
    ids = batch["input_ids"][:, P:].masked_fill(~batch["action_mask"][:, P:], tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)


def forward_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs [B, T] of ``input_ids`` under ``softmax(logits / temperature)``.

    Position k holds ``log p(x_k | x_<k)``; position 0 holds 0. Also returns
    the per-token entropy [B, T] (same alignment) when `with_entropy`.
    Runs one forward pass of `model` (which may be DDP-wrapped), so forward
    hooks such as `LatentTap` see it.
    """
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids(am), use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = F.pad(logp, (1, 0))
    ent = None
    if with_entropy:
        ent = F.pad(-(logp_all.exp() * logp_all).sum(-1), (1, 0))
    return logp, ent
