"""`flowkern pretrain`: fit a velocity field on the latents of any local HF causal LM over expert data.

The policy is frozen (bf16 by default, or its own dtype). Its decoder-layer outputs at
``FlowConfig.hook_layers`` are tapped with `LatentTap`; the (context, target) pairs of
**response tokens only** are packed into fixed-token batches (exactly ``batch_tokens``
pairs per optimiser step, split evenly over the data-parallel ranks) and the flow is
trained by flow matching (`flow_matching_loss`, the op behind `latent_flow_loss`; the
fused backend where one is available) with Adam, linear warm-up and cosine decay, and
gradient clipping. A held-out flow loss is measured with fixed noise every
``eval_every`` steps and at the end. Checkpoints are written atomically and hold the
flow, its optimiser, each rank's noise generator and data position, so a resumed run
equals an uninterrupted one. The result is saved with `save_flow_field`.

Data: a JSONL file (one object per line with prompt/response fields, or a text field),
a plain-text file (one example per non-empty line, every token a response token), or a
local HF ``datasets`` directory (``save_to_disk``) with the same columns.

Run it as ``flowkern-pretrain --model DIR --data FILE --out DIR`` or
``python -m flowkern pretrain ...``; ``torchrun --nproc_per_node N`` runs it data-parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .checkpoint import load_flow_field, save_flow_field
from .config import CONTEXT_MODES, FlowConfig
from .field import VelocityField
from .flow import flow_matching_loss
from .tap import LatentTap

__all__ = ["PretrainConfig", "Example", "load_examples", "encode_example", "pretrain", "main"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FORMATS = ("flowkern", "official")
FLOW_NAME = "flow.safetensors"
REPORT_NAME = "report.json"
METRICS_NAME = "metrics.jsonl"
# Settings that decide the sequence of batches, noise and updates: a resume must not change them.
_RUN_KEYS = ("steps", "batch_tokens", "lr", "min_lr_ratio", "warmup_steps", "clip", "repeats", "seed",
             "forward_batch", "max_length", "eval_frac", "chat_template", "append_eos", "dtype")


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of a pretraining run (validated once; errors name the field).

    Attributes:
        steps: optimiser steps.
        batch_tokens: response-token pairs per step, over all ranks (each pair at every hooked layer).
        lr: peak learning rate of Adam.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warm-up steps.
        clip: gradient-norm clipping (0 disables it).
        repeats: fresh (t, ε) draws per token.
        seed: seeds the data order, the flow's initialisation and the noise.
        forward_batch: examples per policy forward.
        max_length: tokens kept per example (prompt + response; longer ones are cut at the end).
        eval_frac: share of the examples held out (at most `eval_examples`) when no `eval_data` is given.
        eval_examples: most examples held out from the data.
        eval_tokens: held-out pairs scored per evaluation (whole examples, in order, until this many).
        eval_every: steps between held-out evaluations (0: only at the start and the end).
        ckpt_every: steps between checkpoints (0: only at the end).
        keep_ckpts: checkpoints kept.
        log_every: steps between metric lines.
        chat_template: render prompts with the tokenizer's chat template (a user turn, then the
            generation prompt); the response follows as the assistant's turn.
        append_eos: end every response with the tokenizer's EOS token, as a generated rollout does.
        prompt_field, response_field, text_field: column names in the data.
        split: the split of a ``DatasetDict`` directory.
        dtype: the frozen policy's dtype: bfloat16, float16, float32, or "model" (its own).
        device: "auto" (the local CUDA device when there is one), "cpu" or "cuda".
        backend: flowkern backend of the flow loss ("auto", "torch", "triton").
        format: "flowkern" (safetensors + JSON), or "official" to also write the released layout
            (``official/flow_model.bin`` + ``flow_config.json``, the directory the released loader takes).
        resume: continue from the newest checkpoint under ``out`` when there is one.
        progress: show a progress bar (rank 0).
    """

    steps: int = 1000
    batch_tokens: int = 8192
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    clip: float = 1.0
    repeats: int = 1
    seed: int = 0
    forward_batch: int = 8
    max_length: int = 2048
    eval_frac: float = 0.05
    eval_examples: int = 256
    eval_tokens: int = 8192
    eval_every: int = 100
    ckpt_every: int = 200
    keep_ckpts: int = 2
    log_every: int = 10
    chat_template: bool = False
    append_eos: bool = True
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    split: str = "train"
    dtype: str = "bfloat16"
    device: str = "auto"
    backend: str = "auto"
    format: str = "flowkern"
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "repeats", "forward_batch", "max_length", "eval_examples",
                     "eval_tokens", "keep_ckpts", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "seed", "eval_every", "ckpt_every"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "min_lr_ratio", "clip", "eval_frac"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PretrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"PretrainConfig.lr must be positive, got {self.lr!r}")
        if self.min_lr_ratio > 1 or self.eval_frac >= 1:
            raise ValueError("PretrainConfig.min_lr_ratio must be <= 1 and eval_frac < 1")
        if self.dtype not in (*DTYPES, "model"):
            raise ValueError(f"PretrainConfig.dtype must be one of {(*DTYPES, 'model')}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"PretrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.format not in FORMATS:
            raise ValueError(f"PretrainConfig.format must be one of {FORMATS}, got {self.format!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"PretrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Example:
    """One expert example: the prompt (no flow loss) and the response (the flow's targets)."""

    prompt: str
    response: str


def _example(row: Any, where: str, cfg: PretrainConfig) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if cfg.prompt_field in row and cfg.response_field in row:
        prompt, response = row[cfg.prompt_field], row[cfg.response_field]
    elif cfg.text_field in row:
        prompt, response = "", row[cfg.text_field]
    else:
        raise ValueError(f"{where}: needs the fields {cfg.prompt_field!r} and {cfg.response_field!r}, or "
                         f"{cfg.text_field!r}; it has {sorted(row)}")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"{where}: {cfg.prompt_field!r}/{cfg.response_field!r}/{cfg.text_field!r} must be strings")
    return Example(prompt, response)


def load_examples(path: str | os.PathLike, cfg: PretrainConfig = PretrainConfig()) -> list[Example]:
    """Read expert examples from a JSONL file, a plain-text file or a local HF ``datasets`` directory.

    JSONL: one object per line with ``cfg.prompt_field`` and ``cfg.response_field`` (or ``cfg.text_field``,
    all of it a response). Plain text (any other file): one example per non-empty line, all of it a
    response. A directory is read with ``datasets.load_from_disk`` (``cfg.split`` of a ``DatasetDict``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: {path} does not exist")
    if path.is_dir():
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"data: {path} is a directory, read as an HF datasets directory, but the 'datasets' "
                              f"package is missing ({exc}); pip install datasets") from exc
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"data: {path} has splits {sorted(ds)}, not {cfg.split!r} (see split)")
            ds = ds[cfg.split]
        return [_example(row, f"{path} row {i}", cfg) for i, row in enumerate(ds)]
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if path.suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path} line {n} is not JSON ({exc.msg})") from None
            out.append(_example(row, f"{path} line {n}", cfg))
        return out
    return [Example("", line) for line in lines if line.strip()]


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def encode_example(tokenizer, example: Example, cfg: PretrainConfig) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens.

    The prompt is tokenised with the tokenizer's special tokens (or, with ``cfg.chat_template`` and a
    non-empty prompt, rendered as a user turn plus the generation prompt); the response without special
    tokens, plus EOS when ``cfg.append_eos``. The ids are cut at ``cfg.max_length``.
    """
    if cfg.chat_template and example.prompt:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the model's tokenizer has no chat template")
        prompt = _ids(tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                                    add_generation_prompt=True, tokenize=True))
    else:
        prompt = _ids(tokenizer(example.prompt))
    response = _ids(tokenizer(example.response, add_special_tokens=False))
    if cfg.append_eos and tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    ids = (prompt + response)[:cfg.max_length]
    return ids, min(len(prompt), len(ids))


