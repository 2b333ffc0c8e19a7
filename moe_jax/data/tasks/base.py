"""What every verifiable task provides: problems from a seed, a worked solution written as the
model should write it (with a tunable error rate), a readable self-checking solution (R1's cold
start), and a verifier of a completion's answer.

Every task can be posed in several surface languages (`moe_jax.data.language`): with
`languages="en+fr"` each problem draws one, its prompt names it, and its solutions' words are
written in it — each word in the other language with probability `switch_rate`."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

from moe_jax.data.language import LANGUAGE_NAMES, LANGUAGES, Phrasebook, language_share, mixes_languages
from moe_jax.data.template import ParsedCompletion, format_prompt, format_response, parse_completion


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the question text, its canonical answer and what the verifier needs."""

    task: str
    question: str
    answer: str
    data: dict[str, Any]


def problem_language(problem: Problem) -> str:
    """The language a problem asks its reasoning in (English unless it names another)."""
    return problem.data.get("language", "en")


class Task(abc.ABC):
    """A family of problems with difficulty knobs set in the constructor (and the two language
    knobs every task shares: `languages`, e.g. "en+fr", and `switch_rate`)."""

    name: str
    reasoning = True  # answered with a <think> block; False: the answer block alone

    def __init__(self, languages: str = "en", switch_rate: float = 0.0):
        self.languages = tuple(languages.split("+"))
        if not self.languages or set(self.languages) - set(LANGUAGES) or len(set(self.languages)) < len(self.languages):
            raise ValueError(f"languages must be distinct names among {LANGUAGES} joined by '+', got {languages!r}")
        if not 0 <= switch_rate <= 1:
            raise ValueError(f"switch_rate must lie in [0, 1], got {switch_rate}")
        self.switch_rate = switch_rate

    def _posed(self, question: str, answer: str, data: dict[str, Any], rng: np.random.Generator) -> Problem:
        """The problem in a language drawn from `languages` and named by its question; a
        monolingual English task draws nothing and keeps its questions as they are."""
        if self.languages == ("en",):
            return Problem(self.name, question, answer, data)
        language = self.languages[int(rng.integers(len(self.languages)))]
        return Problem(self.name, f"{question} {LANGUAGE_NAMES[language]}", answer, {**data, "language": language})

    def phrasebook(self, problem: Problem, rng: np.random.Generator, *, readable: bool = False) -> Phrasebook:
        """The words of `problem`'s solution in its language, switching at `switch_rate` (never
        in a readable cold-start solution: R1 writes those in one language)."""
        return Phrasebook(problem_language(problem), 0.0 if readable else self.switch_rate, rng)

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

    # How a readable solution may check its result (`readable_solution`'s `check`), the first the default.
    readable_checks: tuple[str, ...] = ()

    def readable_solution(self, problem: Problem, rng: np.random.Generator, retry_rate: float,
                          check: str = "inverse") -> tuple[str, str]:
        """(thinking, answer) of R1's cold-start data (§2.3.1): the steps, a check of the result
        that recomputes it (by the task's method `check`, one of `readable_checks`), and a
        summary; with probability `retry_rate` a first attempt slips, the check catches it and the
        solution starts again. Always correct in the end."""
        raise NotImplementedError(f"task {self.name!r} has no readable (cold-start) solutions")

    def summary(self, problem: Problem, answer: str) -> str:
        """The closing line of a readable solution, after its language's "so": what the answer
        does (`34+12=46`; countdown: `(3+5)*2=16`)."""
        return answer

    def completion(self, problem: Problem, rng: np.random.Generator, error_rate: float = 0.0) -> str:
        """The full response `<think>…</think><answer>…</answer>` for SFT/pretraining text."""
        return format_response(*self.solve(problem, rng, error_rate))

    def is_reasoning(self, problem: Problem) -> bool:
        """Whether `problem` is answered with a thinking block (a mixture asks its part)."""
        return self.reasoning

    def parse(self, problem: Problem, completion: str) -> ParsedCompletion:
        """The completion split by the template this problem is answered in (`format_ok` False
        when it does not follow it)."""
        return parse_completion(completion)

    def prompt(self, problem: Problem, template: str = "r1_zero") -> str:
        return format_prompt(problem.question, template)

    def reasoning_text(self, problem: Problem, completion: str) -> str | None:
        """The text whose language R1's consistency reward measures: the think block, or the
        answer of a problem answered without one; None when the completion breaks its template."""
        parsed = self.parse(problem, completion)
        if not parsed.format_ok:
            return None
        return parsed.thinking if parsed.thinking is not None else parsed.answer

    def language_consistency(self, problem: Problem, completion: str) -> float:
        """R1 §2.3.2: the share of the reasoning text's words in the prompt's language; 0.0 when the
        completion breaks its template (there is no chain of thought to measure)."""
        text = self.reasoning_text(problem, completion)
        return 0.0 if text is None else language_share(text, problem_language(problem))

    def mixes_languages(self, problem: Problem, completion: str) -> bool:
        """Whether the reasoning text has words of two languages (False for a broken template)."""
        text = self.reasoning_text(problem, completion)
        return text is not None and mixes_languages(text)

    def verify(self, problem: Problem, completion: str) -> bool:
        """Accuracy reward's judge: the completion is well formed and its answer is correct
        (anything that is not a string is not a completion: False, as the reward says 0)."""
        if not isinstance(completion, str):
            return False
        parsed = self.parse(problem, completion)
        return parsed.format_ok and self.check_answer(problem, parsed.answer)

    def problems(self, seed: int, count: int) -> list[Problem]:
        """`count` problems from `seed`: the same seed always gives the same list."""
        rng = np.random.default_rng(seed)
        return [self.generate(rng) for _ in range(count)]
