"""The Triton training path of `flow_matching_loss` against the torch reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
in fp32 and fp16 only (the interpreter's bf16 is wrong); bf16 parity is checked on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowkern as fk
from flowkern import backend as dispatch
from flowkern.testing import assert_close

from helpers import need, random_field

need("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread avoids spinning threads on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(dim: int, repeats: int, mask_kind: str, per_row_layer: bool, dtype: torch.dtype, seed: int = 0,
            batch: int = 3, seq: int = 7):
    """[B, T, D] latents with the t, noise and mask of one call; the mask has an all-empty row."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, seq, dim, generator=g).to(dtype)
    cond = torch.randn(batch, seq, dim, generator=g).to(dtype)
    if mask_kind == "bool":
        mask = torch.rand(batch, seq, generator=g) > 0.3
        mask[1] = False
    elif mask_kind == "float":
        mask = torch.rand(batch, seq, generator=g) * 2
        mask[1] = 0.0
    else:
        mask = None
    t = torch.rand(repeats, batch, seq, generator=g) * 0.98 + 0.01
    noise = torch.randn(repeats, batch, seq, dim, generator=g)
    layer = (torch.randint(0, 3, (batch, seq), generator=g).float() + 1) / 4 if per_row_layer else 0.5
    if repeats == 1:
        t, noise = t[0], noise[0]
    return target, cond, mask, t, noise, layer


def _run(field, target, cond, mask, t, noise, layer, repeats, input_grad, backend, combine):
    """The loss and every gradient after backward of combine(loss)."""
    field.zero_grad(set_to_none=True)
    target = target.clone().to(DEVICE).requires_grad_(input_grad)
    cond = cond.clone().to(DEVICE).requires_grad_(input_grad)

    def to(x):
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x

    loss = fk.flow_matching_loss(field, target, cond, to(layer), to(mask), t=to(t), noise=to(noise), repeats=repeats,
                                 input_grad=input_grad, backend=backend)
    combine(loss).backward()
    grads = {name: p.grad for name, p in field.named_parameters()}
    if input_grad:
        grads["<target>"], grads["<cond>"] = target.grad, cond.grad
    return loss.detach(), grads


CASES = [
    # dtype, depth, dim, repeats, mask, per-row layer, input_grad, combine
    (torch.float32, 1, 16, 1, "bool", False, False, "plain"),
    (torch.float32, 2, 24, 2, "float", True, True, "scaled"),
    (torch.float32, 3, 20, 3, "bool", False, True, "nonlinear"),
    (torch.float32, 2, 33, 1, "none", True, False, "plain"),
    (torch.float16, 1, 24, 2, "float", False, False, "scaled"),
    (torch.float16, 2, 16, 1, "bool", True, True, "plain"),
    (torch.float16, 3, 20, 2, "bool", True, True, "nonlinear"),
]
COMBINE = {
    "plain": lambda loss: loss,
    # the backward must scale by grad_output, never by a factor baked in at forward time
    "scaled": lambda loss: -3.5 * loss,
    "nonlinear": lambda loss: loss + loss ** 2,
}


@pytest.mark.parametrize("dtype,depth,dim,repeats,mask_kind,per_row_layer,input_grad,combine", CASES,
                         ids=[f"{str(c[0])[6:]}-K{c[1]}-D{c[2]}-R{c[3]}-{c[4]}{'-rowlayer' if c[5] else ''}"
                              f"{'-inputgrad' if c[6] else ''}-{c[7]}" for c in CASES])
def test_loss_and_every_gradient_match_torch(dtype, depth, dim, repeats, mask_kind, per_row_layer, input_grad,
                                             combine):
    field = random_field(dim, depth, seed=depth, dtype=dtype).to(DEVICE)
    args = _inputs(dim, repeats, mask_kind, per_row_layer, dtype, seed=dim)
    want_loss, want = _run(field, *args, repeats, input_grad, "torch", COMBINE[combine])
    got_loss, got = _run(field, *args, repeats, input_grad, "triton", COMBINE[combine])
    assert_close(got_loss, want_loss, dtype, "loss")
    assert want.keys() == got.keys()
    for name, expected in want.items():
        assert got[name] is not None, f"triton gave no gradient for {name}"
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert float(expected.float().norm()) > 0, f"degenerate test: zero reference gradient for {name}"
        assert_close(got[name], expected, dtype, name)


