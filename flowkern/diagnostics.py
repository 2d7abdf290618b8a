"""Do token-level flow scores localise errors? Measurements on scored rollouts, for any trainer.

`diagnose` takes per-token deviation scores (one [B, T] tensor per hooked
layer, or their average), the action mask, the outcome of each rollout and,
optionally, the first wrong token of each wrong rollout, a class label per
token, the shaped rewards and a second scoring of the same rollouts with
independent noise. It reports, per layer and for the layer average:

- ``seq_auroc``: AUROC of the sequence-mean deviation, wrong rollouts against
  right ones (0.5: no signal; 1: every wrong rollout deviates more);
- ``first_error_ratio`` and ``first_error_auroc``: the deviation at the first
  wrong token against the deviation at tokens of the same class in right
  rollouts (mean ratio, and the probability that a first wrong token outscores
  a right token of its class);

and, for the layer average, the token-class table (mean score, mean shaped
reward, share rewarded) and the agreement of two independent scorings
(Spearman over all tokens, and how often the top-k tokens of a sequence agree).

Everything is computed on the host in float64; nothing here is on a hot path.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

__all__ = ["auroc", "spearman", "topk_agreement", "diagnose", "format_diagnosis"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (float64)."""
    x = x.double().flatten()
    n = x.numel()
    if n == 0:
        return x
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = new_group.long().cumsum(0) - 1
    starts = torch.nonzero(new_group).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    avg = (starts + ends + 1).double() / 2  # mean of the 1-based ranks start+1 .. end
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = avg[group]
    return ranks


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted one half (Mann-Whitney U / (n_pos n_neg)).

    Returns nan when either set is empty.
    """
    pos, neg = positive.double().flatten().cpu(), negative.double().flatten().cpu()
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(torch.cat([pos, neg]))
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two aligned 1-D samples (nan with fewer than 2 values or a constant one)."""
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs aligned samples, got {a.numel()} and {b.numel()} values")
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum().item() * (rb * rb).sum().item())
    return (ra * rb).sum().item() / denom if denom > 0 else float("nan")


