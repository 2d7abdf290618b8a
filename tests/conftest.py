"""Test setup: Triton's CPU interpreter when there is no GPU, the `cuda` marker's auto-skip, a skip summary."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any Triton kernel is defined, i.e. before flowkern.ops is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line counting the skips per reason, so they are explained without ``-rs``."""
    reasons: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        text = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        text = text.removeprefix("Skipped: ")
        reasons[text] = reasons.get(text, 0) + 1
    if reasons:
        terminalreporter.write_line("skip reasons: " + "; ".join(
            f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
