"""RLFR flow rewards inside verl (written against verl 0.9.1).

Two pieces:

- `register()` adds the advantage estimator ``grpo_flow`` to verl's registry
  (`verl.trainer.ppo.core_algos.register_adv_est`) and installs `compute_advantage`
  in ``verl.trainer.ppo.ray_trainer`` so that the estimator receives the flow rewards
  and the trainer's gamma / norm arguments. Separate layout (the default): the
  outcome stays in ``token_level_rewards`` [B, R] (summed over the response, as verl's
  ``grpo`` reads it) and the flow rewards travel under their own batch key
  `FLOW_REWARDS_KEY` (``flow_token_rewards``), so neither can be read as the other.
  Mixed layout (fallback, when that key is absent): the outcome on the last response
  token and flow rewards on the others (`split_outcome`). The estimator normalises
  the outcome within each ``uid`` group and adds the reward-to-go of the flow
  rewards; it equals `flowkern.shape_advantages`.
- `FlowRewardHook` runs on the actor worker: it taps the actor's HF module
  (bare, FSDP1 or FSDP2) with `LatentTap`, and returns flow rewards [B, R]
  aligned to verl's ``responses`` / ``response_mask`` (left-padded prompts,
  right-padded responses). `FlowRewardHook.update_flow` trains the flow on the
  correct rollouts, in chunks of at most ``max_tokens`` tokens.

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
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402

from ..checkpoint import SAFETENSORS_NAME, load_flow_field, save_flow_field  # noqa: E402
from ..config import FlowConfig  # noqa: E402
from ..flow import check_precision  # noqa: E402
from ..reward import flow_reward, shape_advantages  # noqa: E402
from ._common import (FLOW_GENERATOR_NAME, FLOW_OPTIMIZER_NAME, FlowLike, LatentRecorder, as_bool_mask,  # noqa: E402
                      broadcast_module, check_flow_fits_policy, check_max_tokens, decoder_layers, flow_update,
                      last_true, resolve_flow, scored_mask)

ESTIMATOR_NAME = "grpo_flow"
FLOW_REWARDS_KEY = "flow_token_rewards"  # data.batch key of the flow rewards [B, R] (the separate layout)
LAYOUTS = ("separate", "mixed")

__all__ = ["ESTIMATOR_NAME", "FLOW_REWARDS_KEY", "FlowRewardHook", "compute_advantage", "compute_grpo_flow_advantage",
           "outcome_scores", "register", "split_outcome"]


_MISSING = object()


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return _MISSING
    if isinstance(config, Mapping):
        return config.get(key, _MISSING)
    return getattr(config, key, _MISSING)


def _setting(name: str, passed: Any, config: Any, default: Any) -> Any:
    """An estimator setting passed as an argument or read from verl's ``AlgoConfig``; they must agree."""
    configured = _config_value(config, name)
    if passed is not None and configured is not _MISSING and configured != passed:
        raise ValueError(f"grpo_flow: {name}={passed!r} was passed but the config (algorithm.{name}) says "
                         f"{configured!r}; make them agree")
    if passed is not None:
        return passed
    return default if configured is _MISSING else configured


def outcome_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Outcome of each rollout [B] fp32 in the separate layout: the sum of its rewards over `response_mask`,
    as verl's ``grpo`` reads it (reward managers put the score on the last response token)."""
    _check_rewards("token_level_rewards", token_level_rewards)
    mask = as_bool_mask("response_mask", response_mask, token_level_rewards.shape)
    _check_inside("token_level_rewards", token_level_rewards, mask)
    return (token_level_rewards.float() * mask).sum(dim=1)


def _check_rewards(name: str, rewards: Any) -> None:
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor")
    if rewards.dim() != 2:
        raise ValueError(f"{name} must be [B, R], got shape {list(rewards.shape)}")


