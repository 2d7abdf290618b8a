"""The state shared by all stages of a run, and the metrics log."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from flowkern import FlowConfig, VelocityField

from . import distributed as D
from .config import TrainConfig
from .task import Problem

STAGE_ORDER = {"sft": 0, "flow": 1, "rl": 2}


class MetricsLog:
    """Append-only JSONL of metric records (rank 0 writes; other ranks ignore)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.t0 = time.time()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (values converted to plain floats / ints / strings)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor,)) else v) for k, v in record.items()}
        clean["time_s"] = round(time.time() - self.t0, 2)  # seconds since this process started the run
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """All records written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop records logged after (`stage`, `step`), so a resumed run continues the same curve."""
        if not self.enabled or not self.path.exists():
            return
        limit = (STAGE_ORDER[stage], step)
        keep = [r for r in self.records() if (STAGE_ORDER.get(r.get("stage"), 99), r.get("step", 0)) <= limit]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)


@dataclass
class Run:
    """Everything a stage needs: config, data, models, optimizers' owners, RNG and logs."""

    cfg: TrainConfig
    info: D.DistInfo
    out: Path
    tokenizer: Any
    policy: torch.nn.Module  # the bare HF model (never DDP-wrapped)
    field: VelocityField
    flow_config: FlowConfig
    train: list[Problem]
    heldout: list[Problem]
    generator: torch.Generator  # shared by all ranks: batch indices
    metrics: MetricsLog
    resume_stage: Optional[str] = None
    resume_step: int = 0
    resume_optimizers: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    last_rollout: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors of the latest RL step
    _ddp: Optional[torch.nn.Module] = None

    @property
    def ddp(self) -> torch.nn.Module:
        """The policy as trained: DDP-wrapped (created once) when distributed, else the bare model."""
        if self._ddp is None:
            self._ddp = D.wrap_ddp(self.policy, self.info)
        return self._ddp

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.info.device

    def start_step(self, stage: str) -> Optional[int]:
        """First step to run in `stage` (0 when fresh); None when the checkpoint is past it."""
        if self.resume_stage is None:
            return 0
        if STAGE_ORDER[stage] < STAGE_ORDER[self.resume_stage]:
            return None
        if stage == self.resume_stage:
            return self.resume_step
        return 0

    def take_optimizer_state(self, stage: str, name: str) -> Optional[dict]:
        """The saved state of optimizer `name` if resuming inside `stage` (consumed once)."""
        if self.resume_stage == stage and name in self.resume_optimizers:
            return self.resume_optimizers.pop(name)
        return None

    def progress(self, total: int, initial: int, desc: str):
        """A tqdm bar on rank 0 (disabled elsewhere or with --no-progress)."""
        return tqdm(total=total, initial=initial, desc=desc, disable=not (self.cfg.progress and self.info.main),
                    dynamic_ncols=True, leave=True)

    def sample_indices(self, n: int, population: int) -> list[int]:
        """`n` indices in [0, population) from the shared generator (identical on all ranks)."""
        return torch.randint(population, (n,), generator=self.generator).tolist()
