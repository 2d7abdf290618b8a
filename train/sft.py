"""Stage 1: supervised warm-up of the policy on the generator's expert traces."""

from __future__ import annotations

import math

import torch

from . import distributed as D
from .checkpoint import save_checkpoint
from .context import Run
from .evaluate import evaluate_policy
from .policy import encode_traces, forward_logprobs


def sft_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Learning rate at 1-based `step`: linear warmup over `warmup` steps, then cosine to 0."""
    warm = min(1.0, step / max(1, min(warmup, total)))
    return peak * warm * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(1, total)))


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the True positions of `mask` (0 when empty)."""
    m = mask.float()
    return (values * m).sum() / m.sum().clamp_min(1.0)


def run_sft(run: Run) -> None:
    """Train the policy by next-token cross-entropy on response tokens of expert traces.

    Logs ``loss`` every few steps, checkpoints every ``ckpt_every`` steps, and
    evaluates held-out pass@1 / pass@k at the end (the "after SFT" numbers).
    """
    cfg, info = run.cfg, run.info
    start = run.start_step("sft")
    if start is None:
        return
    policy = run.policy
    ddp = run.ddp
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    state = run.take_optimizer_state("sft", "policy")
    if state is not None:
        opt.load_state_dict(state)
    policy.train()
    bar = run.progress(cfg.sft_steps, start, "sft")
    for step in range(start + 1, cfg.sft_steps + 1):
        for group in opt.param_groups:
            group["lr"] = sft_lr(step, cfg.sft_steps, cfg.sft_lr)
        idx = D.shard(run.sample_indices(cfg.sft_batch, len(run.train)), info)
        probs = [run.train[i] for i in idx]
        batch = encode_traces(run.tokenizer, [p.prompt for p in probs], [p.solution for p in probs], run.device)
        logp, _ = forward_logprobs(ddp, batch)
        loss = -masked_token_mean(logp, batch["action_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        bar.update(1)
        if step % 10 == 0 or step == cfg.sft_steps:
            (mean_loss,) = D.all_sum([loss.item() / info.world], info)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            run.metrics.log({"stage": "sft", "step": step, "kind": "train", "loss": mean_loss,
                             "lr": opt.param_groups[0]["lr"]})
        if step == cfg.sft_steps and "sft_eval" not in run.summary:
            bar.close()
            result = evaluate_policy(run, run.heldout, desc="eval after sft")
            run.summary["sft_eval"] = result
            run.metrics.log({"stage": "sft", "step": step, "kind": "eval", **result})
        if step % cfg.ckpt_every == 0 or step == cfg.sft_steps:
            save_checkpoint(run.out, stage="sft", step=step, policy=policy, tokenizer=run.tokenizer,
                            field=run.field, flow_config=run.flow_config, optimizers={"policy": opt},
                            generator=run.generator, info=info, keep=cfg.keep_ckpts, extra=run.summary)
    bar.close()
    if "sft_eval" not in run.summary:  # no SFT steps (e.g. --sft-steps 0 with --model): evaluate the start point
        result = evaluate_policy(run, run.heldout, desc="eval (no sft)")
        run.summary["sft_eval"] = result
        run.metrics.log({"stage": "sft", "step": cfg.sft_steps, "kind": "eval", **result})
