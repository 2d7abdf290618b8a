"""Smoke and unit tests of the `train/` trainer (CPU, tiny sizes, seconds each)."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from helpers import need

need("matplotlib")  # the `train` extra: the trainer's plots
need("tokenizers")
import train.rl as rl_mod
from flowkern import VelocityField
from train import ConfigError, TrainConfig, tiny_config
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.cli import main as cli_main
from train.cli import parse_config
from train.compare import mean_ci, mean_std, paired_differences, run_compare, t_quantile, verdict
from train.distributed import DistInfo
from train.pipeline import run_pipeline
from train.policy import PolicySpec, build_policy, encode_prompts, encode_traces, forward_logprobs, generate, load_policy
from train.policy import response_mask
from train.rl import entropy_advantage, ppo_clip_loss
from train.sweep import run_sweep
from train.evaluate import first_error_positions
from train.task import TaskSpec, extract_boxed, first_error, make_problem, make_splits, verify
from train.tokenizer import build_tokenizer

torch.set_num_threads(1)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(path: Path) -> dict[str, torch.Tensor]:
    policy, _ = load_policy(path / "policy")
    return {k: v.clone() for k, v in policy.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full tiny run of every stage, with flow shaping (shared by several tests)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = tiny_config(out=str(out), rl_steps=4, flow_steps=16, flow_lr=3e-3)
    captured = {}
    original = rl_mod.rl_step

    def spy(run, *args, **kwargs):
        metrics = original(run, *args, **kwargs)
        captured.update({k: v.clone() for k, v in run.last_rollout.items()})
        return metrics

    rl_mod.rl_step = spy
    try:
        summary = run_pipeline(cfg)
    finally:
        rl_mod.rl_step = original
    return cfg, out, summary, captured


# ----------------------------------------------------------------------------- task and tokenizer

def test_task_splits_are_seeded_and_disjoint():
    train_a, held_a = make_splits(3, 300, 50)
    train_b, held_b = make_splits(3, 300, 50)
    assert [p.text for p in train_a] == [p.text for p in train_b] and held_a == held_b
    assert not {p.prompt for p in train_a} & {p.prompt for p in held_a}
    assert make_splits(4, 300, 50)[1] != held_a
    for p in train_a[:50]:  # the expert trace is a correct, verifiable solution
        assert verify(p.solution, p.answer)
        assert eval(p.prompt.rstrip("=")) == p.answer  # left-to-right chains of + and - only
        assert 0 <= p.answer <= 99


def test_default_regime_is_one_trace_style_and_the_old_one_is_reachable():
    cfg = TrainConfig()
    _, held = make_splits(0, 10, 200, cfg.task_spec())
    assert all(p.solution == p.trace and p.solution.count("then") == p.prompt.count("+") + p.prompt.count("-") - 1
               for p in held)
    old = parse_config(["--max-operand", "9", "--max-value", "30", "--direct-share", "0.5"]).task_spec()
    _, held = make_splits(0, 10, 200, old)
    direct = [p for p in held if p.solution.startswith("the answer is")]
    assert 50 < len(direct) < 150 and all(verify(p.solution, p.answer) and p.trace != p.solution for p in direct)


def test_first_error_is_the_first_departure_from_the_trace():
    p = make_problem(random.Random(5), TaskSpec(n_ops=(3, 3)))
    steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)", p.trace)
    assert len(steps) == 3
    assert first_error(p, p.trace) is None  # right: no error
    # a wrong second intermediate value: the error is at its first differing digit
    a, op, b, c = steps[1]
    wrong = str(int(c) + 10)
    at = p.trace.index(f"{a}{op}{b}={c}") + len(f"{a}{op}{b}=")
    bad = p.trace[:at] + wrong + ", then ..."
    diverge = next(i for i, (x, y) in enumerate(zip(wrong, c + " ")) if x != y)
    assert first_error(p, bad) == at + diverge
    assert first_error(p, p.trace[:5]) == 5  # cut short: errs where it stops
    assert first_error(p, "the answer is \\boxed{0}" if p.answer else "the answer is \\boxed{1}") == 0


def test_first_error_positions_map_characters_to_tokens():
    train, _ = make_splits(0, 50, 2, TaskSpec(n_ops=(2, 2)))
    tok = build_tokenizer(p.text for p in train)
    p = train[0]
    at = p.trace.index("=") + 1  # the first intermediate value
    wrong = p.trace[:at] + ("9" if p.trace[at] != "9" else "8") + p.trace[at + 1:]
    wrong = wrong.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")  # and a wrong answer
    batch = encode_traces(tok, [p.prompt, p.prompt, p.prompt], [wrong, p.trace, p.trace[:at]])
    pos = first_error_positions(tok, batch, [p, p, p])
    ids = batch["input_ids"]
    assert tok.decode([int(ids[0, pos[0]])]) == wrong[at]  # the wrong digit's token
    resp = torch.nonzero(batch["action_mask"][0]).flatten()
    assert int(pos[0]) == int(resp[len(tok(p.trace[:at], add_special_tokens=False)["input_ids"])])
    assert int(pos[1]) == -1  # right
    assert int(ids[2, pos[2]]) == tok.eos_token_id  # stopped early: errs at its end of sequence


def test_verify_and_extract():
    assert extract_boxed("so \\boxed{ 4 2 }") == "42"
    assert verify("x \\boxed{1} y \\boxed{42}", 42)
    assert not verify("no box 42", 42)
    assert not verify("\\boxed{4a}", 4)
    with pytest.raises(ValueError, match="verifier"):
        verify("\\boxed{1}", 1, method="bogus")


def test_math_verify_path():
    pytest.importorskip("math_verify")
    assert verify("so \\boxed{42}", 42, method="math-verify")
    assert not verify("so \\boxed{41}", 42, method="math-verify")
    assert verify("\\boxed{\\frac{1}{2}}", "0.5")  # auto: a non-integer answer goes to math-verify


def test_tokenizer_round_trip_and_reload(tmp_path):
    train, held = make_splits(0, 200, 20, TaskSpec(ops=("+", "-", "*")))
    tok = build_tokenizer(p.text for p in train)
    for p in train + held:
        ids = tok(p.text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == p.text
    assert len(tok) < 64
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(train[0].text)["input_ids"] == tok(train[0].text)["input_ids"]
    assert again.padding_side == "left" and again.pad_token_id == tok.pad_token_id


def test_layout_masks():
    train, _ = make_splits(0, 10, 2)
    tok = build_tokenizer(p.text for p in train)
    batch = encode_traces(tok, [p.prompt for p in train[:4]], [p.solution for p in train[:4]])
    ids, act, am = batch["input_ids"], batch["action_mask"], batch["attention_mask"]
    for i, p in enumerate(train[:4]):
        resp = ids[i][act[i]].tolist()
        assert resp[-1] == tok.eos_token_id
        assert tok.decode(resp[:-1]) == p.solution
        assert int(am[i].sum()) == len(tok(p.prompt)["input_ids"]) + len(resp)
    r = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 1, 7, 0], [5, 6, 7, 8, 9]])
    assert response_mask(r, eos_id=1).tolist() == [[True, True, True, False, False],
                                                  [True, True, False, False, False], [True] * 5]


def test_rollouts_are_scored_with_the_log_probs_they_were_sampled_with():
    """GRPO is on-policy only if forward_logprobs gives each sampled token the probability HF generate drew it with
    (left-padded prompts of different lengths, KV cache, temperature)."""
    train, _ = make_splits(0, 40, 2)
    tok = build_tokenizer(p.text for p in train)
    model = build_policy(tok, PolicySpec(hidden=32, layers=2, heads=2, intermediate=64), seed=0).eval()
    prompts = [p.prompt for p in train[:6]]
    ids, am = encode_prompts(tok, prompts)
    assert (am == 0).any()  # some prompts are left-padded
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=True, temperature=0.7,
                         top_k=0, top_p=1.0, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    P = ids.shape[1]
    drawn = torch.stack([torch.log_softmax(x.float() / 0.7, -1) for x in out.logits], 1)
    drawn = drawn.gather(-1, out.sequences[:, P:, None]).squeeze(-1)
    torch.manual_seed(0)
    batch = generate(model, tok, prompts, max_new_tokens=12, temperature=0.7)
    assert torch.equal(batch["input_ids"][:, :P], out.sequences[:, :P])
    act = batch["action_mask"][:, P:]
    assert torch.equal(batch["input_ids"][:, P:][act], out.sequences[:, P:][act])  # same draws
    with torch.no_grad():
        logp, _ = forward_logprobs(model, batch, temperature=0.7)
    assert act.sum() > 20
    torch.testing.assert_close(logp[:, P:][act], drawn[act], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- losses

def test_entropy_advantage_matches_cheng_et_al():
    adv = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    ent = torch.tensor([[3.0, 0.5, 3.0, 0.1]], requires_grad=True)
    act = torch.tensor([[False, True, True, True]])
    out = entropy_advantage(adv, ent, act, alpha=0.4, kappa=2.0)
    # psi = min(0.4 * H, |A| / 2): 0.2, 0.5, 0.04; off-action positions are 0
    assert torch.allclose(out, torch.tensor([[0.0, 1.2, -0.5, 2.04]]))
    assert not out.requires_grad


def test_ppo_clip_loss_clips_and_matches_policy_gradient_on_policy():
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.0, 1.0, -2.0]])
    act = torch.tensor([[False, True, True]])
    loss, frac = ppo_clip_loss(logp, logp.detach(), adv, act, 0.2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, 1.0]]))  # -A / n_action_tokens
    assert frac.item() == 0.0
    old = torch.tensor([[0.0, -1.5, -2.0]])  # ratio e^0.5 > 1.2 on a positive advantage: clipped
    loss, frac = ppo_clip_loss(torch.tensor([[0.0, -1.0, -2.0]]), old, adv, act, 0.2)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 1.0 * -2.0) / 2)
    assert frac.item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- configuration

def test_bad_configs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--shaping must be one of none, flow, entropy; got 'flwo'"):
        TrainConfig(shaping="flwo").validate()
    with pytest.raises(ConfigError, match="--group-size 6 does not divide --batch-size 128"):
        TrainConfig(group_size=6).validate()
    with pytest.raises(ConfigError, match="--model .*nope: no such local HF model directory"):
        TrainConfig(model=str(tmp_path / "nope")).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no such local HF model directory"):
        parse_config(["--model", str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="split evenly over 3 processes"):
        TrainConfig(batch_size=16, group_size=8).validate(world_size=3)
    with pytest.raises(ConfigError, match="--verifier"):
        TrainConfig(verifier="sympy").validate()
    with pytest.raises(ConfigError, match="--flow-norm must be one of"):
        TrainConfig(flow_norm="zscore").validate()
    with pytest.raises(ConfigError, match="--flow-noise-draws must be a positive integer"):
        TrainConfig(flow_noise_draws=0).validate()
    with pytest.raises(ConfigError, match="--direct-share must lie in"):
        TrainConfig(direct_share=2.0).validate()
    if not torch.cuda.is_available():
        assert cli_main(["--device", "cuda", "--out", str(tmp_path / "z")]) == 2
        assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err
    assert cli_main(["--shaping", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "error: --shaping must be one of" in capsys.readouterr().err
    assert cli_main(["compare", "--arms", "flow", "bogus", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists()
    assert parse_config(["--shaping", "entropy", "--rl-steps", "7"]).rl_steps == 7


# ----------------------------------------------------------------------------- the whole pipeline

def test_smoke_every_stage(tiny_run):
    cfg, out, summary, rollout = tiny_run
    recs = _metrics(out)
    flow = [r["flow_loss"] for r in recs if r["stage"] == "flow"]
    assert len(flow) >= 3 and flow[-1] < 0.9 * flow[0], flow  # flow pretraining learns
    rl = [r for r in recs if r["stage"] == "rl" and r["kind"] == "train"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]
    assert all("flow_loss" in r and r["flow_loss"] == r["flow_loss"] for r in rl)
    assert summary["sft_eval"]["n_eval"] == cfg.n_heldout and "pass@1" in summary["rl_eval"]
    assert 0.0 <= summary["rl_eval"]["pass@1"] <= summary["rl_eval"]["pass@2"] <= 1.0
    # the last RL batch: flow rewards are finite, 0 off-action and non-trivial on actions
    r, act, adv = rollout["token_rewards"], rollout["action_mask"], rollout["advantages"]
    assert torch.isfinite(r).all() and torch.isfinite(adv).all()
    assert (r[~act] == 0).all() and (adv[~act] == 0).all()
    assert (r[act] != 0).any()
    assert r.abs().max() <= cfg.flow_coef + 1e-7  # |s| <= 1 with minmax-bil, times beta
    # outputs
    for name in ("curves.png", "flow_heatmap.html", "token_classes.md", "flow_pretrained.safetensors",
                 "metrics.jsonl", "summary.json", "config.json", "diagnostics.md", "diagnostics.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("curves.png", "diagnostics.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    html = (out / "flow_heatmap.html").read_text()
    assert html.count("class='r'") == 2 * cfg.report_rollouts and "title='reward" in html  # sampled + greedy
    assert "temperature 1" in html and "Greedy held-out" in html and "class='p'" in html
    classes = {row["class"]: row for row in summary["token_classes"]}
    assert set(classes) == {"digits", "operators", "=", "connectives", "format/other"}
    assert classes["digits"]["tokens"] > 0
    diag = summary["diagnostics"]
    assert diag["n_rollouts"] == cfg.diag_rollouts and -1 <= diag["noise"]["spearman_tokens"] <= 1
    assert "layer average" in (out / "diagnostics.md").read_text()
    # checkpoints and flows honour the umask like every other output
    mode = 0o666 & ~_umask()
    for path in (out / "flow_pretrained.safetensors", latest_checkpoint(out) / "flow.safetensors", out / "ckpt" / "latest"):
        assert path.stat().st_mode & 0o777 == mode, path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_diagnose_command_and_sweep(tiny_run, tmp_path, capsys):
    cfg, out, _, _ = tiny_run
    assert cli_main(["diagnose", "--from", str(out), "--rollouts", "8", "--noise-draws", "1", "4",
                     "--out", str(tmp_path / "d")]) == 0
    text = (tmp_path / "d" / "diagnostics.md").read_text()
    assert "### Noise draws K" in text and "\n| 4 |" in text and text in capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert set(report["by_noise_draws"]) == {"1", "4"}
    assert cli_main(["diagnose", "--from", str(tmp_path / "nothing")]) == 2
    assert "--from" in capsys.readouterr().err
    base = tmp_path / "base"
    run_pipeline(tiny_config(out=str(base), stop_after="flow", ckpt_every=1000))
    table = run_sweep(base, tmp_path / "sweep", ["run's pretrained flow", "norm mean", "depth 1"], rollouts=6)
    assert table.count("\n| ") == 4 and "| depth 1 | new |" in table  # header + 3 variants
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["n_rollouts"] for r in rows] == [6, 6, 6]
    assert rows[0]["seq_auroc"] == rows[1]["seq_auroc"] or math.isnan(rows[0]["seq_auroc"])  # same raw scores


def test_checkpoint_round_trip(tiny_run, tmp_path):
    cfg, out, _, _ = tiny_run
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"rl-{cfg.rl_steps:06d}"
    info = DistInfo()
    loaded = load_checkpoint(ckpt, info)
    assert loaded["state"]["stage"] == "rl" and loaded["state"]["step"] == cfg.rl_steps
    assert set(loaded["state"]["optimizers"]) == {"policy", "flow"}
    policy, tok = load_policy(loaded["policy_dir"])
    field = loaded["field"]
    opt = torch.optim.AdamW(policy.parameters())
    opt.load_state_dict(loaded["state"]["optimizers"]["policy"])
    gen = torch.Generator()
    gen.set_state(loaded["state"]["generator"])
    torch.manual_seed(123)
    save_checkpoint(tmp_path, stage="rl", step=9, policy=policy, tokenizer=tok, field=field,
                    flow_config=loaded["flow_config"], optimizers={"policy": opt}, generator=gen, info=info,
                    extra={"note": 1})
    again = load_checkpoint(latest_checkpoint(tmp_path), info)
    assert torch.equal(again["rng"]["torch"], torch.get_rng_state())
    assert again["state"]["extra"] == {"note": 1} and again["state"]["step"] == 9
    assert torch.equal(again["state"]["generator"], gen.get_state())
    policy2, _ = load_policy(again["policy_dir"])
    for (k, a), (_, b) in zip(policy.state_dict().items(), policy2.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(field.state_dict().items(), again["field"].state_dict().items()):
        assert torch.equal(a, b), k
    assert isinstance(again["field"], VelocityField) and again["flow_config"] == loaded["flow_config"]
    saved_opt = again["state"]["optimizers"]["policy"]
    assert saved_opt["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


def test_resume_continues_the_same_curve(tiny_run, tmp_path, monkeypatch):
    cfg, out, _, _ = tiny_run
    crashed = tmp_path / "crashed"
    original = rl_mod.rl_step
    calls = {"n": 0}

    def crash_on_step_four(run, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash in RL step 4")
        return original(run, *args, **kwargs)

    monkeypatch.setattr(rl_mod, "rl_step", crash_on_step_four)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(TrainConfig(**{**cfg.to_dict(), "out": str(crashed)}))
    monkeypatch.setattr(rl_mod, "rl_step", original)
    assert latest_checkpoint(crashed).name == "rl-000002"  # ckpt_every=2; step 3 was logged, not checkpointed
    assert max(r["step"] for r in _metrics(crashed) if r["stage"] == "rl") == 3

    summary = run_pipeline(TrainConfig(**{**cfg.to_dict(), "out": str(crashed), "resume": True}))
    ref = [r for r in _metrics(out) if r["stage"] == "rl"]
    got = [r for r in _metrics(crashed) if r["stage"] == "rl"]
    assert [(r["step"], r["kind"]) for r in got] == [(r["step"], r["kind"]) for r in ref]
    for a, b in zip(got, ref):
        for key in ("reward", "loss", "flow_loss", "entropy", "response_len", "pass@1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert summary["rl_eval"] == pytest.approx(json.loads((out / "summary.json").read_text())["rl_eval"])
    a, b = _state(latest_checkpoint(crashed)), _state(latest_checkpoint(out))
    for k in b:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_model_path_loads_a_local_hf_model(tiny_run, tmp_path):
    cfg, out, _, _ = tiny_run
    model_dir = latest_checkpoint(out) / "policy"
    before = _state(latest_checkpoint(out))
    summary = run_pipeline(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "m"), "model": str(model_dir),
                                          "sft_steps": 2, "stop_after": "sft"}))
    assert summary["policy_parameters"] == sum(v.numel() for k, v in before.items() if k != "lm_head.weight")
    assert "sft_eval" in summary and "rl_eval" not in summary
    after = _state(latest_checkpoint(tmp_path / "m"))
    assert any(not torch.equal(after[k], before[k]) for k in before)  # it trained the loaded model


@pytest.mark.parametrize("shaping", ["none", "entropy"])
def test_other_shapings_run(tmp_path, shaping):
    cfg = tiny_config(out=str(tmp_path / shaping), shaping=shaping, rl_steps=2, sft_steps=2, flow_steps=2)
    summary = run_pipeline(cfg)
    rl = [r for r in _metrics(tmp_path / shaping) if r["stage"] == "rl" and r["kind"] == "train"]
    assert len(rl) == 2 and all(r["flow_reward"] == 0.0 and "flow_loss" not in r for r in rl)
    assert 0.0 <= summary["rl_eval"]["pass@1"] <= 1.0


def test_compare_mode_table(tmp_path, capsys):
    cfg = tiny_config(out=str(tmp_path / "cmp"), rl_steps=1, sft_steps=2, flow_steps=2, n_heldout=8)
    result = run_compare(cfg, seeds=[0, 1], arms=["none", "flow"])
    table = result["table"]
    assert "| SFT start (no RL) |" in table and "| RL, shaping=none |" in table and "| RL, shaping=flow |" in table
    assert table.count("±") == 3 + 3 * 3 + 2 * 2  # header + 3 rows x 3 columns, 2 paired tables (header + row)
    for per_seed in result["results"].values():  # sampled accuracy: a share of the k samples, at most pass@k
        assert all(0.0 <= r["sampled_acc"] <= r[f"pass@{cfg.pass_k}"] for r in per_seed.values())
    assert "| flow − none |" in table and "flow − none = " in table  # paired difference and its verdict
    assert set(result["results"]["flow"]) == {0, 1}
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert table in md and "wall time" in md and "python -m train" in md and "the 6 runs' own wall times" in md
    diag = md.split("Flow diagnostic of each arm")[1]  # the per-arm diagnostic, read back from both seeds' runs
    assert "| none | 2 |" in diag and "| flow | 2 |" in diag and "reward digits" in diag
    assert table in capsys.readouterr().out
    # the arms of a seed start from the same base checkpoint
    base = json.loads((tmp_path / "cmp" / "seed0" / "base" / "summary.json").read_text())
    arm = json.loads((tmp_path / "cmp" / "seed0" / "flow" / "summary.json").read_text())
    assert arm["sft_eval"] == base["sft_eval"]
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))


def test_score_precision_flag_scores_rl_rewards_in_fp8(tmp_path, monkeypatch):
    """--score-precision fp8 reaches flow_reward in RL (through FlowConfig) and is saved with the flow."""
    from flowkern.ops import scores_gemm

    assert parse_config(["--score-precision", "fp8"]).score_precision == "fp8"
    with pytest.raises(ConfigError, match="score_precision"):
        parse_config(["--score-precision", "int4"])
    calls = []
    real = scores_gemm.fp8_scores
    monkeypatch.setattr(scores_gemm, "fp8_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(out=str(tmp_path / "fp8"), score_precision="fp8", rl_steps=2, sft_steps=2, flow_steps=2)
    run_pipeline(cfg)
    rl = [r for r in _metrics(tmp_path / "fp8") if r["stage"] == "rl" and r["kind"] == "train"]
    assert len(calls) >= 2 and len(rl) == 2 and any(r["flow_reward"] != 0.0 for r in rl)
    saved = json.loads(next((tmp_path / "fp8").rglob("flow*.json")).read_text())
    assert saved["config"]["score_precision"] == "fp8"


def test_confidence_intervals_and_verdicts():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-2)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962, abs=1e-3)
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    res = {"none": {s: {"pass@1": 0.3} for s in range(5)},
           "flow": {s: {"pass@1": 0.3 + 0.1 + 0.01 * s} for s in range(5)}}
    diff = paired_differences(res, range(5), "pass@1")["flow"]
    assert diff["mean"] == pytest.approx(0.12) and diff["diffs"] == pytest.approx([0.1, 0.11, 0.12, 0.13, 0.14])
    assert verdict("flow", diff).startswith("flow beats none")
    res["flow"] = {s: {"pass@1": 0.3 - 0.1 - 0.01 * s} for s in range(5)}
    assert verdict("flow", paired_differences(res, range(5), "pass@1")["flow"]).startswith("flow is worse")
    res["flow"] = {s: {"pass@1": 0.3 + (0.05 if s % 2 else -0.05)} for s in range(5)}
    assert verdict("flow", paired_differences(res, range(5), "pass@1")["flow"]).startswith("No detectable")


def test_diagnostics_plot_without_first_error_labels_says_so(tmp_path):
    """Real tasks give no first-wrong-token labels: the panel says so instead of an empty legend (a warning)."""
    import warnings

    from train.evaluate import CLASSES, plot_diagnostics

    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.bool)
    stats = {"seq_auroc": 0.6}
    by_k = {1: {"layers": {"layer0": stats}, "mean": stats, "noise": {"spearman_tokens": 0.9}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_diagnostics({"mean": torch.rand(B, T)}, mask, torch.tensor([1, 0, 1, 0]),
                                torch.full((B,), -1), torch.full((B, T), CLASSES.index("connectives")), by_k,
                                tmp_path / "d.png")
    assert path.stat().st_size > 0
