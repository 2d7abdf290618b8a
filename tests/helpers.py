"""Small builders shared by the tests."""

from __future__ import annotations

import importlib
import os

import pytest
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


REQUIRE_INTEGRATIONS = os.environ.get("FLOWKERN_REQUIRE_INTEGRATIONS") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(name: str):
    """Import `name`, skipping the test where it is absent, unless CI requires the integrations."""
    if REQUIRE_INTEGRATIONS:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def subprocess_env(**extra: str) -> dict:
    """The environment for child Pythons: offline, importing flowkern from this checkout first."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}