def test_fp32_latents_with_an_fp16_field():
    """Targets and contexts keep their own dtype: x1 is read in fp32, its gradient comes back in fp32."""
    field = random_field(24, 2, seed=4, dtype=torch.float16).to(DEVICE)
    args = _inputs(24, 2, "bool", False, torch.float32, seed=4)
    want_loss, want = _run(field, *args, 2, True, "torch", COMBINE["plain"])
    got_loss, got = _run(field, *args, 2, True, "triton", COMBINE["plain"])
    assert_close(got_loss, want_loss, torch.float16, "loss")
    assert got["<target>"].dtype == torch.float32 and got["<cond>"].dtype == torch.float32
    for name, expected in want.items():
        assert_close(got[name], expected, torch.float16, name)


def test_matches_the_float64_rederivation():
    """fp32 triton against tests/reference64.py, independent of the torch backend."""
    import reference64 as ref
    dim, depth, n = 12, 2, 30
    field = random_field(dim, depth, seed=5, dtype=torch.float32).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    x1, c = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    t, noise = torch.rand(1, n, generator=g), torch.randn(1, n, dim, generator=g)
    layer, weights = torch.full((n,), 0.75), (torch.rand(n, generator=g) > 0.2).float()
    loss = fk.flow_matching_loss(field, x1.to(DEVICE), c.to(DEVICE), 0.75, weights.bool().to(DEVICE), t=t[0].to(DEVICE),
                                 noise=noise[0].to(DEVICE), backend="triton")
    state = {k: v.cpu() for k, v in field.state_dict().items()}
    want = ref.fm_loss(state, x1, c, layer, weights, t, noise)
    torch.testing.assert_close(loss.double().cpu(), want.reshape(()), rtol=1e-5, atol=1e-6)


def _noise_from_target_grad(dim: int, n: int, repeats: int, seed: int) -> torch.Tensor:
    """Σ_r ε_r per token, read back through d loss / d x1 of a zero-initialised field at x1 = 0.

    With v ≡ 0 the loss is mean (x1 - ε)², so d loss/d x1 = 2/(D·R·N) · Σ_r (x1 - ε_r).
    """
    field = fk.VelocityField(dim, 1).to(DEVICE)
    x1 = torch.zeros(n, dim, device=DEVICE, requires_grad=True)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    loss = fk.flow_matching_loss(field, x1, torch.randn(n, dim, device=DEVICE), 0.5, repeats=repeats, generator=gen,
                                 input_grad=True, backend="triton")
    loss.backward()
    return -x1.grad * (dim * repeats * n / 2.0)


def test_in_kernel_noise_is_standard_normal_deterministic_and_fresh_per_repeat():
    dim, n = 32, 256
    eps = _noise_from_target_grad(dim, n, 1, seed=7)
    assert abs(float(eps.mean())) < 0.05
    assert abs(float(eps.std()) - 1.0) < 0.05
    assert abs(float((eps ** 4).mean()) - 3.0) < 0.3  # kurtosis of a normal
    assert torch.equal(eps, _noise_from_target_grad(dim, n, 1, seed=7)), "same generator seed, same noise"
    assert not torch.allclose(eps, _noise_from_target_grad(dim, n, 1, seed=8)), "another seed, other noise"
    # no structure across columns or rows
    assert abs(float(torch.corrcoef(torch.stack([eps[:, 0], eps[:, 1]]))[0, 1])) < 0.25
    assert abs(float(torch.corrcoef(torch.stack([eps[0], eps[1]]))[0, 1])) < 0.5
    # repeats draw independent noise: the sum of two has variance 2 (identical draws would give 4)
    two = _noise_from_target_grad(dim, n, 2, seed=7)
    assert abs(float(two.var()) - 2.0) < 0.2


