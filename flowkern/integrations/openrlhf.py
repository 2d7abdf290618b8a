"""A drop-in `compute_reward` for the RLFR fork of OpenRLHF, with flowkern's shaping.

The RLFR fork extends OpenRLHF's ``openrlhf.models.utils.compute_reward`` with
``flow_coef`` and ``action_score`` and adds ``-flow_coef * action_score`` to the
per-token reward, after its own normalisation and top-k (``normalize_flow_score``,
``postprocess_flow_score``). This function keeps that signature but takes the
**raw** per-token flow scores (`flowkern.flow_scores`, or the fork's score before
normalisation) and shapes them with `flowkern.shape_rewards` under a `FlowConfig`
whose ``coef`` is `flow_coef`: min/max over action tokens only, the threshold and
top-k per side as in DESIGN.md §1.

Nothing here imports OpenRLHF.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ..config import FlowConfig
from ..reward import shape_rewards
from ._common import as_bool_mask

__all__ = ["compute_reward"]

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def compute_reward(r: Union[torch.Tensor, float], kl_coef: float, kl: TensorOrList, flow_coef: Optional[float] = None,
                   action_score: Optional[TensorOrList] = None, action_mask: Optional[torch.Tensor] = None,
                   num_actions: Optional[Union[int, Sequence[int]]] = None,
                   reward_clip_range: Optional[Tuple[float, float]] = None, *,
                   flow_config: Optional[FlowConfig] = None) -> TensorOrList:
    """Per-token rewards: the outcome on the last action token, ``-kl_coef * kl`` and the shaped flow reward.

    Same signature and return as the RLFR fork's ``compute_reward``, plus `flow_config`.

    Args:
        r: [B] outcome rewards (or a float).
        kl_coef: KL coefficient (a value <= 0 disables the KL term).
        kl: [B, A] per-token KL, or (packed samples, `action_mask` None) a list of [A_i] tensors.
        flow_coef: β of the flow reward; None or 0 disables it. Replaces ``flow_config.coef``.
        action_score: raw flow scores, same layout as `kl` (before any normalisation).
        action_mask: [B, A] 0/1 mask of action tokens; None for packed samples.
        num_actions: per-sample action counts for packed samples.
        reward_clip_range: optional (low, high) clamp of `r`.
        flow_config: the `FlowConfig` giving norm, threshold and top-k; required when the
            flow reward is on.

    Returns:
        [B, A] rewards (batched) or a list of [A_i] rewards (packed).
    """
    if kl_coef <= 0.0:
        kl_coef = 0.0
    use_flow = flow_coef is not None and flow_coef != 0
    if use_flow:
        if isinstance(flow_coef, bool) or not isinstance(flow_coef, (int, float)) or not math.isfinite(flow_coef):
            raise ValueError(f"flow_coef must be a finite number, got {flow_coef!r}")
        if action_score is None:
            raise ValueError("action_score is required when flow_coef is non-zero")
        if flow_config is None:
            raise ValueError("flow_config is missing: pass flow_config=flowkern.FlowConfig(...) to shape action_score "
                             "(norm, threshold, top-k); flow_coef sets its coef")
        if not isinstance(flow_config, FlowConfig):
            raise TypeError(f"flow_config must be a flowkern.FlowConfig, got {type(flow_config).__name__}")
        flow_config = dataclasses.replace(flow_config, coef=float(flow_coef))
    if not isinstance(r, torch.Tensor):
        r = torch.tensor(float(r))
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])

    if action_mask is not None:
        if not isinstance(kl, torch.Tensor) or kl.dim() != 2:
            raise ValueError("kl must be a [B, A] tensor when action_mask is given")
        B, A = kl.shape
        mask = as_bool_mask("action_mask", action_mask, (B, A))
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"action_mask has no action token in rows {empty.nonzero()[:, 0].tolist()[:8]}")
        r = r.to(kl.device).expand(B) if r.dim() == 0 else r
        if tuple(r.shape) != (B,):
            raise ValueError(f"r must have shape [{B}], got {list(r.shape)}")
        last = A - 1 - mask.flip(-1).to(torch.uint8).argmax(dim=1, keepdim=True)
        reward = torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype)) - kl_coef * kl
        if use_flow:
            if not isinstance(action_score, torch.Tensor) or tuple(action_score.shape) != (B, A):
                got = list(action_score.shape) if isinstance(action_score, torch.Tensor) else type(action_score).__name__
                raise ValueError(f"action_score must have the shape of kl and action_mask [{B}, {A}], got {got}: "
                                 f"the flow scores and the action mask are misaligned")
            reward = reward + shape_rewards(action_score.float(), mask, flow_config).to(reward.dtype)
        return reward

    if num_actions is None:
        raise ValueError("num_actions is required for packed samples (action_mask is None)")
    kl = list(kl)
    num_actions = [int(n) for n in ([num_actions] * len(kl) if isinstance(num_actions, int) else num_actions)]
    if len(num_actions) != len(kl):
        raise ValueError(f"num_actions has {len(num_actions)} entries for {len(kl)} samples")
    r = r.expand(len(kl)) if r.dim() == 0 else r
    scores = list(action_score) if use_flow else [None] * len(kl)
    if len(scores) != len(kl):
        raise ValueError(f"action_score has {len(scores)} samples but kl has {len(kl)}")
    rewards = []
    for i, (kl_seg, n, score) in enumerate(zip(kl, num_actions, scores)):
        if kl_seg.dim() != 1 or not 1 <= n <= kl_seg.shape[0]:
            raise ValueError(f"kl[{i}] must be 1-D with at least num_actions[{i}] = {n} >= 1 entries")
        seg = -kl_coef * kl_seg
        seg[n - 1] = seg[n - 1] + r[i].to(seg.dtype)
        if use_flow:
            if tuple(score.shape) != tuple(kl_seg.shape):
                raise ValueError(f"action_score[{i}] has shape {list(score.shape)} but kl[{i}] has "
                                 f"{list(kl_seg.shape)}: the flow scores and the actions are misaligned")
            mask = torch.zeros(1, kl_seg.shape[0], dtype=torch.bool, device=kl_seg.device)
            mask[0, :n] = True
            seg = seg + shape_rewards(score.float()[None], mask, flow_config)[0].to(seg.dtype)
        rewards.append(seg)
    return rewards
