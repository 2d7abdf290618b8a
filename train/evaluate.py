"""Evaluation and reports: held-out pass@1 / pass@k, curves, flow-reward heat-map, token-class table."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from flowkern import flow_reward

from . import distributed as D
from .context import MetricsLog, Run
from .policy import decode_responses, generate
from .task import Problem, verify_batch

GREEDY_CHUNK = 256      # prompts per greedy generate call
SAMPLED_ROWS = 512      # rollouts per sampled generate call
CLASSES = ("digits/operators", "words/connectives", "format/other")
_MATH_CHARS = set("0123456789+-*/=")
_CONNECTIVE_PUNCT = {",", ".", ";", ":"}


@torch.no_grad()
def evaluate_policy(run: Run, problems: Sequence[Problem], desc: str = "eval") -> dict[str, float]:
    """Greedy pass@1 and sampled pass@k (k = ``cfg.pass_k`` samples, temperature ``cfg.temperature``).

    pass@k is the fraction of problems with at least one correct sample among
    k. Problems are split over ranks and the counts summed.
    """
    cfg, tok = run.cfg, run.tokenizer
    mine = D.shard_uneven(list(problems), run.info)
    k = cfg.pass_k
    per_call = max(1, SAMPLED_ROWS // k)
    chunks = [("greedy", mine[i:i + GREEDY_CHUNK]) for i in range(0, len(mine), GREEDY_CHUNK)]
    chunks += [("sampled", mine[i:i + per_call]) for i in range(0, len(mine), per_call)]
    greedy_ok = sampled_ok = length = 0.0
    bar = run.progress(len(chunks), 0, desc)
    for kind, chunk in chunks:
        prompts = [p.prompt for p in chunk]
        if kind == "greedy":
            batch = generate(run.policy, tok, prompts, max_new_tokens=cfg.max_new_tokens, greedy=True,
                             device=run.device)
            ok = verify_batch(decode_responses(tok, batch), [p.answer for p in chunk], cfg.verifier)
            greedy_ok += sum(ok)
            length += batch["action_mask"].sum().item()
        else:
            batch = generate(run.policy, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             num_return_sequences=k, device=run.device)
            ok = verify_batch(decode_responses(tok, batch), [p.answer for p in chunk for _ in range(k)],
                              cfg.verifier)
            sampled_ok += torch.tensor(ok).view(len(chunk), k).any(-1).sum().item()
        bar.update(1)
    bar.close()
    greedy_ok, sampled_ok, length, n = D.all_sum([greedy_ok, sampled_ok, length, len(mine)], run.info)
    n = max(n, 1.0)
    return {"pass@1": greedy_ok / n, f"pass@{k}": sampled_ok / n, "pass_k": float(k),
            "eval_response_len": length / n, "n_eval": n}


# ----------------------------------------------------------------------------- token classes

def token_classes(tokenizer) -> list[str]:
    """Class of every vocabulary id: digits/operators, words/connectives or format/other."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i]).strip()
        if i in special or not text:
            out.append("format/other")
        elif all(c in _MATH_CHARS for c in text):
            out.append("digits/operators")
        elif text.isalpha() or text in _CONNECTIVE_PUNCT:
            out.append("words/connectives")
        else:
            out.append("format/other")
    return out


def class_table(token_ids: torch.Tensor, action: torch.Tensor, shaped: torch.Tensor, raw: torch.Tensor,
                classes: list[str]) -> list[dict[str, Any]]:
    """Per token class: count, mean shaped flow reward, share rewarded (≠ 0), mean raw deviation score."""
    cls_index = torch.tensor([CLASSES.index(c) for c in classes], device=token_ids.device)
    cls = cls_index[token_ids.clamp(max=len(classes) - 1)]
    rows = []
    for ci, name in enumerate(CLASSES):
        sel = action & (cls == ci)
        n = int(sel.sum())
        rows.append({"class": name, "tokens": n,
                     "mean_flow_reward": shaped[sel].mean().item() if n else float("nan"),
                     "rewarded_share": (shaped[sel] != 0).float().mean().item() if n else float("nan"),
                     "mean_raw_score": raw[sel].mean().item() if n else float("nan")})
    return rows


