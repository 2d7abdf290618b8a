"""Evaluation and reports: held-out pass@1 / pass@k, curves, flow diagnostics, heat-map, token-class table."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from flowkern import FlowConfig, flow_reward, shape_rewards
from flowkern.diagnostics import diagnose, format_diagnosis
from flowkern.latents import selected_pairs

from . import distributed as D
from .context import MetricsLog, Run
from .policy import decode_responses, generate
from .task import Problem, first_error, verify_batch

GREEDY_CHUNK = 256      # prompts per greedy generate call
SAMPLED_ROWS = 512      # rollouts per sampled generate call
CLASSES = ("digits", "operators", "=", "connectives", "format/other")
_OPERATORS = {"+", "-", "*", "/"}
_CONNECTIVE_PUNCT = {",", ".", ";", ":"}


@torch.no_grad()
def evaluate_policy(run: Run, problems: Sequence[Problem], desc: str = "eval") -> dict[str, float]:
    """Greedy pass@1, sampled pass@k and sampled accuracy (k = ``cfg.pass_k`` samples at ``cfg.temperature``).

    pass@k is the fraction of problems with at least one correct sample among
    k; ``sampled_acc`` is the fraction of all k samples that are correct (the
    quantity GRPO's outcome reward estimates, where pass@1 is greedy).
    Problems are split over ranks and the counts summed.
    """
    cfg, tok = run.cfg, run.tokenizer
    mine = D.shard_uneven(list(problems), run.info)
    k = cfg.pass_k
    per_call = max(1, SAMPLED_ROWS // k)
    chunks = [("greedy", mine[i:i + GREEDY_CHUNK]) for i in range(0, len(mine), GREEDY_CHUNK)]
    chunks += [("sampled", mine[i:i + per_call]) for i in range(0, len(mine), per_call)]
    greedy_ok = sampled_ok = sampled_right = length = 0.0
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
            sampled_right += sum(ok)
        bar.update(1)
    bar.close()
    greedy_ok, sampled_ok, sampled_right, length, n = D.all_sum(
        [greedy_ok, sampled_ok, sampled_right, length, len(mine)], run.info)
    n = max(n, 1.0)
    return {"pass@1": greedy_ok / n, f"pass@{k}": sampled_ok / n, "sampled_acc": sampled_right / (n * k),
            "pass_k": float(k),
            "eval_response_len": length / n, "n_eval": n}


# ----------------------------------------------------------------------------- token classes

def token_classes(tokenizer) -> list[str]:
    """Class of every vocabulary id, one of `CLASSES`.

    digits; operators (``+ - * /``); ``=``; connectives (words and the
    punctuation between steps); format/other (special tokens, ``\\boxed{``,
    braces, spaces).
    """
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i]).strip()
        if i in special or not text:
            out.append("format/other")
        elif text.isdigit():
            out.append("digits")
        elif text in _OPERATORS:
            out.append("operators")
        elif text == "=":
            out.append("=")
        elif text.isalpha() or text in _CONNECTIVE_PUNCT:
            out.append("connectives")
        else:
            out.append("format/other")
    return out


def format_class_table(rows: list[dict[str, Any]]) -> str:
    """The token-class rows of `flowkern.diagnostics.diagnose` as Markdown."""
    lines = ["| token class | tokens | mean flow reward | share rewarded (≠0) | mean raw deviation score |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['tokens']} | {r['mean_reward']:+.6f} | {r['rewarded_share']:.3f} "
                     f"| {r['mean_score']:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scoring and diagnostics

def _token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) character span of each token in the decoded (special tokens dropped) text."""
    spans, at = [], 0
    for t in ids:
        n = len(tokenizer.decode([t], skip_special_tokens=True))
        spans.append((at, at + n))
        at += n
    return spans


def first_error_positions(tokenizer, batch: dict[str, torch.Tensor], problems: Sequence[Problem]) -> torch.Tensor:
    """[B] position (in the batch's T) of each rollout's first wrong token (`task.first_error`), -1 if right.

    A response that stops early errs at its end-of-sequence token (-1 when it has none).
    """
    texts = decode_responses(tokenizer, batch)
    action = batch["action_mask"]
    out = torch.full((len(texts),), -1, dtype=torch.long)
    for i, (text, prob) in enumerate(zip(texts, problems)):
        at = first_error(prob, text)
        if at is None:
            continue
        pos = torch.nonzero(action[i]).flatten().tolist()
        spans = _token_spans(tokenizer, batch["input_ids"][i, pos].tolist())
        hit = [p for p, (a, b) in zip(pos, spans) if a <= at < b]
        if not hit and at >= len(text):  # cut short: the first token past the text (the eos)
            hit = [p for p, (a, b) in zip(pos, spans) if a == b and a >= len(text)][:1]
        out[i] = hit[0] if hit else -1
    return out


@torch.no_grad()
def score_rollouts(run: Run, batch: dict[str, torch.Tensor], fcfg: FlowConfig, seed: int
                   ) -> dict[str, Any]:
    """Raw deviation scores of a rollout batch: per hooked layer, their average, a second independent scoring.

    Returns ``layers`` (one [B, T] per hooked layer), ``mean`` (their average,
    what flow rewards shape), ``rescored`` (the average again with noise from
    another seed), ``shaped`` (the run's shaped rewards of ``mean``),
    ``scored`` (the action tokens that have a context pair) and the layer names.
    """
    from .flow_pretrain import policy_latents

    cfg = run.cfg
    latents, fracs = policy_latents(run.policy, batch, fcfg.hook_layers)
    action = batch["action_mask"]
    raw_cfg = dataclasses.replace(fcfg, norm="none", threshold=0.0, topk=0, coef=-1.0)
    run.field.eval()

    def raw(lats, fr, s):
        gen = torch.Generator(device=action.device).manual_seed(s)
        return flow_reward(run.field, lats, action, raw_cfg, layer_fracs=fr, generator=gen, backend=cfg.backend)

    layers = [raw([lat], [f], seed + i) for i, (lat, f) in enumerate(zip(latents, fracs))]
    mean = torch.stack(layers).mean(0)
    scored = selected_pairs(action, fcfg, action.shape[1])
    return {"layers": layers, "mean": mean, "rescored": raw(latents, fracs, seed + 1000),
            "shaped": shape_rewards(mean, scored, fcfg, backend="auto"), "scored": scored,
            "layer_names": [f"hook {p:g}: layer {round(f * run.policy.config.num_hidden_layers)}"
                            for p, f in zip(fcfg.hook_layers, fracs)]}


def _rollout_rows(run: Run, batch, problems, scores, first_err, correct, n: int) -> list[dict[str, Any]]:
    tok = run.tokenizer
    rows = []
    for i in range(min(n, len(problems))):
        pos = torch.nonzero(batch["action_mask"][i]).flatten()
        ids = batch["input_ids"][i, pos].tolist()
        rows.append({"prompt": problems[i].prompt, "correct": bool(correct[i]),
                     "tokens": [tok.decode([t]) for t in ids], "rewards": scores["shaped"][i, pos].tolist(),
                     "raw": scores["mean"][i, pos].tolist(),
                     "first_error": pos.tolist().index(int(first_err[i])) if int(first_err[i]) >= 0 else -1})
    return rows


@torch.no_grad()
def run_diagnostics(run: Run, n_rollouts: int = 256, draws: Sequence[int] = (), seed: int = 0,
                    n_show: Optional[int] = None) -> dict[str, Any]:
    """Error localisation of the run's flow on held-out rollouts; writes the report files into ``run.out``.

    Samples one rollout per held-out problem (the first `n_rollouts`) at the
    training temperature, scores it per hooked layer with the run's flow
    (`score_rollouts`), locates each wrong rollout's first wrong token
    (`first_error_positions`) and calls `flowkern.diagnostics.diagnose`. With
    `draws`, the same rollouts are diagnosed again for each number of noise
    draws K. Writes ``diagnostics.md``, ``diagnostics.json``, ``diagnostics.png``,
    ``token_classes.md`` and ``flow_heatmap.html`` (sampled and greedy held-out
    responses, first wrong token outlined).
    """
    cfg, tok, fcfg = run.cfg, run.tokenizer, run.flow_config
    n_show = cfg.report_rollouts if n_show is None else n_show
    probs = run.heldout[:max(1, min(n_rollouts, len(run.heldout)))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = generate(run.policy, tok, [p.prompt for p in probs], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, device=run.device)
    greedy = generate(run.policy, tok, [p.prompt for p in probs[:n_show]], max_new_tokens=cfg.max_new_tokens,
                      greedy=True, device=run.device)
    names = token_classes(tok)
    cls_of = torch.tensor([CLASSES.index(c) for c in names], device=run.device)
    results, by_k = {}, {}
    for k in sorted({fcfg.noise_draws, *draws}):
        kcfg = dataclasses.replace(fcfg, noise_draws=k)
        per = {}
        for kind, batch, group in (("sampled", sampled, probs), ("greedy", greedy, probs[:n_show])):
            correct = torch.tensor(verify_batch(decode_responses(tok, batch), [p.answer for p in group],
                                                cfg.verifier))
            first_err = first_error_positions(tok, batch, group)
            scores = score_rollouts(run, batch, kcfg, seed=seed + 7)
            per[kind] = (batch, group, scores, first_err, correct)
        batch, group, scores, first_err, correct = per["sampled"]
        diag = diagnose(scores["layers"], scores["scored"], correct, first_error=first_err,
                        token_class=cls_of[batch["input_ids"]], class_names=CLASSES, shaped=scores["shaped"],
                        rescored=scores["rescored"], layer_names=scores["layer_names"])
        by_k[k] = diag
        if k == fcfg.noise_draws:
            results = per
    diag = by_k[fcfg.noise_draws]
    batch, group, scores, first_err, correct = results["sampled"]
    how = (f"{len(probs)} held-out problems, one response each sampled at temperature {cfg.temperature:g} "
           f"(as in RL), K = {fcfg.noise_draws} noise draw(s) per token")
    md = [format_diagnosis(diag, f"Flow-score diagnostics ({cfg.shaping} run)"), "", f"Rollouts: {how}."]
    if len(by_k) > 1:
        md += ["", "### Noise draws K (same rollouts)", "",
               "| K | AUROC seq-mean | AUROC first-wrong vs same-class right | first-wrong ratio "
               "| Spearman of two scorings | top-5 agreement |", "|---:|---:|---:|---:|---:|---:|"]
        for k, d in by_k.items():
            m, nz = d["mean"], d["noise"]
            md.append(f"| {k} | {m['seq_auroc']:.3f} | {m['first_error_auroc']:.3f} | {m['first_error_ratio']:.3f} "
                      f"| {nz['spearman_tokens']:.3f} | {nz['topk_agreement']:.3f} |")
    text = "\n".join(md) + "\n"
    (run.out / "diagnostics.md").write_text(text)
    (run.out / "diagnostics.json").write_text(json.dumps({"rollouts": how, "by_noise_draws": by_k}, indent=2,
                                                         default=str) + "\n")
    (run.out / "token_classes.md").write_text(format_class_table(diag["classes"]) + "\n")
    plot_diagnostics(scores, batch["action_mask"] & scores["scored"], correct, first_err,
                     cls_of[batch["input_ids"]], by_k, run.out / "diagnostics.png")
    sections = [(f"Held-out responses sampled at temperature {cfg.temperature:g} (as RL rollouts are)",
                 _rollout_rows(run, batch, group, scores, first_err, correct, n_show)),
                ("Greedy held-out responses (as pass@1 is evaluated)",
                 _rollout_rows(run, *[results["greedy"][i] for i in (0, 1, 2, 3, 4)], n_show))]
    (run.out / "flow_heatmap.html").write_text(heatmap_html(sections, f"flow rewards ({cfg.shaping} run)"))
    return {"diagnostics": diag, "by_noise_draws": by_k, "markdown": text,
            "token_classes": diag["classes"], "token_classes_md": format_class_table(diag["classes"])}


def plot_diagnostics(scores: dict[str, Any], mask: torch.Tensor, correct: torch.Tensor, first_err: torch.Tensor,
                     token_class: torch.Tensor, by_k: dict[int, dict[str, Any]], path: str | Path) -> Path:
    """PNG: sequence-mean deviation wrong vs right, first wrong digit vs right digits, AUROC per layer / K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = scores["mean"].double().cpu()
    mask, correct = mask.cpu(), correct.cpu().bool()
    seq = (mean * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    has = mask.any(-1)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    a = ax[0]
    for sel, label, color in ((has & ~correct, "wrong", "tab:red"), (has & correct, "right", "tab:green")):
        if sel.any():
            a.hist(seq[sel].numpy(), bins=30, alpha=0.55, density=True, label=f"{label} ({int(sel.sum())})",
                   color=color)
    a.set(title="sequence-mean deviation (layer average)", xlabel="mean raw deviation score over the response",
          ylabel="density")
    a.legend(fontsize=8)
    a = ax[1]
    digit = CLASSES.index("digits")
    rows = torch.nonzero(first_err >= 0).flatten()
    fe = mean[rows, first_err[rows]][token_class.cpu()[rows, first_err[rows]] == digit]
    ref = mean[mask & correct[:, None] & (token_class.cpu() == digit)]
    for vals, label, color in ((fe, "first wrong digit", "tab:red"), (ref, "digits of right responses", "tab:green")):
        if vals.numel():
            a.hist(vals.numpy(), bins=30, alpha=0.55, density=True, label=f"{label} ({vals.numel()})", color=color)
    a.set(title="first wrong token vs right tokens (digits)", xlabel="raw deviation score", ylabel="density")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)
    else:  # real tasks give no per-token error labels, and a run may have no right response
        a.text(0.5, 0.5, "no first-wrong-token labels\nor no right responses", ha="center", va="center",
               transform=a.transAxes)
    a = ax[2]
    draws = sorted(by_k)
    if len(draws) > 1:
        for key, label in (("seq_auroc", "sequence mean, wrong vs right"),
                           ("first_error_auroc", "first wrong token vs same-class right")):
            a.plot(draws, [by_k[k]["mean"].get(key, float("nan")) for k in draws], "o-", label=label)
        a.plot(draws, [by_k[k]["noise"]["spearman_tokens"] for k in draws], "s--",
               label="Spearman of two scorings")
        a.set_xscale("log", base=2)
        a.set_xticks(draws, [str(k) for k in draws])
        a.set(title="effect of averaging K noise draws", xlabel="noise draws K per token", ylabel="AUROC / ρ")
    else:
        d = by_k[draws[0]]
        names = [*d["layers"], "average"]
        stats = [*d["layers"].values(), d["mean"]]
        xs = range(len(names))
        a.bar([x - 0.2 for x in xs], [s["seq_auroc"] for s in stats], 0.4, label="sequence mean, wrong vs right")
        a.bar([x + 0.2 for x in xs], [s.get("first_error_auroc", float("nan")) for s in stats], 0.4,
              label="first wrong token vs same-class right")
        a.set_xticks(list(xs), names, fontsize=7)
        a.set(title="AUROC per hooked layer", xlabel="scoring", ylabel="AUROC")
    a.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance (0.5)")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- heat-map

def _color(r: float, scale: float) -> str:
    a = min(1.0, abs(r) / scale) if scale > 0 else 0.0
    return f"rgba(220,40,40,{a:.2f})" if r < 0 else f"rgba(30,160,60,{a:.2f})"


def heatmap_html(sections: list[tuple[str, list[dict[str, Any]]]], title: str) -> str:
    """HTML page: per section, one line per response, its tokens coloured by flow reward (red < 0 < green).

    The prompt is grey and separated from the response by a bar; the first
    wrong token of a wrong response is outlined.
    """
    scale = max([abs(r) for _, rows in sections for row in rows for r in row["rewards"]] + [1e-12])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:monospace;font-size:15px;margin:2em} .r{margin:.6em 0;white-space:pre-wrap}"
             " .p{color:#888;border-right:3px solid #444;padding-right:4px;margin-right:4px}"
             " span.t{padding:1px 0;border-radius:2px} .fe{outline:2px solid #000;outline-offset:1px}"
             " .ok{color:#1a7f37} .bad{color:#c62828}</style></head><body>", f"<h2>{html.escape(title)}</h2>",
             "<p>Token background: flow reward (red = penalised high velocity deviation, green = rewarded low "
             "deviation; opacity = |reward| / max). Grey text left of the bar is the prompt. A black outline marks "
             "the first wrong token of a wrong response (where it first departs from the expert chain). Hover a "
             "token for its shaped reward and raw deviation score.</p>"]
    for heading, rows in sections:
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        for row in rows:
            mark = "<b class='ok'>correct</b>" if row["correct"] else "<b class='bad'>wrong</b>"
            spans = "".join(
                f"<span class='t{' fe' if j == row['first_error'] else ''}' style='background:{_color(r, scale)}' "
                f"title='reward {r:+.5f} | raw {s:.4f}'>{html.escape(t)}</span>"
                for j, (t, r, s) in enumerate(zip(row["tokens"], row["rewards"], row["raw"])))
            parts.append(f"<div class='r'>{mark} <span class='p'>{html.escape(row['prompt'])}</span>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
    a.set(title="accuracy (RL step; 0 = after SFT)", xlabel="RL step", ylabel="accuracy", ylim=(0, 1))
    if rl or ev:
        a.legend(fontsize=8)
    a = ax[0, 1]
    if rl:
        a.plot([r["step"] for r in rl], [r["reward"] for r in rl], label="outcome reward")
        a2 = a.twinx()
        a2.plot([r["step"] for r in rl], [r["flow_reward"] for r in rl], color="tab:red", alpha=0.7,
                label="mean flow token reward")
        a2.set_ylabel("mean flow token reward", color="tab:red")
    a.set(title="reward", xlabel="RL step", ylabel="outcome reward (batch mean)")
    if rl:
        handles = a.get_legend_handles_labels()
        extra = a2.get_legend_handles_labels()
        a.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    a = ax[1, 0]
    pre = [r for r in recs if r["stage"] == "flow" and "flow_loss" in r]
    if pre:
        a.plot([r["step"] for r in pre], [r["flow_loss"] for r in pre], label="pretraining (expert traces)")
    online = [r for r in rl if "flow_loss" in r]
    if online:
        off = pre[-1]["step"] if pre else 0
        a.plot([off + r["step"] for r in online], [r["flow_loss"] for r in online], label="online (correct rollouts)")
    a.set(title="flow-matching loss", xlabel="flow update (pretraining steps, then RL steps)", ylabel="loss")
    values = [r["flow_loss"] for r in pre + online]
    if values:
        if min(values) > 0:
            from matplotlib.ticker import FormatStrFormatter, LogLocator

            a.set_yscale("log")
            a.set_ylabel("loss (log scale)")
            a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            a.yaxis.set_minor_locator(LogLocator(subs="all"))
            a.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            a.yaxis.set_minor_formatter(FormatStrFormatter(""))
        a.legend(fontsize=8)
    a = ax[1, 1]
    if rl:
        a.plot([r["step"] for r in rl], [r["response_len"] for r in rl])
    a.set(title="response length", xlabel="RL step", ylabel="tokens per response (batch mean)")
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


def load_run(run_dir: str | Path, *, checkpoint: Optional[str | Path] = None, out: Optional[str | Path] = None,
             device: str = "auto", fresh_field: bool = False, **overrides: Any) -> Run:
    """A `Run` restored from a finished run directory, for analysis after training.

    Reads ``<run_dir>/config.json`` (with `overrides` applied) and `checkpoint`
    (default: the run's latest). With `fresh_field` the velocity field is a new
    one built from the (overridden) flow settings instead of the checkpoint's.
    Metrics are not logged. Raises `ConfigError` naming ``--from`` when the
    directory holds no run.
    """
    from flowkern import VelocityField

    from .checkpoint import latest_checkpoint, load_checkpoint
    from .config import ConfigError, TrainConfig
    from .policy import load_policy
    from .task import make_splits

    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if not (run_dir / "config.json").exists() or ckpt is None:
        raise ConfigError(f"--from {run_dir}: not a trainer run directory (needs config.json and ckpt/latest)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **overrides, "device": device})
    cfg.validate()
    info = D.init(device)
    ck = load_checkpoint(ckpt, info)
    policy, tokenizer = load_policy(ck["policy_dir"], info.device)
    train, heldout = make_splits(cfg.seed, cfg.n_train, cfg.n_heldout, cfg.task_spec())
    if fresh_field:
        fcfg = cfg.flow_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            field = VelocityField(policy.config.hidden_size, fcfg.depth,
                                  eps=float(getattr(policy.config, "rms_norm_eps", 1e-6) or 1e-6))
    else:
        field, fcfg = ck["field"], ck["flow_config"] or cfg.flow_config()
    target = Path(out) if out is not None else run_dir
    target.mkdir(parents=True, exist_ok=True)
    return Run(cfg=cfg, info=info, out=target, tokenizer=tokenizer, policy=policy, field=field.to(info.device),
               flow_config=fcfg, train=train, heldout=heldout, generator=torch.Generator().manual_seed(cfg.seed),
               metrics=MetricsLog(target / "metrics.jsonl", enabled=False))


def diagnose_from(run_dir: str | Path, *, rollouts: int = 256, draws: Sequence[int] = (1, 4, 16),
                  out: Optional[str | Path] = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """`run_diagnostics` on the latest checkpoint of a finished run directory (``python -m train diagnose``).

    Writes the report files into `out` (default: `run_dir`).
    """
    from .config import ConfigError

    if rollouts < 1 or any(k < 1 for k in draws):
        raise ConfigError(f"--rollouts and --noise-draws must be positive; got {rollouts}, {list(draws)}")
    run = load_run(run_dir, out=out, device=device)
    report = run_diagnostics(run, rollouts, draws=draws, seed=seed)
    print(report["markdown"], flush=True)
    print(f"[train] diagnostics of {run_dir} in {run.out}", flush=True)
    return report
