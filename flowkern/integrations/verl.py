"""RLFR flow rewards inside verl (written against verl 0.9.1).

Two pieces:

- `register()` adds the advantage estimator ``grpo_flow`` to verl's registry
  (`verl.trainer.ppo.core_algos.register_adv_est`). Layout convention of
  ``token_level_rewards`` [B, R] (verl's response layout): the outcome reward
  sits on the **last response token** (where verl's reward managers put it) and
  flow rewards sit on the **other** response tokens, never on the last one. The
  estimator normalises the outcome within each ``uid`` group and adds the
  reward-to-go of the flow rewards; it equals `flowkern.shape_advantages`.
- `FlowRewardHook` runs on the actor worker: it taps the actor's HF module
  (bare, FSDP1 or FSDP2) with `LatentTap`, and returns flow rewards [B, R]
  aligned to verl's ``responses`` / ``response_mask`` (left-padded prompts,
  right-padded responses), zero on the last response token, ready to be added
  to ``token_level_scores``. `FlowRewardHook.update_flow` trains the flow on the
  correct rollouts.

Install with ``pip install flowkern[verl]``.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

from ._common import require

_verl = require("verl", "verl")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from ..checkpoint import save_flow_field  # noqa: E402
from ..config import FlowConfig  # noqa: E402
from ..reward import flow_reward, shape_advantages  # noqa: E402
from ._common import (FlowLike, LatentRecorder, as_bool_mask, broadcast_module, check_flow_fits_policy,  # noqa: E402
                      decoder_layers, flow_update, last_true, resolve_flow, scored_mask)

ESTIMATOR_NAME = "grpo_flow"

__all__ = ["ESTIMATOR_NAME", "FlowRewardHook", "compute_grpo_flow_advantage", "register", "split_outcome"]


def _config_value(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def split_outcome(token_level_rewards: torch.Tensor, response_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split verl's ``token_level_rewards`` [B, R] into (outcome [B], flow rewards [B, R], response mask bool).

    The outcome is the value on each row's last response token; the flow rewards
    are everything else (the last token's slot zeroed). Raises ValueError when a
    row has no response token or when a reward sits outside `response_mask`.
    """
    if not isinstance(token_level_rewards, torch.Tensor) or not token_level_rewards.is_floating_point():
        raise TypeError("token_level_rewards must be a floating torch.Tensor")
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be [B, R], got shape {list(token_level_rewards.shape)}")
    mask = as_bool_mask("response_mask", response_mask, token_level_rewards.shape)
    rewards = token_level_rewards.float()
    outside = (rewards != 0) & ~mask
    if bool(outside.any()):
        rows = sorted(set(outside.nonzero()[:, 0].tolist()))
        raise ValueError(f"token_level_rewards has non-zero values outside response_mask in rows {rows[:8]}: "
                         f"the rewards and the response mask are misaligned")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"response_mask has no response token in rows {empty.nonzero()[:, 0].tolist()[:8]}")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    last = last_true(mask)
    outcome = rewards[rows, last]
    flow = rewards.clone()
    flow[rows, last] = 0.0
    return outcome, flow, mask


