"""`FlowConfig`: every hyper-parameter of the flow environment, validated once."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

CONTEXT_MODES = ("token_pre", "token_post", "identity")
NORM_MODES = ("minmax", "minmax-bil", "mean", "none")
# Normalisations whose output is signed, so the threshold and top-k act on both sides.
TWO_SIDED_NORMS = ("minmax-bil", "mean")


@dataclass(frozen=True)
class FlowConfig:
    """Hyper-parameters of RLFR's flow environment (DESIGN.md §1).

    Attributes:
        hook_layers: fractions p of the decoder depth whose outputs are tapped
            (layer index ``round(p * L)``, clamped to ``L - 1``).
        context_mode: how (context, target) pairs are formed from one latent:
            ``token_pre`` (target predicted from a later token), ``token_post``
            (from an earlier token) or ``identity``.
        shift: token distance between context and target.
        depth: number of residual blocks K of the velocity field.
        timesteps: rewarding timesteps τ, each in (0, 1).
        norm: per-sequence normalisation of scores: minmax, minmax-bil, mean or none.
        threshold: η; one-sided norms keep s > η, two-sided ones keep |s| > η.
        topk: number of tokens kept per sequence after the threshold (0 keeps all).
        coef: β; a kept token's reward is ``-β * s``.
        eps: RMSNorm epsilon of the velocity field.
        score_precision: the precision `flow_reward` scores in unless told otherwise (`flowkern.flow.PRECISIONS`:
            auto, fp32, bf16, fp16 or fp8).
    """

    hook_layers: tuple[float, ...] = (0.25, 0.5, 0.75)
    context_mode: str = "token_pre"
    shift: int = 1
    depth: int = 4
    timesteps: tuple[float, ...] = (0.8,)
    norm: str = "minmax-bil"
    threshold: float = 0.6
    topk: int = 15
    coef: float = 0.01
    eps: float = 1e-6
    score_precision: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hook_layers", _float_tuple("hook_layers", self.hook_layers))
        object.__setattr__(self, "timesteps", _float_tuple("timesteps", self.timesteps))
        for p in self.hook_layers:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FlowConfig.hook_layers: every fraction must lie in [0, 1], got {p}")
        for tau in self.timesteps:
            if not 0.0 < tau < 1.0:
                raise ValueError(f"FlowConfig.timesteps: every timestep must lie in (0, 1), got {tau}")
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"FlowConfig.context_mode must be one of {CONTEXT_MODES}, got {self.context_mode!r}")
        if self.norm not in NORM_MODES:
            raise ValueError(f"FlowConfig.norm must be one of {NORM_MODES}, got {self.norm!r}")
        _check_int("shift", self.shift, minimum=0 if self.context_mode == "identity" else 1)
        _check_int("depth", self.depth, minimum=1)
        _check_int("topk", self.topk, minimum=0)
        for name in ("threshold", "coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FlowConfig.{name} must be a finite number, got {value!r}")
        if self.threshold < 0:
            raise ValueError(f"FlowConfig.threshold must be >= 0, got {self.threshold!r}")
        if self.two_sided and self.topk == 1:
            raise ValueError(f"FlowConfig.topk=1 keeps no token with the two-sided norm {self.norm!r} "
                             "(it keeps topk // 2 per side); use 0 or >= 2")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"FlowConfig.eps must be a positive number, got {self.eps!r}")
        from .flow import PRECISIONS  # flow imports this module
        if self.score_precision not in PRECISIONS:
            raise ValueError(f"FlowConfig.score_precision must be one of {PRECISIONS}, got {self.score_precision!r}")

    @property
    def two_sided(self) -> bool:
        """Whether the normalised scores are signed (threshold on |s|, top-k per side)."""
        return self.norm in TWO_SIDED_NORMS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["hook_layers"] = list(self.hook_layers)
        out["timesteps"] = list(self.timesteps)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlowConfig":
        """Inverse of `to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FlowConfig: unknown field(s) {unknown}")
        return cls(**dict(data))

    @classmethod
    def from_official(cls, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]], **overrides: Any
                      ) -> "FlowConfig":
        """A config from the released RLFR code's flow config JSON (e.g. ``config/flow_config_7B.json``).

        Its four keys map as ``num_layers_flow`` -> depth, ``hook_layers_percentile`` (``"0.25+0.5+0.75"``)
        -> hook_layers, ``flow_context_mode`` -> context_mode and ``flow_shift`` (``"1"``) -> shift; all four
        are required. The JSON carries nothing else, so the remaining fields (timesteps, norm, threshold,
        topk, coef, eps: the policy's ``rms_norm_eps``) keep their defaults unless given in `overrides`.
        A missing or unknown key, "+"-joined multiple modes or shifts, and bad values raise a ValueError
        naming the official key.
        """
        data = _read_official(path_or_dict)
        is_path = isinstance(path_or_dict, (str, os.PathLike))
        where = f"official flow config {os.fspath(path_or_dict)}" if is_path else "official flow config"
        missing = sorted(set(_OFFICIAL_KEYS) - set(data))
        unknown = sorted(set(data) - set(_OFFICIAL_KEYS))
        if missing or unknown:
            raise ValueError(f"{where}: " + "; ".join(
                part for part in (f"missing key(s) {missing}" if missing else "",
                                  f"unknown key(s) {unknown} (known: {list(_OFFICIAL_KEYS)})" if unknown else "")
                if part))
        clash = sorted(set(overrides) & set(_OFFICIAL_KEYS.values()))
        if clash:
            raise ValueError(f"FlowConfig.from_official: {clash} come from the official JSON; "
                             "edit the JSON or use dataclasses.replace instead of passing them as overrides")
        depth = data["num_layers_flow"]
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"{where}: num_layers_flow must be a positive integer, got {depth!r}")
        modes = _official_parts(where, "flow_context_mode", data["flow_context_mode"])
        shifts = _official_parts(where, "flow_shift", data["flow_shift"])
        if len(modes) != 1 or len(shifts) != 1:
            raise ValueError(f"{where}: flowkern takes one context mode and one shift, got flow_context_mode="
                             f"{data['flow_context_mode']!r}, flow_shift={data['flow_shift']!r}")
        if modes[0] not in CONTEXT_MODES:
            raise ValueError(f"{where}: flow_context_mode must be one of {CONTEXT_MODES}, got {modes[0]!r}")
        try:
            shift = int(shifts[0])
        except ValueError:
            raise ValueError(f"{where}: flow_shift must be an integer, got {data['flow_shift']!r}") from None
        try:
            hook_layers = tuple(float(p) for p in _official_parts(where, "hook_layers_percentile",
                                                                   data["hook_layers_percentile"]))
        except ValueError:
            raise ValueError(f"{where}: hook_layers_percentile must be '+'-joined fractions such as "
                             f"'0.25+0.5+0.75' (flowkern needs them explicit, not 'all'), "
                             f"got {data['hook_layers_percentile']!r}") from None
        if shift < (0 if modes[0] == "identity" else 1):
            raise ValueError(f"{where}: flow_shift must be >= 1 for {modes[0]!r}, got {data['flow_shift']!r}")
        if not all(0.0 <= p <= 1.0 for p in hook_layers):
            raise ValueError(f"{where}: every hook_layers_percentile must lie in [0, 1], "
                             f"got {data['hook_layers_percentile']!r}")
        return cls(hook_layers=hook_layers, context_mode=modes[0], shift=shift, depth=depth, **overrides)

    def to_official(self) -> dict[str, Any]:
        """The released RLFR code's flow config JSON for this config (inverse of `from_official`).

        Only depth, hook_layers, context_mode and shift have an official key; the other fields are not
        carried (the released trainer takes them on its command line).
        """
        return {"num_layers_flow": self.depth,
                "hook_layers_percentile": "+".join(repr(p) for p in self.hook_layers),
                "flow_context_mode": self.context_mode,
                "flow_shift": str(self.shift)}


def _float_tuple(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"FlowConfig.{name} must be a sequence of numbers, got {value!r}") from None
    if not out:
        raise ValueError(f"FlowConfig.{name} must not be empty")
    return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"FlowConfig.{name} must be an integer >= {minimum}, got {value!r}")


# Keys of the released RLFR flow config JSON and the FlowConfig field each one sets.
_OFFICIAL_KEYS = {"num_layers_flow": "depth", "hook_layers_percentile": "hook_layers",
                  "flow_context_mode": "context_mode", "flow_shift": "shift"}


def _read_official(path_or_dict: Any) -> dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError("FlowConfig.from_official: path_or_dict must be a JSON path or a dict, "
                        f"got {type(path_or_dict).__name__}")
    with open(path_or_dict, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"official flow config {os.fspath(path_or_dict)} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"official flow config {os.fspath(path_or_dict)} must hold a JSON object, "
                         f"got {type(data).__name__}")
    return data


def _official_parts(where: str, key: str, value: Any) -> list[str]:
    """The '+'-joined parts of an official string value (a bare number counts as one part)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [repr(value)]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key} must be a '+'-joined string, got {value!r}")
    return [part.strip() for part in value.split("+")]
