"""A non-reasoning task (R1 §2.3.3's "non-reasoning data"): write a number in words in the
language the prompt names — "47 in English" -> `<answer>forty-seven</answer>`, "47 en francais"
-> `<answer>quarante-sept</answer>`. It is answered without a `<think>` block, and its checker
looks at the answer alone (R1 scores non-reasoning replies on their summary)."""

from __future__ import annotations

import re

import numpy as np

from moe_jax.data.language import number_words, words
from moe_jax.data.tasks.base import Problem, Task, problem_language
from moe_jax.data.template import ANSWER_CLOSE, ANSWER_OPEN, ParsedCompletion

# One answer block and nothing else but whitespace; the block may not hold a tag.
_ANSWER_ONLY = re.compile(r"\s*<answer>(?P<answer>(?:(?!</?(?:think|answer)>).)*)</answer>\s*", re.DOTALL)


class NumberWords(Task):
    """Numbers in [0, `max_value`] to spell out in `languages` ("en+fr" by default)."""

    name = "number_words"
    reasoning = False

    def __init__(self, max_value: int = 99, languages: str = "en+fr", switch_rate: float = 0.0):
        super().__init__(languages, switch_rate)
        if not 0 <= max_value <= 999:
            raise ValueError(f"max_value must lie in [0, 999], got {max_value}")
        self.max_value = max_value

    def generate(self, rng: np.random.Generator) -> Problem:
        n = int(rng.integers(self.max_value + 1))
        problem = self._posed(str(n), "", {"n": n}, rng)
        return Problem(self.name, problem.question, number_words(n, problem_language(problem)), problem.data)

    def solve(self, problem: Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, str]:
        """No thinking; with probability `error_rate` the number is spelled one off."""
        n = problem.data["n"]
        if rng.random() < error_rate:
            n = n + 1 if n == 0 or (n < self.max_value and rng.random() < 0.5) else n - 1
        return "", number_words(n, problem_language(problem))

    def completion(self, problem: Problem, rng: np.random.Generator, error_rate: float = 0.0) -> str:
        return f"{ANSWER_OPEN}{self.solve(problem, rng, error_rate)[1]}{ANSWER_CLOSE}"

    def parse(self, problem: Problem, completion: str) -> ParsedCompletion:
        match = _ANSWER_ONLY.fullmatch(completion)
        if match is None:
            return ParsedCompletion(False, None, None)
        return ParsedCompletion(True, None, match["answer"].strip())

    def check_answer(self, problem: Problem, answer: str) -> bool:
        """The same words as the canonical spelling, case and hyphens/spaces aside."""
        return len(answer) <= 200 and words(answer) == words(problem.answer)