def compute_grpo_flow_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                index: Optional[Sequence] = None, config: Any = None,
                                **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``grpo_flow``: GRPO outcome advantage plus the reward-to-go of flow rewards.

    ``A[i, k] = (R_i - mean_g) / (std_g + 1e-6) + Σ_{s ≥ k, s ∈ response} γ^(s-k) r[i, s]``, with
    R_i on the last response token, r the flow rewards on the other tokens, groups
    given by `index` (verl's ``uid``; any group sizes) and γ = ``config.gamma``
    (``algorithm.gamma``; verl passes no gamma to registered estimators). Exactly
    `flowkern.shape_advantages` on each group; a single-rollout group gets Â = 0.

    Returns ``(advantages, returns)``, both [B, R] fp32 and equal.
    """
    outcome, flow, mask = split_outcome(token_level_rewards, response_mask)
    B = outcome.shape[0]
    if index is None:
        raise ValueError("grpo_flow needs the group id of each rollout: verl passes non_tensor_batch['uid'] as index")
    index = list(index)
    if len(index) != B:
        raise ValueError(f"index has {len(index)} entries for {B} rollouts")
    if not _config_value(config, "norm_adv_by_std_in_grpo", True):
        raise ValueError("grpo_flow normalises the outcome by the group std (as flowkern.shape_advantages); "
                         "set algorithm.norm_adv_by_std_in_grpo=True")
    gamma = float(_config_value(config, "gamma", 1.0))
    groups: dict[Any, list[int]] = defaultdict(list)
    for row, uid in enumerate(index):
        groups[uid].append(row)
    by_size: dict[int, list[int]] = defaultdict(list)
    for rows in groups.values():
        by_size[len(rows)].extend(rows)
    advantages = torch.zeros_like(flow)
    for size, rows in by_size.items():
        order = torch.tensor(rows, dtype=torch.long, device=flow.device)
        advantages[order] = shape_advantages(outcome[order], flow[order], mask[order], size, gamma)
    return advantages, advantages.clone()


def register() -> Any:
    """Register ``grpo_flow`` with verl's advantage-estimator registry; idempotent. Returns the estimator.

    Call it in the process that computes advantages (verl's driver / TaskRunner), then set
    ``algorithm.adv_estimator=grpo_flow``.
    """
    registered = core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME)
    if registered is not compute_grpo_flow_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_grpo_flow_advantage)
    return compute_grpo_flow_advantage


class FlowRewardHook:
    """Flow rewards for verl rollouts, computed on the actor's HF module.

    Args:
        module: the actor's HF causal LM, bare or wrapped by FSDP1 / FSDP2 / DDP
            (in verl's engine workers: ``self.actor.engine.module``). Its forward
            runs under ``torch.no_grad`` on every rank, like ``compute_log_prob``.
        flow: a `flowkern.VelocityField` or a flow checkpoint path; its dim must
            equal the policy's hidden size.
        flow_config: the `flowkern.FlowConfig`; optional for flowkern checkpoints.
        lr: learning rate of the flow's Adam optimiser (`update_flow`).
        incorrect_weight: weight of incorrect rollouts in `update_flow`.
        micro_batch_size: rows per forward pass (default: the whole batch).
        backend: flowkern backend.
        device: where the flow lives (default: the device of the first batch).
        process_group: ranks whose flow copies are kept identical (default: the world).
        seed: seed of the noise generator.
        repeats: noise draws per token in the flow-matching loss.
    """

    def __init__(self, module: nn.Module, flow: FlowLike, flow_config: Optional[FlowConfig] = None, *,
                 lr: float = 1e-4, incorrect_weight: float = 0.0, micro_batch_size: Optional[int] = None,
                 backend: str = "auto", device: Optional[torch.device] = None, process_group=None,
                 seed: int = 0, repeats: int = 1, layers: Optional[nn.ModuleList] = None):
        field, config = resolve_flow(flow, flow_config)
        check_flow_fits_policy(field, module)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(incorrect_weight, (int, float)) and incorrect_weight >= 0):
            raise ValueError(f"incorrect_weight must be >= 0, got {incorrect_weight!r}")
        if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        self.module = module
        self.field = field.float()
        self.config = config
        self.layers = layers if layers is not None else decoder_layers(module)
        self.lr = float(lr)
        self.incorrect_weight = float(incorrect_weight)
        self.micro_batch_size = micro_batch_size
        self.backend = backend
        self.process_group = process_group
        self.repeats = repeats
        self.seed = int(seed)
        self.generator: Optional[torch.Generator] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if device is not None:
            self._place(torch.device(device))
        forward = getattr(self._recorder().base, "forward", None)
        self._logits_to_keep = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters

    def _place(self, device: torch.device) -> None:
        if self.optimizer is None:
            self.field.to(device)
            broadcast_module(self.field, self.process_group)  # every rank starts from the first rank's flow
            self.optimizer = torch.optim.Adam(self.field.parameters(), lr=self.lr)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    def _recorder(self) -> LatentRecorder:
        return LatentRecorder(self.module, self.config.hook_layers, layers=self.layers)

    # ------------------------------------------------------------------ layout

    @staticmethod
    def _check_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("input_ids", input_ids), ("responses", responses)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a [B, L] tensor")
        B, L = input_ids.shape
        if responses.shape[0] != B or responses.shape[1] > L:
            raise ValueError(f"responses has shape {list(responses.shape)} but input_ids has {list(input_ids.shape)}: "
                             f"responses must be the last R columns of input_ids")
        R = responses.shape[1]
        attention = as_bool_mask("attention_mask", attention_mask, (B, L))
        response = as_bool_mask("response_mask", response_mask, (B, R))
        if not torch.equal(input_ids[:, L - R:], responses):
            raise ValueError("responses differ from the last R columns of input_ids: verl's layout is the "
                             "left-padded prompt followed by the right-padded response")
        if bool((response & ~attention[:, L - R:]).any()):
            raise ValueError("response_mask marks positions that attention_mask marks as padding: "
                             "the masks are misaligned")
        return attention, response

    def _latents(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
        step = self.micro_batch_size or input_ids.shape[0]
        extra: dict[str, Any] = {"use_cache": False}
        if self._logits_to_keep:
            extra["logits_to_keep"] = 1
        recorder = self._recorder()
        with torch.no_grad(), recorder:
            for start in range(0, input_ids.shape[0], step):
                part = slice(start, start + step)
                if position_ids is not None:
                    extra["position_ids"] = position_ids[part]
                self.module(input_ids=input_ids[part], attention_mask=attention_mask[part], **extra)
        return recorder.latents, recorder.layer_fracs

    # ------------------------------------------------------------------ public

    def flow_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor,
                     response_mask: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                     noise: Optional[Sequence[torch.Tensor]] = None, return_latents: bool = False):
        """Flow rewards [B, R] fp32 in verl's response layout, zero off `response_mask` and on the last response token.

        Args:
            input_ids: [B, P+R] left-padded prompts followed by right-padded responses.
            attention_mask: [B, P+R] 0/1.
            responses: [B, R], the last R columns of `input_ids`.
            response_mask: [B, R] 0/1 (verl's ``response_mask``).
            position_ids: [B, P+R], as verl computes them (recommended with left padding).
            noise: optional per-layer [B, P+R, D] noise for `flowkern.flow_reward`.
            return_latents: also return the captured latents (for `update_flow`).
        """
        attention, response = self._check_layout(input_ids, attention_mask, responses, response_mask)
        self._place(input_ids.device)
        latents, fracs = self._latents(input_ids, attention_mask, position_ids)
        P = input_ids.shape[1] - responses.shape[1]
        action = torch.cat([torch.zeros_like(attention[:, :P]), response], dim=1)
        has = response.any(dim=1)
        rows = has.nonzero()[:, 0]
        action[rows, P + last_true(response[rows])] = False  # the outcome's slot gets no flow reward
        rewards = flow_reward(self.field, latents, scored_mask(action, attention, self.config), self.config,
                              layer_fracs=fracs, noise=noise, generator=self.generator, backend=self.backend)[:, P:]
        return (rewards, latents) if return_latents else rewards

    def __call__(self, data: Any) -> torch.Tensor:
        """`flow_rewards` for a verl ``DataProto`` (reads ``input_ids``, ``attention_mask``, ``position_ids``,
        ``responses`` and ``response_mask`` from ``data.batch``)."""
        batch = data.batch
        position_ids = batch["position_ids"] if "position_ids" in batch.keys() else None
        if position_ids is not None and position_ids.dim() != 2:
            position_ids = None  # mrope (multimodal) position ids: let the model derive them
        response_mask = batch["response_mask"] if "response_mask" in batch.keys() else \
            batch["attention_mask"][:, -batch["responses"].shape[1]:]
        return self.flow_rewards(batch["input_ids"], batch["attention_mask"], batch["responses"], response_mask,
                                 position_ids=position_ids)

    def update_flow(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor,
                    response_mask: torch.Tensor, correct: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                    latents: Optional[Sequence[torch.Tensor]] = None) -> Optional[float]:
        """One flow-matching step on the response tokens of the correct rollouts (online flow update).

        Args:
            correct: [B] bool (correct rollouts weigh 1, the others `incorrect_weight`) or
                [B] non-negative float weights.
            latents: the latents returned by ``flow_rewards(..., return_latents=True)`` for the
                same batch, to skip a second forward.

        Returns the flow-matching loss, or None when no rollout has weight (no step).
        Call it on every rank: gradients are summed over `process_group`.
        """
        attention, response = self._check_layout(input_ids, attention_mask, responses, response_mask)
        B = input_ids.shape[0]
        if not isinstance(correct, torch.Tensor) or tuple(correct.shape) != (B,):
            raise ValueError(f"correct must be a [{B}] tensor, got "
                             f"{list(correct.shape) if isinstance(correct, torch.Tensor) else type(correct).__name__}")
        if correct.dtype == torch.bool:
            weights = torch.where(correct, 1.0, self.incorrect_weight)
        else:
            weights = correct.float()
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("correct weights must be finite and non-negative")
        self._place(input_ids.device)
        if latents is None:
            latents, fracs = self._latents(input_ids, attention_mask, position_ids)
        else:
            latents = list(latents)
            fracs = self._recorder().layer_fracs
            if len(latents) != len(fracs) or latents[0].shape[:2] != input_ids.shape:
                raise ValueError("latents do not match this batch: pass those returned by flow_rewards(...)")
        P = input_ids.shape[1] - responses.shape[1]
        action = torch.cat([torch.zeros_like(attention[:, :P]), response], dim=1)
        with torch.enable_grad():
            return flow_update(self.field, self.optimizer, latents, fracs, scored_mask(action, attention, self.config),
                               weights.to(input_ids.device), self.config, generator=self.generator,
                               repeats=self.repeats, backend=self.backend, process_group=self.process_group)

    def save(self, path) -> Path:
        """Save the flow and its config (`flowkern.save_flow_field`); returns the weights' path."""
        return save_flow_field(self.field, path, self.config)
