"""FlowGRPOTrainer against the real TRL: a tiny random Qwen2 and tokenizer built in code, 2 training steps.

Skipped without trl, except under FLOWKERN_REQUIRE_INTEGRATIONS=1 (CI), where a missing trl fails.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import need, random_field, subprocess_env

from flowkern import FlowConfig, LatentTap, VelocityField, flow_reward, load_flow_field

VOCAB = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(61)]
HIDDEN = 32
FLOW_CONFIG = FlowConfig(depth=2, norm="minmax", threshold=0.0, topk=3, coef=0.01)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())


def test_importing_flowkern_never_imports_trl_or_verl():
    done = run_python("import sys, flowkern, flowkern.integrations, flowkern.integrations.openrlhf\n"
                      "bad = sorted(m for m in ('trl', 'verl') if m in sys.modules)\n"
                      "assert not bad, bad\nprint('ok')")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_missing_trl_raises_import_error_naming_the_extra():
    done = run_python("import sys\nsys.modules['trl'] = None\n"
                      "try:\n    import flowkern.integrations.trl\nexcept ImportError as e:\n    print(e)\n"
                      "else:\n    print('imported')")
    assert done.returncode == 0, done.stderr
    assert "pip install flowkern[trl]" in done.stdout


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_policy():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return Qwen2ForCausalLM(config)


def parity_reward(completions, **kwargs):
    """Rule-based reward: rollouts 0, 2, 4, ... of each batch are 'correct' (each group of 4 gets 2)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def make_trainer(tmp_path, *, steps_per_generation=None, max_steps=2, **flow_kwargs):
    from datasets import Dataset
    from trl import GRPOConfig

    from flowkern.integrations.trl import FlowGRPOTrainer

    prompts = [" ".join(f"w{(7 * i + j) % 61}" for j in range(2 + i % 3)) for i in range(8)]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=max_steps, save_steps=2, logging_steps=1, report_to="none",
                      use_cpu=True, learning_rate=1e-3, seed=0, steps_per_generation=steps_per_generation,
                      dataloader_num_workers=0)
    flow_kwargs.setdefault("flow", random_field(HIDDEN, FLOW_CONFIG.depth, dtype=torch.float32))
    flow_kwargs.setdefault("flow_config", FLOW_CONFIG)
    return FlowGRPOTrainer(tiny_policy(), parity_reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                           processing_class=tiny_tokenizer(), flow_lr=1e-2, correct_threshold=1.0, **flow_kwargs)