def pair_positions(length: int, n_prompt: int, config: FlowConfig) -> tuple[range, int]:
    """Target positions of the response tokens that have a context in the example, and the context offset."""
    s = config.shift
    if config.context_mode == "token_pre":
        return range(n_prompt, max(n_prompt, length - s)), s
    if config.context_mode == "token_post":
        return range(max(n_prompt, s), length), -s
    return range(n_prompt, length), 0


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # this run started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist = torch.distributed
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(rank, world, dev, owns)


def _all_sum(t: torch.Tensor, info: _Dist) -> torch.Tensor:
    if info.world > 1:
        torch.distributed.all_reduce(t)
    return t


def _barrier(info: _Dist) -> None:
    if info.world > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------- latents

class _Policy:
    """The frozen policy and its tap: latent pairs of response tokens, group of examples by group."""

    def __init__(self, model, tokenizer, config: FlowConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.tap = LatentTap(model, config.hook_layers)
        self.layer_fracs = self.tap.layer_fracs
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.no_grad()
    def pairs(self, encoded: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, contexts) [m, L, D] of every response pair of `encoded`, example by example, in order."""
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, (row, _) in enumerate(encoded):
            ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        with self.tap:
            self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device), use_cache=False,
                       **extra)
        latents = torch.stack(self.tap.latents, dim=2)  # [B, T, L, D]
        rows, pos, ctx = [], [], []
        for i, (row, n_prompt) in enumerate(encoded):
            targets, offset = pair_positions(len(row), n_prompt, self.config)
            rows += [i] * len(targets)
            pos += list(targets)
            ctx += [p + offset for p in targets]
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        return (latents[rows_t, torch.tensor(pos, dtype=torch.long, device=self.device)],
                latents[rows_t, torch.tensor(ctx, dtype=torch.long, device=self.device)])


class _Stream:
    """One rank's endless stream of response pairs: epoch by epoch, its shard of a seeded permutation,
    in groups of ``forward_batch`` examples. Its state (epoch, group, offset) is all a resume needs."""

    def __init__(self, encoded: list[tuple[list[int], int]], counts: list[int], policy: _Policy,
                 cfg: PretrainConfig, info: _Dist):
        self.encoded, self.counts, self.policy, self.cfg, self.info = encoded, counts, policy, cfg, info
        self.epoch, self.group, self.offset = 0, 0, 0
        self._groups: list[list[int]] = []
        self._buffer: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._plan()

    def _plan(self) -> None:
        order = torch.randperm(len(self.encoded), generator=torch.Generator().manual_seed(self.cfg.seed * 7919
                                                                                          + self.epoch))
        shard = order[self.info.rank::self.info.world].tolist()
        step = self.cfg.forward_batch
        self._groups = [shard[i:i + step] for i in range(0, len(shard), step)]
        if not any(self.counts[i] for i in shard):
            raise ValueError(f"rank {self.info.rank}'s share of the data has no response token with a context")

    def state(self) -> dict[str, int]:
        """Where the stream stands."""
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        """Go back to a position returned by `state`."""
        self.epoch, self.group, self.offset = int(state["epoch"]), int(state["group"]), int(state["offset"])
        self._buffer = None
        self._plan()

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` pairs: (targets, contexts) [n, L, D]."""
        parts_t, parts_c = [], []
        while n:
            if self.group >= len(self._groups):
                self.epoch, self.group, self.offset = self.epoch + 1, 0, 0
                self._buffer = None
                self._plan()
                continue
            if self._buffer is None:
                members = self._groups[self.group]
                self._buffer = self.policy.pairs([self.encoded[i] for i in members]) \
                    if sum(self.counts[i] for i in members) else None
                if self._buffer is None:
                    self.group, self.offset = self.group + 1, 0
                    continue
            targets, conds = self._buffer
            k = min(n, targets.shape[0] - self.offset)
            parts_t.append(targets[self.offset:self.offset + k])
            parts_c.append(conds[self.offset:self.offset + k])
            self.offset += k
            n -= k
            if self.offset == targets.shape[0]:
                self.group, self.offset, self._buffer = self.group + 1, 0, None
        return torch.cat(parts_t), torch.cat(parts_c)


def _loss(field: VelocityField, targets: torch.Tensor, conds: torch.Tensor, fracs: torch.Tensor, repeats: int,
          generator: torch.Generator, backend: str) -> torch.Tensor:
    """Flow-matching loss of pairs [n, L, D], every layer stacked layer-major (as `latent_flow_loss` does)."""
    n, n_layers, dim = targets.shape
    return flow_matching_loss(field, targets.transpose(0, 1).reshape(n_layers * n, dim),
                              conds.transpose(0, 1).reshape(n_layers * n, dim), fracs.repeat_interleave(n),
                              repeats=repeats, generator=generator, backend=backend)


def _heldout(field: VelocityField, policy: _Policy, groups: list[list[tuple[list[int], int]]], fracs: torch.Tensor,
             cfg: PretrainConfig, info: _Dist) -> float:
    """Mean flow loss over this run's held-out pairs (all ranks), with the same fixed noise every time."""
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed + 104729 + info.rank)
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    was_training = field.training
    field.eval()
    with torch.no_grad():
        for group in groups:
            targets, conds = policy.pairs(group)
            loss = _loss(field, targets, conds, fracs, 1, generator, cfg.backend)
            total += torch.stack([loss.double() * targets.shape[0], torch.tensor(targets.shape[0], dtype=torch.float64,
                                                                                  device=info.device)])
    field.train(was_training)
    total = _all_sum(total, info)
    return float(total[0] / total[1]) if float(total[1]) else float("nan")


