"""One trainer run: task → policy → SFT → flow pretraining → RL → evaluation and reports."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.utils import logging as hf_logging

from flowkern import VelocityField

from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint, set_rng_state
from .config import TrainConfig
from .context import MetricsLog, Run
from .evaluate import plot_curves, run_diagnostics, write_summary
from .flow_pretrain import run_flow_pretrain
from .models import MODELS, load_model, resolve_model
from .policy import PolicySpec, build_policy, count_parameters, load_policy
from .real_tasks import load_asdiv, parse_task, task_splits, with_chat_prompts
from .rl import run_rl
from .sft import run_sft
from .task import make_splits
from .tokenizer import build_tokenizer


def default_threads(world: int) -> int:
    """CPU threads per process: the cores this process may use, split over the local processes.

    When the machine is already busy (1-minute load average at or above the
    core count) one thread is used: the tiny policy's small matmuls lose more
    to thread synchronisation under contention than they gain (measured 3x).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:  # pragma: no cover
        busy = False
    return 1 if busy else max(1, cores // max(1, world))


def _say(info: D.DistInfo, msg: str) -> None:
    if info.main:
        print(msg, flush=True)


def setup(cfg: TrainConfig, info: D.DistInfo) -> Run:
    """Build (or restore from a checkpoint) everything a run needs."""
    out = Path(cfg.out)
    task = parse_task(cfg.task, cfg.task_options)
    ckpt_path: Optional[Path] = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt_path is None:
        _say(info, f"[train] --resume: no checkpoint in {out}/ckpt, starting fresh")
    fresh = ckpt_path is None
    if ckpt_path is None and cfg.init_from:
        ckpt_path = Path(cfg.init_from)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if fresh:  # a new run in this directory: drop the previous run's log and checkpoints
            for stale in ("metrics.jsonl", "summary.json", "flow_traces.jsonl"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(out / "ckpt", ignore_errors=True)
        cfg.save(out / "config.json")
        # downloads happen once, here, before any other rank reads the cache
        if cfg.model in MODELS and ckpt_path is None:
            resolve_model(cfg.model)
        if task.kind == "asdiv":
            load_asdiv()
    D.barrier(info)

    if task.real:
        train, heldout = task_splits(task, cfg.seed, cfg.n_train, cfg.n_heldout, progress=info.main)
    else:
        train, heldout = make_splits(cfg.seed, cfg.n_train, cfg.n_heldout, cfg.task_spec())
    generator = torch.Generator().manual_seed(cfg.seed)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.main)
    fcfg = cfg.flow_config()
    resume: dict[str, Any] = {}
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path, info)
        policy, tokenizer = load_policy(ck["policy_dir"], info.device)
        field = ck["field"].to(info.device)
        if ck["flow_config"] is not None and ck["flow_config"] != fcfg:
            _say(info, f"[train] using the checkpoint's flow config {ck['flow_config']}")
            fcfg = ck["flow_config"]
        state = ck["state"]
        generator.set_state(state["generator"])
        set_rng_state(ck["rng"])
        resume = {"resume_stage": state["stage"], "resume_step": int(state["step"])}
        if not fresh:  # --resume: optimizers continue; --init-from: fresh optimizers
            resume["resume_optimizers"] = dict(state["optimizers"])
            metrics.truncate_after(state["stage"], int(state["step"]))
        summary = dict(state.get("extra") or {})
        _say(info, f"[train] {'resumed' if not fresh else 'initialised'} from {ckpt_path} "
                   f"({state['stage']} step {state['step']})")
    else:
        torch.manual_seed(cfg.seed * 1000 + info.rank)
        if cfg.model:
            policy, tokenizer = load_model(cfg.model, info.device, progress=info.main)
        else:
            tokenizer = build_tokenizer(p.text for p in train[:2000])
            spec = PolicySpec(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, intermediate=cfg.intermediate)
            policy = build_policy(tokenizer, spec, seed=cfg.seed).to(info.device)
        dim = policy.config.hidden_size
        eps = float(getattr(policy.config, "rms_norm_eps", 1e-6) or 1e-6)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            field = VelocityField(dim, fcfg.depth, eps=eps).to(info.device)
        summary = {}
    if task.real:
        train, heldout = with_chat_prompts(tokenizer, train), with_chat_prompts(tokenizer, heldout)
    D.broadcast_module(field, info)
    run = Run(cfg=cfg, info=info, out=out, tokenizer=tokenizer, policy=policy, field=field, flow_config=fcfg,
              train=train, heldout=heldout, generator=generator, metrics=metrics, summary=summary, **resume)
    run.summary.setdefault("policy_parameters", count_parameters(policy))
    run.summary.setdefault("flow_parameters", count_parameters(field))
    return run


