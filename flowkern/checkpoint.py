"""Loading and saving velocity fields: the released RLFR code's `flow_model.bin`, or flowkern safetensors + JSON.

The official layout (what the released LLaMA-Factory fork writes and its OpenRLHF fork loads with
``strict=True`` into ``FlowReward``) is a torch-pickled state dict whose keys carry a leading ``model.``
and whose sinusoid buffers ``time_embed.freqs`` / ``layer_embed.freqs`` are [1, 128]; its flow config is a
separate JSON (`FlowConfig.from_official`). flowkern keeps the freqs as [128] internally.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .config import FlowConfig
from .field import FREQ_FEATURES, VelocityField

PathLike = Union[str, os.PathLike]
FORMAT_NAME = "flowkern-flow"
FORMAT_VERSION = 1
SAFETENSORS_NAME = "flow.safetensors"
OFFICIAL_NAME = "flow_model.bin"
OFFICIAL_CONFIG_NAME = "flow_config.json"
OFFICIAL_PREFIX = "model."
FORMATS = ("safetensors", "official")
# The sinusoid buffers: [128] in flowkern, [1, 128] in the released module (registered as ``freqs[None]``).
FREQ_KEYS = ("time_embed.freqs", "layer_embed.freqs")
OFFICIAL_FREQ_SHAPE = (1, FREQ_FEATURES // 2)
_BLOCK_KEY = re.compile(r"^res_blocks\.(\d+)\.")


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar next to a safetensors file: ``flow.safetensors`` -> ``flow.json``."""
    return Path(path).with_suffix(".json")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)` into a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_flow_field(field: VelocityField, path: PathLike, config: FlowConfig, *,
                    format: str = "safetensors") -> Path:
    """Save `field` and `config`; returns the weights' path. Every file is written atomically.

    ``format="safetensors"`` (default): safetensors at `path` plus a JSON sidecar ``<stem>.json`` holding
    the whole config, dim, depth and eps; an existing directory gets ``flow.safetensors``.

    ``format="official"``: the released RLFR layout, loadable by its OpenRLHF fork (``FlowReward`` with
    ``strict=True``): a torch pickle at `path` if it ends in ``.bin``, else ``path/flow_model.bin`` (the
    directory is created; the released loader takes that directory), with
    ``model.``-prefixed keys, freqs as [1, 128] and every tensor fp32, plus ``flow_config.json`` beside it
    (`FlowConfig.to_official`: depth, hook layers, context mode, shift). The official files carry neither
    eps (the released code takes the policy's ``rms_norm_eps``) nor the reward settings.
    """
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a flowkern.VelocityField, got {type(field).__name__}")
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a flowkern.FlowConfig, got {type(config).__name__}")
    if config.depth != field.depth:
        raise ValueError(f"config.depth ({config.depth}) differs from the field's depth ({field.depth})")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if format == "official":
        if path.is_dir() or path.suffix != ".bin":  # the released loader looks for flow_model.bin in a directory
            path = path / OFFICIAL_NAME
        state = official_state_dict(field)
        _atomic_write(path, lambda tmp: torch.save(state, tmp))
        _write_json(path.parent / OFFICIAL_CONFIG_NAME, config.to_official())
        return path
    if path.is_dir():
        path = path / SAFETENSORS_NAME
    tensors = {k: v.detach().contiguous().cpu() for k, v in field.state_dict().items()}
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": field.dim, "depth": field.depth,
            "eps": field.eps, "config": config.to_dict()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    _write_json(sidecar_path(path), meta)
    return path


def official_state_dict(field: VelocityField) -> dict[str, torch.Tensor]:
    """`field`'s state dict in the released layout: ``model.`` keys, freqs [1, 128], fp32 CPU tensors."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a flowkern.VelocityField, got {type(field).__name__}")
    out = {}
    for key, value in field.state_dict().items():
        value = value.detach().to(device="cpu", dtype=torch.float32)
        out[OFFICIAL_PREFIX + key] = (value.reshape(OFFICIAL_FREQ_SHAPE) if key in FREQ_KEYS else value).clone()
    return out


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        side = sidecar_path(path)
        return state, json.loads(side.read_text()) if side.exists() else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return dict(state), None


def _listing(keys: list[str], limit: int = 12) -> str:
    """At most `limit` names, then how many more: a whole LLM checkpoint must not flood the message."""
    return str(keys[:limit])[:-1] + (f", ... and {len(keys) - limit} more]" if len(keys) > limit else "]")


def _official_to_flowkern(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Strip ``model.``, flatten [1, 128] freqs; also returns each key's name as given, for messages."""
    out, given = {}, {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r}: expected a str key and a tensor value, "
                             f"got {type(key).__name__} -> {type(value).__name__}")
        name = key[len(OFFICIAL_PREFIX):] if key.startswith(OFFICIAL_PREFIX) else key
        if name in out:
            raise ValueError(f"state dict holds both {given[name]!r} and {key!r}: the same key with and without "
                             f"the {OFFICIAL_PREFIX!r} prefix")
        if name in FREQ_KEYS and tuple(value.shape) == OFFICIAL_FREQ_SHAPE:
            value = value.reshape(-1)
        out[name], given[name] = value, key
    return out, given


def field_from_state_dict(state: Mapping[str, torch.Tensor], eps: float = 1e-6) -> VelocityField:
    """Build a `VelocityField` from a state dict in the official layout.

    Accepts the dicts the released code writes: keys with or without ``model.``, freqs as [1, 128] or
    [128], fp32, fp16 or bf16 tensors (kept in their dtype, freqs included, so the field computes what the
    released module computes with them). dim and depth are inferred from the tensors. Missing,
    unexpected (non-flow) and mis-shaped keys are all named in one ValueError; nothing is zero-initialised.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    state, given = _official_to_flowkern(state)
    if "input_proj.weight" not in state or state["input_proj.weight"].dim() != 2:
        raise ValueError("state dict has no 2-D 'input_proj.weight' (nor 'model.input_proj.weight'), "
                         "so dim cannot be inferred")
    dim = int(state["input_proj.weight"].shape[1])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    if depth < 1:
        raise ValueError("state dict has no 'res_blocks.*' keys, so depth cannot be inferred")
    with torch.device("meta"):
        field = VelocityField(dim, depth, eps=eps)
    expected = {k: tuple(v.shape) for k, v in field.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(given[k] for k in set(state) - set(expected))
    misshaped = sorted(f"{given[k]}: expected {list(OFFICIAL_FREQ_SHAPE) if k in FREQ_KEYS else list(shape)}, "
                       f"got {list(state[k].shape)}"
                       for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape)
    if missing or unexpected or misshaped:
        parts = [f"missing keys {_listing(missing)}" if missing else "",
                 f"unexpected (non-flow) keys {_listing(unexpected)}" if unexpected else "",
                 f"mis-shaped keys [{'; '.join(misshaped)}]" if misshaped else ""]
        raise ValueError(f"flow state dict (dim={dim}, depth={depth}) does not fit: "
                         + ", ".join(p for p in parts if p))
    not_float = sorted(given[k] for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise ValueError(f"flow state dict has non-floating tensors in {not_float}")
    bad = sorted(given[k] for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"flow state dict has NaN or Inf values in {bad}")
    field.load_state_dict(state, assign=True)
    return field


ConfigLike = Union[FlowConfig, str, os.PathLike]


def load_flow_field(path: PathLike, *, config: Optional[ConfigLike] = None, eps: Optional[float] = None
                    ) -> tuple[VelocityField, Optional[FlowConfig]]:
    """Load a velocity field and its `FlowConfig` (None when none is known).

    Args:
        path: an official ``flow_model.bin`` (a torch state dict as the released RLFR code writes it,
            read with ``weights_only=True``), a flowkern ``.safetensors`` file, or a directory holding
            ``flow.safetensors`` or ``flow_model.bin`` (as the released loader takes a directory).
        config: a `FlowConfig`, or the path of a released flow config JSON (`FlowConfig.from_official`).
            Without it, the config comes from the flowkern sidecar JSON, else from an official
            ``flow_config.json`` beside ``flow_model.bin``, else it is None.
        eps: RMSNorm epsilon (the policy's ``rms_norm_eps``); defaults to the sidecar's value, else the
            config's ``eps``, else 1e-6.
    """
    if config is not None and not isinstance(config, (FlowConfig, str, os.PathLike)):
        raise TypeError(f"config must be a flowkern.FlowConfig or the path of an official flow config JSON, "
                        f"got {type(config).__name__}")
    if isinstance(config, (str, os.PathLike)):
        config = FlowConfig.from_official(config)
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
    explicit = config is not None
    if meta is not None:
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{sidecar_path(path)} is not a {FORMAT_NAME} sidecar")
        config = config if explicit else FlowConfig.from_dict(meta["config"])
        eps = meta.get("eps", 1e-6) if eps is None else eps
    elif not explicit and path.suffix != ".safetensors" and (path.parent / OFFICIAL_CONFIG_NAME).exists():
        config = FlowConfig.from_official(path.parent / OFFICIAL_CONFIG_NAME)
    if eps is None:
        eps = config.eps if config is not None else 1e-6
    field = field_from_state_dict(state, eps=eps)
    if meta is not None and (meta.get("dim"), meta.get("depth")) != (field.dim, field.depth):
        raise ValueError(f"{sidecar_path(path)} says dim={meta.get('dim')}, depth={meta.get('depth')} but the "
                         f"weights have dim={field.dim}, depth={field.depth}")
    if config is not None and config.depth != field.depth:
        source = "config" if explicit else f"the config beside {path}"
        raise ValueError(f"{source} has depth {config.depth} but the weights at {path} have {field.depth} "
                         "residual blocks")
    return field, config