def _check_inside(name: str, rewards: torch.Tensor, mask: torch.Tensor) -> None:
    outside = (rewards != 0) & ~mask
    if bool(outside.any()):
        rows = sorted(set(outside.nonzero()[:, 0].tolist()))
        raise ValueError(f"{name} has non-zero values outside response_mask in rows {rows[:8]}: "
                         f"the rewards and the response mask are misaligned")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"response_mask has no response token in rows {empty.nonzero()[:, 0].tolist()[:8]}")


def split_outcome(token_level_rewards: torch.Tensor, response_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed layout (the fallback): split ``token_level_rewards`` [B, R] into (outcome [B], flow rewards [B, R],
    response mask bool).

    The outcome is the value on each row's last response token; the flow rewards
    are everything else (the last token's slot zeroed). Raises ValueError when a
    row has no response token or when a reward sits outside `response_mask`. It
    cannot tell a flow reward on the last token from the outcome, nor an outcome
    placed elsewhere from a flow reward: use the separate layout (`FLOW_REWARDS_KEY`).
    """
    _check_rewards("token_level_rewards", token_level_rewards)
    mask = as_bool_mask("response_mask", response_mask, token_level_rewards.shape)
    _check_inside("token_level_rewards", token_level_rewards, mask)
    rewards = token_level_rewards.float()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    last = last_true(mask)
    outcome = rewards[rows, last]
    flow = rewards.clone()
    flow[rows, last] = 0.0
    return outcome, flow, mask


def compute_grpo_flow_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                index: Optional[Sequence] = None, config: Any = None, *,
                                flow_token_rewards: Optional[torch.Tensor] = None, gamma: Optional[float] = None,
                                norm_adv_by_std_in_grpo: Optional[bool] = None,
                                **unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``grpo_flow``: GRPO outcome advantage plus the reward-to-go of flow rewards.

    ``A[i, k] = (R_i - mean_g) / (std_g + 1e-6) + Σ_{s ≥ k, s ∈ response} γ^(s-k) r[i, s]`` over the groups
    given by `index` (verl's ``uid``; any group sizes); without the std division when
    ``norm_adv_by_std_in_grpo`` is False. Per group it equals `flowkern.shape_advantages`.

    Layouts:
        - separate (when `flow_token_rewards` is given; `compute_advantage` passes
          ``data.batch[FLOW_REWARDS_KEY]``): R_i is the sum of ``token_level_rewards`` over the
          response, as in verl's ``grpo``, and r is `flow_token_rewards` [B, R], on any response token;
        - mixed (fallback): R_i is the value on the last response token and r the other values
          (`split_outcome`).

    `gamma` and `norm_adv_by_std_in_grpo` come from the arguments or from `config` (``algorithm.*``);
    both given and different is an error. Defaults 1.0 and True. A one-rollout group gets Â = 0 (verl's
    ``grpo`` gives such a rollout its raw score).

    Returns ``(advantages, returns)``, both [B, R] fp32 and equal.
    """
    if flow_token_rewards is None:
        outcome, flow, mask = split_outcome(token_level_rewards, response_mask)
    else:
        outcome = outcome_scores(token_level_rewards, response_mask)
        _check_rewards(FLOW_REWARDS_KEY, flow_token_rewards)
        mask = as_bool_mask("response_mask", response_mask, token_level_rewards.shape)
        if flow_token_rewards.shape != token_level_rewards.shape:
            raise ValueError(f"{FLOW_REWARDS_KEY} has shape {list(flow_token_rewards.shape)} but token_level_rewards "
                             f"has {list(token_level_rewards.shape)}")
        _check_inside(FLOW_REWARDS_KEY, flow_token_rewards, mask)
        flow = flow_token_rewards.float()
    B = outcome.shape[0]
    if index is None:
        raise ValueError("grpo_flow needs the group id of each rollout: verl passes non_tensor_batch['uid'] as index")
    index = list(index)
    if len(index) != B:
        raise ValueError(f"index has {len(index)} entries for {B} rollouts")
    gamma = float(_setting("gamma", gamma, config, 1.0))
    by_std = bool(_setting("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo, config, True))
    groups: dict[Any, list[int]] = defaultdict(list)
    for row, uid in enumerate(index):
        groups[uid].append(row)
    by_size: dict[int, list[int]] = defaultdict(list)
    for rows in groups.values():
        by_size[len(rows)].extend(rows)
    advantages = torch.zeros_like(flow)
    for size, rows in by_size.items():
        order = torch.tensor(rows, dtype=torch.long, device=flow.device)
        if by_std:
            advantages[order] = shape_advantages(outcome[order], flow[order], mask[order], size, gamma)
        else:  # Dr. GRPO: the outcome only centred; shape_advantages of a zero outcome is the flow reward-to-go
            centred = outcome[order].view(-1, size) - outcome[order].view(-1, size).mean(1, keepdim=True)
            rtg = shape_advantages(torch.zeros_like(outcome[order]), flow[order], mask[order], size, gamma)
            advantages[order] = rtg + centred.reshape(-1, 1) * mask[order]
    return advantages, advantages.clone()


_verl_compute_advantage = ray_trainer.compute_advantage


def compute_advantage(data: Any, adv_estimator: Any, gamma: Optional[float] = None, lam: float = 1.0,
                      num_repeat: int = 1, norm_adv_by_std_in_grpo: Optional[bool] = None, config: Any = None) -> Any:
    """verl's ``compute_advantage`` (same arguments), with ``grpo_flow`` reading the separate flow key.

    For ``adv_estimator == "grpo_flow"`` it passes ``data.batch[FLOW_REWARDS_KEY]`` (when present) and the
    `gamma` / `norm_adv_by_std_in_grpo` arguments to `compute_grpo_flow_advantage` (None: take them from
    `config`, else 1.0 and True); every other estimator goes to verl's own function with verl's defaults.
    `register` installs it in ``verl.trainer.ppo.ray_trainer``.
    """
    if str(getattr(adv_estimator, "value", adv_estimator)) != ESTIMATOR_NAME:
        return _verl_compute_advantage(data, adv_estimator, gamma=1.0 if gamma is None else gamma, lam=lam,
                                       num_repeat=num_repeat, config=config,
                                       norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo is not False)
    batch = data.batch
    if "response_mask" not in batch.keys():
        batch["response_mask"] = ray_trainer.compute_response_mask(data)
    uid = data.non_tensor_batch.get("uid")
    flow = batch[FLOW_REWARDS_KEY] if FLOW_REWARDS_KEY in batch.keys() else None
    advantages, returns = compute_grpo_flow_advantage(batch["token_level_rewards"], batch["response_mask"], uid,
                                                      config, flow_token_rewards=flow, gamma=gamma,
                                                      norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
    batch["advantages"] = advantages
    batch["returns"] = returns
    return data


def register() -> Any:
    """Register ``grpo_flow`` with verl's advantage-estimator registry and install `compute_advantage` as
    ``verl.trainer.ppo.ray_trainer.compute_advantage`` (what ``RayPPOTrainer.fit`` calls), so the estimator
    sees the flow rewards under `FLOW_REWARDS_KEY` and the trainer's gamma / norm arguments. Idempotent;
    returns the estimator.

    Call it in the process that computes advantages (verl's driver / TaskRunner), then set
    ``algorithm.adv_estimator=grpo_flow``.
    """
    registered = core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME)
    if registered is not compute_grpo_flow_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_grpo_flow_advantage)
    ray_trainer.compute_advantage = compute_advantage
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
        precision: the precision the flow is scored in (`flowkern.flow_reward`): "auto" (bf16 on CUDA through
            a cached copy of the fp32 weights, fp32 on CPU), "fp32", "bf16", "fp16" or "fp8"; None (the default)
            takes ``config.score_precision``. The flow's weights, its update and its Adam state stay fp32.
        device: where the flow lives (default: the device of the first batch).
        process_group: ranks whose flow copies are kept identical (default: the world).
        seed: seed of the noise generator (each rank should pass its own, e.g. ``seed + rank``).
        repeats: noise draws per token in the flow-matching loss.
        max_tokens: at most this many response tokens (each at every hooked layer) per
            forward/backward of `update_flow`; gradients are accumulated over the chunks,
            so the update's memory is bounded whatever the batch (None: one chunk).
        layout: ``"separate"`` (default): flow rewards on every scored response token, to be
            stored under ``data.batch[FLOW_REWARDS_KEY]``; ``"mixed"``: zero on the last
            response token, to be added to the outcome scores (the fallback layout).
    """

    def __init__(self, module: nn.Module, flow: FlowLike, flow_config: Optional[FlowConfig] = None, *,
                 lr: float = 1e-4, incorrect_weight: float = 0.0, micro_batch_size: Optional[int] = None,
                 backend: str = "auto", device: Optional[torch.device] = None, process_group=None,
                 seed: int = 0, repeats: int = 1, layers: Optional[nn.ModuleList] = None,
                 max_tokens: Optional[int] = None, layout: str = "separate", precision: Optional[str] = None):
        field, config = resolve_flow(flow, flow_config)
        if precision is not None:
            check_precision(precision)
        check_max_tokens("max_tokens", max_tokens)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
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
        self.precision = precision
        self.process_group = process_group
        self.repeats = repeats
        self.max_tokens = max_tokens
        self.layout = layout
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
        """Flow rewards [B, R] fp32 in verl's response layout, zero off `response_mask` (and, with
        ``layout="mixed"``, on the last response token).

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
        if self.layout == "mixed":
            rows = response.any(dim=1).nonzero()[:, 0]
            action[rows, P + last_true(response[rows])] = False  # the outcome's slot gets no flow reward
        rewards = flow_reward(self.field, latents, scored_mask(action, attention, self.config), self.config,
                              layer_fracs=fracs, noise=noise, generator=self.generator, backend=self.backend,
                              precision=self.precision)[:, P:]
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
                               repeats=self.repeats, backend=self.backend, process_group=self.process_group,
                               max_tokens=self.max_tokens)

    def save(self, path) -> Path:
        """Save the flow and its config (`flowkern.save_flow_field`); returns the weights' path."""
        return save_flow_field(self.field, path, self.config)

    def save_checkpoint(self, folder, rank: int) -> None:
        """Checkpoint for an exact resume; call it on every rank. Rank 0 writes the flow
        (``flow.safetensors`` + ``flow.json``) and its optimiser; every rank writes its noise generator."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.generator is not None:
            torch.save(self.generator.get_state(), folder / FLOW_GENERATOR_NAME.format(rank=rank))
        if rank == 0:
            self.save(folder / SAFETENSORS_NAME)
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), folder / FLOW_OPTIMIZER_NAME)

    def load_checkpoint(self, folder, rank: int, device: Optional[torch.device] = None) -> None:
        """Restore what `save_checkpoint` wrote (the flow, its optimiser, this rank's generator)."""
        folder = Path(folder)
        field, _ = load_flow_field(folder / SAFETENSORS_NAME)
        self.field.load_state_dict(field.state_dict())
        self._place(torch.device(device) if device is not None else self.field.input_proj.weight.device)
        if (folder / FLOW_OPTIMIZER_NAME).exists():
            self.optimizer.load_state_dict(torch.load(folder / FLOW_OPTIMIZER_NAME, map_location="cpu",
                                                      weights_only=True))
        gen = folder / FLOW_GENERATOR_NAME.format(rank=rank)
        if gen.exists():
            self.generator.set_state(torch.load(gen, map_location="cpu", weights_only=True))
