"""Flow-score diagnostic of a pretrained model on a real task, without RL.

``python -m train.real_diagnostic --model qwen2.5-coder-1.5b --task asdiv --flow-harvest 200 --out runs/diag``

1. The trainer runs up to flow pretraining (``--stop-after flow``, no SFT): held-out pass@1 of the model as it
   is, then a flow fitted on the latents of the model's own correct answers to ``--flow-harvest`` train problems
   (their text is cached in ``<out>/flow_traces.jsonl``; latents are recomputed, never stored).
2. ``--diag-samples`` responses to each of the first ``--diag-problems`` held-out problems (or, with
   ``--diag-split unharvested``, train problems the harvest never sampled) are sampled once and cached with their text and outcome in ``<out>/diag_rollouts.jsonl``; a rerun reuses both caches.
3. Each held-out rollout is scored token by token (deviation scores: `flowkern.flow_reward` with no
   normalisation, threshold or top-k, and coefficient -1; twice, with independent noise) and
   `flowkern.diagnostics.diagnose` reports the AUROC of the sequence-mean deviation for wrong against right
   rollouts, the token-class table and the agreement of the two scorings (``<out>/diagnosis.md``/``.json``).
   ASDiv and reasoning_gym give no first-wrong-token labels, so error-localisation AUROC is not reported.

Every other flag is a trainer flag (``python -m train run --help``). Wall times of each part are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from flowkern.diagnostics import diagnose, format_diagnosis

from . import distributed as D
from .checkpoint import latest_checkpoint
from .cli import parse_config
from .evaluate import CLASSES, token_classes
from .flow_pretrain import policy_latents
from .policy import decode_responses, encode_traces, generate
from .task import verify_batch

CHUNK = 16  # rollouts per generate / scoring call


def _pad_cat(parts: Sequence[torch.Tensor], value) -> torch.Tensor:
    """Concatenate [b, t] tensors along rows, right-padding each to the longest t with `value`."""
    T = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1]), value=value) for p in parts])


def diag_problems(run, n_problems: int, split: str) -> list:
    """The first `n_problems` problems the flow never saw: of the held-out split, or the train problems after the
    first ``--flow-harvest`` (those the harvest did not sample; cheaper, as they need no held-out evaluation)."""
    pool = run.heldout if split == "heldout" else run.train[run.cfg.flow_harvest:]
    if len(pool) < n_problems:
        raise ValueError(f"--diag-problems {n_problems}: the {split} split has only {len(pool)} problems "
                         f"(raise --n-heldout or --n-train)")
    return pool[:n_problems]


def sample_rollouts(run, probs: Sequence, samples: int, path: Path) -> list[dict]:
    """`samples` responses to each problem of `probs`, verified; cached in `path`."""
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cfg, tok = run.cfg, run.tokenizer
    rows = []
    bar = run.progress(len(probs), 0, "diagnostic rollouts")
    per_call = max(1, CHUNK // samples)
    for i in range(0, len(probs), per_call):
        chunk = probs[i:i + per_call]
        batch = generate(run.policy, tok, [p.prompt for p in chunk], max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, num_return_sequences=samples, device=run.device)
        answers = [p for p in chunk for _ in range(samples)]
        responses = decode_responses(tok, batch)
        ok = verify_batch(responses, [p.answer for p in answers], cfg.verifier)
        rows += [{"prompt": p.prompt, "response": r, "answer": p.answer, "correct": bool(c)}
                 for p, r, c in zip(answers, responses, ok)]
        bar.update(len(chunk))
    bar.close()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@torch.no_grad()
def score_rollouts(run, rows: list[dict]) -> dict:
    """Deviation scores (two noise draws), shaped rewards, action mask and token classes of cached rollouts."""
    from flowkern import flow_reward

    fcfg = run.flow_config
    raw_cfg = dataclasses.replace(fcfg, norm="none", threshold=0.0, topk=0, coef=-1.0)
    classes = torch.tensor([CLASSES.index(c) for c in token_classes(run.tokenizer)])
    run.field.eval()
    out = {k: [] for k in ("raw", "rescored", "shaped", "action", "cls")}
    gen = torch.Generator().manual_seed(run.cfg.seed)
    for i in range(0, len(rows), CHUNK):
        part = rows[i:i + CHUNK]
        batch = encode_traces(run.tokenizer, [r["prompt"] for r in part], [r["response"] for r in part], run.device)
        latents, fracs = policy_latents(run.policy, batch, fcfg.hook_layers)
        action = batch["action_mask"]
        noise = [torch.randn(lat.shape, generator=gen).to(lat.device) for lat in latents]
        noise2 = [torch.randn(lat.shape, generator=gen).to(lat.device) for lat in latents]
        kw = dict(layer_fracs=fracs, backend=run.cfg.backend)
        out["raw"].append(flow_reward(run.field, latents, action, raw_cfg, noise=noise, **kw).cpu())
        out["rescored"].append(flow_reward(run.field, latents, action, raw_cfg, noise=noise2, **kw).cpu())
        out["shaped"].append(flow_reward(run.field, latents, action, fcfg, noise=noise, **kw).cpu())
        out["action"].append(action.cpu())
        out["cls"].append(classes[batch["input_ids"].cpu().clamp(max=len(classes) - 1)])
    pads = {"raw": 0.0, "rescored": 0.0, "shaped": 0.0, "action": False, "cls": 0}
    return {k: _pad_cat(v, pads[k]) for k, v in out.items()}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def stage_table(root: Path) -> str:
    """Markdown table of every stage's wall time in a ``python -m train compare`` output directory: the base run
    (evaluation of the start point, harvest + flow pretraining) and each arm (GRPO + final evaluation, report; an
    arm's summary also holds the base stages' times it was started from, which are not repeated),
    with the arms' mean generation tokens/s and RL step time from their ``metrics.jsonl``."""
    lines = ["| run | stage | wall time (s) | generation tokens/s (mean) | RL step time (s, mean) |",
             "|---|---|---:|---:|---:|"]
    names = {"sft": "evaluation of the start point (no SFT)", "flow": "harvest + flow pretraining",
             "rl": "GRPO steps + final evaluation", "report": "report (heat-map, token classes, diagnostics)"}
    for seed_dir in sorted(root.glob("seed*")):
        for run_dir in sorted(d for d in seed_dir.iterdir() if (d / "summary.json").exists()):
            wall = json.loads((run_dir / "summary.json").read_text()).get("wall_s", {})
            steps = [m for m in _metrics(run_dir / "metrics.jsonl") if m.get("stage") == "rl" and "step_s" in m]
            own = ("sft", "flow") if run_dir.name == "base" else ("rl", "report")  # arms inherit the base's times
            for stage, secs in wall.items():
                if stage not in own:
                    continue
                extra = "| | |"
                if stage == "rl" and steps:
                    tps = sum(m["gen_tokens_per_s"] for m in steps) / len(steps)
                    extra = f"| {tps:.1f} | {sum(m['step_s'] for m in steps) / len(steps):.1f} ({len(steps)} steps) |"
                lines.append(f"| {seed_dir.name}/{run_dir.name} | {names[stage]} (`{stage}`) | {secs:.0f} {extra}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the diagnostic; trainer flags pass through. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m train.real_diagnostic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--diag-problems", type=int, default=100, help="held-out problems to sample (default 100)")
    parser.add_argument("--diag-samples", type=int, default=4, help="responses per problem (default 4)")
    parser.add_argument("--diag-split", choices=("heldout", "unharvested"), default="heldout",
                        help="where the diagnostic's problems come from: the held-out split, or the train problems "
                             "after the first --flow-harvest (default heldout)")
    parser.add_argument("--stages", metavar="DIR", help="only print the stage wall-time table of the "
                        "`python -m train compare` output DIR and exit")
    args, rest = parser.parse_known_args(argv)
    if args.stages:
        print(stage_table(Path(args.stages)))
        return 0
    cfg = parse_config([*rest, "--stop-after", "flow"])
    if cfg.sft_steps:
        parser.error("the diagnostic looks at the model as it is: pass --sft-steps 0")
    from .pipeline import run_pipeline, setup

    out = Path(cfg.out)
    times = {}
    t0 = time.perf_counter()
    if latest_checkpoint(out) is None or not (out / "summary.json").exists():
        run_pipeline(cfg)  # held-out eval of the model as it is, harvest of correct samples, flow pretraining
    times["eval_harvest_flow_s"] = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    info = D.init(cfg.device)
    torch.set_num_threads(cfg.threads or 1)
    run = setup(dataclasses.replace(cfg, resume=True), info)
    t0 = time.perf_counter()
    probs = diag_problems(run, args.diag_problems, args.diag_split)
    rows = sample_rollouts(run, probs, args.diag_samples, out / "diag_rollouts.jsonl")
    times["rollouts_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = score_rollouts(run, rows)
    times["scoring_s"] = time.perf_counter() - t0
    correct = torch.tensor([r["correct"] for r in rows])
    diag = diagnose(scored["raw"], scored["action"], correct, token_class=scored["cls"], class_names=CLASSES,
                    shaped=scored["shaped"], rescored=scored["rescored"])
    title = f"{cfg.model} on {cfg.task}: flow fitted on {summary.get('flow_harvest', {}).get('distinct')} correct " \
            f"samples, {len(rows)} rollouts of " \
            f"{len(probs)} {args.diag_split} problems"
    md = format_diagnosis(diag, title)
    start = summary.get("sft_eval", {})
    md += (f"\n\nHeld-out greedy pass@1 of the model: {start.get('pass@1', float('nan')):.3f} "
           f"({int(start.get('n_eval', 0))} problems); sampled rollouts correct: {correct.float().mean().item():.3f}."
           f"\nWall time (s): trainer stages {json.dumps({k: round(v, 1) for k, v in summary.get('wall_s', {}).items()})}; "
           f"this process "
           f"{json.dumps({k: round(v, 1) for k, v in times.items()})}.\n")
    (out / "diagnosis.md").write_text(md)
    (out / "diagnosis.json").write_text(json.dumps({"diagnosis": diag, "times_s": times, "argv": sys.argv},
                                                   indent=2, default=str) + "\n")
    print(md)
    D.shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