def topk_agreement(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, k: int) -> float:
    """Mean over rows of |top-k(a) ∩ top-k(b)| / k, over the masked tokens (rows with ≤ k tokens skipped).

    A row with k or fewer tokens agrees trivially, so it is left out; nan when no row is left.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    a, b, mask = a.double().cpu(), b.double().cpu(), mask.cpu()
    shares = []
    for i in range(a.shape[0]):
        sel = mask[i]
        if int(sel.sum()) <= k:
            continue
        ta = set(torch.topk(a[i][sel], k).indices.tolist())
        tb = set(torch.topk(b[i][sel], k).indices.tolist())
        shares.append(len(ta & tb) / k)
    return sum(shares) / len(shares) if shares else float("nan")


def _as_layers(scores: torch.Tensor | Sequence[torch.Tensor], shape: tuple[int, int]) -> list[torch.Tensor]:
    layers = [scores] if isinstance(scores, torch.Tensor) and scores.dim() == 2 else list(scores)
    if not layers:
        raise ValueError("scores must be a [B, T] tensor or a non-empty sequence of them")
    for i, s in enumerate(layers):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
            got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"scores[{i}] must have the action mask's shape {list(shape)}, got {got}")
    return [s.detach().double().cpu() for s in layers]


def _scoring_stats(scores: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor,
                   first_error: Optional[torch.Tensor], token_class: Optional[torch.Tensor]) -> dict[str, Any]:
    """Sequence-level and first-error separation of one [B, T] scoring."""
    counts = mask.sum(-1)
    has = counts > 0
    seq_mean = (scores * mask).sum(-1) / counts.clamp_min(1)
    wrong, right = seq_mean[has & ~correct], seq_mean[has & correct]
    out: dict[str, Any] = {"seq_auroc": auroc(wrong, right),
                           "seq_mean_wrong": wrong.mean().item() if wrong.numel() else float("nan"),
                           "seq_mean_right": right.mean().item() if right.numel() else float("nan")}
    if first_error is None:
        return out
    rows = torch.nonzero(~correct & (first_error >= 0)).flatten()
    pos = first_error[rows]
    keep = mask[rows, pos]
    rows, pos = rows[keep], pos[keep]
    fe = scores[rows, pos]
    cls = token_class[rows, pos] if token_class is not None else torch.zeros_like(pos)
    right_tokens = mask & correct[:, None]
    # P(first wrong token > right token of its class) = pooled within-class comparisons.
    num = den = 0.0
    matched_ref = []
    for c in cls.unique().tolist():
        ref = scores[right_tokens & (token_class == c)] if token_class is not None else scores[right_tokens]
        mine = fe[cls == c]
        if ref.numel() == 0:
            continue
        num += auroc(mine, ref) * mine.numel() * ref.numel()
        den += mine.numel() * ref.numel()
        matched_ref.append(torch.full((mine.numel(),), ref.mean().item(), dtype=torch.float64))
    ref_mean = torch.cat(matched_ref).mean().item() if matched_ref else float("nan")
    fe_mean = fe.mean().item() if fe.numel() else float("nan")
    out.update({"first_error_tokens": int(fe.numel()), "first_error_mean": fe_mean,
                "same_class_right_mean": ref_mean,
                "first_error_ratio": fe_mean / ref_mean if matched_ref and ref_mean != 0 else float("nan"),
                "first_error_auroc": num / den if den else float("nan")})
    return out


def diagnose(scores: torch.Tensor | Sequence[torch.Tensor], action_mask: torch.Tensor, correct: torch.Tensor, *,
             first_error: Optional[torch.Tensor] = None, token_class: Optional[torch.Tensor] = None,
             class_names: Optional[Sequence[str]] = None, shaped: Optional[torch.Tensor] = None,
             rescored: Optional[torch.Tensor] = None, layer_names: Optional[Sequence[str]] = None,
             topk: int = 5) -> dict[str, Any]:
    """Error-localisation diagnostics of flow deviation scores (higher = more deviation).

    Args:
        scores: [B, T] deviation scores, or one [B, T] tensor per hooked layer
            (their mean is the "layer average" that flow rewards use).
        action_mask: [B, T] bool; only these tokens are looked at.
        correct: [B] bool outcome of each rollout.
        first_error: [B] long, the position (in T) of each wrong rollout's first
            wrong token, -1 where unknown or for right rollouts.
        token_class: [B, T] long class ids (indices into `class_names`).
        class_names: names of the classes of `token_class`.
        shaped: [B, T] shaped token rewards (for the class table's reward columns).
        rescored: [B, T] a second layer-average scoring of the same rollouts with
            independent noise (for the noise-agreement figures).
        layer_names: a name per layer of `scores` (default ``layer0``, ...).
        topk: k of the top-k agreement of the two scorings.

    Returns:
        ``{"n_rollouts", "n_wrong", "n_tokens", "layers": {name: stats}, "mean": stats,
        "classes": [rows], "noise": {...}}``, stats as described in the module docstring.
    """
    if not isinstance(action_mask, torch.Tensor) or action_mask.dtype != torch.bool or action_mask.dim() != 2:
        raise ValueError("action_mask must be a [B, T] bool tensor")
    shape = tuple(action_mask.shape)
    B = shape[0]
    layers = _as_layers(scores, shape)
    mask = action_mask.cpu()
    correct = torch.as_tensor(correct).cpu()
    if correct.shape != (B,):
        raise ValueError(f"correct must have shape [{B}], got {list(correct.shape)}")
    correct = correct.bool()
    if first_error is not None:
        first_error = torch.as_tensor(first_error).cpu().long()
        if first_error.shape != (B,):
            raise ValueError(f"first_error must have shape [{B}], got {list(first_error.shape)}")
        if bool((first_error >= shape[1]).any()):
            raise ValueError(f"first_error positions must be < T = {shape[1]} (or -1)")
    if token_class is not None:
        token_class = torch.as_tensor(token_class).cpu().long()
        if tuple(token_class.shape) != shape:
            raise ValueError(f"token_class must have shape {list(shape)}, got {list(token_class.shape)}")
        names = list(class_names) if class_names is not None else [str(c) for c in range(int(token_class.max()) + 1)]
        if int(token_class.max()) >= len(names) or int(token_class.min()) < 0:
            raise ValueError(f"token_class ids must index class_names ({len(names)} names)")
    for name, t in (("shaped", shaped), ("rescored", rescored)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    names_l = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(len(layers))]
    if len(names_l) != len(layers):
        raise ValueError(f"layer_names has {len(names_l)} names for {len(layers)} layers")

    avg = torch.stack(layers).mean(0)
    out: dict[str, Any] = {"n_rollouts": B, "n_wrong": int((~correct).sum()), "n_tokens": int(mask.sum()),
                           "layers": {n: _scoring_stats(s, mask, correct, first_error, token_class)
                                      for n, s in zip(names_l, layers)},
                           "mean": _scoring_stats(avg, mask, correct, first_error, token_class)}
    if token_class is not None:
        shaped_d = shaped.detach().double().cpu() if shaped is not None else None
        rows = []
        for c, name in enumerate(names):
            sel = mask & (token_class == c)
            n = int(sel.sum())
            row = {"class": name, "tokens": n, "mean_score": avg[sel].mean().item() if n else float("nan")}
            if shaped_d is not None:
                row["mean_reward"] = shaped_d[sel].mean().item() if n else float("nan")
                row["rewarded_share"] = (shaped_d[sel] != 0).double().mean().item() if n else float("nan")
            rows.append(row)
        out["classes"] = rows
    if rescored is not None:
        second = rescored.detach().double().cpu()
        out["noise"] = {"spearman_tokens": spearman(avg[mask], second[mask]),
                        "spearman_seq_mean": spearman(*((s * mask).sum(-1) / mask.sum(-1).clamp_min(1)
                                                        for s in (avg, second))),
                        "topk": topk, "topk_agreement": topk_agreement(avg, second, mask, topk)}
    return out


def _f(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_diagnosis(diag: dict[str, Any], title: str = "Flow-score diagnostics") -> str:
    """The result of `diagnose` as Markdown (one table of separation per layer, the class table, noise)."""
    lines = [f"## {title}", "",
             f"{diag['n_rollouts']} rollouts ({diag['n_wrong']} wrong), {diag['n_tokens']} scored tokens.", "",
             "| scoring | AUROC seq-mean (wrong vs right) | first-wrong / same-class right (ratio) "
             "| AUROC first-wrong vs same-class right | first-wrong tokens |",
             "|---|---:|---:|---:|---:|"]
    for name, s in [*diag["layers"].items(), ("layer average", diag["mean"])]:
        lines.append(f"| {name} | {_f(s['seq_auroc'])} | {_f(s.get('first_error_ratio', float('nan')))} "
                     f"| {_f(s.get('first_error_auroc', float('nan')))} | {s.get('first_error_tokens', 'n/a')} |")
    if "classes" in diag:
        has_reward = any("mean_reward" in r for r in diag["classes"])
        lines += ["", "| token class | tokens | mean deviation score |"
                  + (" mean shaped reward | share rewarded (≠0) |" if has_reward else ""),
                  "|---|---:|---:|" + ("---:|---:|" if has_reward else "")]
        for r in diag["classes"]:
            line = f"| {r['class']} | {r['tokens']} | {_f(r['mean_score'], '.4f')} |"
            if has_reward:
                line += f" {_f(r['mean_reward'], '+.6f')} | {_f(r['rewarded_share'])} |"
            lines.append(line)
    if "noise" in diag:
        nz = diag["noise"]
        lines += ["", f"Two independent scorings of the same rollouts (new noise ε): Spearman over tokens "
                      f"{_f(nz['spearman_tokens'])}, over sequence means {_f(nz['spearman_seq_mean'])}; "
                      f"top-{nz['topk']} tokens of a sequence agree {_f(nz['topk_agreement'])} of the time."]
    return "\n".join(lines)
