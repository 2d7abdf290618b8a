"""Which flow settings make flow rewards prefer execution tokens and localise first errors?

``python -m train.sweep --from RUN_DIR --out DIR`` takes a finished run's SFT
policy (its ``sft-*`` checkpoint) and, for each flow setting below, pretrains a
new velocity field on the expert traces (policy frozen) and runs the flow
diagnostics on the same held-out rollouts of that policy. Shaping settings
(norm, threshold, top-k, noise draws) reuse the run's pretrained field. The table (``DIR/sweep.md``) gives, per
setting, the error-localisation AUROCs and the mean shaped reward per token
class, so "does the reward prefer digits over connectives" is read off it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ConfigError
from .evaluate import load_run, run_diagnostics
from .flow_pretrain import run_flow_pretrain

# name -> (overrides of the run's config, whether a new field is pretrained); a new field differs from the
# run's pretrained one in the overridden settings (same policy, trace distribution and step count otherwise)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "run's pretrained flow": ({}, False),
    "token_post": ({"flow_context": "token_post"}, True),
    "depth 1": ({"flow_depth": 1}, True),
    "depth 4": ({"flow_depth": 4}, True),
    "half the flow steps": ({"flow_steps": "half"}, True),
    "twice the flow steps": ({"flow_steps": "twice"}, True),
    "norm minmax (one-sided)": ({"flow_norm": "minmax"}, False),
    "norm mean": ({"flow_norm": "mean"}, False),
    "threshold 0, top-k all": ({"flow_threshold": 0.0, "flow_topk": 0}, False),
    "K = 16 noise draws": ({"flow_noise_draws": 16}, False),
}



def _checkpoint(run_dir: Path, stage: str) -> Path:
    """The run's last `stage` checkpoint (a compare arm's: its seed's base run's)."""
    found = sorted((run_dir / "ckpt").glob(f"{stage}-*"))
    if not found and (run_dir / "config.json").exists():  # compare arms start from their seed's base run
        saved = json.loads((run_dir / "config.json").read_text())
        if saved.get("init_from"):
            found = sorted((Path(saved["init_from"]).parent).glob(f"{stage}-*"))
    if not found:
        raise ConfigError(f"--from {run_dir}: no {stage}-* checkpoint in it (or in the run it started from)")
    return found[-1]


def run_sweep(run_dir: str | Path, out: str | Path, names: Optional[Sequence[str]] = None,
              rollouts: int = 128) -> str:
    """Run the variants `names` (default: all of `VARIANTS`) and write ``out/sweep.md`` and ``sweep.json``."""
    run_dir, out = Path(run_dir), Path(out)
    names = list(names or VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ConfigError(f"--variants: unknown {bad}; known: {list(VARIANTS)}")
    sft, flow = _checkpoint(run_dir, "sft"), _checkpoint(run_dir, "flow")
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        overrides, fresh = VARIANTS[name]
        t0 = time.perf_counter()
        where = out / f"v{i:02d}"
        if overrides.get("flow_steps") in ("half", "twice"):  # relative to the run's own flow pretraining
            steps = json.loads((run_dir / "config.json").read_text())["flow_steps"]
            overrides = {**overrides, "flow_steps": max(1, steps // 2) if overrides["flow_steps"] == "half"
                         else 2 * steps}
        run = load_run(run_dir, checkpoint=sft if fresh else flow, out=where, fresh_field=fresh, progress=False,
                       **overrides)
        if fresh:
            run_flow_pretrain(run)
        else:  # shaping settings apply to the pretrained field as it is
            c = run.cfg
            run.flow_config = dataclasses.replace(run.flow_config, norm=c.flow_norm, threshold=c.flow_threshold,
                                                  topk=c.flow_topk, noise_draws=c.flow_noise_draws)
        rep = run_diagnostics(run, rollouts, seed=0)
        d = rep["diagnostics"]
        cls = {r["class"]: r for r in d["classes"]}
        rows.append({"variant": name, "field": "new" if fresh else flow.name, "seq_auroc": d["mean"]["seq_auroc"],
                     "first_error_auroc": d["mean"].get("first_error_auroc"),
                     "first_error_ratio": d["mean"].get("first_error_ratio"),
                     "spearman_two_scorings": d["noise"]["spearman_tokens"],
                     "reward": {c: cls[c]["mean_reward"] for c in cls}, "n_wrong": d["n_wrong"],
                     "n_rollouts": d["n_rollouts"], "wall_s": time.perf_counter() - t0})
        print(f"[sweep] {name}: seq AUROC {rows[-1]['seq_auroc']:.3f}, first-error AUROC "
              f"{rows[-1]['first_error_auroc']:.3f} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    classes = list(rows[0]["reward"])
    lines = [f"Sweep of flow settings on `{run_dir}` ({rollouts} held-out rollouts at the run's temperature; "
             f"every row scores the same rollouts of the run's SFT policy `{sft.name}`; 'new' fields are pretrained "
             f"on it from scratch, the others use the run's pretrained field `{flow.name}`).", "",
             "| variant | field | AUROC seq-mean | AUROC first-wrong | first-wrong ratio | ρ two scorings | "
             + " | ".join(f"mean reward {c}" for c in classes) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(classes)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['field']} | {r['seq_auroc']:.3f} | {r['first_error_auroc']:.3f} | "
                     f"{r['first_error_ratio']:.3f} | {r['spearman_two_scorings']:.3f} | "
                     + " | ".join(f"{r['reward'][c]:+.5f}" for c in classes) + " |")
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m train.sweep --from RUN_DIR --out DIR [--variants ...] [--rollouts N]``."""
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="run_dir", required=True, help="finished run directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--variants", nargs="+", default=None, help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--rollouts", type=int, default=128, help="held-out rollouts per variant (default: 128)")
    args = parser.parse_args(argv)
    try:
        print(run_sweep(args.run_dir, args.out, args.variants, args.rollouts))
    except ConfigError as exc:
        print(f"python -m train.sweep: error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