def expected_scored(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Completion tokens whose token_pre context (the next token) is a real token, by plain loops."""
    B, T = attention_mask.shape
    P = T - completion_mask.shape[1]
    out = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        for k in range(P, T - 1):
            out[i, k] = bool(completion_mask[i, k - P]) and bool(attention_mask[i, k + 1])
    return out


@pytest.fixture(scope="module", params=["extra_forward", "reused_forward"])
def trained(request, tmp_path_factory):
    """Two FlowGRPOTrainer steps; every generation batch recorded with an independent recomputation."""
    need("trl")
    tmp = tmp_path_factory.mktemp(request.param)
    trainer = make_trainer(tmp, steps_per_generation=2 if request.param == "reused_forward" else None)
    initial = copy.deepcopy(trainer.flow_field.state_dict())
    records = []
    original = trainer._generate_and_score_completions

    def recorded(inputs):
        flow_before = copy.deepcopy(trainer.flow_field)
        generator = torch.Generator().manual_seed(0)
        generator.set_state(trainer._flow_generator.get_state())
        out = original(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad(), LatentTap(trainer.model, FLOW_CONFIG.hook_layers) as tap:
            trainer.model(input_ids=ids, attention_mask=attention)
        scored = expected_scored(attention, out["completion_mask"])
        reference = flow_reward(flow_before, tap.latents, scored, FLOW_CONFIG, layer_fracs=tap.layer_fracs,
                                generator=generator)[:, out["prompt_ids"].shape[1]:]
        records.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in out.items()}
                       | {"reference_rewards": reference})
        return out

    trainer._generate_and_score_completions = recorded
    trainer.train()
    return request.param, trainer, records, initial, tmp


def test_trainer_reuses_trl_forward_when_trl_runs_one(trained):
    mode, trainer, records, _, _ = trained
    assert len(records) >= 1
    assert trainer.flow_last_forward_reused is (mode == "reused_forward")


def test_flow_rewards_are_flowkern_rewards_on_completion_tokens(trained):
    _, _, records, _, _ = trained
    for rec in records:
        rewards, mask = rec["flow_rewards"], rec["completion_mask"].bool()
        assert rewards.shape == rec["completion_ids"].shape
        assert bool((rewards != 0).any()), "no flow reward at all: the test would be vacuous"
        assert not bool(rewards[~mask].any())
        torch.testing.assert_close(rewards, rec["reference_rewards"], rtol=1e-4, atol=1e-6)


def test_advantages_are_trl_group_advantage_plus_flow_reward_to_go(trained):
    _, _, records, _, _ = trained
    for rec in records:
        adv, seq, rewards = rec["advantages"], rec["sequence_advantages"], rec["flow_rewards"]
        mask = rec["completion_mask"].bool()
        B, C = rec["completion_ids"].shape
        assert adv.shape == (B, C) and seq.shape == (B,)
        assert bool((seq != 0).any())
        rtg = torch.zeros(B, C)
        for i in range(B):
            for k in range(C):
                rtg[i, k] = sum(float(rewards[i, s]) for s in range(k, C) if mask[i, s])
        expected = torch.where(mask, seq[:, None] + rtg, 0.0)
        torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-7)
        differs = (adv != seq[:, None]) & mask
        assert torch.equal(differs, (rtg != 0) & mask)
        assert bool(differs.any())


def test_online_update_changes_the_flow_and_logs_metrics(trained):
    _, trainer, _, initial, _ = trained
    changed = [k for k, v in trainer.flow_field.state_dict().items() if not torch.equal(initial[k], v)]
    assert changed, "the online flow update left every flow parameter unchanged"
    logged = [entry for entry in trainer.state.log_history if "flow/loss" in entry]
    assert logged and all(entry["flow/loss"] > 0 for entry in logged)
    for key in ("flow/reward_abs_mean", "flow/rewarded_frac", "flow/correct_frac"):
        assert any(key in entry for entry in trainer.state.log_history), key
    assert all(entry["flow/correct_frac"] == 0.5 for entry in logged)


def test_checkpoint_folder_holds_the_flow_with_its_config(trained):
    _, trainer, _, _, tmp = trained
    folder = tmp / "checkpoint-2"
    assert (folder / "flow.safetensors").exists() and (folder / "flow.json").exists()
    assert (folder / "flow_optimizer.pt").exists()
    field, config = load_flow_field(folder)
    assert config == FLOW_CONFIG
    for key, value in trainer.flow_field.state_dict().items():
        torch.testing.assert_close(field.state_dict()[key], value.cpu(), rtol=0, atol=0)


def test_flow_dim_differing_from_hidden_size_is_refused(tmp_path):
    need("trl")
    with pytest.raises(ValueError, match=r"dim 16 but the policy's hidden size is 32"):
        make_trainer(tmp_path, flow=VelocityField(16, FLOW_CONFIG.depth))


def test_missing_flow_config_is_refused(tmp_path):
    need("trl")
    with pytest.raises(ValueError, match="flow_config is missing"):
        make_trainer(tmp_path, flow_config=None)
    with pytest.raises(TypeError, match="flow is required"):
        make_trainer(tmp_path, flow=None)


DDP_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from test_integrations_trl import make_trainer

out = Path(sys.argv[2])
trainer = make_trainer(out / "run")
rank = trainer.accelerator.process_index
initial = torch.cat([p.detach().flatten().clone() for p in trainer.flow_field.parameters()])
trainer.train()
final = torch.cat([p.detach().flatten() for p in trainer.flow_field.parameters()])
torch.save({"initial": initial, "final": final, "world": trainer.accelerator.num_processes,
            "logs": [e for e in trainer.state.log_history if "flow/loss" in e]}, out / f"rank{rank}.pt")
'''


def test_two_ranks_keep_identical_flows(tmp_path):
    """DDP on CPU (gloo), 2 processes: each scores its slice; the online update keeps the flow copies identical."""
    need("trl")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), os.path.dirname(__file__), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    assert not torch.equal(ranks[0]["final"], ranks[0]["initial"])
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
    assert ranks[0]["logs"] and [e["flow/loss"] for e in ranks[0]["logs"]] == [e["flow/loss"] for e in ranks[1]["logs"]]


def test_resuming_from_a_checkpoint_restores_the_flow_and_its_optimiser(trained, tmp_path):
    mode, trainer, _, _, tmp = trained
    if mode != "extra_forward":
        pytest.skip("one resume suffices")
    fresh = make_trainer(tmp_path)
    assert not torch.equal(fresh.flow_field.input_proj.weight, trainer.flow_field.input_proj.weight)
    fresh.create_optimizer_and_scheduler(num_training_steps=2)
    fresh._load_optimizer_and_scheduler(str(tmp / "checkpoint-2"))  # what Trainer.train(resume_from_checkpoint=...) runs
    for key, value in trainer.flow_field.state_dict().items():
        torch.testing.assert_close(fresh.flow_field.state_dict()[key], value, rtol=0, atol=0)
    saved = torch.load(tmp / "checkpoint-2" / "flow_optimizer.pt", weights_only=True)
    assert fresh.flow_optimizer.state_dict()["state"].keys() == saved["state"].keys()
    torch.testing.assert_close(fresh.flow_optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def flow_and_policy(trainer) -> dict[str, torch.Tensor]:
    state = {f"flow.{k}": v for k, v in trainer.flow_field.state_dict().items()}
    return state | {f"policy.{k}": v for k, v in trainer.model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    """Resuming from checkpoint-2 of a 4-step run ends where the uninterrupted run ends, bit for bit."""
    need("trl")
    from flowkern.integrations.trl import FLOW_GENERATOR_NAME

    whole = make_trainer(tmp_path / "whole", max_steps=4)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / FLOW_GENERATOR_NAME.format(rank=0)).exists()
    resumed = make_trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = flow_and_policy(whole), flow_and_policy(resumed)
    assert not torch.equal(expected["flow.input_proj.weight"],
                           make_trainer(tmp_path / "fresh").flow_field.input_proj.weight)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    logged = [[e["flow/loss"] for e in t.state.log_history if "flow/loss" in e and e["step"] > 2] for t in (whole, resumed)]
    assert logged[0] and logged[0] == logged[1]


def test_chunked_online_update_equals_the_unchunked_one(tmp_path):
    """flow_update_max_tokens=5 (several chunks per update) trains the flow as one chunk does."""
    need("trl")
    flows = []
    for limit in (None, 5):
        trainer = make_trainer(tmp_path / str(limit), max_steps=1, flow_update_max_tokens=limit)
        trainer.train()
        flows.append(trainer.flow_field.state_dict())
    for key, value in flows[0].items():
        torch.testing.assert_close(flows[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="flow_update_max_tokens must be a positive integer"):
        make_trainer(tmp_path / "bad", flow_update_max_tokens=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        make_trainer(tmp_path / "bad", flow_precision="int8")


def test_an_untrained_flow_warns(tmp_path):
    need("trl")
    with pytest.warns(UserWarning, match="output layer is all zero"):
        make_trainer(tmp_path, flow=VelocityField(HIDDEN, FLOW_CONFIG.depth))


@pytest.mark.parametrize("how", ["flow_precision", "flow_config"])
def test_fp8_scoring_end_to_end(tmp_path, monkeypatch, how):
    """fp8 scoring, asked for by the trainer's flow_precision or by the flow config's score_precision: the
    trainer's flow rewards go through the fp8 path (`flowkern.ops.scores_gemm.fp8_scores`)."""
    need("trl")
    from flowkern.ops import scores_gemm

    calls = []
    real = scores_gemm.fp8_scores
    monkeypatch.setattr(scores_gemm, "fp8_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = ({"flow_precision": "fp8"} if how == "flow_precision"
          else {"flow_config": dataclasses.replace(FLOW_CONFIG, score_precision="fp8")})
    trainer = make_trainer(tmp_path, **kw)
    trainer.train()
    assert calls
