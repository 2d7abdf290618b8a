"""`LatentTap`: forward hooks that capture decoder-layer outputs of an HF causal LM."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

# Path components that mark a non-text tower inside multimodal models.
_NON_TEXT = ("vision", "visual", "audio", "image", "encoder")


def layer_index(frac: float, n_layers: int) -> int:
    """Decoder layer index for depth fraction `frac`: ``round(frac * L)`` (Python rounding), at most L-1."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"layer fraction must lie in [0, 1], got {frac}")
    return min(round(frac * n_layers), n_layers - 1)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of text decoder layers of `model` (Llama, Qwen2/3, Mistral, VL wrappers...).

    Candidates are ModuleLists named ``layers`` or ``h`` whose elements are
    ``*DecoderLayer``/``*Block`` modules, outside any vision/audio tower.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        parts = name.lower().split(".")
        if parts[-1] not in ("layers", "h") or any(tag in part for part in parts for tag in _NON_TEXT):
            continue
        kind = type(module[0]).__name__
        if kind.endswith("DecoderLayer") or kind.endswith("Block"):
            candidates.append((name, module))
    if len(candidates) != 1:
        found = [name for name, _ in candidates] or "none"
        raise ValueError(f"could not identify one stack of text decoder layers in {type(model).__name__} "
                         f"(candidates: {found}); pass decoder_layers= explicitly")
    return candidates[0][1]


class LatentTap:
    """Capture the outputs (residual stream after the layer) of chosen decoder layers.

    Usage::

        with LatentTap(model, layers=(0.25, 0.5, 0.75)) as tap:
            model(input_ids=ids, attention_mask=am)
        latents = tap.latents          # list of [B, T, D], in hook order
        fracs = tap.layer_fracs        # index / L of each

    Only the hooked layers' outputs are kept (never ``output_hidden_states``).
    Hooks are removed on exit. Each forward pass replaces the stored latents.

    Args:
        model: an HF causal LM (or any module holding decoder layers).
        layers: depth fractions p; layer ``round(p * L)``, clamped to L-1.
        detach: store detached latents (default), or keep them in the graph.
        decoder_layers: the layer ModuleList, when it cannot be found automatically.
    """

    def __init__(self, model: nn.Module, layers: Sequence[float] = (0.25, 0.5, 0.75), *,
                 detach: bool = True, decoder_layers: Optional[nn.ModuleList] = None):
        self.model = model
        self.decoder_layers = find_decoder_layers(model) if decoder_layers is None else decoder_layers
        n_layers = len(self.decoder_layers)
        fracs = [float(p) for p in layers]
        if not fracs:
            raise ValueError("layers must name at least one depth fraction")
        self.indices = [layer_index(p, n_layers) for p in fracs]
        self.layer_fracs = [i / n_layers for i in self.indices]
        self.detach = detach
        self._captured: list[Optional[torch.Tensor]] = [None] * len(self.indices)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, slot: int):
        def capture(module: nn.Module, args, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(f"decoder layer {self.indices[slot]} returned {type(hidden).__name__}, not a tensor")
            self._captured[slot] = hidden.detach() if self.detach else hidden
        return capture

    def __enter__(self) -> "LatentTap":
        if self._handles:
            raise RuntimeError("LatentTap is already active")
        self._captured = [None] * len(self.indices)
        for slot, idx in enumerate(self.indices):
            self._handles.append(self.decoder_layers[idx].register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent); captured latents stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def latents(self) -> list[torch.Tensor]:
        """Captured [B, T, D] latents, one per hooked layer, in hook order."""
        if any(x is None for x in self._captured):
            raise RuntimeError("LatentTap has captured nothing yet: run a forward pass inside the `with` block")
        return list(self._captured)