def test_in_kernel_noise_loss_of_a_zero_field_is_one():
    """v ≡ 0 and x1 = 0: the loss is mean ε², ≈ 1, and the torch backend agrees in distribution."""
    dim, n = 32, 512
    field = fk.VelocityField(dim, 2).to(DEVICE)
    zeros = torch.zeros(n, dim, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    loss = fk.flow_matching_loss(field, zeros, zeros, 0.5, repeats=2, generator=gen, backend="triton")
    assert abs(float(loss.detach()) - 1.0) < 0.03


def test_empty_mask_gives_zero_loss_and_finite_zero_gradients():
    dim = 16
    field = random_field(dim, 2, dtype=torch.float32).to(DEVICE)
    x = torch.randn(2, 5, dim, device=DEVICE)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    loss = fk.flow_matching_loss(field, x, x, 0.5, mask, backend="triton")
    assert float(loss.detach()) == 0.0
    (loss * 1e30).backward()  # a huge grad_output must not turn 0 · (1/0) into NaN
    for name, p in field.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_float64_field_uses_the_float64_reference():
    field = random_field(8, 1, dtype=torch.float64).to(DEVICE)
    x = torch.randn(10, 8, dtype=torch.float64, device=DEVICE)
    t, noise = torch.rand(10, dtype=torch.float64, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    got = fk.flow_matching_loss(field, x, x, 0.5, t=t, noise=noise, backend="triton")
    want = fk.flow_matching_loss(field, x, x, 0.5, t=t, noise=noise, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mixed_parameter_dtypes_are_refused():
    field = random_field(8, 1, dtype=torch.float32).to(DEVICE)
    field.final_layer.linear.half()
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="share one dtype"):
        fk.flow_matching_loss(field, x, x, 0.5, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the interpreter switch")
def test_triton_on_cpu_without_the_interpreter_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    field = fk.VelocityField(8, 1)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fk.flow_matching_loss(field, x, x, 0.5, backend="triton")
    assert "triton" not in dispatch.available_backends("flow_matching_loss", torch.device("cpu"))


def _saved_bytes(field, loss_fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters and inputs excluded."""
    skip = {p.untyped_storage().data_ptr() for p in [*field.parameters(), *field.buffers()]}
    skip |= {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(field, *args)
    return sum(kept.values())


def test_saves_at_most_60_percent_of_eager_activations():
    from flowkern.flow import _flow_matching_loss_torch
    from flowkern.ops.fm_loss import flow_matching_loss_triton
    dim, n = 64, 32
    field = random_field(dim, 4, dtype=torch.float16).to(DEVICE)
    x, c = torch.randn(n, dim, device=DEVICE).half(), torch.randn(n, dim, device=DEVICE).half()
    args = (x, c, 0.5, torch.ones(n, device=DEVICE), torch.rand(1, n, device=DEVICE), None, None)
    eager = _saved_bytes(field, _flow_matching_loss_torch, *args)
    fused = _saved_bytes(field, flow_matching_loss_triton, *args)
    assert fused <= 0.6 * eager, (fused, eager)


def _manifold_data(n: int, dim: int, seed: int):
    """A 2-D manifold embedded in `dim` dimensions: the latent (θ, s) drives the target through a fixed
    nonlinear feature map, and the context is a neighbouring point (θ + 0.3) on a second embedding."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g) * 2 * math.pi
    s = torch.rand(n, generator=g) * 2 - 1

    def feats(th):
        return torch.stack([torch.cos(th), torch.sin(th), s, s * torch.cos(th), s * torch.sin(th), torch.cos(2 * th)], -1)

    a, b = torch.randn(6, dim, generator=g), torch.randn(6, dim, generator=g)
    return feats(theta) @ a / math.sqrt(6), feats(theta + 0.3) @ b / math.sqrt(6)


def _train(backend: str, steps: int, dim: int, target, cond, seed: int):
    torch.manual_seed(seed)
    field = fk.VelocityField(dim, 2).to(DEVICE)
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    n = target.shape[0]
    losses = []
    for _ in range(steps):
        t = torch.sigmoid(torch.randn(n, generator=g)).to(DEVICE)
        noise = torch.randn(n, dim, generator=g).to(DEVICE)
        loss = fk.flow_matching_loss(field, target, cond, 0.5, t=t, noise=noise, backend=backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return field, losses


def _eval_loss(field, target, cond, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    n, dim = target.shape[0], target.shape[1]
    t = torch.sigmoid(torch.randn(4, n, generator=g)).to(DEVICE)
    noise = torch.randn(4, n, dim, generator=g).to(DEVICE)
    with torch.no_grad():
        return float(fk.flow_matching_loss(field, target, cond, 0.5, t=t, noise=noise, repeats=4, backend="torch"))


def test_200_adam_steps_on_a_2d_manifold_match_torch():
    dim, n, steps = 32, 64, 200
    target, cond = (x.to(DEVICE) for x in _manifold_data(n, dim, seed=0))
    fields, curves = {}, {}
    for name in ("torch", "triton"):
        fields[name], curves[name] = _train(name, steps, dim, target, cond, seed=1)
    initial = _eval_loss(fk.VelocityField(dim, 2).to(DEVICE), target, cond, seed=2)
    final = {name: _eval_loss(f, target, cond, seed=2) for name, f in fields.items()}
    assert final["triton"] < 0.5 * initial, (initial, final)
    assert abs(final["triton"] - final["torch"]) <= 0.05 * final["torch"], final
    # the training curves agree too (same t and noise at every step)
    assert abs(sum(curves["triton"][-20:]) - sum(curves["torch"][-20:])) <= 0.05 * sum(curves["torch"][-20:])


def test_bench_train_runs_at_toy_size_on_cpu(tmp_path):
    from benchmarks import bench_train
    csv = tmp_path / "train.csv"
    rows = bench_train.main(["--device", "cpu", "--csv", str(csv)])
    assert csv.exists() and csv.read_text().count("\n") == 1 + len(rows)
    assert {r["backend"] for r in rows} >= {"eager", "triton"}
    for row in rows:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["gflop"] > 0
        assert row["max_abs_loss_diff"] < 1e-4


def _low_precision_errors(dtype, depth, dim, seed=3, batch=8, seq=64):
    """Per gradient, the relative error in norm against the fp32 torch backend of the triton backend and of
    the torch backend, both run in `dtype` on the same field, t and noise; and both losses' errors."""
    field = random_field(dim, depth, seed=seed, dtype=torch.float32).to(DEVICE)
    args = _inputs(dim, 2, "bool", True, torch.float32, seed=seed, batch=batch, seq=seq)
    ref_loss, ref = _run(field, *args, 2, True, "torch", COMBINE["scaled"])
    low = field.to(dtype)
    low_args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 3 else a
                     for a in args)
    errors = {}
    for name in ("torch", "triton"):
        loss, grads = _run(low, *low_args, 2, True, name, COMBINE["scaled"])
        errors[name] = {"<loss>": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
        for key, expected in ref.items():
            errors[name][key] = float((grads[key].float() - expected).norm() / expected.norm().clamp_min(1e-30))
    return errors


def test_fp16_is_as_accurate_as_eager_against_fp32():
    errors = _low_precision_errors(torch.float16, 2, 40, batch=4, seq=16)
    for key, eager_err in errors["torch"].items():
        assert errors["triton"][key] <= max(2 * eager_err, 1e-2), (key, errors["triton"][key], eager_err)


@pytest.mark.cuda
@pytest.mark.parametrize("depth,dim", [(2, 96), (3, 200)])
def test_bf16_parity_on_gpu(depth, dim):
    """bf16 triton is as accurate as bf16 eager: against the fp32 reference, its loss and each gradient
    are within twice eager's error (or 1% in norm), and within the bf16 tolerance of eager directly."""
    errors = _low_precision_errors(torch.bfloat16, depth, dim)
    for key, eager_err in errors["torch"].items():
        assert errors["triton"][key] <= max(2 * eager_err, 1e-2), (key, errors["triton"][key], eager_err)
