"""`FlowConfig`: every hyper-parameter of the flow environment, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

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
        noise_draws: K independent noise draws ε per scored token, averaged (1 is the
            paper's single-draw estimate). The draws are batched as K times the rows
            of one scoring call, not K calls.
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
    noise_draws: int = 1

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
        _check_int("noise_draws", self.noise_draws, minimum=1)
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
