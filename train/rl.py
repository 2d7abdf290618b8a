"""Stage 3: GRPO with flow rewards (RLFR), plain RLVR, or the entropy-advantage baseline.

One step:

1. draw ``batch_size / group_size`` prompts (each rank keeps its share) and
   sample ``group_size`` responses per prompt with HF ``generate`` (KV cache);
2. verify each response against the answer: outcome reward 1 or 0;
3. one forward pass under `LatentTap` gives the log-probs (with grad), the
   token entropies and the hooked latents;
4. token rewards: `flowkern.flow_reward` (``--shaping flow``) or 0;
   advantages: `flowkern.shape_advantages` (group-normalised outcome plus the
   flow reward-to-go); ``--shaping entropy`` adds Cheng et al.'s term
   ``min(alpha * H_detached, |A| / kappa)``;
5. PPO-clip loss, token-mean over action tokens;
6. online flow update on the latents of correct rollouts (others weigh
   ``flow_soft``), flow shaping only.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from flowkern import LatentTap, flow_reward, latent_flow_loss, shape_advantages
from flowkern.integrations._common import flow_update

from . import distributed as D
from .checkpoint import save_checkpoint
from .context import Run
from .evaluate import evaluate_policy
from .policy import decode_responses, forward_logprobs, generate
from .sft import masked_token_mean
from .task import verify_batch


def entropy_advantage(adv: torch.Tensor, entropy: torch.Tensor, action_mask: torch.Tensor,
                      alpha: float, kappa: float) -> torch.Tensor:
    """Cheng et al. (2025) entropy-shaped advantage: ``A + min(alpha * H.detach(), |A| / kappa)`` on actions."""
    psi = torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)
    return torch.where(action_mask, adv + psi, 0.0)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, action_mask: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean PPO-clip loss and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -masked_token_mean(torch.minimum(unclipped, clipped), action_mask)
    frac = masked_token_mean((clipped < unclipped).float(), action_mask)
    return loss, frac


def rl_step(run: Run, ddp: torch.nn.Module, opt: torch.optim.Optimizer,
            flow_opt: Optional[torch.optim.Optimizer]) -> dict[str, float]:
    """One GRPO step on this rank's share of the batch; returns its (local) metrics."""
    cfg, info, tok = run.cfg, run.info, run.tokenizer
    n_prompts = cfg.batch_size // cfg.group_size
    idx = D.shard(run.sample_indices(n_prompts, len(run.train)), info)
    probs = [run.train[i] for i in idx]
    t0 = time.perf_counter()
    batch = generate(run.policy, tok, [p.prompt for p in probs], max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, num_return_sequences=cfg.group_size, device=run.device)
    t_gen = time.perf_counter() - t0
    answers = [p.answer for p in probs for _ in range(cfg.group_size)]
    correct = verify_batch(decode_responses(tok, batch), answers, cfg.verifier)
    outcome = torch.tensor(correct, dtype=torch.float32, device=run.device)
    action = batch["action_mask"]

    run.policy.train()
    with LatentTap(run.policy, run.flow_config.hook_layers) as tap:
        logp, ent = forward_logprobs(ddp, batch, cfg.temperature, with_entropy=True)
    latents, fracs = tap.latents, tap.layer_fracs
    if cfg.shaping == "flow":
        run.field.eval()
        token_rewards = flow_reward(run.field, latents, action, run.flow_config, layer_fracs=fracs,
                                    backend=cfg.backend)
    else:
        token_rewards = torch.zeros(action.shape, dtype=torch.float32, device=run.device)
    adv = shape_advantages(outcome, token_rewards, action, cfg.group_size, cfg.gamma, backend=cfg.backend)
    if cfg.shaping == "entropy":
        adv = entropy_advantage(adv, ent, action, cfg.entropy_alpha, cfg.entropy_kappa)

    old_logp = logp.detach()
    for epoch in range(cfg.ppo_epochs):
        if epoch:
            logp, _ = forward_logprobs(ddp, batch, cfg.temperature)
        loss, clip_frac = ppo_clip_loss(logp, old_logp, adv, action, cfg.clip_eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.policy.parameters(), 1.0)
        opt.step()

    metrics = {"reward": outcome.mean().item(), "loss": loss.item(), "clip_frac": clip_frac.item(),
               "entropy": masked_token_mean(ent, action).item(),
               "response_len": action.sum(-1).float().mean().item(), "gen_s": t_gen,
               "gen_tokens_per_s": action.sum().item() / max(t_gen, 1e-9),
               "flow_reward": masked_token_mean(token_rewards, action).item(),
               "flow_reward_nonzero": masked_token_mean((token_rewards != 0).float(), action).item()}
    if flow_opt is not None and cfg.flow_max_tokens is not None:  # bounded: chunks, gradients summed over ranks
        run.field.train()
        floss = flow_update(run.field, flow_opt, latents, fracs, action, torch.where(outcome > 0, 1.0, cfg.flow_soft),
                            run.flow_config, repeats=cfg.flow_repeats, backend=cfg.backend,
                            max_tokens=cfg.flow_max_tokens)
        if floss is not None:
            metrics["flow_loss"] = floss
    elif flow_opt is not None:
        weights = action.float() * torch.where(outcome > 0, 1.0, cfg.flow_soft)[:, None]
        run.field.train()
        floss = latent_flow_loss(run.field, latents, weights, run.flow_config, layer_fracs=fracs,
                                 repeats=cfg.flow_repeats, backend=cfg.backend)
        flow_opt.zero_grad(set_to_none=True)
        floss.backward()
        D.average_gradients(run.field.parameters(), info)
        flow_opt.step()
        metrics["flow_loss"] = floss.item()
    metrics["step_s"] = time.perf_counter() - t0  # generation to the last update, on this rank
    run.last_rollout = {"action_mask": action, "token_rewards": token_rewards, "advantages": adv.detach(),
                        "outcome": outcome}
    return metrics


