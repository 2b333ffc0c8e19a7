"""The task world's second language: number words, the language-consistency reward (R1 §2.3.2)
on hand-computed and hostile cases, multilingual problems, readable cold-start solutions, the
non-reasoning task and task mixtures."""

from __future__ import annotations

import numpy as np
import pytest

from moe_jax.data import language
from moe_jax.data.pipelines import problem_at
from moe_jax.data.tasks import Mixture, make_task, problem_language
from moe_jax.data.template import format_response
from moe_jax.rl import rewards
from moe_jax.train.evaluation import judge

BILINGUAL = make_task("arithmetic", max_digits=3, ops="+*", languages="en+fr")


@pytest.mark.parametrize("n,en,fr", [
    (0, "zero", "zero"), (7, "seven", "sept"), (17, "seventeen", "dix-sept"), (21, "twenty-one", "vingt et un"),
    (70, "seventy", "soixante-dix"), (71, "seventy-one", "soixante et onze"), (80, "eighty", "quatre-vingts"),
    (81, "eighty-one", "quatre-vingt-un"), (99, "ninety-nine", "quatre-vingt-dix-neuf"),
    (200, "two hundred", "deux cents"), (201, "two hundred one", "deux cent un")])
def test_number_words(n, en, fr):
    assert language.number_words(n, "en") == en
    assert language.number_words(n, "fr") == fr


def _problem(lang: str):
    return next(p for i in range(100) if problem_language(p := problem_at(BILINGUAL, 0, i)) == lang)


def _reward(name: str, problem, completion) -> float:
    return rewards.REWARD_FUNCTIONS[name](BILINGUAL, problem, completion)


def test_language_reward_hand_computed():
    en, fr = _problem("en"), _problem("fr")
    # think words: write, ecris, donc, carry -> English has write + carry of 4
    mixed = format_response("1+2=3, write 3\n4+5=9, ecris 9\ncarry 1\ndonc 41+52=93", "93")
    assert _reward("language", en, mixed) == pytest.approx(2 / 4)
    assert _reward("language", fr, mixed) == pytest.approx(2 / 4)
    assert _reward("language_mixed", en, mixed) == 1.0
    pure = format_response("1+2=3, ecris 3\ndonc 1+2=3", "3")
    assert _reward("language", fr, pure) == 1.0 and _reward("language", en, pure) == 0.0
    assert _reward("language_mixed", fr, pure) == 0.0
    # A word both languages have ("six") counts for either; digits and signs are not words.
    assert language.language_share("six 6+6=12", "fr") == language.language_share("six", "en") == 1.0
    # No words at all: nothing in another language.
    assert _reward("language", en, format_response("1+2=3", "3")) == 1.0
    # Unknown words count against the share (a third of these are English).
    assert language.language_share("write bonjour hello", "en") == pytest.approx(1 / 3)


@pytest.mark.parametrize("completion", [
    "", "write 3", "<think>write</think>", "<think>a</think><answer>3</answer><think>b</think>",
    "<think>" + "write " * 100_000 + "</think><answer>3</answer>", None, 42, "<think>écris ça</think><answer>3</answer>"])
def test_language_reward_on_hostile_inputs(completion):
    """Broken templates, nothing, a text past the reward's bound, non-strings: 0, never a raise;
    accented letters are not ASCII letters, so "écris" is the unknown word "cris"."""
    en = _problem("en")
    assert _reward("language", en, completion) == 0.0
    assert _reward("language_mixed", en, completion) == 0.0


def test_bilingual_problems_name_their_language_and_english_only_tasks_are_unchanged():
    english = make_task("arithmetic", max_digits=3)
    plain = problem_at(english, 3, 5)
    assert "language" not in plain.data and "English" not in plain.question
    languages = {problem_language(problem_at(BILINGUAL, 0, i)) for i in range(50)}
    assert languages == {"en", "fr"}
    fr = _problem("fr")
    assert fr.question.endswith(" en francais")
    thinking, _ = BILINGUAL.solve(fr, np.random.default_rng(0), 0.0)
    assert language.language_share(thinking, "fr") == 1.0


def test_switch_rate_mixes_the_corpus_at_that_rate():
    switching = make_task("arithmetic", max_digits=3, ops="+", languages="en+fr", switch_rate=0.3)
    words_in_other = total = 0
    for i in range(300):
        problem = problem_at(switching, 0, i)
        thinking, _ = switching.solve(problem, np.random.default_rng(i), 0.0)
        words = language.words(thinking)
        total += len(words)
        words_in_other += sum(w not in language.LEXICONS[problem_language(problem)] for w in words)
    assert words_in_other / total == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("task", [BILINGUAL, make_task("countdown", min_numbers=3, max_numbers=3, languages="en+fr")],
                         ids=["arithmetic", "countdown"])
def test_readable_solutions_check_their_work_and_are_right(task):
    retried = 0
    for i in range(40):
        problem = problem_at(task, 1, i)
        thinking, answer = task.readable_solution(problem, np.random.default_rng(i), retry_rate=0.5)
        completion = format_response(thinking, answer)
        assert task.verify(problem, completion)
        assert language.language_share(thinking, problem_language(problem)) == 1.0  # one language
        words = language.STEP_WORDS[problem_language(problem)]
        assert words["ok"] in language.words(thinking.splitlines()[-1])  # ends on a passed check
        retried += words["again"] in language.words(thinking)
    assert 5 < retried < 35  # about half redo a first attempt that failed its check


def test_number_words_task_is_answered_without_thinking():
    task = make_task("number_words", max_value=99)
    problem = problem_at(task, 0, 0)
    right = f"<answer>{problem.answer}</answer>"
    assert task.completion(problem, np.random.default_rng(0)) == right
    assert task.verify(problem, right) and task.verify(problem, f" <answer>{problem.answer.upper()}</answer>\n")
    assert not task.verify(problem, format_response("x", problem.answer))  # a think block is not its template
    assert not task.verify(problem, "<answer>one hundred</answer>")
    fmt = rewards.REWARD_FUNCTIONS["format"]
    assert fmt(task, problem, right) == 1.0 and fmt(task, problem, format_response("", problem.answer)) == 0.0


def test_mixture_routes_options_and_shares():
    mix = make_task("arithmetic+number_words", max_digits=2, languages="en+fr", **{"number_words.share": 0.25,
                                                                                   "number_words.max_value": 20})
    assert isinstance(mix, Mixture) and mix.tasks["arithmetic"].max_digits == 2
    assert mix.tasks["number_words"].max_value == 20 and mix.tasks["arithmetic"].languages == ("en", "fr")
    problems = [problem_at(mix, 0, i) for i in range(2000)]
    share = np.mean([p.task == "number_words" for p in problems])
    assert share == pytest.approx(0.25, abs=0.03)
    texts = [mix.completion(p, np.random.default_rng(0)) for p in problems[:50]]
    measures = judge(mix, problems[:50], texts)
    assert measures["accuracy"] == measures["format"] == measures["accuracy/number_words"] == 1.0
    assert measures["language"] == 1.0 and measures["language_mixed"] == 0.0
    with pytest.raises(ValueError, match="not in the mixture"):
        make_task("arithmetic+number_words", **{"countdown.max_number": 3})
    with pytest.raises(ValueError, match="no task of"):
        make_task("arithmetic+number_words", colour=3)
    with pytest.raises(ValueError, match="leave nothing"):
        make_task("arithmetic+number_words", **{"number_words.share": 1.0})
