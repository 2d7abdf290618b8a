"""The verl integration against the real verl: the grpo_flow estimator through verl's own compute_advantage on a
DataProto, and FlowRewardHook on a tiny HF model in verl's padded layout.

Skipped without verl, except under FLOWKERN_REQUIRE_INTEGRATIONS=1 (CI), where a missing verl fails.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import need, subprocess_env

from flowkern import FlowConfig, LatentTap, VelocityField, flow_reward, shape_advantages

HIDDEN = 32


@pytest.fixture(scope="module")
def verl_integration():
    need("verl")
    from flowkern.integrations import verl as integration

    integration.register()
    return integration


def test_missing_verl_raises_import_error_naming_the_extra():
    done = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['verl'] = None\n"
                           "try:\n    import flowkern.integrations.verl\nexcept ImportError as e:\n    print(e)\n"
                           "else:\n    print('imported')"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert "pip install flowkern[verl]" in done.stdout


# --------------------------------------------------------------------------- estimator

def test_registered_estimator_is_ours(verl_integration):
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    assert get_adv_estimator_fn("grpo_flow") is verl_integration.compute_grpo_flow_advantage
    assert verl_integration.register() is verl_integration.compute_grpo_flow_advantage  # idempotent


def rollout_batch(seed: int = 0):
    """uids shuffled, groups of 4, 4 and 3, right-padded responses; outcome on the last response token."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 3, dtype=object)
    B, R = len(uids), 7
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    lengths[0] = R
    mask = torch.arange(R)[None] < lengths[:, None]
    flow = torch.randn(B, R, generator=g) * 0.01 * (torch.rand(B, R, generator=g) < 0.5)
    flow = flow.masked_fill(~mask, 0.0)
    last = lengths - 1
    flow[torch.arange(B), last] = 0.0
    outcome = torch.randint(0, 2, (B,), generator=g).float()
    outcome[8:] = torch.tensor([1.0, 0.0, 1.0])
    scores = flow.clone()
    scores[torch.arange(B), last] = outcome
    perm = torch.randperm(B, generator=g)
    return uids[perm.numpy()], scores[perm], mask[perm].long(), outcome[perm], flow[perm]


def data_proto(uids, scores, mask):
    from verl import DataProto

    return DataProto.from_dict(tensors={"token_level_rewards": scores, "response_mask": mask},
                               non_tensors={"uid": uids})


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_verl_compute_advantage_equals_shape_advantages(verl_integration, gamma):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    uids, scores, mask, outcome, flow = rollout_batch()
    data = compute_advantage(data_proto(uids, scores, mask), adv_estimator="grpo_flow", num_repeat=4,
                             config=AlgoConfig(gamma=gamma, adv_estimator="grpo_flow"))
    advantages = data.batch["advantages"]
    assert advantages.shape == scores.shape
    assert torch.equal(data.batch["returns"], advantages)
    seen = 0
    for uid in sorted(set(uids)):
        rows = torch.tensor([i for i, u in enumerate(uids) if u == uid])
        expected = shape_advantages(outcome[rows], flow[rows], mask[rows].bool(), len(rows), gamma)
        torch.testing.assert_close(advantages[rows], expected, rtol=1e-6, atol=1e-7)
        seen += len(rows)
    assert seen == len(uids)
    assert bool((flow != 0).any()) and bool((advantages != 0).any())


def test_without_flow_rewards_grpo_flow_equals_verl_grpo(verl_integration):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    uids, scores, mask, outcome, flow = rollout_batch(seed=1)
    outcome_only = scores - flow
    ours = compute_advantage(data_proto(uids, outcome_only.clone(), mask), adv_estimator="grpo_flow",
                             config=AlgoConfig(adv_estimator="grpo_flow")).batch["advantages"]
    theirs = compute_advantage(data_proto(uids, outcome_only.clone(), mask), adv_estimator="grpo",
                               config=AlgoConfig(adv_estimator="grpo")).batch["advantages"]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_estimator_refuses_misaligned_rewards_and_dr_grpo(verl_integration):
    uids, scores, mask, _, _ = rollout_batch()
    fn = verl_integration.compute_grpo_flow_advantage
    short = mask.argmin(dim=1).nonzero()[:, 0]  # a row with padding
    bad = scores.clone()
    row = int(short[0])
    bad[row, -1] = 0.5
    with pytest.raises(ValueError, match="outside response_mask"):
        fn(bad, mask, index=uids)
    with pytest.raises(ValueError, match="response_mask must have shape"):
        fn(scores, mask[:, :-1], index=uids)
    with pytest.raises(ValueError, match="index has"):
        fn(scores, mask, index=uids[:-1])
    with pytest.raises(ValueError, match=r"gamma=0.9 was passed but the config \(algorithm.gamma\) says 1.0"):
        fn(scores, mask, index=uids, config={"gamma": 1.0}, gamma=0.9)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo=False was passed"):
        fn(scores, mask, index=uids, config={"norm_adv_by_std_in_grpo": True}, norm_adv_by_std_in_grpo=False)
    flow = torch.zeros_like(scores)
    flow[row, -1] = 0.1
    with pytest.raises(ValueError, match="flow_token_rewards has non-zero values outside response_mask"):
        fn(scores, mask, index=uids, flow_token_rewards=flow)