def run_rl(run: Run) -> None:
    """GRPO for ``rl_steps`` steps with held-out evaluation every ``eval_every`` steps and at the end."""
    cfg, info = run.cfg, run.info
    start = run.start_step("rl")
    if start is None:
        return
    ddp = run.ddp
    opt = torch.optim.AdamW(run.policy.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    flow_opt = torch.optim.Adam(run.field.parameters(), lr=cfg.flow_online_lr) if cfg.shaping == "flow" else None
    for name, o in (("policy", opt), ("flow", flow_opt)):
        state = run.take_optimizer_state("rl", name)
        if state is not None and o is not None:
            o.load_state_dict(state)
    bar = run.progress(cfg.rl_steps, start, f"rl ({cfg.shaping})")
    for step in range(start + 1, cfg.rl_steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.rl_lr * min(1.0, step / max(1, cfg.rl_warmup))
        local = rl_step(run, ddp, opt, flow_opt)
        keys = sorted(local)
        means = dict(zip(keys, (v / info.world for v in D.all_sum([local[k] for k in keys], info))))
        bar.update(1)
        bar.set_postfix(reward=f"{means['reward']:.3f}", len=f"{means['response_len']:.1f}")
        run.metrics.log({"stage": "rl", "step": step, "kind": "train", **means})
        if step == cfg.rl_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            result = evaluate_policy(run, run.heldout, desc=f"eval rl step {step}")
            run.metrics.log({"stage": "rl", "step": step, "kind": "eval", **result})
            if step == cfg.rl_steps:
                run.summary["rl_eval"] = result
        if step % cfg.ckpt_every == 0 or step == cfg.rl_steps:
            opts = {"policy": opt, **({"flow": flow_opt} if flow_opt is not None else {})}
            save_checkpoint(run.out, stage="rl", step=step, policy=run.policy, tokenizer=run.tokenizer,
                            field=run.field, flow_config=run.flow_config, optimizers=opts,
                            generator=run.generator, info=info, keep=cfg.keep_ckpts, extra=run.summary)
    bar.close()
