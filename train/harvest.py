"""Flow-pretraining data for real tasks: the policy's own correct responses to train problems.

A pretrained chat model has no expert traces in its own style, so on real tasks (``--task reasoning_gym:...`` or
``asdiv``) flow pretraining learns from the latents of correct samples instead: the first ``--flow-harvest`` train
problems are each sampled ``--group-size`` times at ``--temperature``, every response is verified, and the
distinct correct (prompt, response) pairs are kept. They are written to ``<out>/flow_traces.jsonl`` and read back
on resume, so a resumed run pretrains on the same set.
"""

from __future__ import annotations

import json

from . import distributed as D
from .context import Run
from .policy import decode_responses, generate
from .real_tasks import parse_task
from .task import Problem, verify_batch

HARVEST_PROMPTS = 16  # prompts per generate call


def flow_traces(run: Run) -> list[Problem]:
    """The traces flow pretraining learns from: the expert traces (embedded task) or harvested correct samples."""
    cfg = run.cfg
    if not parse_task(cfg.task, cfg.task_options).real:
        return run.train
    path = run.out / "flow_traces.jsonl"
    if path.exists():
        return [Problem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    mine = D.shard_uneven(run.train[:cfg.flow_harvest], run.info)
    found, sampled = [], 0
    bar = run.progress(len(mine), 0, "harvest correct samples")
    for start in range(0, len(mine), HARVEST_PROMPTS):
        chunk = mine[start:start + HARVEST_PROMPTS]
        batch = generate(run.policy, run.tokenizer, [p.prompt for p in chunk], max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, num_return_sequences=cfg.group_size, device=run.device)
        responses = decode_responses(run.tokenizer, batch)
        rows = [p for p in chunk for _ in range(cfg.group_size)]
        ok = verify_batch(responses, [p.answer for p in rows], cfg.verifier)
        found += [Problem(p.prompt, r, p.answer) for p, r, good in zip(rows, responses, ok) if good]
        sampled += len(rows)
        bar.update(len(chunk))
        bar.set_postfix(correct=len(found))
    bar.close()
    lines = [json.dumps({"prompt": p.prompt, "solution": p.solution, "answer": p.answer}) for p in found]
    everything = [line for part in D.gather_strings("\n".join(lines), run.info) for line in part.splitlines()]
    traces = [Problem(**json.loads(line)) for line in dict.fromkeys(everything)]  # distinct, in order
    (total,) = D.all_sum([float(sampled)], run.info)
    if not traces:
        raise RuntimeError(f"flow pretraining: none of {int(total)} samples of {cfg.flow_harvest} train problems was "
                           f"correct; pick an easier task (--task-options) or raise --flow-harvest / --group-size")
    if run.info.main:
        path.write_text("".join(line + "\n" for line in dict.fromkeys(everything)))
    run.metrics.log({"stage": "flow", "step": 0, "kind": "harvest", "samples": total, "correct": len(everything),
                     "distinct_correct": len(traces), "sample_accuracy": len(everything) / total})
    run.summary["flow_harvest"] = {"samples": int(total), "correct": len(everything), "distinct": len(traces)}
    D.barrier(run.info)
    return traces
