"""Token-level flow rewards and GRPO advantages with flow shaping (DESIGN.md §1)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks
from . import backend as dispatch
from ._device import small_tensor
from .config import FlowConfig
from .field import VelocityField
from .flow import LayerRows, check_precision, score_rows, scoring_call
from .latents import check_latents, context_offset, pair_index, selected_pairs

ADV_EPS = 1e-6  # added to the group std before dividing
RTG_CHUNK = 64  # reward-to-go is scanned in chunks of this many positions
SCORE_GATHER_BYTES = 128 * 2**20  # bound on flow_reward's gathered (target, cond, noise) copies per scoring call


def flow_reward(field: VelocityField, latents: Sequence[torch.Tensor], action_mask: torch.Tensor,
                config: FlowConfig, *, layer_fracs: Sequence[float],
                noise: Optional[Sequence[torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
                backend: str = "auto", precision: Optional[str] = None, check_finite: bool = True) -> torch.Tensor:
    """Shaped token rewards [B, T] fp32 from the policy latents of a rollout batch.

    Each latent is paired by ``config.context_mode``; every action token that has
    a pair is scored (`flow_scores`) at each hooked layer and the scores are
    averaged over layers. Each sequence is then shaped over its action tokens
    (`shape_rewards`): normalisation, threshold, top-k and ``-config.coef``.
    Non-action positions, and the ``shift`` positions without a pair, get 0.

    Host syncs: one by default, for the number of scored tokens (a data-dependent size); the NaN/Inf check
    of `check_finite` is read back in that same sync. None with ``check_finite=False``: the scored rows then
    have a fixed number, every position of the batch that has a context (B · (T − shift)), and the rows that
    are not action tokens are computed and discarded. That is cheaper than the sync when most positions are
    action tokens, and up to T / (response length) times the scoring work otherwise.

    Args:
        field: the velocity field, trained in the same context mode as `config`.
        latents: one [B, T, D] tensor per hooked layer (e.g. `LatentTap.latents`).
        action_mask: [B, T] bool, True on response (action) tokens.
        config: the flow configuration.
        layer_fracs: layer fraction ℓ = index / L of each latent (`LatentTap.layer_fracs`).
        noise: optional list of [B, T, D] tensors, one per latent; the target token at
            position k uses ``noise[l][:, k]``, shared by all timesteps. With
            ``config.noise_draws`` K > 1 each tensor is [K, B, T, D] (one slice per draw).
        generator: random source for the noise when `noise` is None.
        backend: "auto", "torch", "triton" or "cuda". It selects the scoring backend and
            the shaping backend; a stage that has no such implementation uses "auto".
        precision: the dtype the field is scored in (`flow_scores`): "auto" (bf16 on CUDA for an fp32
            field, the field's dtype otherwise), "fp32", "bf16", "fp16" or "fp8"; None (the default) takes
            ``config.score_precision``.
        check_finite: check that the latents and noise hold no NaN or Inf where they are read (the scored
            tokens and their contexts); the error names the tensor. It reads each latent once on the device and
            costs no extra sync. False skips it, for callers that validate upstream, and makes the call
            sync-free (see "Host syncs").
    """
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a flowkern.FlowConfig, got {type(config).__name__}")
    precision = config.score_precision if precision is None else precision
    check_precision(precision)
    latents, layer_fracs = check_latents(field, latents, layer_fracs, action_mask)
    B, T, D = latents[0].shape
    device = action_mask.device
    draws = config.noise_draws
    if noise is not None:
        noise = list(noise)
        if len(noise) != len(latents):
            raise ValueError(f"noise has {len(noise)} tensors for {len(latents)} latents")
        for i, nz in enumerate(noise):
            _checks.floating(f"noise[{i}]", nz)
            _checks.shape(f"noise[{i}]", nz, (B, T, D) if draws == 1 else (draws, B, T, D))
            _checks.same_device(**{"latents[0]": latents[0], f"noise[{i}]": nz})
    score_backend, shape_backend = _stage_backends(backend)
    score_fn, scoring = scoring_call(*dispatch.resolve("flow_scores", score_backend, device), field, precision,
                                     device)
    _, shape_fn = dispatch.resolve("shape_rewards", shape_backend, device)

    selected = selected_pairs(action_mask, config, T)
    inputs = {f"latents[{i}]": (lat, True) for i, lat in enumerate(latents)}
    inputs.update({f"noise[{i}]": (nz if draws == 1 else nz.abs().amax(0), False)  # NaN/Inf of any draw
                   for i, nz in enumerate(noise or [])})
    offset = context_offset(config)
    index = pair_index(selected, config, _non_finite_read(inputs.values(), selected, offset) if check_finite else None,
                       static=not check_finite)
    if index.flagged:
        for name, tensor_and_cond in inputs.items():
            if bool(_non_finite_read([tensor_and_cond], selected, offset)):
                raise ValueError(f"{name} contains NaN or Inf values")

    scores = torch.zeros(B * T + 1, dtype=torch.float32, device=device)  # the last slot takes discarded rows
    # The gathered copies are bounded: tokens are scored in near-equal chunks of at most SCORE_GATHER_BYTES of
    # copies (one chunk, hence one scoring call, unless the batch is large).
    # K noise draws are K copies of the rows of one call (one larger GEMM), averaged afterwards.
    per_token = draws * (sum(2 * lat.element_size() * D for lat in latents)
                         + sum(nz.element_size() * D for nz in noise or []))
    count = -(-index.n // max(1, SCORE_GATHER_BYTES // per_token))
    fracs = small_tensor(layer_fracs, device)
    for i in range(count):  # chunk sizes differ by at most one token
        part = index.slice(i * index.n // count, (i + 1) * index.n // count)
        targets, conds = part.gather(latents)
        if draws > 1:
            targets, conds = targets.repeat(draws, 1), conds.repeat(draws, 1)
        rows = torch.arange(len(latents), device=device)[:, None].expand(-1, part.n).reshape(-1)
        per_layer = score_rows(score_fn, scoring, targets, conds, LayerRows(fracs, rows.repeat(draws)),
                               config.timesteps,
                               None if noise is None else torch.cat(
                                   [nz.reshape(draws, B, T, D)[k, part.rows, part.pos]
                                    for k in range(draws) for nz in noise]), generator)
        scores[part.dest] = per_layer.view(draws * len(latents), part.n).mean(0)
    return shape_fn(scores[:-1].view(B, T), index.selected, config)


def _non_finite_read(inputs, selected: torch.Tensor, offset: int) -> torch.Tensor:
    """0-d bool on the device: does a NaN/Inf sit where flow_reward reads? `inputs`: (tensor [B, T, D], also read
    as context?) pairs; a selected target at k reads position k, and position k + offset as its context."""
    bad = torch.zeros_like(selected)
    for x, as_context in inputs:
        rows = _checks.non_finite_rows(x)
        bad |= rows
        if as_context and offset:
            bad |= rows.roll(-offset, dims=1)  # wrapped positions have no pair: `selected` masks them out
    return (bad & selected).any()


def _stage_backends(backend: str) -> tuple[str, str]:
    """The (scoring, shaping) backends for a `flow_reward` request."""
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    stages = [(op, backend if dispatch.implements(op, backend) else "auto") for op in ("flow_scores", "shape_rewards")]
    if all(chosen == "auto" for _, chosen in stages) and backend != "auto":
        raise RuntimeError(f"backend {backend!r} implements neither flow scoring nor reward shaping")
    return stages[0][1], stages[1][1]


def shape_rewards(scores: torch.Tensor, action_mask: torch.Tensor, config: FlowConfig, *,
                  backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Per-sequence shaping of token scores [B, T] into token rewards [B, T] fp32.

    Over the action tokens of each row: normalisation (``config.norm``), the
    threshold η (one-sided ``s > η`` for minmax/none, ``|s| > η`` for the signed
    norms), top-k (k largest, or ⌊k/2⌋ per side for the signed norms), then
    ``r = -config.coef * s`` on kept tokens. Everything else is 0. A row with no
    action token is all zero; a constant row normalises to 0.

    `check_finite` checks that no action token's score is NaN or Inf (one host sync); False skips it.
    """
    check_shaping_inputs(scores, action_mask, config)
    device = _checks.same_device(scores=scores, action_mask=action_mask)
    if check_finite:
        _checks.finite("scores", scores.masked_fill(~action_mask, 0))
    _, fn = dispatch.resolve("shape_rewards", backend, device)
    return fn(scores, action_mask, config)


def check_shaping_inputs(scores: torch.Tensor, action_mask: torch.Tensor, config: FlowConfig) -> None:
    """`config` is a FlowConfig, `scores` a floating [B, T] tensor and `action_mask` a bool [B, T] tensor."""
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a flowkern.FlowConfig, got {type(config).__name__}")
    _checks.floating("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, T], got shape {list(scores.shape)}")
    _checks.mask("action_mask", action_mask, scores.shape)


def _normalise(scores: torch.Tensor, action: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row normalisation of `scores` over `action` positions (fp32; 0 off-action)."""
    s = scores.float()
    if norm == "none":
        return s.masked_fill(~action, 0.0)
    inf = torch.tensor(float("inf"), device=s.device)
    lo = torch.where(action, s, inf).amin(-1, keepdim=True)
    hi = torch.where(action, s, -inf).amax(-1, keepdim=True)
    span = hi - lo
    constant = ~(span > 0)  # also true for rows without action tokens
    unit = torch.where(constant, 0.0, (s - lo) / torch.where(constant, 1.0, span))
    unit = unit.masked_fill(~action, 0.0)
    if norm == "minmax":
        return unit
    if norm == "minmax-bil":
        return torch.where(action & ~constant, 2.0 * unit - 1.0, 0.0)
    count = action.sum(-1, keepdim=True).clamp_min(1)
    centred = unit - unit.sum(-1, keepdim=True) / count
    return centred.masked_fill(~action, 0.0)


def _top_k(values: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the (at most) k largest `values` per row among `candidates`."""
    if k <= 0:
        return torch.zeros_like(candidates)
    k = min(k, values.shape[-1])
    ranked = torch.where(candidates, values, -torch.inf)
    idx = ranked.topk(k, dim=-1).indices
    chosen = torch.zeros_like(candidates).scatter_(-1, idx, True)
    return chosen & candidates


def _shape_rewards_torch(scores: torch.Tensor, action: torch.Tensor, config: FlowConfig) -> torch.Tensor:
    s = _normalise(scores, action, config.norm)
    if config.two_sided:
        survive = action & (s.abs() > config.threshold)
        if config.topk:
            half = config.topk // 2
            survive = _top_k(s, survive & (s > 0), half) | _top_k(-s, survive & (s < 0), half)
    else:
        survive = action & (s > config.threshold)
        if config.topk:
            survive = _top_k(s, survive, config.topk)
    return torch.where(survive, -config.coef * s, 0.0)


def shape_advantages(outcome: torch.Tensor, token_rewards: torch.Tensor, action_mask: torch.Tensor,
                     group_size: int, gamma: float = 1.0, *, backend: str = "auto",
                     check_finite: bool = True) -> torch.Tensor:
    """GRPO advantages with flow shaping, [B, T] fp32 (0 off-action).

    ``A[i, k] = Â_i + Σ_{s ≥ k, s ∈ action} γ^(s-k) r[i, s]`` where
    ``Â_i = (R_i - mean_g) / (std_g + 1e-6)`` over consecutive groups of
    `group_size` rollouts (unbiased std; a zero-std group gets Â = 0).

    Args:
        outcome: [B] outcome rewards R.
        token_rewards: [B, T] token rewards r (e.g. from `flow_reward`).
        action_mask: [B, T] bool.
        group_size: rollouts per prompt n; must divide B.
        gamma: discount γ in [0, 1].
        backend: "auto", "torch", "triton" or "cuda".
        check_finite: check that `outcome` and `token_rewards` hold no NaN or Inf (one host sync for both,
            the error names the argument); False skips it.
    """
    _checks.floating("outcome", outcome)
    _checks.floating("token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be [B, T], got shape {list(token_rewards.shape)}")
    B = token_rewards.shape[0]
    _checks.shape("outcome", outcome, (B,))
    _checks.mask("action_mask", action_mask, token_rewards.shape)
    _checks.group_size(group_size, B)
    gamma = _checks.gamma(gamma)
    device = _checks.same_device(outcome=outcome, token_rewards=token_rewards, action_mask=action_mask)
    if check_finite:
        _checks.all_finite(outcome=outcome, token_rewards=token_rewards)
    _, fn = dispatch.resolve("shape_advantages", backend, device)
    return fn(outcome, token_rewards, action_mask, group_size, gamma)


def group_advantages(outcome: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-normalised outcome Â [B] fp32; zero-std (and single-sample) groups give 0."""
    grouped = outcome.float().view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = (grouped - mean) / (std + ADV_EPS)
    return torch.where(std > 0, adv, 0.0).reshape(-1)


def reward_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G[k] = Σ_{s ≥ k} γ^(s-k) r[s]`` along the last dim, fp32.

    Scanned right to left in chunks of RTG_CHUNK positions: inside a chunk by a
    small triangular matmul, across chunks by a carry, so no power of γ larger
    than the chunk is ever formed.
    """
    r = rewards.float()
    if gamma == 1.0:
        return r.flip(-1).cumsum(-1).flip(-1)
    T = r.shape[-1]
    c = min(RTG_CHUNK, max(T, 1))
    pos = torch.arange(c, device=r.device, dtype=torch.float32)
    lag = pos[None, :] - pos[:, None]  # lag[k, s] = s - k
    discount = torch.where(lag >= 0, torch.pow(gamma, lag.clamp_min(0)), 0.0)
    tail = torch.pow(gamma, c - pos)  # γ^(c-k): weight of the next chunk's G at its start
    out = torch.empty_like(r)
    carry = torch.zeros(r.shape[:-1], dtype=torch.float32, device=r.device)
    for start in range(((T - 1) // c) * c, -1, -c):
        chunk = r[..., start:start + c]
        width = chunk.shape[-1]
        local = chunk @ discount[:width, :width].T
        local = local + carry[..., None] * tail[:width]  # carry is 0 for the (possibly short) last chunk
        out[..., start:start + width] = local
        carry = local[..., 0]
    return out


def _shape_advantages_torch(outcome: torch.Tensor, token_rewards: torch.Tensor, action: torch.Tensor,
                            group_size: int, gamma: float) -> torch.Tensor:
    rtg = reward_to_go(token_rewards.float().masked_fill(~action, 0.0), gamma)
    return (group_advantages(outcome, group_size)[:, None] + rtg).masked_fill(~action, 0.0)


dispatch.register("shape_rewards", "torch", _shape_rewards_torch)
dispatch.register("shape_advantages", "torch", _shape_advantages_torch)