def _heldout_groups(encoded: list[tuple[list[int], int]], counts: list[int], cfg: PretrainConfig,
                    info: _Dist) -> tuple[list[list[tuple[list[int], int]]], int]:
    """This rank's held-out examples in forward groups, and the pairs of all ranks together: the
    held-out examples in order until ``eval_tokens`` pairs are reached (the example crossing it included)."""
    mine, total = [], 0
    for i, item in enumerate(encoded):
        if total >= cfg.eval_tokens:
            break
        if counts[i]:
            total += counts[i]
            if i % info.world == info.rank:
                mine.append(item)
    return [mine[i:i + cfg.forward_batch] for i in range(0, len(mine), cfg.forward_batch)], total


# --------------------------------------------------------------------------- checkpoints

def _lr(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of step `step` (1-based): linear warm-up, then cosine down to ``lr * min_lr_ratio``."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _latest(out: Path) -> Optional[Path]:
    pointer = out / "ckpt" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _save_ckpt(out: Path, step: int, field: VelocityField, flow_config: FlowConfig, optimizer, stream: _Stream,
               generator: torch.Generator, run: dict, extra: dict, cfg: PretrainConfig, info: _Dist) -> None:
    """Write ``ckpt/step-N`` through a temp directory renamed into place, then the ``latest`` pointer."""
    root = out / "ckpt"
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}"
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(info)
    torch.save({"generator": generator.get_state(), "stream": stream.state(), "torch": torch.get_rng_state()},
               tmp / f"rank{info.rank}.pt")
    if info.main:
        save_flow_field(field, tmp / FLOW_NAME, flow_config)
        torch.save({"step": step, "world": info.world, "optimizer": optimizer.state_dict(), "run": json.dumps(run),
                    "extra": json.dumps(extra)},
                   tmp / "state.pt")
    _barrier(info)
    if not info.main:
        return
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fd, pointer = tempfile.mkstemp(dir=root, prefix=".latest.")
    with os.fdopen(fd, "w") as fh:
        fh.write(name + "\n")
    os.replace(pointer, root / "latest")
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-cfg.keep_ckpts]:
        shutil.rmtree(old, ignore_errors=True)


