"""Atomic checkpoints: policy, flow, optimizers, RNG state, stage and step.

Layout under ``<out>/ckpt``::

    sft-000450/                  one directory per checkpoint
        policy/                  save_pretrained (safetensors) + tokenizer
        flow.safetensors, flow.json   save_flow_field
        state.pt                 optimizers, stage, step, generator state
        rng-rank{r}.pt           each rank's torch / python RNG states
    latest                       name of the newest complete checkpoint

A checkpoint is written into ``.tmp-<name>`` and renamed into place, then
``latest`` is replaced atomically, so an interrupted write never becomes
the checkpoint a resume reads. Everything is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from flowkern import FlowConfig, VelocityField, load_flow_field, save_flow_field
from flowkern.checkpoint import umask_mode

from . import distributed as D

STAGES = ("sft", "flow", "rl")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if present, python `random`)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by `rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, umask_mode())
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | os.PathLike, *, stage: str, step: int, policy, tokenizer, field: VelocityField,
                    flow_config: FlowConfig, optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator, info: D.DistInfo, keep: int = 2,
                    extra: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """Write a checkpoint of (`stage`, `step`) atomically; every rank must call it.

    Rank 0 writes the weights and optimizers; each rank writes its own RNG
    states. Returns the checkpoint directory on rank 0 (None elsewhere).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    root = Path(root) / "ckpt"
    name = f"{stage}-{step:06d}"
    tmp = root / f".tmp-{name}"
    if info.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    D.barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    if info.main:
        D.unwrap(policy).save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        save_flow_field(field, tmp / "flow.safetensors", flow_config)
        torch.save({"stage": stage, "step": step, "world": info.world, "generator": generator.get_state(),
                    "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
                    "extra": extra or {}}, tmp / "state.pt")
    D.barrier(info)
    if not info.main:
        return None
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (STAGES.index(p.name.split("-")[0]), int(p.name.split("-")[1])))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint directory under ``<out>/ckpt``, or None."""
    pointer = Path(out) / "ckpt" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: str | os.PathLike, info: D.DistInfo) -> dict[str, Any]:
    """Read a checkpoint: ``state`` (stage, step, optimizers, generator), ``rng`` for this rank,
    ``flow`` (field, config) and ``policy_dir``. Weights are loaded by the caller."""
    path = Path(path)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{path} is not a trainer checkpoint (no state.pt)")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-rank{info.rank}.pt"
    if not rng_file.exists():  # resuming with more ranks than were saved: derive from rank 0
        rng_file = path / "rng-rank0.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    field, flow_config = load_flow_field(path / "flow.safetensors")
    return {"state": state, "rng": rng, "field": field, "flow_config": flow_config, "policy_dir": path / "policy",
            "path": path}
