"""Loading and saving velocity fields: official `flow_model.bin` or flowkern safetensors + JSON."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .config import FlowConfig
from .field import VelocityField

PathLike = Union[str, os.PathLike]
FORMAT_NAME = "flowkern-flow"
FORMAT_VERSION = 1
SAFETENSORS_NAME = "flow.safetensors"
OFFICIAL_NAME = "flow_model.bin"
_BLOCK_KEY = re.compile(r"^res_blocks\.(\d+)\.")


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar next to a safetensors file: ``flow.safetensors`` -> ``flow.json``."""
    return Path(path).with_suffix(".json")


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask.

    `tempfile.mkstemp` creates files with mode 0600; atomic writers chmod their
    temp file to this so outputs are as readable as every other file written.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` into a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())  # after writing: a writer may replace the file (safetensors does)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_flow_field(field: VelocityField, path: PathLike, config: FlowConfig) -> Path:
    """Save `field` as safetensors at `path` plus a JSON sidecar (config, dim, depth, eps).

    Both files are written atomically (temp file, then rename). If `path` is an
    existing directory, the weights go to ``path/flow.safetensors``. Returns the
    weights' path.
    """
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a flowkern.VelocityField, got {type(field).__name__}")
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a flowkern.FlowConfig, got {type(config).__name__}")
    if config.depth != field.depth:
        raise ValueError(f"config.depth ({config.depth}) differs from the field's depth ({field.depth})")
    path = Path(path)
    if path.is_dir():
        path = path / SAFETENSORS_NAME
    tensors = {k: v.detach().contiguous().cpu() for k, v in field.state_dict().items()}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": field.dim, "depth": field.depth,
            "eps": field.eps, "config": config.to_dict()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        side = sidecar_path(path)
        return state, json.loads(side.read_text()) if side.exists() else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return dict(state), None


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def field_from_state_dict(state: Mapping[str, torch.Tensor], eps: float = 1e-6) -> VelocityField:
    """Build a `VelocityField` from a state dict in the official layout (``model.`` prefix optional).

    dim and depth are inferred from the tensors. Missing, unexpected and
    mis-shaped keys are all named in one ValueError; nothing is zero-initialised.
    """
    state = _strip_prefix(state)
    if "input_proj.weight" not in state or state["input_proj.weight"].dim() != 2:
        raise ValueError("state dict has no 2-D 'input_proj.weight', so dim cannot be inferred")
    dim = int(state["input_proj.weight"].shape[1])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    if depth < 1:
        raise ValueError("state dict has no 'res_blocks.*' keys, so depth cannot be inferred")
    with torch.device("meta"):
        field = VelocityField(dim, depth, eps=eps)
    expected = {k: tuple(v.shape) for k, v in field.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: expected {list(shape)}, got {list(state[k].shape)}"
                       for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape)
    if missing or unexpected or misshaped:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"mis-shaped keys [{'; '.join(misshaped)}]" if misshaped else ""]
        raise ValueError(f"flow state dict (dim={dim}, depth={depth}) does not fit: "
                         + ", ".join(p for p in parts if p))
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"flow state dict has NaN or Inf values in {bad}")
    field.load_state_dict(state, assign=True)
    return field


def load_flow_field(path: PathLike, *, eps: Optional[float] = None) -> tuple[VelocityField, Optional[FlowConfig]]:
    """Load a velocity field and, if saved with one, its `FlowConfig`.

    `path` is an official ``flow_model.bin`` (a torch state dict, read with
    ``weights_only=True``), a flowkern ``.safetensors`` file, or a directory
    holding either. Official files carry no config, so the second value is None.

    Args:
        path: file or directory.
        eps: RMSNorm epsilon; defaults to the sidecar's value, else 1e-6.
    """
    path = Path(path)
    if path.is_dir():
        for name in (SAFETENSORS_NAME, OFFICIAL_NAME):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds neither {SAFETENSORS_NAME} nor {OFFICIAL_NAME}")
    if not path.exists():
        raise FileNotFoundError(f"no flow checkpoint at {path}")
    state, meta = _read_state(path)
    config = None
    if meta is not None:
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{sidecar_path(path)} is not a {FORMAT_NAME} sidecar")
        config = FlowConfig.from_dict(meta["config"])
        eps = meta.get("eps", 1e-6) if eps is None else eps
    field = field_from_state_dict(state, eps=1e-6 if eps is None else eps)
    if meta is not None and (meta.get("dim"), meta.get("depth")) != (field.dim, field.depth):
        raise ValueError(f"{sidecar_path(path)} says dim={meta.get('dim')}, depth={meta.get('depth')} but the "
                         f"weights have dim={field.dim}, depth={field.depth}")
    return field, config
