"""CUDA `shape_rewards` / `shape_advantages` through the extension `flowkern._C` (csrc/shaping.cu).

One thread block per sequence does the masked min/max, normalisation, threshold, top-k (radix
select), ``-coef`` scaling and, for the advantages, the group-normalised outcome plus the
γ-discounted reward-to-go, in a single launch. Importing this module registers both ops under the
"cuda" backend; `flowkern.ops` imports it only when `flowkern._C` is built.

`shape_rewards_and_advantages` runs both in one launch (13 bytes per token instead of 18).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _C, _checks
from .. import backend as dispatch
from ..config import FlowConfig
from ..reward import check_shaping_inputs

NORM_CODES: dict[str, int] = dict(_C.NORM_CODES)


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> Optional[str]:
    return _C.kernel_unavailable_reason(index) or None


def why_unavailable(device: torch.device) -> Optional[str]:
    """None when the kernels can run on `device`, else why not (they need CUDA tensors)."""
    if device.type != "cuda":
        return f"the CUDA kernels of flowkern._C need CUDA tensors, got tensors on {device}"
    if not torch.cuda.is_available():
        return "the CUDA kernels of flowkern._C need CUDA tensors, and torch.cuda is not available"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def _shape_rewards_cuda(scores: torch.Tensor, action: torch.Tensor, config: FlowConfig, *,
                        use_smem: bool = True) -> torch.Tensor:
    return _C.shape_rewards(scores.float(), action, NORM_CODES[config.norm], float(config.threshold),
                            int(config.topk), float(config.coef), use_smem)


def _shape_advantages_cuda(outcome: torch.Tensor, token_rewards: torch.Tensor, action: torch.Tensor,
                           group_size: int, gamma: float) -> torch.Tensor:
    return _C.shape_advantages(outcome.float(), token_rewards.float(), action, int(group_size), float(gamma))


def shape_rewards_and_advantages(scores: torch.Tensor, action_mask: torch.Tensor, outcome: torch.Tensor,
                                 config: FlowConfig, group_size: int, gamma: float = 1.0, *,
                                 use_smem: bool = True, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`shape_rewards` then `shape_advantages` fused in one CUDA launch.

    Equivalent to ``r = shape_rewards(scores, action_mask, config)`` and
    ``shape_advantages(outcome, r, action_mask, group_size, gamma)``, on CUDA tensors only.

    Args:
        scores: [B, T] floating flow scores (cast to fp32).
        action_mask: [B, T] bool, True on response (action) tokens.
        outcome: [B] outcome rewards R.
        config: the flow configuration (norm, threshold, topk, coef).
        group_size: rollouts per prompt n; must divide B.
        gamma: discount γ in [0, 1].
        use_smem: stage rows in shared memory when they fit (False forces the global-scratch path).
        check_finite: check that the action tokens' scores and `outcome` hold no NaN or Inf (one host sync for
            both; the error names the tensor); False skips it, and the call makes no host sync.

    Returns:
        (token rewards [B, T] fp32, advantages [B, T] fp32).
    """
    check_shaping_inputs(scores, action_mask, config)
    _checks.floating("outcome", outcome)
    _checks.shape("outcome", outcome, (scores.shape[0],))
    _checks.group_size(group_size, scores.shape[0])
    gamma = _checks.gamma(gamma)
    device = _checks.same_device(scores=scores, action_mask=action_mask, outcome=outcome)
    reason = why_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"shape_rewards_and_advantages: {reason}")
    if check_finite:
        _checks.all_finite(scores=scores.masked_fill(~action_mask, 0), outcome=outcome)
    return _C.shape_rewards_and_advantages(scores.float(), action_mask, outcome.float(), NORM_CODES[config.norm],
                                           float(config.threshold), int(config.topk), float(config.coef),
                                           group_size, gamma, use_smem)


dispatch.register("shape_rewards", "cuda", _shape_rewards_cuda, why_unavailable)
dispatch.register("shape_advantages", "cuda", _shape_advantages_cuda, why_unavailable)
