"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from flowkern import VelocityField


def random_field(dim: int, depth: int, seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 0.2
                 ) -> VelocityField:
    """A VelocityField with every parameter random (the default init makes v ≡ 0)."""
    torch.manual_seed(seed)
    field = VelocityField(dim, depth)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, scale if p.dim() > 1 else 0.1)
    return field.to(dtype)
