"""Compare mode: none / flow / entropy shaping over S seeds at an equal budget.

For each seed one base run does SFT and flow pretraining (``<out>/seed<S>/base``);
every arm then starts from that same checkpoint (same weights, same RNG state,
same prompt order) and runs the same number of GRPO steps with the same batch,
so the arms differ only in how advantages are shaped. The table reports
held-out greedy pass@1, pass@k and the sampled accuracy (share of the k samples
at the training temperature that are right: what GRPO's reward estimates) as
mean ± the half-width of a 95% Student-t confidence interval over seeds, then the paired per-seed difference of each arm
against ``none`` with its 95% CI and a verdict sentence read off that interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
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


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution with `df` degrees of freedom (bisection on a Simpson-integrated CDF)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, steps: int = 4000) -> float:
        h = x / steps
        f = [const * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t confidence interval (nan for a single value)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, float("nan")
    return mean, t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)


def _pm(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}" if not math.isnan(half) else f"{mean:.3f}"


def paired_differences(results: dict[str, dict[int, dict[str, float]]], seeds: Sequence[int], key: str,
                       baseline: str = "none") -> dict[str, dict[str, Any]]:
    """Per arm other than `baseline`: the per-seed differences arm − baseline of `key`, their mean and 95% CI."""
    out = {}
    for arm, per_seed in results.items():
        if arm in ("sft", baseline) or baseline not in results:
            continue
        both = [s for s in seeds if s in per_seed and s in results[baseline]]
        if not both:
            continue
        diffs = [per_seed[s][key] - results[baseline][s][key] for s in both]
        mean, half = mean_ci(diffs)
        out[arm] = {"seeds": both, "diffs": diffs, "mean": mean, "ci95": half}
    return out


def verdict(arm: str, diff: dict[str, Any], key: str = "pass@1", baseline: str = "none") -> str:
    """One sentence read off a paired difference: better, worse, or no detectable difference at 95%."""
    m, h, n = diff["mean"], diff["ci95"], len(diff["seeds"])
    span = f"{arm} − {baseline} = {m:+.3f} (95% CI [{m - h:+.3f}, {m + h:+.3f}], {n} paired seeds)"
    if math.isnan(h):
        return f"{span}: one seed gives no interval, so no verdict."
    if m - h > 0:
        return f"{arm} beats {baseline} on held-out {key}: {span} excludes 0."
    if m + h < 0:
        return f"{arm} is worse than {baseline} on held-out {key}: {span} excludes 0."
    return f"No detectable difference between {arm} and {baseline} on held-out {key}: {span} includes 0."


def format_table(results: dict[str, dict[int, dict[str, float]]], seeds: Sequence[int], k: int) -> str:
    """Markdown: per arm (plus the SFT start) mean ± 95% CI of pass@1 / pass@k and per-seed pass@1;
    then the paired differences against ``none`` and their verdicts."""
    lines = [f"| run | held-out pass@1 (mean ± 95% CI) | pass@{k} (mean ± 95% CI) "
             f"| sampled accuracy (mean ± 95% CI) | pass@1 per seed ({', '.join(map(str, seeds))}) |",
             "|---|---:|---:|---:|---|"]
    for arm, per_seed in results.items():
        got = [s for s in seeds if s in per_seed]
        if not got:
            continue
        p1 = [per_seed[s]["pass@1"] for s in got]
        pk = [per_seed[s][f"pass@{k}"] for s in got]
        acc = [per_seed[s]["sampled_acc"] for s in got if "sampled_acc" in per_seed[s]]  # older runs lack it
        label = "SFT start (no RL)" if arm == "sft" else f"RL, shaping={arm}"
        lines.append(f"| {label} | {_pm(*mean_ci(p1))} | {_pm(*mean_ci(pk))} | "
                     f"{_pm(*mean_ci(acc)) if len(acc) == len(got) else '—'} | {', '.join(f'{v:.3f}' for v in p1)} |")
    sentences = []
    for key in ("pass@1", f"pass@{k}"):
        diffs = paired_differences(results, seeds, key)
        if not diffs:
            continue
        lines += ["", f"| paired difference (per seed) | {key}: mean ± 95% CI | per seed |", "|---|---:|---|"]
        for arm, d in diffs.items():
            lines.append(f"| {arm} − none | {d['mean']:+.3f} ± {d['ci95']:.3f} | "
                         f"{', '.join(f'{v:+.3f}' for v in d['diffs'])} |")
            sentences.append(verdict(arm, d, key))
    if sentences:
        lines += ["", *[f"- {s}" for s in sentences]]
    return "\n".join(lines)


def format_diagnostics(root: Path, seeds: Sequence[int], arms: Sequence[str]) -> str:
    """Markdown: per arm, the flow diagnostic of its final policy (layer average) averaged over the seeds that
    wrote one: AUROC of the sequence-mean deviation (wrong vs right), AUROC of the first wrong token against
    right tokens of its class, and the mean shaped flow reward per token class. Empty if no run wrote one."""
    rows = []
    for arm in arms:
        got = []
        for seed in seeds:
            path = root / f"seed{seed}" / arm / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else {}
            if "diagnostics" in summary and "token_classes" in summary:
                got.append(summary)
        if not got:
            continue
        classes = [c["class"] for c in got[0]["token_classes"]]

        def avg(values: list[float]) -> str:
            finite = [v for v in values if v is not None and not math.isnan(v)]
            return _pm(*mean_ci(finite)) if finite else "—"

        layer = [g["diagnostics"]["layer_average"] for g in got]
        reward = {c: [next(t["mean_reward"] for t in g["token_classes"] if t["class"] == c) for g in got]
                  for c in classes}
        rows.append((arm, len(got), avg([x["seq_auroc"] for x in layer]), avg([x["first_error_auroc"] for x in layer]),
                     [f"{sum(v) / len(v):+.5f}" for v in reward.values()], classes,
                     sum(g["diagnostics"]["n_rollouts"] for g in got), sum(g["diagnostics"]["n_wrong"] for g in got)))
    if not rows:
        return ""
    classes = rows[0][5]
    lines = ["Flow diagnostic of each arm's final policy (layer average, held-out rollouts at the training "
             "temperature; AUROCs as mean ± 95% CI over seeds, shaped flow reward per token class as the mean over "
             "seeds):", "",
             "| arm | seeds | rollouts (wrong) | AUROC seq-mean | AUROC first-wrong vs same-class right | "
             + " | ".join(f"reward {c}" for c in classes) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(classes)]
    for arm, n, seq, first, rewards, _, n_roll, n_wrong in rows:
        lines.append(f"| {arm} | {n} | {n_roll} ({n_wrong}) | {seq} | {first} | " + " | ".join(rewards) + " |")
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
    t_start = time.perf_counter()
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
                                                               for a, r in results.items()},
                                                           "paired_pass@1": paired_differences(
                                                               results, seeds, "pass@1")}, indent=2) + "\n")
    table = format_table(results, seeds, k)
    wall = time.perf_counter() - t_start
    runs = [json.loads(f.read_text()).get("wall_s", {}).get("total_this_process", 0.0)
            for seed in seeds for part in ("base", *arms) if (f := root / f"seed{seed}" / part / "summary.json").exists()]
    head = (f"compare: {len(seeds)} seeds, {cfg.rl_steps} GRPO steps x {cfg.batch_size} rollouts per arm "
            f"(group {cfg.group_size}), {cfg.sft_steps} SFT steps, {cfg.flow_steps} flow steps; "
            f"wall time {wall:.0f} s for `{shlex.join(['python', '-m', 'train', *sys.argv[1:]])}`; "
            f"the {len(runs)} runs' own wall times (their summary.json, also those read back by --resume) "
            f"add up to {sum(runs):.0f} s")
    diag = format_diagnostics(root, seeds, arms)
    (root / "compare.md").write_text(f"{head}\n\n{table}\n" + (f"\n{diag}\n" if diag else ""))
    print(f"\n{head}\n{table}" + (f"\n\n{diag}" if diag else ""), flush=True)
    return {"table": table, "results": results, "wall_s": wall}
