"""`precision` of flow_scores / flow_reward: the dtype the field is scored in, through a cached cast copy."""

from __future__ import annotations

import pytest
import torch

from helpers import need, random_field

import flowkern as fk
from flowkern import flow
from flowkern.testing import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D = 32


def _setup(n: int = 19, dtype: torch.dtype = torch.float32):
    field = random_field(D, 2, seed=1, dtype=dtype, scale=D ** -0.5).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x1, cond, noise = (torch.randn(n, D, generator=g).to(DEVICE) for _ in range(3))
    return field, x1, cond, noise


def test_precisions_are_defined_once():
    assert flow.PRECISIONS[0] == "auto" and set(flow.PRECISIONS[1:]) == set(flow.PRECISION_DTYPES) | {"fp8"}
    field, x1, cond, _ = _setup()
    with pytest.raises(ValueError, match="precision must be one of"):
        fk.flow_scores(field, x1, cond, 0.5, precision="int8")
    latents = [torch.randn(2, 5, D, device=DEVICE)]
    with pytest.raises(ValueError, match="precision must be one of"):
        fk.flow_reward(field, latents, torch.ones(2, 5, dtype=torch.bool, device=DEVICE), fk.FlowConfig(),
                       layer_fracs=[0.5], precision="fp64")


def test_auto_precision_rule():
    field = random_field(D, 1, dtype=torch.float32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert flow.scoring_dtype(field, "auto", cpu) == torch.float32
    assert flow.scoring_dtype(field, "auto", cuda) == torch.bfloat16  # fp32 field on CUDA: bf16 copy
    assert flow.scoring_dtype(field.half(), "auto", cuda) == torch.float16
    assert flow.scoring_dtype(field.double(), "auto", cuda) == torch.float64
    assert flow.scoring_dtype(field, "fp16", cuda) == torch.float16
    assert flow.scoring_dtype(field.bfloat16(), "fp32", cpu) == torch.float32


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_torch_path_scores_as_the_cast_field(precision, dtype):
    """precision="bf16" on an fp32 field gives exactly the scores of field.to(bf16); "fp32" those of the field."""
    field, x1, cond, noise = _setup()
    got = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision=precision, backend="torch")
    want = fk.flow_scores(_copy(field).to(dtype), x1, cond, 0.5, noise=noise,
                          backend="torch")
    assert torch.equal(got, want)
    full = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision="fp32", backend="torch")
    assert not torch.equal(got, full)  # the precision really changed the arithmetic
    assert_close(got, full, dtype)


def _copy(field):
    clone = random_field(D, 2, seed=99, dtype=torch.float32).to(DEVICE)
    clone.load_state_dict(field.state_dict())
    return clone


def test_cast_copy_is_cached_and_refreshed_after_an_optimizer_step():
    field, x1, cond, noise = _setup()
    copy = flow.cast_field(field, torch.float16)
    assert copy is flow.cast_field(field, torch.float16)  # cached
    assert flow.cast_field(field, torch.float32) is field  # no copy in the field's own dtype
    assert all(not p.requires_grad for p in copy.parameters())
    before = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision="fp16", backend="torch")
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    fk.flow_matching_loss(field, x1, cond, 0.5, backend="torch").backward()
    opt.step()
    assert flow.cast_field(field, torch.float16) is copy  # refreshed in place, not rebuilt
    after = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision="fp16", backend="torch")
    fresh = fk.flow_scores(_copy(field).half(), x1, cond, 0.5, noise=noise, backend="torch")
    assert torch.equal(after, fresh) and not torch.equal(after, before)
    with torch.no_grad():  # load_state_dict / copy_ under no_grad bump the version counters too
        field.input_proj.weight.copy_(torch.zeros_like(field.input_proj.weight))
    assert torch.equal(copy.input_proj.weight, torch.zeros_like(copy.input_proj.weight)) is False
    flow.cast_field(field, torch.float16)
    assert torch.equal(copy.input_proj.weight, torch.zeros_like(copy.input_proj.weight))


def test_reward_honours_precision():
    field, _, _, _ = _setup()
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(2, 9, D, generator=g).to(DEVICE) for _ in range(2)]
    noise = [torch.randn(2, 9, D, generator=g).to(DEVICE) for _ in range(2)]
    action = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    cfg = fk.FlowConfig(norm="none", threshold=0.0, topk=0, coef=1.0)
    kw = dict(layer_fracs=(0.25, 0.75), noise=noise, backend="torch")
    half = fk.flow_reward(field, latents, action, cfg, precision="fp16", **kw)
    assert torch.equal(half, fk.flow_reward(_copy(field).half(), latents, action, cfg, **kw))
    assert not torch.equal(half, fk.flow_reward(field, latents, action, cfg, precision="fp32", **kw))


def test_triton_path_scores_an_fp32_field_through_its_fp16_copy():
    """The fused kernels see the cast copy: an fp32 field at precision="fp16" matches the fp16 reference."""
    need("triton")
    field, x1, cond, noise = _setup(n=21)
    got = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision="fp16", backend="triton")
    want = fk.flow_scores(_copy(field).half(), x1, cond, 0.5, noise=noise, backend="torch")
    assert_close(got, want, torch.float16)
    full = fk.flow_scores(field, x1, cond, 0.5, noise=noise, precision="fp32", backend="torch")
    assert (got - want).abs().max() < (got - full).abs().max()  # closer to the fp16 reference than to fp32


@pytest.mark.cuda
def test_auto_precision_on_cuda_uses_bf16_for_fp32_fields():
    field, x1, cond, noise = _setup(n=300)
    got = fk.flow_scores(field, x1, cond, 0.5, noise=noise, backend="triton")
    want = fk.flow_scores(_copy(field).bfloat16(), x1, cond, 0.5, noise=noise, backend="torch")
    assert_close(got, want, torch.bfloat16)
    assert flow.cast_field(field, torch.bfloat16) is flow.cast_field(field, torch.bfloat16)
