"""Offsets that exceed 2**31 elements: a supplied [J, N, D] noise whose timestep stride times j wraps int32.

The kernels run in Triton's interpreter on CPU, which computes int32 offsets with int32 wrap-around like the
GPU. The noise is a view into a 4 GiB fp16 buffer from `torch.empty`, so only the pages of the rows actually
written and read are ever committed (a few MiB). Run in a child process: before the fix, the wrapped offset
points 4 GiB below the buffer and the read crashes or returns garbage.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import need, subprocess_env

SCRIPT = textwrap.dedent("""
    import torch
    import flowkern as fk
    from flowkern.testing import assert_close
    from helpers import random_field

    D, n, J = 64, 7, 3
    stride = 2**30 + D  # < 2**31, so passed as int32; 2 * stride > 2**31: j = 2 wraps without int64 offsets
    buffer = torch.empty(2 * stride + n * D, dtype=torch.float16)  # 4 GiB reserved, not committed
    noise = buffer.as_strided((J, n, D), (stride, D, 1))
    g = torch.Generator().manual_seed(0)
    for j in range(J):
        noise[j] = torch.randn(n, D, generator=g).half()
    field = random_field(D, 1, dtype=torch.float32, scale=D ** -0.5)
    x1, cond = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    taus = (0.3, 0.6, 0.9)
    got = fk.flow_scores(field, x1, cond, 0.5, timesteps=taus, noise=noise, backend="triton")
    want = fk.flow_scores(field, x1, cond, 0.5, timesteps=taus, noise=noise, backend="torch")
    assert_close(got, want, torch.float32)
    print("ok")
""")


def test_noise_offsets_beyond_int32():
    need("triton")
    if torch.cuda.is_available():
        pytest.skip("runs the interpreter on CPU tensors")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(TRITON_INTERPRET="1", PYTHONPATH=_path()))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-3000:])


def _path() -> str:
    import os

    from helpers import ROOT
    return os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