class _Metrics:
    """Rank 0 appends one JSON object per line to ``metrics.jsonl`` (lines past a resumed step are dropped)."""

    def __init__(self, path: Path, info: _Dist, resumed_step: Optional[int]):
        self.path, self.on = path, info.main
        if not self.on:
            return
        if resumed_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if self.on:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the run

def _load_policy(model_dir: Path, cfg: PretrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model: {model_dir} is not a directory holding an HF causal LM")
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    kwargs["dtype" if _new_transformers() else "torch_dtype"] = "auto" if cfg.dtype == "model" else DTYPES[cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _new_transformers() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _hidden(model) -> tuple[int, float]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size), float(getattr(config, "rms_norm_eps", None) or 1e-6)


def default_depth(hidden_size: int) -> int:
    """K of the released flows: 4 up to the 1.5B models' width (D ≤ 2048), 6 beyond (7B/8B)."""
    return 4 if hidden_size <= 2048 else 6


def pretrain(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             cfg: PretrainConfig = PretrainConfig(), *,
             flow_config: Union[FlowConfig, Mapping[str, Any], None] = None,
             init: Optional[str | os.PathLike] = None, eval_data: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Fit a flow on `model`'s latents over the responses of `data`; write it under `out` and return the report.

    Args:
        model: directory of a local HF causal LM and its tokenizer.
        data: JSONL, plain text, or an HF ``datasets`` directory (see `load_examples`).
        out: output directory: ``flow.safetensors`` + ``flow.json`` (and ``official/flow_model.bin`` +
            ``flow_config.json`` with ``cfg.format="official"``), ``metrics.jsonl``, ``report.json``, ``ckpt/``.
        cfg: the run's settings.
        flow_config: the flow's `FlowConfig`, or a dict of FlowConfig fields over the defaults; the
            defaults are depth `default_depth(D)` and the policy's ``rms_norm_eps``.
        init: a flow checkpoint to start from instead of a fresh field.
        eval_data: held-out examples; default: ``cfg.eval_frac`` of `data` (at most ``cfg.eval_examples``).

    Returns:
        The report (also written to ``out/report.json`` by rank 0): held-out flow loss at the start and
        the end, the last training loss, steps, tokens, wall time, output paths, and whether every rank
        ended with the same flow.
    """
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"cfg must be a flowkern.pretrain.PretrainConfig, got {type(cfg).__name__}")
    started = time.perf_counter()
    out = Path(out)
    info = _init_dist(cfg.device)
    policy_model, tokenizer = _load_policy(Path(model), cfg, info.device)
    hidden, rms_eps = _hidden(policy_model)
    if not isinstance(flow_config, FlowConfig):
        flow_config = FlowConfig(**{"depth": default_depth(hidden), "eps": rms_eps, **dict(flow_config or {})})
    examples = load_examples(data, cfg)
    if eval_data is not None:
        heldout_examples = load_examples(eval_data, cfg)
    else:
        n_eval = min(cfg.eval_examples, int(len(examples) * cfg.eval_frac))
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        heldout_examples = [examples[i] for i in perm[:n_eval]]
        examples = [examples[i] for i in sorted(perm[n_eval:])]
    if not examples:
        raise ValueError(f"data: {data} holds no training example")
    from tqdm.auto import tqdm

    bar_off = not (cfg.progress and info.main)
    encoded = [encode_example(tokenizer, ex, cfg) for ex in tqdm(examples, desc="tokenize", disable=bar_off)]
    heldout = [encode_example(tokenizer, ex, cfg) for ex in heldout_examples]

    def count(item: tuple[list[int], int]) -> int:
        return len(pair_positions(len(item[0]), item[1], flow_config)[0])

    counts = [count(item) for item in encoded]
    if cfg.batch_tokens % info.world:
        raise ValueError(f"batch_tokens ({cfg.batch_tokens}) must divide by the number of ranks ({info.world})")
    local_tokens = cfg.batch_tokens // info.world

    policy = _Policy(policy_model, tokenizer, flow_config, info.device)
    if init is not None:
        field, init_config = load_flow_field(init)
        flow_config = init_config or flow_config
    else:
        torch.manual_seed(cfg.seed)
        field = VelocityField(hidden, flow_config.depth, eps=flow_config.eps)
    if field.dim != hidden:
        raise ValueError(f"init: the flow has dim {field.dim} but the policy's hidden size is {hidden}")
    field = field.to(device=info.device, dtype=torch.float32).train()
    if info.world > 1:
        with torch.no_grad():
            for t in field.state_dict().values():
                torch.distributed.broadcast(t, src=0)
    optimizer = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed * 1000003 + info.rank)
    stream = _Stream(encoded, counts, policy, cfg, info)
    fracs = torch.tensor(policy.layer_fracs, dtype=torch.float32, device=info.device)
    heldout_groups, heldout_pairs = _heldout_groups(heldout, [count(item) for item in heldout], cfg, info)
    run = {"model": str(Path(model).resolve()), "flow_config": flow_config.to_dict(),
           **{k: getattr(cfg, k) for k in _RUN_KEYS}}

    start = 0
    ckpt = _latest(out) if cfg.resume else None
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        saved = json.loads(state["run"])
        diff = sorted(k for k in run if saved.get(k) != run[k])
        if diff or state["world"] != info.world:
            raise ValueError(f"cannot resume {ckpt}: it was run with other settings ({diff or 'world size'}); "
                             f"use another out directory or resume=False")
        saved_field, _ = load_flow_field(ckpt / FLOW_NAME)
        field.load_state_dict(saved_field.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        mine = torch.load(ckpt / f"rank{info.rank}.pt", map_location="cpu", weights_only=True)
        generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch"])
        stream.load_state(mine["stream"])
        start = int(state["step"])
    elif info.main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / METRICS_NAME, info, start if ckpt is not None else None)

    if start == 0:
        initial = _heldout(field, policy, heldout_groups, fracs, cfg, info)
        metrics.log({"step": 0, "heldout_loss": initial})
    else:
        initial = json.loads(state["extra"])["heldout_loss_initial"]
    bar = tqdm(total=cfg.steps, initial=start, desc="flow pretrain", disable=bar_off)
    train_loss = float("nan")
    for step in range(start + 1, cfg.steps + 1):
        lr = _lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        targets, conds = stream.take(local_tokens)
        loss = _loss(field, targets, conds, fracs, cfg.repeats, generator, cfg.backend)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if info.world > 1:  # one flattened all-reduce: every rank's batch has the same number of pairs
            grads = [p.grad for p in field.parameters()]
            flat = _all_sum(torch.cat([g.reshape(-1) for g in grads]), info).div_(info.world)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        norm = torch.nn.utils.clip_grad_norm_(field.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        optimizer.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            train_loss = float(_all_sum(loss.detach().double().reshape(1), info)[0]) / info.world
            metrics.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(norm),
                         "tokens": step * cfg.batch_tokens})
            bar.set_postfix(loss=f"{train_loss:.4f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) and step != cfg.steps:
            metrics.log({"step": step, "heldout_loss": _heldout(field, policy, heldout_groups, fracs, cfg, info)})
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
            _save_ckpt(out, step, field, flow_config, optimizer, stream, generator, run,
                       {"heldout_loss_initial": initial}, cfg, info)
    bar.close()
    final = _heldout(field, policy, heldout_groups, fracs, cfg, info)
    metrics.log({"step": cfg.steps, "heldout_loss": final})
    checksum = torch.stack([p.detach().double().sum() for p in field.parameters()]).sum().reshape(1)
    spread = [checksum.clone() for _ in range(info.world)]
    if info.world > 1:
        torch.distributed.all_gather(spread, checksum)
    report = {"model": str(Path(model)), "data": str(Path(data)), "steps": cfg.steps, "world": info.world,
              "tokens_seen": cfg.steps * cfg.batch_tokens, "train_loss_last": train_loss,
              "heldout_loss_initial": initial, "heldout_loss_final": final,
              "heldout_pairs": heldout_pairs,
              "heldout_examples": len(heldout_examples), "train_examples": len(examples),
              "ranks_identical": all(bool(torch.equal(spread[0], s)) for s in spread),
              "layer_fracs": policy.layer_fracs, "flow_config": flow_config.to_dict(),
              "wall_s": round(time.perf_counter() - started, 2), "resumed_from_step": start}
    if info.main:
        report["flow"] = str(save_flow_field(field.cpu(), out / FLOW_NAME, flow_config))
        if cfg.format == "official":
            report["official"] = str(save_flow_field(field.cpu(), out / "official", flow_config, format="official"))
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    _barrier(info)
    if info.owns_group:
        torch.distributed.destroy_process_group()
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as the few lines a user reads before RL."""
    lines = [f"flow pretraining: {report['steps']} steps x {report['tokens_seen'] // max(report['steps'], 1)} "
             f"response tokens on {report['world']} rank(s), {report['wall_s']:.1f} s",
             f"  held-out flow loss: {report['heldout_loss_initial']:.4f} at the start (v = 0) -> "
             f"{report['heldout_loss_final']:.4f} at the end ({report['heldout_examples']} held-out examples)",
             f"  last training loss: {report['train_loss_last']:.4f}; flow identical on every rank: "
             f"{report['ranks_identical']}"]
    for key in ("flow", "official"):
        if key in report:
            lines.append(f"  {key}: {report[key]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def build_parser(prog: str = "flowkern-pretrain") -> argparse.ArgumentParser:
    """The command line of `main`."""
    d = PretrainConfig()
    helps = _field_help()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="directory of a local HF causal LM (and its tokenizer)")
    p.add_argument("--data", required=True, help="JSONL (prompt/response or text), plain text, or a datasets dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--eval-data", help="held-out examples (default: --eval-frac of --data)")
    p.add_argument("--init", help="start from this flow checkpoint instead of a fresh field")
    p.add_argument("--depth", type=int, help="flow depth K (default 4 for D <= 2048, else 6)")
    p.add_argument("--hook-layers", type=float, nargs="+", default=list(FlowConfig.hook_layers),
                   help="depth fractions of the tapped decoder layers (default: %(default)s)")
    p.add_argument("--context-mode", choices=CONTEXT_MODES, default=FlowConfig.context_mode,
                   help="how a target token is paired with its context (default: %(default)s)")
    p.add_argument("--shift", type=int, default=FlowConfig.shift, help="context distance (default: %(default)s)")
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name))
        else:
            p.add_argument(flag, type=type(default), default=default, help=helps.get(f.name),
                           choices={"format": FORMATS, "dtype": (*DTYPES, "model"),
                                    "device": ("auto", "cpu", "cuda")}.get(f.name))
    return p


def _field_help() -> dict[str, str]:
    """Each field's help text, from the ``Attributes:`` section of `PretrainConfig`'s docstring."""
    out: dict[str, str] = {}
    names: list[str] = []
    for line in (PretrainConfig.__doc__ or "").split("Attributes:")[-1].splitlines():
        head, sep, text = line.strip().partition(": ")
        if sep and line.startswith(" " * 8) and not line.startswith(" " * 12) and all(
                n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            out.update({n: text for n in names})
        elif line.strip():
            out.update({n: out[n] + " " + line.strip() for n in names})
    return {k: v.rstrip(".").replace("``", "") + " (default: %(default)s)" for k, v in out.items()}


def main(argv: Optional[Sequence[str]] = None, prog: str = "flowkern-pretrain") -> int:
    """Command-line entry point; returns the exit code (2 for bad arguments)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    try:
        cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        flow_config = {"hook_layers": tuple(args.hook_layers), "context_mode": args.context_mode,
                       "shift": args.shift, **({"depth": args.depth} if args.depth is not None else {})}
        report = pretrain(args.model, args.data, args.out, cfg, flow_config=flow_config, init=args.init,
                          eval_data=args.eval_data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
    return 0
