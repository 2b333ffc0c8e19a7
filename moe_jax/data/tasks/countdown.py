"""Countdown (the TinyZero task): reach a target with 3–4 given numbers, each used exactly once,
and + − × ÷. Problems are built from a random expression, so every one is solvable."""

from __future__ import annotations

import dataclasses
from collections import Counter
from fractions import Fraction

import numpy as np

from moe_jax.data.expression import ExpressionError, evaluate
from moe_jax.data.tasks.base import Problem, Task

OPS = "+-*/"


@dataclasses.dataclass(frozen=True)
class _Node:
    """A binary expression tree; leaves carry a number, inner nodes an operator."""

    value: Fraction
    text: str
    steps: tuple[str, ...] = ()


def _combine(op: str, left: _Node, right: _Node) -> _Node | None:
    if op == "/" and right.value == 0:
        return None
    value = {"+": left.value + right.value, "-": left.value - right.value,
             "*": left.value * right.value}.get(op) if op != "/" else left.value / right.value
    if value.denominator != 1 or value < 0:  # keep every intermediate a natural number
        return None
    step = f"{left.value}{op}{right.value}={value}"
    return _Node(value, f"({left.text}{op}{right.text})", left.steps + right.steps + (step,))


def _strip_outer(text: str) -> str:
    return text[1:-1] if text.startswith("(") and text.endswith(")") else text


class Countdown(Task):
    """`n_numbers` numbers from [1, max_number], a target in [1, max_target]."""

    name = "countdown"

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99,
                 max_target: int = 999, max_tries: int = 1000, languages: str = "en", switch_rate: float = 0.0):
        super().__init__(languages, switch_rate)
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target, self.max_tries = max_number, max_target, max_tries

    def _random_tree(self, numbers: list[int], rng: np.random.Generator, ops: str = OPS) -> _Node | None:
        """Combine the numbers (in the given order) pairwise at random until one remains."""
        nodes = [_Node(Fraction(n), str(n)) for n in numbers]
        while len(nodes) > 1:
            i = int(rng.integers(len(nodes) - 1))
            node = _combine(str(rng.choice(list(ops))), nodes[i], nodes[i + 1])
            if node is None:
                return None
            nodes[i:i + 2] = [node]
        return nodes[0]

    def generate(self, rng: np.random.Generator) -> Problem:
        for _ in range(self.max_tries):
            count = int(rng.integers(self.min_numbers, self.max_numbers + 1))
            numbers = [int(n) for n in rng.integers(1, self.max_number + 1, size=count)]
            tree = self._random_tree(list(rng.permutation(numbers)), rng)
            if tree is not None and 1 <= tree.value <= self.max_target:
                target = int(tree.value)
                question = f"Using the numbers {numbers}, create an equation that equals {target}"
                return self._posed(question, _strip_outer(tree.text), {"numbers": numbers, "target": target}, rng)
        raise RuntimeError(f"no solvable countdown problem in {self.max_tries} tries; relax the knobs")

    def solve(self, problem: Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, str]:
        """The steps of the stored solution. A slip swaps one operator and follows the changed
        expression through honestly, so the answer misses the target."""
        expression = problem.answer
        if rng.random() < error_rate:
            expression = self._slipped(expression, problem.data["target"], rng)
        value, _ = evaluate(expression)
        # A posed language gets one word to be written in: the closing "so" (English-only traces
        # are equations alone, as before).
        so = "" if self.languages == ("en",) else f"{self.phrasebook(problem, rng)('so')} "
        return "\n".join(self._steps(expression) + [f"{so}{expression}={value}"]), expression

    readable_checks = ("inverse",)

    def readable_solution(self, problem: Problem, rng: np.random.Generator, retry_rate: float,
                          check: str = "inverse") -> tuple[str, str]:
        """Try a candidate, work it out step by step, test it against the target: "try (3+5)*2",
        ..., "16 no, again" for a wrong one (a swapped operator), "16 ok" for the right one (the
        one check countdown has: evaluating the candidate is the base's own skill)."""
        if check not in self.readable_checks:
            raise ValueError(f"unknown check {check!r}; countdown checks by {self.readable_checks}")
        say, target, lines = self.phrasebook(problem, rng, readable=True), problem.data["target"], []
        candidates = [problem.answer]
        if rng.random() < retry_rate:
            candidates.insert(0, self._slipped(problem.answer, target, rng))
        for expression in candidates:
            value, _ = evaluate(expression)
            verdict = say("ok") if value == target else f"{say('no')}, {say('again')}"
            lines += [f"{say('try')} {expression}", *self._steps(expression), f"{expression}={value} {verdict}"]
        return "\n".join(lines), problem.answer

    def summary(self, problem: Problem, answer: str) -> str:
        return f"{answer}={problem.data['target']}"

    @staticmethod
    def _slipped(expression: str, target: int, rng: np.random.Generator) -> str:
        """The expression with one operator swapped, chosen at random among the swaps whose
        intermediate results stay natural numbers and that miss the target."""
        swaps = [(i, op) for i, c in enumerate(expression) if c in OPS for op in OPS if op != c]
        for k in rng.permutation(len(swaps)):
            at, op = swaps[k]
            candidate = expression[:at] + op + expression[at + 1:]
            try:
                value, _ = evaluate(candidate)
            except ExpressionError:
                continue
            if value.denominator == 1 and value >= 0 and value != target:
                return candidate
        return expression  # no such swap exists: the solution stays right

    def _steps(self, expression: str) -> list[str]:
        """Each parenthesised sub-result, innermost first, as `a op b = c` lines."""
        steps, stack = [], []
        for i, c in enumerate(expression):
            if c == "(":
                stack.append(i)
            elif c == ")":
                inner = expression[stack.pop() + 1:i]
                steps.append(f"{inner}={evaluate(inner)[0]}")
        return steps

    def check_answer(self, problem: Problem, answer: str) -> bool:
        """Uses each given number exactly once and evaluates exactly to the target."""
        try:
            value, used = evaluate(answer)
        except ExpressionError:
            return False
        return Counter(used) == Counter(problem.data["numbers"]) and value == problem.data["target"]