def separate_batch(seed: int = 0):
    """The separate layout: outcome in token_level_rewards, flow rewards (last token included) under their key."""
    uids, scores, mask, outcome, flow = rollout_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    last = mask.sum(1) - 1
    flow[torch.arange(len(uids)), last] = torch.randn(len(uids), generator=g) * 0.01  # a flow reward on the last token
    on_last = torch.zeros(mask.shape)
    on_last[torch.arange(len(uids)), last] = outcome
    return uids, on_last, mask, outcome, flow


def proto(tensors, uids):
    from verl import DataProto

    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids})


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_separate_key_makes_both_layout_mistakes_impossible(verl_integration, gamma):
    """Through verl 0.9.1's own compute_advantage (as RayPPOTrainer.fit calls it): a flow reward on the last
    response token stays a flow reward, and an outcome on the first response token is still the outcome."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import ray_trainer

    uids, on_last, mask, outcome, flow = separate_batch()
    on_first = torch.zeros(mask.shape)
    on_first[:, 0] = outcome
    key = verl_integration.FLOW_REWARDS_KEY
    config = AlgoConfig(gamma=gamma, adv_estimator="grpo_flow")
    results = []
    for rewards in (on_last, on_first):
        data = proto({"token_level_rewards": rewards, "response_mask": mask, key: flow.clone()}, uids)
        data = ray_trainer.compute_advantage(data, adv_estimator="grpo_flow", gamma=gamma, num_repeat=4,
                                             config=config)
        results.append(data.batch["advantages"])
    assert torch.equal(results[0], results[1])
    for uid in sorted(set(uids)):
        rows = torch.tensor([i for i, u in enumerate(uids) if u == uid])
        expected = shape_advantages(outcome[rows], flow[rows], mask[rows].bool(), len(rows), gamma)
        torch.testing.assert_close(results[0][rows], expected, rtol=1e-6, atol=1e-7)
    # Without flow rewards, the outcome part is verl's own grpo advantage.
    data = proto({"token_level_rewards": on_first, "response_mask": mask, key: torch.zeros_like(flow)}, uids)
    ours = ray_trainer.compute_advantage(data, adv_estimator="grpo_flow", config=config).batch["advantages"]
    multi = torch.tensor([list(uids).count(u) > 1 for u in uids])
    theirs = ray_trainer.compute_advantage(proto({"token_level_rewards": on_first, "response_mask": mask}, uids),
                                           adv_estimator="grpo", config=AlgoConfig()).batch["advantages"]
    torch.testing.assert_close(ours[multi], theirs[multi].float(), rtol=1e-5, atol=1e-6)


def test_mixed_layout_cannot_see_the_mistakes_the_separate_key_prevents(verl_integration):
    """What the README says of the fallback: both mistakes pass silently there (they are not detectable)."""
    uids, on_last, mask, outcome, flow = separate_batch(seed=2)
    fn = verl_integration.compute_grpo_flow_advantage
    right, _ = fn(on_last, mask, index=uids, flow_token_rewards=flow)
    mixed, _ = fn(on_last + flow, mask, index=uids)  # the last token's flow reward is added into the outcome
    assert not torch.allclose(mixed, right)
    on_first = torch.zeros(mask.shape)
    on_first[:, 0] = outcome
    mixed, _ = fn(on_first, mask, index=uids)  # read as a flow reward on token 0, outcome 0
    assert not torch.allclose(mixed, fn(on_last, mask, index=uids)[0])


def test_gamma_and_norm_arguments_are_honoured(verl_integration):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import ray_trainer

    uids, on_last, mask, outcome, flow = separate_batch(seed=3)
    key = verl_integration.FLOW_REWARDS_KEY
    data = proto({"token_level_rewards": on_last, "response_mask": mask, key: flow}, uids)
    got = ray_trainer.compute_advantage(data, adv_estimator="grpo_flow", gamma=0.5).batch["advantages"]
    rows = torch.tensor([i for i, u in enumerate(uids) if u == "a"])
    torch.testing.assert_close(got[rows], shape_advantages(outcome[rows], flow[rows], mask[rows].bool(), 4, 0.5))
    with pytest.raises(ValueError, match="gamma=0.5 was passed"):
        ray_trainer.compute_advantage(data, adv_estimator="grpo_flow", gamma=0.5, config=AlgoConfig(gamma=1.0))
    # norm_adv_by_std_in_grpo=False (Dr. GRPO): without flow rewards it equals verl's grpo with the same switch.
    zero = torch.zeros_like(flow)
    ours = ray_trainer.compute_advantage(proto({"token_level_rewards": on_last, "response_mask": mask, key: zero}, uids),
                                         adv_estimator="grpo_flow", norm_adv_by_std_in_grpo=False,
                                         config=AlgoConfig(norm_adv_by_std_in_grpo=False)).batch["advantages"]
    theirs = ray_trainer.compute_advantage(proto({"token_level_rewards": on_last, "response_mask": mask}, uids),
                                           adv_estimator="grpo", norm_adv_by_std_in_grpo=False).batch["advantages"]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_one_rollout_group_differs_from_verl_grpo(verl_integration):
    """Documented difference: a group of one gets Â = 0 here, its raw score in verl's grpo."""
    from verl.trainer.ppo import ray_trainer

    mask = torch.ones(1, 3, dtype=torch.long)
    rewards = torch.tensor([[0.0, 0.0, 0.7]])
    key = verl_integration.FLOW_REWARDS_KEY
    ours = ray_trainer.compute_advantage(proto({"token_level_rewards": rewards, "response_mask": mask,
                                                key: torch.zeros(1, 3)}, np.array(["x"], dtype=object)),
                                         adv_estimator="grpo_flow").batch["advantages"]
    theirs = ray_trainer.compute_advantage(proto({"token_level_rewards": rewards, "response_mask": mask},
                                                 np.array(["x"], dtype=object)), adv_estimator="grpo").batch["advantages"]
    assert torch.equal(ours, torch.zeros(1, 3))
    torch.testing.assert_close(theirs.float(), torch.full((1, 3), 0.7))


