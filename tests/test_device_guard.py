"""Every Triton launch runs under a guard that makes the tensors' device current (not whatever device is)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from helpers import need, random_field

need("triton")
import flowkern as fk  # noqa: E402
from flowkern.ops import _triton, scores  # noqa: E402

D = 32


def _launches_outside_guard(monkeypatch, run):
    """(launches, launches made outside `_triton.device_guard`, devices guarded) while `run()` executes."""
    from triton.runtime.interpreter import InterpretedFunction

    state = {"depth": 0, "launches": 0, "outside": 0, "devices": set()}
    guard = _triton.device_guard

    @contextmanager
    def recording_guard(device):
        state["devices"].add(torch.device(device))
        state["depth"] += 1
        try:
            with guard(device):
                yield
        finally:
            state["depth"] -= 1

    original = InterpretedFunction.run

    def run_kernel(self, *args, **kwargs):
        state["launches"] += 1
        state["outside"] += state["depth"] == 0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_triton, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", run_kernel)
    run()
    monkeypatch.undo()
    return state


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreter launches; the cuda test covers GPUs")
def test_every_launch_is_guarded(monkeypatch):
    field = random_field(D, 1, dtype=torch.float32, scale=D ** -0.5)
    x = torch.randn(9, D)

    def run():
        fk.flow_scores(field, x, x, 0.5, backend="triton")  # seeded
        fk.flow_scores(field, x, x, torch.rand(9), noise=torch.randn(2, 9, D), timesteps=(0.3, 0.7), backend="triton")
        scores.seeded_noise(3, 4, D)
        fk.flow_matching_loss(field, x, x.clone().requires_grad_(), 0.5, backend="triton", input_grad=True).backward()

    state = _launches_outside_guard(monkeypatch, run)
    assert state["launches"] > 20  # scoring, noise, and the training forward and backward all launched
    assert state["outside"] == 0
    assert state["devices"] == {torch.device("cpu")}


def test_guard_makes_the_device_current(monkeypatch):
    """On CUDA the guard is torch.cuda.device(tensor device); on CPU it changes nothing."""
    entered = []

    class FakeDevice:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with _triton.device_guard(torch.device("cuda", 1)):
        pass
    with _triton.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_with_the_first_current():
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    field = random_field(256, 2, dtype=torch.bfloat16, scale=256 ** -0.5).to(dev)
    g = torch.Generator().manual_seed(0)
    x1, cond, noise = (torch.randn(300, 256, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    got = fk.flow_scores(field, x1, cond, 0.5, noise=noise.float(), backend="triton")
    want = fk.flow_scores(field, x1, cond, 0.5, noise=noise.float(), backend="torch")
    assert torch.cuda.current_device() == 0
    assert float((got - want).norm() / want.norm()) < 2e-2
    seeded = fk.flow_scores(field, x1, cond, 0.5, backend="triton", generator=torch.Generator(dev).manual_seed(1))
    assert torch.isfinite(seeded).all() and seeded.device == dev
    loss = fk.flow_matching_loss(field.float(), x1.float(), cond.float(), 0.5, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and loss.device == dev
