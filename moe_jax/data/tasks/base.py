"""What every verifiable task provides: problems from a seed, a worked solution written as the
model should write it (with a tunable error rate), and a verifier of a completion's answer."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

from moe_jax.data.template import format_prompt, format_response, parse_completion


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the question text, its canonical answer and what the verifier needs."""

    task: str
    question: str
    answer: str
    data: dict[str, Any]


class Task(abc.ABC):
    """A family of problems with difficulty knobs set in the constructor."""

    name: str

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator) -> Problem:
        """A new problem, deterministic given the generator's state."""

    @abc.abstractmethod
    def solve(self, problem: Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, str]:
        """(step-by-step thinking, final answer). With probability `error_rate` one step contains a
        slip that the rest of the solution carries through, as an imperfect base model would."""

    @abc.abstractmethod
    def check_answer(self, problem: Problem, answer: str) -> bool:
        """Whether an answer string (the text inside `<answer>`) is correct."""

    def completion(self, problem: Problem, rng: np.random.Generator, error_rate: float = 0.0) -> str:
        """The full response `<think>…</think><answer>…</answer>` for SFT/pretraining text."""
        return format_response(*self.solve(problem, rng, error_rate))

    def prompt(self, problem: Problem, template: str = "r1_zero") -> str:
        return format_prompt(problem.question, template)

    def verify(self, problem: Problem, completion: str) -> bool:
        """Accuracy reward's judge: the completion is well formed and its answer is correct
        (anything that is not a string is not a completion: False, as the reward says 0)."""
        if not isinstance(completion, str):
            return False
        parsed = parse_completion(completion)
        return parsed.format_ok and self.check_answer(problem, parsed.answer)

    def problems(self, seed: int, count: int) -> list[Problem]:
        """`count` problems from `seed`: the same seed always gives the same list."""
        rng = np.random.default_rng(seed)
        return [self.generate(rng) for _ in range(count)]
