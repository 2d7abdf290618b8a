"""Working with a batch of tapped latents: validation, (context, target) gathering, the flow loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import _checks
from ._device import small_tensor
from .config import FlowConfig
from .field import LayerRows, VelocityField
from .flow import flow_matching_loss, flow_pairs


def check_latents(field: VelocityField, latents: Sequence[torch.Tensor], layer_fracs: Sequence[float],
                  mask: torch.Tensor, mask_name: str = "action_mask", allow_float_mask: bool = False
                  ) -> tuple[list[torch.Tensor], list[float]]:
    """Validate per-layer latents [B, T, D] against `field`, `layer_fracs` and a [B, T] mask.

    Shapes, dtypes and devices only (no host sync): NaN/Inf values are checked by the callers, once.
    Returns the latents as a list and the fractions as floats. Errors name the argument.
    """
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a flowkern.VelocityField, got {type(field).__name__}")
    latents = list(latents)
    if not latents:
        raise ValueError("latents must hold at least one [B, T, D] tensor")
    fracs = [float(f) for f in layer_fracs]
    if len(fracs) != len(latents):
        raise ValueError(f"layer_fracs has {len(fracs)} entries for {len(latents)} latents")
    for i, lat in enumerate(latents):
        _checks.floating(f"latents[{i}]", lat)
        if lat.dim() != 3:
            raise ValueError(f"latents[{i}] must be [B, T, D], got shape {list(lat.shape)}")
        if lat.shape != latents[0].shape:
            raise ValueError(f"latents[{i}] has shape {list(lat.shape)} but latents[0] has {list(latents[0].shape)}")
    B, T, D = latents[0].shape
    if D != field.dim:
        raise ValueError(f"latents have hidden size {D} but the field's dim is {field.dim}")
    _checks.mask(mask_name, mask, (B, T), allow_float=allow_float_mask)
    _checks.same_device(**{mask_name: mask}, **{f"latents[{i}]": lat for i, lat in enumerate(latents)})
    return latents, fracs


@dataclass
class PairIndex:
    """Which (row, position) pairs are used: targets at ``pos``, contexts at ``cond_pos``."""

    rows: torch.Tensor
    pos: torch.Tensor
    cond_pos: torch.Tensor
    selected: torch.Tensor  # [B, T] bool: selected target positions
    dest: torch.Tensor  # flat index into a [B * T + 1] buffer where each pair's result goes (B * T: discard it)
    flagged: bool = False  # the `flag` given to `pair_index` was set (then rows/pos/cond_pos are empty)

    @property
    def n(self) -> int:
        """Number of pairs."""
        return int(self.rows.numel())

    def slice(self, start: int, stop: int) -> "PairIndex":
        """Pairs ``start:stop`` (the `selected` mask is shared, not sliced)."""
        return PairIndex(self.rows[start:stop], self.pos[start:stop], self.cond_pos[start:stop], self.selected,
                         self.dest[start:stop])

    def gather(self, latents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, contexts), each [len(latents) * n, D], stacked layer-major."""
        targets = torch.cat([lat[self.rows, self.pos] for lat in latents])
        conds = torch.cat([lat[self.rows, self.cond_pos] for lat in latents])
        return targets, conds


def context_offset(config: FlowConfig) -> int:
    """Position of a target's context relative to the target (``cond_pos = pos + offset``)."""
    return {"token_pre": config.shift, "token_post": -config.shift, "identity": 0}[config.context_mode]


def selected_pairs(mask: torch.Tensor, config: FlowConfig, seq_len: int) -> torch.Tensor:
    """[B, T] bool: the target positions in `mask` (bool [B, T]) that have a context under `config`."""
    _, _, valid = flow_pairs(torch.empty(1, seq_len, 1, device=mask.device), config.context_mode, config.shift)
    return mask & valid[None]


def pair_index(selected: torch.Tensor, config: FlowConfig, flag: Optional[torch.Tensor] = None, *,
               static: bool = False) -> PairIndex:
    """The pairs of the `selected` target positions ([B, T] bool, from `selected_pairs`).

    Their number is data-dependent, so listing them costs one host sync. A 0-d bool `flag` on the device
    (e.g. "an input holds a NaN") is read back in that same sync: `PairIndex.flagged`.

    ``static=True`` makes no host sync: the list has a fixed size, every position that can have a pair
    (B · (T − |offset|)), the selected pairs first; the rest point at a valid pair for reading and at the
    discard slot B · T of `dest` for writing. The caller then computes those rows too and throws them away.
    """
    flat = selected.reshape(-1)
    size, seq_len = flat.numel(), selected.shape[-1]
    offset = context_offset(config)
    if static:
        if flag is not None:
            raise ValueError("pair_index: a flag is read back by a host sync, which static=True avoids")
        count = (size // seq_len) * max(0, seq_len - abs(offset))
        dest = torch.nonzero_static(flat, size=count, fill_value=size).squeeze(1)
        idx = torch.where(dest < size, dest, max(0, -offset))  # padding reads row 0's first paired position
    else:
        if flag is not None:  # flag set -> size + 1 extra nonzero entries: the count alone tells
            flat = torch.cat([flat, flag.reshape(1).expand(size + 1)])
        idx = dest = flat.nonzero().squeeze(1)  # the host sync
        if idx.numel() > size:
            empty = idx[:0]
            return PairIndex(empty, empty, empty, selected, empty, flagged=True)
    rows, pos = idx // seq_len, idx % seq_len
    return PairIndex(rows, pos, pos + offset, selected, dest)


def latent_flow_loss(field: VelocityField, latents: Sequence[torch.Tensor], mask: torch.Tensor,
                     config: FlowConfig, *, layer_fracs: Sequence[float], repeats: int = 1,
                     generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Flow-matching loss over every paired token of every hooked layer, in one batched call.

    Args:
        field: the velocity field being trained.
        latents: one [B, T, D] tensor per hooked layer (detached policy latents).
        mask: [B, T] bool (tokens to learn from) or non-negative float weights, e.g. 1 for
            correct rollouts and ``soft`` for the others.
        config: gives the context mode and shift.
        layer_fracs: ℓ of each latent.
        repeats: fresh (t, ε) draws per token.
        generator: random source for t and ε.
        backend: "auto", "torch", "triton" or "cuda".

    Returns:
        The scalar fp32 masked mean over tokens, layers and repeats (0 for an empty mask).
    """
    if not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a flowkern.FlowConfig, got {type(config).__name__}")
    latents, fracs = check_latents(field, latents, layer_fracs, mask, "mask", allow_float_mask=True)
    B, T, _ = latents[0].shape
    index = pair_index(selected_pairs(mask != 0, config, T), config)
    targets, conds = index.gather(latents)
    layer = LayerRows(small_tensor(fracs, mask.device),
                      torch.arange(len(fracs), device=mask.device).repeat_interleave(index.n))
    weights = mask[index.rows, index.pos].float().repeat(len(latents))
    loss = flow_matching_loss(field, targets, conds, layer, weights, repeats=repeats, generator=generator,
                              backend=backend, check_finite=False)
    _checks.finite_result("latent_flow_loss", loss.detach(), **{f"latents[{i}]": lat for i, lat in enumerate(latents)})
    return loss
