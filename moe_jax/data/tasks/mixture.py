"""Several task families as one stream: each problem is drawn from one family by its share, and
every question about a problem (its prompt, template, verifier, solutions) goes to that family.
R1's final RL stage mixes reasoning prompts with non-reasoning ones this way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_jax.data.tasks.base import Problem, Task
from moe_jax.data.template import ParsedCompletion


class Mixture(Task):
    """`Mixture([(arithmetic, 0.8), (number_words, 0.2)])`: shares are normalised to sum to 1."""

    def __init__(self, parts: Sequence[tuple[Task, float]]):
        names = [task.name for task, _ in parts]
        if len(parts) < 2 or len(set(names)) < len(names):
            raise ValueError(f"a mixture needs two or more different tasks, got {names}")
        shares = np.asarray([share for _, share in parts], np.float64)
        if np.any(shares <= 0):
            raise ValueError(f"every task's share must be > 0, got {dict(zip(names, shares.tolist()))}")
        self.name = "+".join(names)
        self.tasks = {task.name: task for task, _ in parts}
        self.cumulative_shares = np.cumsum(shares / shares.sum())
        self.languages = tuple(dict.fromkeys(language for task, _ in parts for language in task.languages))

    def _of(self, problem: Problem) -> Task:
        return self.tasks[problem.task]

    def generate(self, rng: np.random.Generator) -> Problem:
        index = min(int(np.searchsorted(self.cumulative_shares, rng.random(), side="right")), len(self.tasks) - 1)
        return list(self.tasks.values())[index].generate(rng)

    def solve(self, problem: Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, str]:
        return self._of(problem).solve(problem, rng, error_rate)

    def readable_solution(self, problem: Problem, rng: np.random.Generator, retry_rate: float,
                          check: str = "inverse") -> tuple[str, str]:
        return self._of(problem).readable_solution(problem, rng, retry_rate, check)

    def summary(self, problem: Problem, answer: str) -> str:
        return self._of(problem).summary(problem, answer)

    def completion(self, problem: Problem, rng: np.random.Generator, error_rate: float = 0.0) -> str:
        return self._of(problem).completion(problem, rng, error_rate)

    def prompt(self, problem: Problem, template: str = "r1_zero") -> str:
        return self._of(problem).prompt(problem, template)

    def parse(self, problem: Problem, completion: str) -> ParsedCompletion:
        return self._of(problem).parse(problem, completion)

    def check_answer(self, problem: Problem, answer: str) -> bool:
        return self._of(problem).check_answer(problem, answer)

    def is_reasoning(self, problem: Problem) -> bool:
        return self._of(problem).reasoning