def run_pipeline(cfg: TrainConfig) -> dict[str, Any]:
    """Run every stage of `cfg` (resuming where asked) and return the summary.

    The summary holds ``sft_eval`` and ``rl_eval`` (held-out pass@1 / pass@k),
    the token-class table, parameter counts, stage wall times and the output paths.
    """
    cfg.validate(D.world_size_from_env())  # before D.init: a bad --device is a one-line error, not a traceback
    info = D.init(cfg.device)
    hf_logging.disable_progress_bar()  # checkpoint writes would each draw a bar
    try:
        torch.set_num_threads(cfg.threads or default_threads(info.world))
        t_start = time.perf_counter()
        run = setup(cfg, info)
        _say(info, f"[train] policy {run.summary['policy_parameters']:,} params, flow "
                   f"{run.summary['flow_parameters']:,} params, {len(run.train)} train / {len(run.heldout)} "
                   f"held-out problems, {info.world} process(es) x {torch.get_num_threads()} thread(s), "
                   f"device {info.device}")
        times = run.summary.setdefault("wall_s", {})
        for name, stage in (("sft", run_sft), ("flow", run_flow_pretrain), ("rl", run_rl)):
            t0 = time.perf_counter()
            stage(run)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            if cfg.stop_after == name:
                break
        extra: dict[str, Any] = {}
        if info.main and cfg.stop_after in (None, "rl"):
            t0 = time.perf_counter()
            report = run_diagnostics(run, cfg.diag_rollouts, seed=cfg.seed)
            plot_curves(run.metrics, run.out / "curves.png", run.summary.get("sft_eval"))
            times["report"] = time.perf_counter() - t0
            diag = report["diagnostics"]
            extra = {"token_classes": report["token_classes"],
                     "diagnostics": {"layer_average": diag["mean"], "noise": diag["noise"],
                                     "n_rollouts": diag["n_rollouts"], "n_wrong": diag["n_wrong"]},
                     "outputs": {
                "metrics": str(run.out / "metrics.jsonl"), "curves": str(run.out / "curves.png"),
                "heatmap": str(run.out / "flow_heatmap.html"), "token_classes": str(run.out / "token_classes.md"),
                "diagnostics": str(run.out / "diagnostics.md"),
                "flow": str(run.out / "flow_pretrained.safetensors"), "checkpoints": str(run.out / "ckpt")}}
            _say(info, "\n" + report["markdown"])
        times["total_this_process"] = time.perf_counter() - t_start
        if info.enabled:  # data parallel must keep every rank's weights identical
            run.summary["rank_fingerprints"] = {
                "policy": D.gather_strings(D.fingerprint(run.policy), info),
                "flow": D.gather_strings(D.fingerprint(run.field), info)}
            for what, prints in run.summary["rank_fingerprints"].items():
                if len(set(prints)) != 1:
                    raise RuntimeError(f"data-parallel ranks ended with different {what} weights: {prints}")
        summary = write_summary(run, extra) if info.main else dict(run.summary)
        sft, rl = run.summary.get("sft_eval"), run.summary.get("rl_eval")
        if sft:
            _say(info, f"\n[train] held-out pass@1 after SFT: {sft['pass@1']:.3f}" +
                 (f"  after RL ({cfg.shaping}): {rl['pass@1']:.3f}" if rl else ""))
        _say(info, f"[train] outputs in {run.out}")
        D.barrier(info)
        return summary
    finally:
        D.shutdown(info)