def format_class_table(rows: list[dict[str, Any]]) -> str:
    """The token-class table as Markdown."""
    lines = ["| token class | tokens | mean flow reward | share rewarded (≠0) | mean raw deviation score |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['tokens']} | {r['mean_flow_reward']:+.6f} | {r['rewarded_share']:.3f} "
                     f"| {r['mean_raw_score']:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- flow report

def _color(r: float, scale: float) -> str:
    a = min(1.0, abs(r) / scale) if scale > 0 else 0.0
    return f"rgba(220,40,40,{a:.2f})" if r < 0 else f"rgba(30,160,60,{a:.2f})"


def heatmap_html(rows: list[dict[str, Any]], title: str) -> str:
    """HTML page: one line per rollout, response tokens coloured by flow reward (red < 0 < green)."""
    scale = max([abs(r) for row in rows for r in row["rewards"]] + [1e-12])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:monospace;font-size:15px;margin:2em} .r{margin:.6em 0;white-space:pre-wrap}"
             " .p{color:#888} span.t{padding:1px 0;border-radius:2px} .ok{color:#1a7f37} .bad{color:#c62828}"
             "</style></head><body>", f"<h2>{html.escape(title)}</h2>",
             "<p>Token background: flow reward (red = penalised high velocity deviation, green = rewarded low "
             "deviation; opacity = |reward| / max). Hover a token for its shaped reward and raw score.</p>"]
    for row in rows:
        mark = "<b class='ok'>correct</b>" if row["correct"] else "<b class='bad'>wrong</b>"
        spans = "".join(
            f"<span class='t' style='background:{_color(r, scale)}' title='reward {r:+.5f} | raw {s:.4f}'>"
            f"{html.escape(t)}</span>" for t, r, s in zip(row["tokens"], row["rewards"], row["raw"]))
        parts.append(f"<div class='r'>{mark} <span class='p'>{html.escape(row['prompt'])}</span>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


@torch.no_grad()
def flow_report(run: Run, n_rollouts: int, n_table: int = 128) -> dict[str, Any]:
    """Sample held-out rollouts and write ``flow_heatmap.html`` and ``token_classes.md`` (rank 0).

    Shaped rewards use the run's FlowConfig; the raw score is the same
    `flow_reward` call with normalisation ``none``, threshold 0 (scores are positive), no top-k and
    coefficient -1 (so it returns the deviation itself), with the same noise.
    """
    from .flow_pretrain import policy_latents

    cfg, tok, fcfg = run.cfg, run.tokenizer, run.flow_config
    probs = run.heldout[:max(n_rollouts, min(n_table, len(run.heldout)))]
    batch = generate(run.policy, tok, [p.prompt for p in probs], max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, device=run.device)
    correct = verify_batch(decode_responses(tok, batch), [p.answer for p in probs], cfg.verifier)
    latents, fracs = policy_latents(run.policy, batch, fcfg.hook_layers)
    noise = [torch.randn(lat.shape, device=lat.device, dtype=torch.float32) for lat in latents]
    action = batch["action_mask"]
    run.field.eval()
    shaped = flow_reward(run.field, latents, action, fcfg, layer_fracs=fracs, noise=noise, backend=cfg.backend)
    raw_cfg = dataclasses.replace(fcfg, norm="none", threshold=0.0, topk=0, coef=-1.0)
    raw = flow_reward(run.field, latents, action, raw_cfg, layer_fracs=fracs, noise=noise, backend=cfg.backend)
    table = class_table(batch["input_ids"], action, shaped, raw, token_classes(tok))
    rows = []
    for i in range(min(n_rollouts, len(probs))):
        sel = action[i]
        ids = batch["input_ids"][i][sel].tolist()
        rows.append({"prompt": probs[i].prompt, "correct": bool(correct[i]),
                     "tokens": [tok.decode([t]) for t in ids], "rewards": shaped[i][sel].tolist(),
                     "raw": raw[i][sel].tolist()})
    (run.out / "flow_heatmap.html").write_text(heatmap_html(rows, f"flow rewards ({cfg.shaping} run)"))
    md = format_class_table(table)
    (run.out / "token_classes.md").write_text(md + "\n")
    return {"token_classes": table, "token_classes_md": md}


# ----------------------------------------------------------------------------- curves

def plot_curves(metrics: MetricsLog, path: str | Path, start_eval: dict[str, Any] | None = None) -> Path:
    """PNG with four panels: accuracy, reward, flow loss and response length over training.

    `start_eval` (the after-SFT evaluation) is drawn at RL step 0 when the log
    has none, e.g. for a run started with ``--init-from``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = metrics.records()
    rl = [r for r in recs if r["stage"] == "rl" and r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    if start_eval and not any(r["stage"] == "sft" for r in evals):
        evals.insert(0, {"stage": "sft", "step": 0, **start_eval})
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0, 0]
    if rl:
        a.plot([r["step"] for r in rl], [r["reward"] for r in rl], alpha=0.5, label="train batch accuracy")
    ev = [(0 if r["stage"] == "sft" else r["step"], r["pass@1"]) for r in evals]
    if ev:
        a.plot(*zip(*ev), "o-", label="held-out pass@1 (greedy)")
    evk = [(0 if r["stage"] == "sft" else r["step"], r[f"pass@{int(r['pass_k'])}"]) for r in evals]
    if evk:
        a.plot(*zip(*evk), "s--", label=f"held-out pass@{int(evals[0]['pass_k'])}")
    a.set(title="accuracy (RL step; 0 = after SFT)", xlabel="RL step", ylim=(0, 1))
    if rl or ev:
        a.legend(fontsize=8)
    a = ax[0, 1]
    if rl:
        a.plot([r["step"] for r in rl], [r["reward"] for r in rl], label="outcome reward")
        a2 = a.twinx()
        a2.plot([r["step"] for r in rl], [r["flow_reward"] for r in rl], color="tab:red", alpha=0.7,
                label="mean flow token reward")
        a2.set_ylabel("flow token reward", color="tab:red")
    a.set(title="reward", xlabel="RL step")
    if rl:
        a.legend(fontsize=8, loc="upper left")
    a = ax[1, 0]
    pre = [r for r in recs if r["stage"] == "flow" and "flow_loss" in r]
    if pre:
        a.plot([r["step"] for r in pre], [r["flow_loss"] for r in pre], label="pretraining (expert traces)")
    online = [r for r in rl if "flow_loss" in r]
    if online:
        off = pre[-1]["step"] if pre else 0
        a.plot([off + r["step"] for r in online], [r["flow_loss"] for r in online], label="online (correct rollouts)")
    a.set(title="flow-matching loss", xlabel="flow update")
    values = [r["flow_loss"] for r in pre + online]
    if values:
        if min(values) > 0:
            a.set_yscale("log")
        a.legend(fontsize=8)
    a = ax[1, 1]
    if rl:
        a.plot([r["step"] for r in rl], [r["response_len"] for r in rl])
    a.set(title="response length (tokens)", xlabel="RL step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(run: Run, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` (SFT and RL evaluations, config, extras) and return it."""
    summary = {"config": run.cfg.to_dict(), **run.summary, **extra}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
