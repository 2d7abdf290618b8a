"""`flowkern pretrain` on CPU: a tiny Llama and word-level tokenizer saved in the test, data made in the test.

A run (files, report, a held-out loss that falls), exact resume from a mid-run checkpoint, the data
formats (JSONL, plain text, a datasets directory, the chat template) and a 2-process torchrun (gloo).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import need, subprocess_env

from flowkern import FlowConfig, load_flow_field
from flowkern.pretrain import Example, PretrainConfig, encode_example, load_examples, main, pretrain

WORDS = [f"w{i}" for i in range(40)]
VOCAB = ["<pad>", "<unk>", "</s>", "<bos>", "<user>", "<assistant>"] + WORDS
CHAT = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"


def save_tiny_model(path):
    """A tiny random Llama and its word-level tokenizer (with a chat template), saved like an HF model."""
    need("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = (torch.randint(0, 40, (2,), generator=g) + 0).tolist()
            length = int(torch.randint(3, 9, (1,), generator=g))
            response = " ".join(f"w{(a + k * b) % 40}" for k in range(length))  # arithmetic sequences
            fh.write(json.dumps({"prompt": f"w{a} w{b}", "response": response}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return save_tiny_model(root / "model"), write_jsonl(root / "data.jsonl")


FAST = dict(steps=6, batch_tokens=48, lr=3e-3, warmup_steps=2, eval_tokens=64, eval_every=3, ckpt_every=3,
            log_every=1, forward_batch=4, dtype="float32", device="cpu", progress=False)


def test_run_writes_a_flow_that_fits_better_than_the_start(assets, tmp_path):
    model, data = assets
    report = pretrain(model, data, tmp_path, PretrainConfig(**FAST, format="official"), flow_config={"depth": 2})
    field, config = load_flow_field(tmp_path)
    assert config == FlowConfig(depth=2) and field.dim == 32
    official, _ = load_flow_field(tmp_path / "official" / "flow_model.bin")  # the released layout, same weights
    assert report["official"] == str(tmp_path / "official" / "flow_model.bin")
    for key, value in field.state_dict().items():
        assert torch.equal(official.state_dict()[key], value), key
    assert report["heldout_loss_final"] < report["heldout_loss_initial"]
    assert report["train_examples"] + report["heldout_examples"] == 40 and report["heldout_examples"] == 2
    assert report["world"] == 1 and report["ranks_identical"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "heldout_loss" in r] == [0, 3, 6]
    assert all(r["tokens"] == 48 * r["step"] for r in records if "loss" in r)
    assert json.loads((tmp_path / "report.json").read_text())["heldout_loss_final"] == report["heldout_loss_final"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000003", "step-00000006"]


def test_resume_from_a_mid_run_checkpoint_is_exact(assets, tmp_path):
    model, data = assets
    cfg = PretrainConfig(**FAST)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(model, data, whole, cfg, flow_config={"depth": 2})
    shutil.copytree(whole, cut)
    # Interrupted after step 3: the step-6 checkpoint and the final outputs never got written.
    shutil.rmtree(cut / "ckpt" / "step-00000006")
    (cut / "ckpt" / "latest").write_text("step-00000003\n")
    for name in ("flow.safetensors", "flow.json", "report.json"):
        (cut / name).unlink()
    report = pretrain(model, data, cut, cfg, flow_config={"depth": 2})
    assert report["resumed_from_step"] == 3
    a, _ = load_flow_field(whole)
    b, _ = load_flow_field(cut)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key

    def records(path):
        return [{k: v for k, v in json.loads(line).items()} for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert records(whole) == records(cut)
    changed = PretrainConfig(**{**FAST, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"other settings \(\['lr'\]\)"):
        pretrain(model, data, cut, changed, flow_config={"depth": 2})


def test_data_formats_and_response_only_tokens(assets, tmp_path):
    model, data = assets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tmp_path / "data.txt"
    text.write_text("w1 w2 w3\n\nw4 w5\n")
    assert load_examples(text) == [Example("", "w1 w2 w3"), Example("", "w4 w5")]
    rows = load_examples(data)
    assert len(rows) == 40 and rows[0].prompt and rows[0].response
    datasets = need("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "w7 w8"}])}).save_to_disk(tmp_path / "ds")
    assert load_examples(tmp_path / "ds") == [Example("", "w7 w8")]
    with pytest.raises(ValueError, match="has splits"):
        load_examples(tmp_path / "ds", PretrainConfig(split="test"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "w1"}\n')
    with pytest.raises(ValueError, match="line 1: needs the fields 'prompt' and 'response'"):
        load_examples(bad)

    ex = Example("w1 w2", "w3 w4")
    ids, n_prompt = encode_example(tokenizer, ex, PretrainConfig())
    assert tokenizer.convert_ids_to_tokens(ids) == ["w1", "w2", "w3", "w4", "</s>"] and n_prompt == 2
    ids, n_prompt = encode_example(tokenizer, ex, PretrainConfig(chat_template=True, append_eos=False))
    assert tokenizer.convert_ids_to_tokens(ids) == ["<user>", "w1", "w2", "<assistant>", "w3", "w4"]
    assert n_prompt == 4
    ids, n_prompt = encode_example(tokenizer, ex, PretrainConfig(max_length=3))
    assert len(ids) == 3 and n_prompt == 2


def test_command_line_errors_exit_2(assets, tmp_path, capsys):
    model, _ = assets
    assert main(["--model", str(model), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model)])


def test_torchrun_two_processes(assets, tmp_path):
    """`torchrun --nproc_per_node 2 -m flowkern pretrain` on CPU (gloo): each rank its shard, one flow."""
    model, data = assets
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "flowkern", "pretrain", "--model", str(model), "--data", str(data), "--out", str(out),
                           "--steps", "4", "--batch-tokens", "48", "--lr", "3e-3", "--warmup-steps", "1",
                           "--eval-tokens", "64", "--ckpt-every", "2", "--forward-batch", "4", "--depth", "2",
                           "--dtype", "float32", "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world"] == 2 and report["ranks_identical"]
    assert report["heldout_loss_final"] < report["heldout_loss_initial"]
    assert "held-out flow loss" in done.stdout
    ckpt = out / "ckpt" / "step-00000004"
    assert (ckpt / "rank0.pt").exists() and (ckpt / "rank1.pt").exists()
    states = [torch.load(ckpt / f"rank{r}.pt", weights_only=True)["generator"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])  # each rank draws its own noise
    assert os.path.exists(out / "flow.safetensors")
