"""Rule-based rewards: correct answers score 1; hostile completions score without error, quickly, and
earn no accuracy credit (model text is parsed, never executed)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from moe_jax.data.tasks import Problem, make_task
from moe_jax.data.template import format_response
from moe_jax.rl import rewards

ARITHMETIC = make_task("arithmetic", min_digits=2, max_digits=3)
COUNTDOWN = make_task("countdown")
# Hand-made problems so every hostile answer below is about a known target and number set.
SUM = Problem("arithmetic", "12+30", "42", {"a": 12, "b": 30, "op": "+"})
TARGET = Problem("countdown", "Using the numbers [3, 4, 5], create an equation that equals 23", "3+4*5",
                 {"numbers": [3, 4, 5], "target": 23})


def wrap(answer: str, thinking: str = "thinking") -> str:
    return format_response(thinking, answer)


def _timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{fn.__name__} took {elapsed:.2f} s"  # a safety bound, not a performance claim
    return value


def timed_score(task, problem, completion):
    """(accuracy, format), each call bounded in time and agreeing with `combined_rewards`."""
    accuracy = _timed(rewards.accuracy_reward, task, problem, completion)
    fmt = _timed(rewards.format_reward, completion)
    totals = _timed(rewards.combined_rewards, task, [problem], [completion])
    assert totals["accuracy"][0] == accuracy and totals["format"][0] == fmt
    return accuracy, fmt


def test_correct_answers_score_one():
    rng = np.random.default_rng(0)
    for task in (ARITHMETIC, COUNTDOWN):
        problems = task.problems(seed=1, count=20)
        completions = [task.completion(p, rng, error_rate=0.0) for p in problems]
        scores = rewards.combined_rewards(task, problems, completions)
        np.testing.assert_array_equal(scores["accuracy"], 1.0)
        np.testing.assert_array_equal(scores["format"], 1.0)
        np.testing.assert_allclose(scores["total"], 1.1, rtol=1e-6)
    assert timed_score(ARITHMETIC, SUM, wrap(" 42\n")) == (1.0, 1.0)
    assert timed_score(ARITHMETIC, SUM, "\n<think>12+30</think>\n<answer>42</answer>\n") == (1.0, 1.0)
    # Any expression using each given number once and reaching the target, in any order or notation.
    for answer in ("3+4*5", "5*4+3", "(5×4)+3", "3 + (4 * 5)", "4*5+3", "(3+4*5)"):
        assert timed_score(COUNTDOWN, TARGET, wrap(answer)) == (1.0, 1.0), answer


def test_wrong_answers_and_bad_format_score_zero_accuracy():
    assert timed_score(ARITHMETIC, SUM, wrap("41")) == (0.0, 1.0)
    assert timed_score(ARITHMETIC, SUM, "42") == (0.0, 0.0)  # right number, no template
    assert timed_score(COUNTDOWN, TARGET, wrap("(3+4)*5")) == (0.0, 1.0)  # 35
    rng = np.random.default_rng(3)
    problems = COUNTDOWN.problems(seed=2, count=20)
    slipped = [COUNTDOWN.completion(p, rng, error_rate=1.0) for p in problems]
    scores = rewards.combined_rewards(COUNTDOWN, problems, slipped)
    assert scores["accuracy"].mean() < 0.5 and scores["format"].min() == 1.0


HOSTILE_ANSWERS = [
    "__import__('os').system('touch {canary}')",
    "eval(\"__import__('os').system('touch {canary}')\")",
    "exec('import os')",
    "(lambda: 23)()",
    "9**9**9",
    "9**9**9**9",
    "2**10000000",
    "1e999",
    "inf",
    "nan",
    "0x17",
    "2_3",
    "23.0",
    "+23",
    "-(-23)",
    "23",  # the target, without the given numbers
    "3+4*5+0",  # a number not in the set
    "3+4*5*1",
    "3*3+4*5-9",  # reuses 3
    "3+4",  # misses 5
    "3+4*5/(4-4)",  # division by zero
    "5/(3-3)",
    "(" * 1000 + "3+4*5" + ")" * 1000,  # deep nesting
    "(" * 98 + "3+4*5" + ")" * 98,  # within the length bound: parsed, and still not the numbers/target
    "(" * 5000,
    ")" * 5000,
    "9" * 5000,  # a 5000-digit number (beyond Python's int() digit limit)
    "*".join(["99"] * 66),  # a huge product within the length bound
    "3+4*5=23",
    "3+4*5; import os",
    "3 + 4 * 5 # comment",
    "٣+٤*٥0",
    "",
    " ",
    "\x00" * 100,
]


@pytest.mark.parametrize("answer", HOSTILE_ANSWERS)
@pytest.mark.parametrize("task,problem", [(COUNTDOWN, TARGET), (ARITHMETIC, SUM)], ids=["countdown", "arithmetic"])
def test_hostile_answers_earn_nothing(tmp_path, task, problem, answer):
    canary = tmp_path / "pwned"
    answer = answer.format(canary=canary) if "{canary}" in answer else answer
    for completion in (wrap(answer), answer, f"<answer>{answer}</answer>"):
        accuracy, _ = timed_score(task, problem, completion)
        assert accuracy == 0.0, completion[:80]
    assert not os.path.exists(canary)


HOSTILE_COMPLETIONS = {
    "1MB of text": "a" * (1 << 20),
    "1MB of whitespace": " " * (1 << 20),
    "1MB think, no close": "<think>" + "x" * (1 << 20),
    "long answer, within the bound": wrap("3" * (rewards.MAX_COMPLETION_CHARS // 2)),
    "1MB of open tags": "<think>" * (1 << 17),
    "1MB of '<'": "<" * (1 << 20),
    "over the scoring bound": wrap("{right}", "x" * (rewards.MAX_COMPLETION_CHARS + 1)),
    "unbalanced: no answer close": "<think>a</think><answer>{right}",
    "unbalanced: no think close": "<think>a<answer>{right}</answer>",
    "unclosed think before answer": "<think><answer>{right}</answer>",
    "repeated answer": "<think>a</think><answer>{right}</answer><answer>{right}</answer>",
    "repeated think": "<think>a</think><think>b</think><answer>{right}</answer>",
    "nested think": "<think><think>a</think></think><answer>{right}</answer>",
    "tag inside answer": "<think>a</think><answer><answer>{right}</answer>",
    "answer before think": "<answer>{right}</answer><think>a</think>",
    "text after answer": "<think>a</think><answer>{right}</answer> so the answer is {right}",
    "text before think": "Sure! <think>a</think><answer>{right}</answer>",
    "upper-case tags": "<THINK>a</THINK><ANSWER>{right}</ANSWER>",
    "only answer": "<answer>{right}</answer>",
}


@pytest.mark.parametrize("name", list(HOSTILE_COMPLETIONS))
@pytest.mark.parametrize("task,problem,right", [(COUNTDOWN, TARGET, "3+4*5"), (ARITHMETIC, SUM, "42")],
                         ids=["countdown", "arithmetic"])
def test_hostile_completions_earn_nothing(task, problem, right, name):
    completion = HOSTILE_COMPLETIONS[name].replace("{right}", right)
    accuracy, fmt = timed_score(task, problem, completion)
    assert accuracy == 0.0
    assert fmt == (1.0 if name == "long answer, within the bound" else 0.0)


def test_combined_rewards_weights_and_errors():
    problems = [SUM, SUM, SUM]
    completions = [wrap("42"), wrap("41"), "42"]
    scores = rewards.combined_rewards(ARITHMETIC, problems, completions, weights={"accuracy": 2.0, "format": 0.5})
    assert set(scores) == {"accuracy", "format", "total"}
    assert all(v.dtype == np.float32 and v.shape == (3,) for v in scores.values())
    np.testing.assert_array_equal(scores["accuracy"], [1, 0, 0])
    np.testing.assert_array_equal(scores["format"], [1, 1, 0])
    np.testing.assert_allclose(scores["total"], [2.5, 0.5, 0.0])
    only_accuracy = rewards.combined_rewards(ARITHMETIC, problems, completions, weights={"accuracy": 1.0})
    np.testing.assert_array_equal(only_accuracy["total"], [1, 0, 0])
    assert "format" in only_accuracy  # still logged
    length = rewards.combined_rewards(ARITHMETIC, problems, completions, weights={"short": -0.01},
                                      reward_fns={"short": lambda task, problem, c: float(len(c))})
    np.testing.assert_allclose(length["total"], [-0.01 * len(c) for c in completions], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown rewards"):
        rewards.combined_rewards(ARITHMETIC, problems, completions, weights={"acc": 1.0})
    with pytest.raises(ValueError, match="problems for"):
        rewards.combined_rewards(ARITHMETIC, problems[:2], completions)


def test_the_work_per_call_is_bounded_and_non_text_is_wrong_everywhere(monkeypatch):
    """A completion past the bound scores 0 without being parsed at all; a non-string is wrong for
    the verifier exactly as for the rewards (False / 0, never a TypeError)."""
    parsed = []
    monkeypatch.setattr("moe_jax.data.tasks.base.parse_completion",
                        lambda text: parsed.append(len(text)) or rewards.parse_completion(text))
    huge = wrap("42", "x" * (4 << 20))
    assert rewards.accuracy_reward(ARITHMETIC, SUM, huge) == 0.0 and rewards.format_reward(huge) == 0.0
    assert parsed == []
    assert rewards.accuracy_reward(ARITHMETIC, SUM, wrap("42", "x" * 1000)) == 1.0 and parsed
    for not_text in (42, None, b"<think>x</think><answer>42</answer>", ["42"]):
        assert ARITHMETIC.verify(SUM, not_text) is False
        assert rewards.accuracy_reward(ARITHMETIC, SUM, not_text) == 0.0
