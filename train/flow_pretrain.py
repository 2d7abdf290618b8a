"""Stage 2: flow pretraining on the expert traces' latents, with the policy frozen."""

from __future__ import annotations

from typing import Sequence

import torch

from flowkern import LatentTap, latent_flow_loss, save_flow_field

from . import distributed as D
from .checkpoint import save_checkpoint
from .context import Run
from .harvest import flow_traces
from .policy import encode_traces, position_ids


@torch.no_grad()
def policy_latents(policy, batch: dict[str, torch.Tensor], layers: Sequence[float]
                   ) -> tuple[list[torch.Tensor], list[float]]:
    """Detached latents of the hooked layers for a layout batch, and their layer fractions."""
    am = batch["attention_mask"]
    with LatentTap(D.unwrap(policy), layers) as tap:
        D.unwrap(policy)(input_ids=batch["input_ids"], attention_mask=am, position_ids=position_ids(am),
                         use_cache=False)
    return tap.latents, tap.layer_fracs


def run_flow_pretrain(run: Run) -> None:
    """Pretrain the velocity field on expert-trace latents (response tokens), policy frozen.

    The traces are `train.harvest.flow_traces`: the expert traces of the embedded task, or the policy's own
    correct samples on a real task.

    Saves the field with `flowkern.save_flow_field` to ``<out>/flow_pretrained.safetensors``.
    """
    cfg, info = run.cfg, run.info
    start = run.start_step("flow")
    if start is None:
        return
    field, fcfg = run.field, run.flow_config
    traces = flow_traces(run) if start < cfg.flow_steps else []
    opt = torch.optim.Adam(field.parameters(), lr=cfg.flow_lr)
    state = run.take_optimizer_state("flow", "flow")
    if state is not None:
        opt.load_state_dict(state)
    run.policy.eval()
    field.train()
    bar = run.progress(cfg.flow_steps, start, "flow pretrain")
    for step in range(start + 1, cfg.flow_steps + 1):
        idx = D.shard(run.sample_indices(cfg.flow_batch, len(traces)), info)
        probs = [traces[i] for i in idx]
        batch = encode_traces(run.tokenizer, [p.prompt for p in probs], [p.solution for p in probs], run.device)
        latents, fracs = policy_latents(run.policy, batch, fcfg.hook_layers)
        loss = latent_flow_loss(field, latents, batch["action_mask"], fcfg, layer_fracs=fracs,
                                repeats=cfg.flow_repeats, backend=cfg.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        D.average_gradients(field.parameters(), info)
        opt.step()
        bar.update(1)
        if step % 5 == 0 or step == 1 or step == cfg.flow_steps:
            (mean_loss,) = D.all_sum([loss.item() / info.world], info)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            run.metrics.log({"stage": "flow", "step": step, "kind": "train", "flow_loss": mean_loss})
        if step % cfg.ckpt_every == 0 or step == cfg.flow_steps:
            save_checkpoint(run.out, stage="flow", step=step, policy=run.policy, tokenizer=run.tokenizer,
                            field=field, flow_config=fcfg, optimizers={"flow": opt}, generator=run.generator,
                            info=info, keep=cfg.keep_ckpts, extra=run.summary)
    bar.close()
    if info.main:
        save_flow_field(field, run.out / "flow_pretrained.safetensors", fcfg)
    D.barrier(info)
