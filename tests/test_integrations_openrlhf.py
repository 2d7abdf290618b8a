"""flowkern.integrations.openrlhf.compute_reward: the RLFR fork's signature with flowkern's shaping (no OpenRLHF needed)."""

from __future__ import annotations

import inspect

import pytest
import torch

from flowkern import FlowConfig
from flowkern.integrations.openrlhf import compute_reward

RLFR_FORK_PARAMS = ["r", "kl_coef", "kl", "flow_coef", "action_score", "action_mask", "num_actions",
                    "reward_clip_range"]


def test_signature_is_the_rlfr_forks():
    params = inspect.signature(compute_reward).parameters
    assert list(params)[:len(RLFR_FORK_PARAMS)] == RLFR_FORK_PARAMS
    assert params["flow_config"].kind is inspect.Parameter.KEYWORD_ONLY


def batch():
    # Row 0: 4 actions then 1 pad; row 1: 5 actions.
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0, -50.0], [5.0, 1.0, 3.0, 2.0, 4.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]])
    r = torch.tensor([1.0, 0.0])
    return r, kl, score, mask


def test_minmax_threshold_by_hand():
    r, kl, score, mask = batch()
    config = FlowConfig(norm="minmax", threshold=0.5, topk=0, coef=123.0)  # coef is replaced by flow_coef
    out = compute_reward(r, 0.1, kl, 0.01, score, mask, flow_config=config)
    # row 0 normalised over its 4 actions: [0, 1/3, 2/3, 1] -> kept > 0.5: [2/3, 1]
    # row 1: [1, 0, 1/2, 1/4, 3/4] -> kept > 0.5: [1, 3/4]
    flow = torch.tensor([[0, 0, -0.01 * 2 / 3, -0.01, 0], [-0.01, 0, 0, 0, -0.0075]])
    outcome = torch.tensor([[0, 0, 0, 1.0, 0], [0, 0, 0, 0, 0.0]])
    torch.testing.assert_close(out, outcome - 0.1 * kl + flow)


def test_bilateral_top_k_by_hand():
    r, kl, score, mask = batch()
    config = FlowConfig(norm="minmax-bil", threshold=0.2, topk=2)
    out = compute_reward(r, 0.0, kl, 0.5, score, mask, flow_config=config)
    # row 0: 2*[0, 1/3, 2/3, 1] - 1 = [-1, -1/3, 1/3, 1]; |s| > 0.2 all; top-1 per side: -1 and 1
    # row 1: 2*[1, 0, 1/2, 1/4, 3/4] - 1 = [1, -1, 0, -1/2, 1/2]; top-1 per side: 1 (pos 0) and -1 (pos 1)
    expected = torch.tensor([[0.5, 0, 0, -0.5 + 1.0, 0], [-0.5, 0.5, 0, 0, 0]])
    torch.testing.assert_close(out, expected)


def test_scores_off_the_action_mask_are_ignored():
    r, kl, score, mask = batch()
    config = FlowConfig(norm="minmax", threshold=0.0, topk=0)
    a = compute_reward(r, 0.1, kl, 0.01, score, mask, flow_config=config)
    moved = score.clone()
    moved[0, 4] = 1e6
    b = compute_reward(r, 0.1, kl, 0.01, moved, mask, flow_config=config)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_flow_it_is_openrlhfs_compute_reward():
    r, kl, _, mask = batch()
    out = compute_reward(r, 0.2, kl, None, None, mask)
    assert torch.equal(compute_reward(r, 0.2, kl, 0.0, None, mask), out)
    expected = -0.2 * kl
    expected[0, 3] += 1.0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compute_reward(r, -1.0, kl, None, None, mask), expected + 0.2 * kl)
    clipped = compute_reward(torch.tensor([5.0, -5.0]), 0.0, kl, None, None, mask, reward_clip_range=(-1.0, 2.0))
    assert clipped[0, 3] == 2.0 and clipped[1, 4] == -1.0


def test_packed_samples_match_the_batched_layout():
    r, kl, score, mask = batch()
    config = FlowConfig(norm="mean", threshold=0.1, topk=2)
    batched = compute_reward(r, 0.1, kl, 0.02, score, mask, flow_config=config)
    lengths = [4, 5]
    packed = compute_reward(r, 0.1, [kl[i, :n] for i, n in enumerate(lengths)], 0.02,
                            [score[i, :n] for i, n in enumerate(lengths)], None, lengths, flow_config=config)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(packed[i], batched[i, :n])


def test_bad_input_is_refused_with_the_argument_named():
    r, kl, score, mask = batch()
    config = FlowConfig()
    with pytest.raises(ValueError, match="flow_config is missing"):
        compute_reward(r, 0.1, kl, 0.01, score, mask)
    with pytest.raises(ValueError, match="action_score is required"):
        compute_reward(r, 0.1, kl, 0.01, None, mask, flow_config=config)
    with pytest.raises(ValueError, match="action_score must have the shape .* misaligned"):
        compute_reward(r, 0.1, kl, 0.01, score[:, :-1], mask, flow_config=config)
    with pytest.raises(ValueError, match="action_mask must have shape"):
        compute_reward(r, 0.1, kl, 0.01, score, mask[:, :-1], flow_config=config)
    with pytest.raises(ValueError, match="action_mask must hold only 0 and 1"):
        compute_reward(r, 0.1, kl, 0.01, score, mask.long() * 2, flow_config=config)
    with pytest.raises(ValueError, match="action_mask has no action token"):
        compute_reward(r, 0.1, kl, 0.01, score, torch.zeros_like(mask), flow_config=config)
    with pytest.raises(TypeError, match="flow_config must be a flowkern.FlowConfig"):
        compute_reward(r, 0.1, kl, 0.01, score, mask, flow_config={"norm": "minmax"})
    with pytest.raises(ValueError, match=r"action_score\[1\] has shape"):
        compute_reward(r, 0.1, [kl[0, :4], kl[1]], 0.01, [score[0, :4], score[1, :3]], None, [4, 5],
                       flow_config=config)
