"""Compare mode: none / flow / entropy shaping over S seeds at an equal budget.

For each seed one base run does SFT and flow pretraining (``<out>/seed<S>/base``);
every arm then starts from that same checkpoint (same weights, same RNG state,
same prompt order) and runs the same number of GRPO steps with the same batch,
so the arms differ only in how advantages are shaped. The table reports
held-out greedy pass@1 and pass@k as mean ± std (sample std over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import latest_checkpoint
from .config import SHAPINGS, ConfigError, TrainConfig


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_table(results: dict[str, dict[int, dict[str, float]]], seeds: Sequence[int], k: int) -> str:
    """Markdown table: one row per arm (plus the SFT start point), mean ± std and per-seed pass@1."""
    lines = [f"| run | held-out pass@1 (mean ± std) | pass@{k} (mean ± std) | pass@1 per seed ({', '.join(map(str, seeds))}) |",
             "|---|---:|---:|---|"]
    for arm, per_seed in results.items():
        got = [s for s in seeds if s in per_seed]
        if not got:
            continue
        p1 = [per_seed[s]["pass@1"] for s in got]
        pk = [per_seed[s][f"pass@{k}"] for s in got]
        m1, s1 = mean_std(p1)
        mk, sk = mean_std(pk)
        label = "SFT start (no RL)" if arm == "sft" else f"RL, shaping={arm}"
        lines.append(f"| {label} | {m1:.3f} ± {s1:.3f} | {mk:.3f} ± {sk:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in p1)} |")
    return "\n".join(lines)


def _done(out: Path, key: str) -> dict[str, Any] | None:
    path = out / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary.get(key)


def run_compare(cfg: TrainConfig, seeds: Sequence[int], arms: Sequence[str] = SHAPINGS) -> dict[str, Any]:
    """Run the comparison and print the table; returns ``{"table", "results"}``.

    With ``--resume``, seeds and arms whose ``summary.json`` already holds an
    evaluation are read back instead of being run again.
    """
    from .pipeline import run_pipeline

    bad = [a for a in arms if a not in SHAPINGS]
    if bad or not arms:
        raise ConfigError(f"--arms must be a non-empty subset of {', '.join(SHAPINGS)}; got {list(arms)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers; got {list(seeds)}")
    cfg.validate()
    root = Path(cfg.out)
    results: dict[str, dict[int, dict[str, float]]] = {"sft": {}, **{a: {} for a in arms}}
    k = cfg.pass_k
    for seed in seeds:
        base_out = root / f"seed{seed}" / "base"
        sft = _done(base_out, "sft_eval") if cfg.resume and latest_checkpoint(base_out) else None
        if sft is None:
            base = dataclasses.replace(cfg, seed=seed, out=str(base_out), stop_after="flow", init_from=None)
            sft = run_pipeline(base)["sft_eval"]
        results["sft"][seed] = sft
        ckpt = latest_checkpoint(base_out)
        for arm in arms:
            arm_out = root / f"seed{seed}" / arm
            rl = _done(arm_out, "rl_eval") if cfg.resume else None
            if rl is None:
                arm_cfg = dataclasses.replace(cfg, seed=seed, out=str(arm_out), shaping=arm, init_from=str(ckpt),
                                              stop_after=None, resume=False)
                rl = run_pipeline(arm_cfg)["rl_eval"]
            results[arm][seed] = rl
            table = format_table(results, seeds, k)
            (root / "compare.md").write_text(table + "\n")
            (root / "compare.json").write_text(json.dumps({"seeds": list(seeds), "arms": list(arms),
                                                           "rl_steps": cfg.rl_steps, "batch_size": cfg.batch_size,
                                                           "group_size": cfg.group_size, "results": {
                                                               a: {str(s): v for s, v in r.items()}
                                                               for a, r in results.items()}}, indent=2) + "\n")
    table = format_table(results, seeds, k)
    print(f"\ncompare: {len(seeds)} seeds, {cfg.rl_steps} GRPO steps x {cfg.batch_size} rollouts per arm "
          f"(group {cfg.group_size}), {cfg.sft_steps} SFT steps, {cfg.flow_steps} flow steps\n{table}", flush=True)
    return {"table": table, "results": results}