# --------------------------------------------------------------------------- FlowRewardHook

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def random_field(depth: int, seed: int = 0) -> VelocityField:
    torch.manual_seed(seed)
    field = VelocityField(HIDDEN, depth)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.1)
    return field


def verl_batch(prompt_lens, response_lens, P=5, R=6, seed=0):
    """verl's layout: left-padded prompts then right-padded responses, verl-style position ids."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompts[i, P - p:] = torch.randint(3, 64, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        responses[i, :r] = torch.randint(3, 64, (r,), generator=g)
        response_mask[i, :r] = 1
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return input_ids, attention_mask, responses, response_mask, position_ids


CONFIGS = {
    "paper": FlowConfig(depth=2, norm="minmax-bil", threshold=0.2, topk=4, coef=0.05),
    "token_post": FlowConfig(depth=2, context_mode="token_post", norm="minmax", threshold=0.0, topk=0, coef=0.05),
}


@pytest.mark.parametrize("layout", ["separate", "mixed"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hook_aligns_rewards_to_verl_response_layout(verl_integration, name, layout):
    config = CONFIGS[name]
    model = tiny_llama()
    field = random_field(config.depth)
    hook = verl_integration.FlowRewardHook(model, field, config, micro_batch_size=2, layout=layout)
    prompt_lens, response_lens = [3, 5, 1, 4], [6, 4, 2, 1]
    input_ids, attention_mask, responses, response_mask, position_ids = verl_batch(prompt_lens, response_lens)
    B, L = input_ids.shape
    R = responses.shape[1]
    noise = [torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(10 + i))
             for i in range(len(config.hook_layers))]
    rewards = hook.flow_rewards(input_ids, attention_mask, responses, response_mask, position_ids=position_ids,
                                noise=noise)
    assert rewards.shape == (B, R) and rewards.dtype == torch.float32
    assert not bool(rewards[response_mask == 0].any())
    last = torch.tensor(response_lens) - 1
    if layout == "mixed":
        assert not bool(rewards[torch.arange(B), last].any()), "a flow reward sits on the outcome's token"
    assert bool((rewards != 0).any())

    # Reference: each row alone, without padding, through the core flow_reward.
    for i in range(B):
        keep = attention_mask[i].bool()
        ids = input_ids[i, keep][None]
        n_prompt, n_resp = prompt_lens[i], response_lens[i]
        with torch.no_grad(), LatentTap(model, config.hook_layers) as tap:
            model(input_ids=ids)
        action = torch.zeros(1, ids.shape[1], dtype=torch.bool)
        action[0, n_prompt:n_prompt + n_resp - (layout == "mixed")] = True  # mixed: every response token but the last
        row = flow_reward(field, tap.latents, action, config, layer_fracs=tap.layer_fracs,
                          noise=[nz[i, keep][None] for nz in noise])[0, n_prompt:]
        expected = torch.zeros(R)
        expected[:n_resp] = row
        torch.testing.assert_close(rewards[i], expected, rtol=1e-4, atol=1e-6, msg=f"row {i}")


def test_hook_reads_a_verl_dataproto(verl_integration):
    from verl import DataProto

    config = CONFIGS["paper"]
    model = tiny_llama()
    input_ids, attention_mask, responses, response_mask, position_ids = verl_batch([2, 4], [5, 3])
    data = DataProto.from_dict(tensors={"input_ids": input_ids, "attention_mask": attention_mask,
                                        "responses": responses, "response_mask": response_mask,
                                        "position_ids": position_ids})
    hook = verl_integration.FlowRewardHook(model, random_field(config.depth), config, seed=3)
    from_data = hook(data)
    again = verl_integration.FlowRewardHook(model, random_field(config.depth), config, seed=3)
    direct = again.flow_rewards(input_ids, attention_mask, responses, response_mask, position_ids=position_ids)
    torch.testing.assert_close(from_data, direct, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["separate", "mixed"])
def test_hook_rewards_plus_outcome_feed_the_estimator(verl_integration, layout):
    config = CONFIGS["token_post"]  # the last response token has a context, so it gets a score
    hook = verl_integration.FlowRewardHook(tiny_llama(), random_field(config.depth), config, layout=layout)
    input_ids, attention_mask, responses, response_mask, position_ids = verl_batch([2, 4, 3, 5], [6, 3, 5, 2])
    flow = hook.flow_rewards(input_ids, attention_mask, responses, response_mask, position_ids=position_ids)
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0])
    scores = torch.zeros_like(flow)
    scores[torch.arange(4), response_mask.sum(1) - 1] = outcome  # verl's reward manager: the last response token
    if layout == "separate":
        assert bool(flow[torch.arange(4), response_mask.sum(1) - 1].any())
        adv, _ = verl_integration.compute_grpo_flow_advantage(scores, response_mask, index=["u"] * 4,
                                                              flow_token_rewards=flow)
    else:
        adv, _ = verl_integration.compute_grpo_flow_advantage(scores + flow, response_mask, index=["u"] * 4)
    torch.testing.assert_close(adv, shape_advantages(outcome, flow, response_mask.bool(), 4))


def test_hook_checkpoint_resumes_exactly(verl_integration, tmp_path):
    """Two rollout steps straight, or one, a checkpoint, a fresh hook and the second: the same flow, bit for bit."""
    config = CONFIGS["paper"]
    model = tiny_llama()
    batches = [verl_batch([2, 4, 3], [6, 3, 5], seed=s) for s in (0, 1)]
    correct = torch.tensor([True, False, True])

    def step(hook, batch):
        rewards, latents = hook.flow_rewards(*batch[:4], position_ids=batch[4], return_latents=True)
        hook.update_flow(*batch[:4], correct, latents=latents)
        return rewards

    def new_hook():
        return verl_integration.FlowRewardHook(model, random_field(config.depth), config, lr=1e-2, seed=5,
                                               max_tokens=4)

    whole = new_hook()
    straight = [step(whole, b) for b in batches]
    first = new_hook()
    step(first, batches[0])
    first.save_checkpoint(tmp_path, rank=0)
    resumed = new_hook()
    resumed.load_checkpoint(tmp_path, rank=0)
    assert torch.equal(step(resumed, batches[1]), straight[1])
    for key, value in whole.field.state_dict().items():
        assert torch.equal(resumed.field.state_dict()[key], value), key


def test_update_flow_trains_on_correct_rollouts_only(verl_integration):
    config = CONFIGS["paper"]
    model = tiny_llama()
    hook = verl_integration.FlowRewardHook(model, random_field(config.depth), config, lr=1e-2)
    batch = verl_batch([2, 4, 3], [6, 3, 5])
    before = {k: v.clone() for k, v in hook.field.state_dict().items()}
    assert hook.update_flow(*batch[:4], torch.tensor([False, False, False]), position_ids=batch[4]) is None
    assert all(torch.equal(before[k], v) for k, v in hook.field.state_dict().items())
    _, latents = hook.flow_rewards(*batch[:4], position_ids=batch[4], return_latents=True)
    loss = hook.update_flow(*batch[:4], torch.tensor([True, False, True]), latents=latents)
    assert loss is not None and loss > 0
    assert any(not torch.equal(before[k], v) for k, v in hook.field.state_dict().items())


def test_hook_refuses_bad_input(verl_integration):
    config = CONFIGS["paper"]
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"dim 16 but the policy's hidden size is 32"):
        verl_integration.FlowRewardHook(model, VelocityField(16, config.depth), config)
    with pytest.raises(ValueError, match="flow_config is missing"):
        verl_integration.FlowRewardHook(model, VelocityField(HIDDEN, config.depth))
    with pytest.raises(ValueError, match="precision must be one of"):
        verl_integration.FlowRewardHook(model, random_field(config.depth), config, precision="int8")
    with pytest.raises(ValueError, match="layout must be one of"):
        verl_integration.FlowRewardHook(model, random_field(config.depth), config, layout="last")
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        verl_integration.FlowRewardHook(model, random_field(config.depth), config, max_tokens=0)
    hook = verl_integration.FlowRewardHook(model, random_field(config.depth), config)
    input_ids, attention_mask, responses, response_mask, _ = verl_batch([2, 4], [5, 3])
    with pytest.raises(ValueError, match="responses differ from the last R columns"):
        hook.flow_rewards(input_ids, attention_mask, responses.flip(1), response_mask)
    with pytest.raises(ValueError, match="response_mask must have shape"):
        hook.flow_rewards(input_ids, attention_mask, responses, response_mask[:, :-1])
    shifted = response_mask.roll(1, dims=1)
    with pytest.raises(ValueError, match="misaligned"):
        hook.flow_rewards(input_ids, attention_mask, responses, shifted)
    with pytest.raises(ValueError, match=r"correct must be a \[2\] tensor"):
        hook.update_flow(input_ids, attention_mask, responses, response_mask, torch.tensor([True]))


FSDP_SCRIPT = r'''
import copy, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from flowkern import FlowConfig, VelocityField
from flowkern.integrations.verl import FlowRewardHook

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2)
flow_config = FlowConfig(depth=2, norm="minmax", threshold=0.0, topk=0)
field = VelocityField(32, 2)
ids = torch.randint(3, 64, (2, 9))
attention = torch.ones_like(ids)
bare = LlamaForCausalLM(config).eval()

def rewards(module):
    hook = FlowRewardHook(module, copy.deepcopy(field), flow_config, seed=1)
    return hook.flow_rewards(ids, attention, ids[:, 5:], attention[:, 5:])

reference = rewards(bare)
fsdp2 = copy.deepcopy(bare)
for layer in fsdp2.model.layers:
    fully_shard(layer)
fully_shard(fsdp2)
fsdp1 = FullyShardedDataParallel(copy.deepcopy(bare), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                 device_id=torch.device("cpu"), use_orig_params=True)
assert bool((reference != 0).any())
for name, module in (("fsdp2", fsdp2), ("fsdp1", fsdp1)):
    torch.testing.assert_close(rewards(module), reference, rtol=1e-5, atol=1e-7, msg=name)
dist.destroy_process_group()
print("fsdp ok")
'''


def test_hook_on_fsdp_wrapped_actor_matches_the_bare_module(verl_integration, tmp_path):
    done = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path / "pg")], capture_output=True, text=True,
                          timeout=240, env=subprocess_env())
    assert done.returncode == 0 and "fsdp ok" in done.stdout, done.stderr[-3000:]
