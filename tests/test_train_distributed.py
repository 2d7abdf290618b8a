"""Two-process data-parallel run (torchrun, gloo on CPU): both ranks must end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import need

need("matplotlib")  # the `train` extra
need("tokenizers")
from train import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_run_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_config(out=str(out), rl_steps=2, sft_steps=3, flow_steps=3, n_heldout=8, report_rollouts=1)
    flags = []
    for key in ("out", "n_train", "n_heldout", "hidden", "layers", "heads", "intermediate", "sft_steps", "sft_batch",
                "flow_steps", "flow_batch", "rl_steps", "batch_size", "group_size", "max_new_tokens", "eval_every",
                "pass_k", "ckpt_every", "report_rollouts", "threads"):
        flags += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "train", "--no-progress", "--device", "cpu", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    prints = summary["rank_fingerprints"]
    assert len(prints["policy"]) == 2 and len(set(prints["policy"])) == 1
    assert len(prints["flow"]) == 2 and len(set(prints["flow"])) == 1
    assert "2 process(es)" in proc.stdout
    # the ranks trained on disjoint halves of each batch, and the run still covered every stage
    assert summary["rl_eval"]["n_eval"] == cfg.n_heldout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {"sft", "flow", "rl"}
    assert (out / "ckpt" / "latest").read_text().strip() == f"rl-{cfg.rl_steps:06d}"
    assert sorted(p.name for p in (out / "ckpt" / f"rl-{cfg.rl_steps:06d}").glob("rng-rank*.pt")) == [
        "rng-rank0.pt", "rng-rank1.pt"]


def test_world_size_must_split_the_prompts():
    from train import ConfigError

    with pytest.raises(ConfigError, match="cannot be split evenly over 2 processes"):
        tiny_config(batch_size=12, group_size=4).validate(world_size=2)
