"""RLFR flow rewards inside TRL's `GRPOTrainer` (written against trl 1.16).

`FlowGRPOTrainer` is a drop-in subclass. After TRL has generated and scored a
batch, it takes the policy latents of prompt + completion (from the no-grad
forward TRL already runs for the old log-probs when there is one, else from one
extra no-grad forward), computes `flowkern.flow_reward` on the completion
tokens, and replaces TRL's per-sequence ``advantages`` [B] by a [B, C] tensor:

    A[i, k] = TRL's group advantage of rollout i + Σ_{s ≥ k} γ^(s-k) r_flow[i, s]

under the completion (loss) mask. Once per generation batch (training only) the
flow is then trained by flow matching on the completions whose reward is
≥ `correct_threshold` (others weigh `flow_incorrect_weight`), with its own Adam
optimiser. The flow and its optimiser are saved with every checkpoint.

Install with ``pip install flowkern[trl]``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from ._common import require

_trl = require("trl", "trl")

import inspect  # noqa: E402

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from ..checkpoint import SAFETENSORS_NAME, load_flow_field, save_flow_field  # noqa: E402
from ..config import FlowConfig  # noqa: E402
from ..flow import check_precision  # noqa: E402
from ..reward import flow_reward, reward_to_go  # noqa: E402
from ._common import (FLOW_GENERATOR_NAME, FLOW_OPTIMIZER_NAME, FlowLike, LatentRecorder,  # noqa: E402
                      broadcast_module, check_flow_fits_policy, check_max_tokens, decoder_layers, flow_update, resolve_flow, scored_mask)

_HOOKED = ("_generate_and_score_completions", "_calculate_rewards", "_get_per_token_logps_and_entropies",
           "_save_checkpoint", "_load_optimizer_and_scheduler")
_missing = [name for name in _HOOKED if not hasattr(GRPOTrainer, name)]
if _missing:
    raise ImportError(f"flowkern.integrations.trl was written for trl 1.16 and hooks GRPOTrainer.{_missing}, which "
                      f"trl {getattr(_trl, '__version__', '?')} lacks; install it with: pip install flowkern[trl]")

__all__ = ["FlowGRPOTrainer", "FLOW_GENERATOR_NAME", "FLOW_OPTIMIZER_NAME"]


class FlowGRPOTrainer(GRPOTrainer):
    """TRL `GRPOTrainer` with RLFR flow rewards and an online flow update.

    Takes every argument of `trl.GRPOTrainer`, plus (keyword-only):

    Args:
        flow: a `flowkern.VelocityField`, or the path of a flow checkpoint (flowkern
            safetensors + JSON, or an official ``flow_model.bin``). Its dim must equal
            the policy's hidden size.
        flow_config: the `flowkern.FlowConfig` (hooked layers, pairing, shaping).
            Optional when `flow` is a flowkern checkpoint, which carries its own.
        flow_lr: learning rate of the flow's Adam optimiser.
        flow_incorrect_weight: weight of rollouts below `correct_threshold` in the
            flow update (0 = rejection sampling, as in RLFR).
        online_flow_update: train the flow once per generation batch.
        correct_threshold: a rollout whose total reward is ≥ this is correct.
        flow_gamma: discount γ of the flow rewards' reward-to-go.
        flow_repeats: noise draws per token in the flow-matching loss.
        flow_backend: flowkern backend ("auto", "torch", "triton", "cuda").
        flow_precision: the precision the flow is scored in (`flowkern.flow_reward`): "auto" (bf16 on
            CUDA through a cached copy of the fp32 weights, fp32 on CPU), "fp32", "bf16", "fp16" or "fp8";
            None (the default) takes the flow config's ``score_precision`` (itself "auto" by default).
            The flow's weights, its online update and its Adam state stay fp32.
        flow_update_max_tokens: at most this many completion tokens (each at every hooked
            layer) per forward/backward of the online update; gradients are accumulated
            over the chunks, so its memory is bounded whatever the batch (None: one chunk).

    Batches seen by the loss carry three extra keys: ``advantages`` [B, C] (the
    shaped ones), ``sequence_advantages`` [B] (TRL's) and ``flow_rewards`` [B, C].
    Metrics ``flow/reward_abs_mean``, ``flow/rewarded_frac``, ``flow/loss`` and
    ``flow/correct_frac`` go through TRL's logging: the first two on every generation batch,
    ``flow/correct_frac`` on training generation batches with the update on, and ``flow/loss``
    only when that update took a step (some rollout had weight). Checkpoints hold the flow,
    its optimiser and each process's noise generator, so a resumed run is bit-exact.
    Text-only policies.
    """

    def __init__(self, model, reward_funcs=None, args=None, *pos, flow: FlowLike = None,
                 flow_config: Optional[FlowConfig] = None, flow_lr: float = 1e-4,
                 flow_incorrect_weight: float = 0.0, online_flow_update: bool = True,
                 correct_threshold: float = 1.0, flow_gamma: float = 1.0, flow_repeats: int = 1,
                 flow_backend: str = "auto", flow_update_max_tokens: Optional[int] = None,
                 flow_precision: Optional[str] = None, **kwargs):
        field, config = resolve_flow(flow, flow_config)
        if flow_precision is not None:
            check_precision(flow_precision)
        check_max_tokens("flow_update_max_tokens", flow_update_max_tokens)
        for name, value in (("flow_lr", flow_lr), ("flow_incorrect_weight", flow_incorrect_weight),
                            ("correct_threshold", correct_threshold), ("flow_gamma", flow_gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if flow_lr <= 0:
            raise ValueError(f"flow_lr must be positive, got {flow_lr}")
        if flow_incorrect_weight < 0:
            raise ValueError(f"flow_incorrect_weight must be >= 0, got {flow_incorrect_weight}")
        if not 0.0 <= flow_gamma <= 1.0:
            raise ValueError(f"flow_gamma must lie in [0, 1], got {flow_gamma}")
        if isinstance(flow_repeats, bool) or not isinstance(flow_repeats, int) or flow_repeats < 1:
            raise ValueError(f"flow_repeats must be a positive integer, got {flow_repeats!r}")
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        check_flow_fits_policy(field, self.model)
        device = self.accelerator.device
        self.flow_field = field.to(device=device, dtype=torch.float32)
        broadcast_module(self.flow_field)  # every rank starts from rank 0's flow
        self.flow_config = config
        self.flow_optimizer = torch.optim.Adam(self.flow_field.parameters(), lr=float(flow_lr))
        self.flow_incorrect_weight = float(flow_incorrect_weight)
        self.online_flow_update = bool(online_flow_update)
        self.correct_threshold = float(correct_threshold)
        self.flow_gamma = float(flow_gamma)
        self.flow_repeats = flow_repeats
        self.flow_backend = flow_backend
        self.flow_precision = flow_precision
        self.flow_update_max_tokens = flow_update_max_tokens
        self._flow_layers = decoder_layers(self.model)
        self._flow_generator = torch.Generator(device=device)
        self._flow_generator.manual_seed(int(self.args.seed) * 7919 + self.accelerator.process_index)
        self._flow_recorder: Optional[LatentRecorder] = None
        self._flow_rewards_per_func: Optional[torch.Tensor] = None
        self.flow_last_forward_reused: Optional[bool] = None  # whether the last batch reused TRL's forward
        forward = getattr(self.accelerator.unwrap_model(self.model), "forward", None)
        self._flow_logits_to_keep = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters

    # ------------------------------------------------------------------ hooks into TRL

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._flow_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        recorder = self._flow_recorder
        if recorder is None or recorder.calls or model is not self.model:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        with recorder:  # the old-log-prob forward of the policy: keep its latents
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _flow_reuses_trl_forward(self) -> bool:
        """Whether TRL runs its own no-grad policy forward (old log-probs) in this generation step."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return bool(self.args.gradient_accumulation_steps % generate_every != 0
                    or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        recorder = LatentRecorder(self.model, self.flow_config.hook_layers, layers=self._flow_layers)
        self._flow_recorder = recorder if self._flow_reuses_trl_forward() else None
        self._flow_rewards_per_func = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._flow_recorder = None
        if any(key in output for key in ("pixel_values", "image_grid_thw", "num_images")):
            raise NotImplementedError("FlowGRPOTrainer supports text-only policies")
        prompt_mask, completion_mask = output["prompt_mask"], output["completion_mask"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        loss_mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        loss_mask = loss_mask.bool()
        self.flow_last_forward_reused = recorder.calls > 0
        latents = recorder.latents if recorder.calls else self._flow_forward(recorder, input_ids, attention_mask, mode)
        if latents[0].shape[:2] != input_ids.shape:
            raise RuntimeError(f"captured latents of shape {list(latents[0].shape)} do not match the batch "
                               f"{list(input_ids.shape)}")

        P = prompt_mask.shape[1]
        action = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), loss_mask], dim=1)
        scored = scored_mask(action, attention_mask, self.flow_config)
        rewards = flow_reward(self.flow_field, latents, scored, self.flow_config, layer_fracs=recorder.layer_fracs,
                              generator=self._flow_generator, backend=self.flow_backend,
                              precision=self.flow_precision)[:, P:]
        sequence_advantages = output["advantages"]
        advantages = sequence_advantages.float()[:, None] + reward_to_go(rewards, self.flow_gamma)
        output["advantages"] = advantages.masked_fill(~loss_mask, 0.0)
        output["sequence_advantages"] = sequence_advantages
        output["flow_rewards"] = rewards

        nonzero = (rewards != 0) & loss_mask
        stats = torch.stack([rewards.abs().masked_fill(~loss_mask, 0).sum(), nonzero.sum().float(),
                             loss_mask.sum().float()]).to(self.accelerator.device)
        abs_sum, rewarded, tokens = self.accelerator.gather(stats).view(-1, 3).sum(0).tolist()
        self._metrics[mode]["flow/reward_abs_mean"].append(abs_sum / max(tokens, 1.0))
        self._metrics[mode]["flow/rewarded_frac"].append(rewarded / max(tokens, 1.0))

        if mode == "train" and self.online_flow_update:
            outcome = self._flow_local_outcome(len(input_ids))
            correct = outcome >= self.correct_threshold
            weights = torch.where(correct, 1.0, self.flow_incorrect_weight)
            with torch.enable_grad():
                loss = flow_update(self.flow_field, self.flow_optimizer, latents, recorder.layer_fracs, scored,
                                   weights, self.flow_config, generator=self._flow_generator,
                                   repeats=self.flow_repeats, backend=self.flow_backend,
                                   max_tokens=self.flow_update_max_tokens)
            counts = torch.tensor([correct.sum().item(), len(correct)], dtype=torch.float32,
                                  device=self.accelerator.device)
            n_correct, n_total = self.accelerator.gather(counts).view(-1, 2).sum(0).tolist()
            self._metrics[mode]["flow/correct_frac"].append(n_correct / max(n_total, 1.0))
            if loss is not None:
                self._metrics[mode]["flow/loss"].append(loss)
        return output

    # ------------------------------------------------------------------ helpers

    def _flow_forward(self, recorder: LatentRecorder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      mode: str) -> list[torch.Tensor]:
        """One extra no-grad policy forward over the batch, in TRL's micro-batches, keeping only the latents."""
        batch_size = (self.args.per_device_train_batch_size if mode == "train"
                      else self.args.per_device_eval_batch_size) or input_ids.shape[0]
        extra = {"use_cache": False}
        if self._flow_logits_to_keep:
            extra["logits_to_keep"] = 1
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with recorder:
                for start in range(0, input_ids.shape[0], batch_size):
                    self.model(input_ids=input_ids[start:start + batch_size],
                               attention_mask=attention_mask[start:start + batch_size], **extra)
        return recorder.latents

    def _flow_local_outcome(self, n_local: int) -> torch.Tensor:
        """This rank's total rewards [B] (weighted sum over reward functions; unscorable rows are -inf)."""
        per_func = self._flow_rewards_per_func
        if per_func is None:
            raise RuntimeError("FlowGRPOTrainer: TRL computed no rewards for this batch")
        weights = self.reward_weights.to(per_func.device)
        total = (per_func * weights[None]).nansum(dim=1)
        total = total.masked_fill(torch.isnan(per_func).all(dim=1), -math.inf)
        start = self.accelerator.process_index * n_local
        return total[start:start + n_local].to(self.accelerator.device)

    # ------------------------------------------------------------------ checkpoints

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """Save the policy as TRL does, plus the flow (``flow.safetensors`` + ``flow.json``) beside it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            save_flow_field(self.flow_field, out / SAFETENSORS_NAME, self.flow_config)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self._flow_generator.get_state(),
                   os.path.join(folder, FLOW_GENERATOR_NAME.format(rank=self.accelerator.process_index)))
        if self.args.should_save:
            torch.save(self.flow_optimizer.state_dict(), os.path.join(folder, FLOW_OPTIMIZER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not (Path(checkpoint) / SAFETENSORS_NAME).exists():
            return
        field, _ = load_flow_field(checkpoint)
        self.flow_field.load_state_dict(field.state_dict())
        opt_path = Path(checkpoint) / FLOW_OPTIMIZER_NAME
        if opt_path.exists():
            state = torch.load(opt_path, map_location=self.accelerator.device, weights_only=True)
            self.flow_optimizer.load_state_dict(state)
        gen_path = Path(checkpoint) / FLOW_GENERATOR_NAME.format(rank=self.accelerator.process_index)
        if gen_path.exists():
            self._flow_generator.set_state(torch.load(gen_path, map_location="cpu", weights_only=True))
