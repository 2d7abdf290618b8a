"""flowkern.diagnostics on constructed cases with known answers, and FlowConfig.noise_draws."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flowkern import FlowConfig, flow_reward
from flowkern.diagnostics import auroc, diagnose, format_diagnosis, spearman, topk_agreement
from helpers import random_field


def test_auroc_known_values():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5  # ties count one half
    # pairs (1,2) lose, (3,2) win -> 1/2; (2 vs 2) tie
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([2.0, 1.0])) == pytest.approx((1.5 + 2) / 4)
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))


def test_spearman_and_topk_agreement():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    other = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = torch.ones(2, 5, dtype=torch.bool)
    # row 0: top-2 {0, 1} vs {0, 4} -> 1/2; row 1 agrees fully
    assert topk_agreement(scores, other, mask, 2) == pytest.approx(0.75)
    mask[1, 2:] = False  # row 1 now has only 2 tokens: left out
    assert topk_agreement(scores, other, mask, 2) == pytest.approx(0.5)


def _case():
    """4 rollouts x 6 positions: rows 0-1 wrong, 2-3 right; classes 0 = digit, 1 = word; position 0 is prompt."""
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 0] = False
    cls = torch.tensor([[1, 0, 1, 0, 0, 1]] * 4)
    scores = torch.ones(4, 6)
    scores[0, 3] = 5.0  # row 0's first wrong token: a digit at position 3
    scores[1, 4] = 3.0  # row 1's: a digit at position 4
    scores[:, 0] = 100.0  # prompt positions must be ignored
    correct = torch.tensor([False, False, True, True])
    first = torch.tensor([3, 4, -1, -1])
    return scores, mask, cls, correct, first


def test_diagnose_on_a_constructed_case():
    scores, mask, cls, correct, first = _case()
    second = scores.clone()
    second[2, 1] = 7.0  # the second scoring disagrees on one token
    shaped = torch.where(cls == 1, 0.01, 0.0) * mask
    diag = diagnose([scores, scores * 2], mask, correct, first_error=first, token_class=cls,
                    class_names=["digits", "words"], shaped=shaped, rescored=second, layer_names=["a", "b"])
    assert diag["n_rollouts"] == 4 and diag["n_wrong"] == 2 and diag["n_tokens"] == 20
    for stats in (*diag["layers"].values(), diag["mean"]):
        assert stats["seq_auroc"] == 1.0  # every wrong rollout deviates more on average
        assert stats["first_error_tokens"] == 2
        assert stats["first_error_auroc"] == 1.0  # 5 and 3 beat every right digit (all 1)
        assert stats["first_error_ratio"] == pytest.approx(4.0)  # mean(5, 3) / 1
    # the layer average of (s, 2s) is 1.5 s
    assert diag["mean"]["seq_mean_right"] == pytest.approx(1.5)
    rows = {r["class"]: r for r in diag["classes"]}
    assert rows["digits"]["tokens"] == 12 and rows["words"]["tokens"] == 8
    assert rows["words"]["rewarded_share"] == 1.0 and rows["digits"]["rewarded_share"] == 0.0
    assert rows["words"]["mean_reward"] == pytest.approx(0.01)
    assert rows["words"]["mean_score"] == pytest.approx(1.5)
    assert rows["digits"]["mean_score"] == pytest.approx(1.5 * (10 + 5 + 3) / 12)  # ten 1s, the 5 and the 3
    assert 0 < diag["noise"]["spearman_tokens"] < 1
    text = format_diagnosis(diag)
    assert "| layer average | 1.000 | 4.000 | 1.000 | 2 |" in text


def test_diagnose_first_error_compares_within_class():
    scores, mask, cls, correct, first = _case()
    # row 0 errs on a word token (position 2) scoring 2: right words score 1, right digits 10
    scores[0, 3] = 1.0
    scores[0, 2] = 2.0
    scores[2:, 1] = 10.0
    scores[2:, 3] = 10.0
    first[0] = 2
    diag = diagnose(scores, mask, correct, first_error=first, token_class=cls)
    m = diag["mean"]
    # word error (2) beats all 4 right words (1); digit error (3 at row 1) loses to the 10s and beats the 1s:
    # pooled within-class pairs (4 x 1 + 6 x 1/3) / (4 + 6)
    right_digits = torch.tensor([10.0, 10.0, 1.0] * 2)
    expected = (1.0 * 4 + auroc(torch.tensor([3.0]), right_digits) * 6) / 10
    assert expected == pytest.approx(0.6)
    assert m["first_error_auroc"] == pytest.approx(expected)
    assert m["first_error_ratio"] == pytest.approx(2.5 / ((1.0 + right_digits.mean().item()) / 2))


def test_diagnose_validates_its_inputs():
    scores, mask, cls, correct, first = _case()
    with pytest.raises(ValueError, match="action_mask"):
        diagnose(scores, mask.int(), correct)
    with pytest.raises(ValueError, match="scores\\[0\\]"):
        diagnose(scores[:, :3], mask, correct)
    with pytest.raises(ValueError, match="first_error"):
        diagnose(scores, mask, correct, first_error=torch.tensor([9, -1, -1, -1]))
    with pytest.raises(ValueError, match="class_names"):
        diagnose(scores, mask, correct, token_class=cls, class_names=["one"])


def _raw(cfg: FlowConfig) -> FlowConfig:
    return dataclasses.replace(cfg, norm="none", threshold=0.0, topk=0, coef=-1.0)


def test_noise_draws_average_k_single_draws():
    B, T, D, K = 3, 7, 16, 4
    field = random_field(D, 2, dtype=torch.float32)
    torch.manual_seed(1)
    latents = [torch.randn(B, T, D) for _ in range(2)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 2:] = True
    noise = [torch.randn(K, B, T, D) for _ in latents]
    base = _raw(FlowConfig(depth=2))
    fracs = [0.25, 0.5]
    single = [flow_reward(field, latents, mask, base, layer_fracs=fracs, noise=[nz[k] for nz in noise],
                          backend="torch") for k in range(K)]
    averaged = flow_reward(field, latents, mask, dataclasses.replace(base, noise_draws=K), layer_fracs=fracs,
                           noise=noise, backend="torch")
    torch.testing.assert_close(averaged, torch.stack(single).mean(0), rtol=1e-5, atol=1e-6)
    assert bool((averaged[:, 2:-1] > 0).all())  # token_pre: the last token has no context pair
    with pytest.raises(ValueError, match="noise\\[0\\]"):
        flow_reward(field, latents, mask, dataclasses.replace(base, noise_draws=K), layer_fracs=fracs,
                    noise=[nz[0] for nz in noise], backend="torch")


def test_noise_draws_reduce_the_spread_of_scores():
    B, T, D = 4, 12, 16
    field = random_field(D, 2, dtype=torch.float32)
    torch.manual_seed(2)
    latents = [torch.randn(B, T, D)]
    mask = torch.ones(B, T, dtype=torch.bool)

    def score(k, seed):
        gen = torch.Generator().manual_seed(seed)
        return flow_reward(field, latents, mask, _raw(FlowConfig(depth=2, noise_draws=k)), layer_fracs=[0.5],
                           generator=gen, backend="torch")[:, :-1]

    one = torch.stack([score(1, s) for s in range(8)]).std(0).mean()
    sixteen = torch.stack([score(16, s) for s in range(8)]).std(0).mean()
    assert sixteen < one / 2  # the spread of a mean of 16 draws is about a quarter


def test_noise_draws_is_validated():
    with pytest.raises(ValueError, match="noise_draws"):
        FlowConfig(noise_draws=0)
    assert FlowConfig.from_dict(FlowConfig(noise_draws=4).to_dict()).noise_draws == 4
