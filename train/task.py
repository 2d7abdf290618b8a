"""The embedded task: generated multi-step integer arithmetic with a short chain of thought.

A problem is a left-to-right chain such as ``17+25-9`` (the prompt is
``"17+25-9="``). The expert solution (the generator's own trace) computes one
operation per step and boxes the result::

    17+25=42, then 42-9=33, so the answer is \\boxed{33}

By default every expert trace has this one style, so the trace is a function
of the prompt: `first_error` finds the character where a wrong response first
leaves it (the first wrong intermediate value, or a mis-copied operand), which
is what the error-localisation diagnostic needs. ``TaskSpec.direct_share``
mixes in a second style that states the answer at once (``the answer is
\\boxed{33}``); a tiny model that imitates it guesses far more often, which
leaves RL a style to select (the trainer's old default regime).

Problems are drawn from a seeded generator; the train and held-out splits
come from different seeds and are disjoint (held-out problems never occur in
the train split).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

try:  # optional extra: `pip install math-verify`
    import math_verify as _math_verify  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _math_verify = None

HAS_MATH_VERIFY = _math_verify is not None
VERIFIERS = ("auto", "exact", "numeric", "math-verify")
OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: its prompt, expert solution and integer answer."""

    prompt: str
    solution: str
    answer: int
    trace: str = ""  # the step-by-step expert trace (equal to `solution` unless the direct style was drawn)

    @property
    def text(self) -> str:
        """Prompt followed by the expert solution (an SFT / flow-pretraining trace)."""
        return self.prompt + self.solution


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs of the generated task.

    Attributes:
        n_ops: number of operations per problem (min, max), inclusive.
        max_operand: operands are drawn from [1, max_operand].
        max_value: every intermediate result stays in [0, max_value].
        ops: the operators that may appear ("+", "-", "*"); "*" uses operands ≤ 9.
        direct_share: fraction of expert traces that give the answer without the chain.
    """

    n_ops: tuple[int, int] = (2, 3)
    max_operand: int = 40
    max_value: int = 99
    ops: tuple[str, ...] = ("+", "-")
    direct_share: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.n_ops
        if not 1 <= lo <= hi:
            raise ValueError(f"TaskSpec.n_ops must satisfy 1 <= min <= max, got {self.n_ops}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError(f"TaskSpec needs 1 <= max_operand <= max_value, got {self.max_operand}, {self.max_value}")
        bad = [op for op in self.ops if op not in OPS]
        if not self.ops or bad:
            raise ValueError(f"TaskSpec.ops must be a non-empty subset of {OPS}, got {self.ops}")
        if not 0.0 <= self.direct_share <= 1.0:
            raise ValueError(f"TaskSpec.direct_share must lie in [0, 1], got {self.direct_share}")


def _step(rng: random.Random, value: int, spec: TaskSpec) -> tuple[str, int]:
    """One operation applied to `value` that keeps the result inside [0, max_value]."""
    choices = []
    if "+" in spec.ops and value + 1 <= spec.max_value:
        choices.append("+")
    if "-" in spec.ops and value >= 1:
        choices.append("-")
    if "*" in spec.ops and 2 * value <= spec.max_value and value >= 1:
        choices.append("*")
    op = rng.choice(choices or ["+"])
    if op == "+":
        b = rng.randint(1, min(spec.max_operand, spec.max_value - value))
        return op, b
    if op == "-":
        b = rng.randint(1, min(spec.max_operand, value))
        return op, b
    b = rng.randint(2, max(2, min(9, spec.max_value // value)))
    return op, b


def make_problem(rng: random.Random, spec: TaskSpec) -> Problem:
    """Draw one problem from `rng` and write its expert chain of thought."""
    n = rng.randint(*spec.n_ops)
    first = rng.randint(1, min(spec.max_operand, spec.max_value))
    expr, value, steps = str(first), first, []
    for _ in range(n):
        op, b = _step(rng, value, spec)
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(f"{value}{op}{b}={new}")
        expr += f"{op}{b}"
        value = new
    chain = steps[0] + "".join(f", then {s}" for s in steps[1:])
    trace = f"{chain}, so the answer is \\boxed{{{value}}}"
    if spec.direct_share and rng.random() < spec.direct_share:
        return Problem(prompt=f"{expr}=", solution=f"the answer is \\boxed{{{value}}}", answer=value, trace=trace)
    return Problem(prompt=f"{expr}=", solution=trace, answer=value, trace=trace)


def first_error(problem: Problem, response: str) -> Optional[int]:
    """Character index in `response` where a wrong response first departs from the expert trace.

    The step-by-step trace is a function of the prompt, so the first character
    that differs from ``problem.trace`` is where the chain first goes wrong: a
    digit of a wrong intermediate value, a mis-copied operand, or a format
    slip. A response that is a strict prefix of the trace (cut off) errs at its
    end (``len(response)``). Returns None when the response boxes the right
    answer (`verify` with the exact checker).
    """
    if verify(response, problem.answer, "exact"):
        return None
    trace = problem.trace or problem.solution
    for i, (a, b) in enumerate(zip(response, trace)):
        if a != b:
            return i
    return min(len(response), len(trace))


def make_splits(seed: int, n_train: int, n_heldout: int, spec: Optional[TaskSpec] = None
                ) -> tuple[list[Problem], list[Problem]]:
    """Seeded, disjoint (train, held-out) splits.

    The held-out split is drawn first from ``Random(seed * 2 + 1)``; the train
    split from ``Random(seed * 2)``, skipping any prompt that is held out.
    """
    spec = spec or TaskSpec()
    rng_h, rng_t = random.Random(seed * 2 + 1), random.Random(seed * 2)
    heldout, seen = [], set()
    for _ in range(50 * n_heldout + 100):
        if len(heldout) == n_heldout:
            break
        p = make_problem(rng_h, spec)
        if p.prompt not in seen:
            seen.add(p.prompt)
            heldout.append(p)
    if len(heldout) < n_heldout:
        raise ValueError(f"the task space is too small for {n_heldout} distinct held-out problems")
    train: list[Problem] = []
    for _ in range(50 * n_train + 100):
        if len(train) == n_train:
            break
        p = make_problem(rng_t, spec)
        if p.prompt not in seen:
            train.append(p)
    if len(train) < n_train:
        raise ValueError(f"the task space is too small for {n_train} train problems outside the held-out split")
    return train, heldout


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in `text` (nested braces allowed, spaces removed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].replace(" ", "")
    return None


_ANSWER_IS = re.compile(r"answer is\W*?(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer of a free-form response: the last ``\\boxed{}`` content, else the number after the last
    "answer is", else the last number in `text` (commas dropped); None when there is none."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS.findall(text) or _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _as_number(text: str) -> Optional[float]:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def verify(response: str, answer: object, method: str = "auto") -> bool:
    """Whether `response` gives the right answer.

    Methods:
        ``exact``: the boxed content parses as an integer equal to `answer`
        (the embedded task's checker).
        ``numeric``: the final answer (`extract_final_answer`: boxed, else after
        "answer is", else the last number) equals `answer` as a number (relative
        tolerance 1e-6); math-verify is tried next where it is installed.
        ``math-verify``: `math_verify.parse` / `math_verify.verify` on the final
        answer (needs the optional ``math-verify`` package).
        ``auto``: exact for an integer `answer` (the embedded task), numeric for
        an answer that reads as a number (the real tasks), otherwise
        math-verify when installed, otherwise normalised string equality.
    """
    if method not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {method!r}")
    if method == "auto":
        if isinstance(answer, int) and not isinstance(answer, bool):
            method = "exact"
        elif _as_number(answer) is not None:
            method = "numeric"
    if method == "exact":
        boxed = extract_boxed(response)
        try:
            return boxed is not None and int(boxed) == answer
        except ValueError:
            return False
    final = extract_final_answer(response)
    if final is None:
        return False
    if method == "numeric":
        got, want = _as_number(final), _as_number(answer)
        if got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)):
            return True
        if not HAS_MATH_VERIFY:
            return False
        method = "math-verify"
    if method == "math-verify" or HAS_MATH_VERIFY:
        if not HAS_MATH_VERIFY:
            raise RuntimeError("verifier 'math-verify' needs the optional package: pip install math-verify")
        gold = _math_verify.parse(f"\\boxed{{{answer}}}")
        pred = _math_verify.parse(f"\\boxed{{{final}}}")
        return bool(_math_verify.verify(gold, pred))
    return final == str(answer).replace(" ", "")


def verify_batch(responses: Sequence[str], answers: Iterable[object], method: str = "auto") -> list[bool]:
    """`verify` over aligned lists of responses and answers."""
    return [verify(r, a, method) for r, a in zip(responses, answers)]


WORDS = ("then", "so", "the", "answer", "is")
SYMBOLS = tuple("0123456789+-*=,")
