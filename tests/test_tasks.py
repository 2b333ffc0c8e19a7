import re
from fractions import Fraction

import numpy as np
import pytest

from moe_jax.data.expression import ExpressionError, evaluate
from moe_jax.data.tasks import Arithmetic, Countdown, make_task
from moe_jax.data.template import format_prompt, format_response, parse_completion


@pytest.mark.parametrize("text, value, numbers", [
    ("3+4*2", 11, [3, 4, 2]), ("(3+4)*2", 14, [3, 4, 2]), ("8/3", Fraction(8, 3), [8, 3]),
    ("2×3÷4", Fraction(3, 2), [2, 3, 4]), (" ( 10 - 4 ) - 3 ", 3, [10, 4, 3]), ("7-9", -2, [7, 9]),
])
def test_expression_values_hand_computed(text, value, numbers):
    assert evaluate(text) == (value, numbers)


@pytest.mark.parametrize("text", ["2+", "(2", "2)", "1/0", "a+1", "2**3", "", "__import__('os')",
                                  "1+" * 150 + "1", "(" * 33 + "1" + ")" * 33, "٣+٤"])
def test_expression_rejects_malformed_text(text):
    """Including nesting past MAX_DEPTH and non-ASCII digits (which int() would accept)."""
    with pytest.raises(ExpressionError):
        evaluate(text)


@pytest.mark.parametrize("text, ok, answer", [
    ("<think>a</think><answer>5</answer>", True, "5"),
    (" <think>x\ny</think>\n<answer> 5 </answer>\n", True, "5"),
    ("<think>a</think>", False, None),
    ("<answer>5</answer>", False, None),
    ("<think>a<think>b</think><answer>5</answer>", False, None),
    ("<think>a</think><answer>5</answer> and more", False, None),
    ("<think>a</think><answer>5</answer><answer>6</answer>", False, None),
    ("<think>a</think><answer><think>5</answer>", False, None),
])
def test_completion_format_is_strict(text, ok, answer):
    parsed = parse_completion(text)
    assert parsed.format_ok == ok and parsed.answer == answer


def test_prompt_templates():
    assert format_prompt("1+1", "compact") == "1+1\n"
    prompt = format_prompt("1+1")
    assert prompt.startswith("A conversation between User and Assistant") and "User: 1+1. Assistant:" in prompt
    with pytest.raises(ValueError, match="compact"):
        format_prompt("1+1", "chatml")


@pytest.mark.parametrize("task", [Arithmetic(1, 4), Countdown()], ids=["arithmetic", "countdown"])
def test_problems_are_deterministic_in_the_seed(task):
    assert task.problems(3, 20) == task.problems(3, 20)
    assert task.problems(3, 20) != task.problems(4, 20)


def test_arithmetic_answers_knobs_and_traces():
    task = make_task("arithmetic", min_digits=2, max_digits=3)
    rng = np.random.default_rng(0)
    for problem in task.problems(0, 300):
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        assert 10 <= a < 1000 and 10 <= b < 1000 and problem.question == f"{a}{op}{b}"
        assert int(problem.answer) == (a + b if op == "+" else a * b)
        completion = task.completion(problem, rng)
        assert task.verify(problem, completion), completion
        assert completion.endswith(f"={problem.answer}</think><answer>{problem.answer}</answer>")
    assert not task.check_answer(task.problems(0, 1)[0], "12abc")


def test_arithmetic_slips_are_carried_through_to_the_answer():
    task = Arithmetic(2, 4)
    rng = np.random.default_rng(1)
    for problem in task.problems(1, 200):
        thinking, answer = task.solve(problem, rng, error_rate=1.0)
        assert answer != problem.answer
        assert thinking.endswith(f"={answer}")  # the wrong result is the trace's own conclusion


def test_carry_slip_is_a_consistent_misconception():
    task = Arithmetic(2, 3, ops="+", slip="carry")
    rng = np.random.default_rng(3)
    for problem in task.problems(2, 100):
        a, b = problem.data["a"], problem.data["b"]
        no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:04d}", f"{b:04d}", strict=True)))
        thinking, answer = task.solve(problem, rng, error_rate=1.0)
        assert answer == str(no_carry) and thinking.endswith(f"={answer}")
        assert not re.search(r"\d\+\d\+\d=", thinking) and "carry" not in thinking  # no carry added
        assert task.solve(problem, rng, error_rate=0.0)[1] == problem.answer
    with pytest.raises(ValueError, match="slip"):
        Arithmetic(slip="sloppy")


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_error_rate_controls_the_fraction_of_wrong_solutions(name):
    task, rng = make_task(name), np.random.default_rng(2)
    problems = task.problems(5, 1000)
    wrong = np.mean([not task.verify(p, task.completion(p, rng, 0.3)) for p in problems])
    assert abs(wrong - 0.3) < 0.06  # binomial std ≈ 0.015
    assert all(task.verify(p, task.completion(p, rng, 0.0)) for p in problems[:200])


def test_countdown_problems_are_solvable_and_within_knobs():
    task = Countdown(min_numbers=3, max_numbers=4, max_number=50, max_target=200)
    for problem in task.problems(7, 300):
        numbers, target = problem.data["numbers"], problem.data["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= n <= 50 for n in numbers)
        assert 1 <= target <= 200 and str(target) in problem.question
        assert task.check_answer(problem, problem.answer)


def test_countdown_verifier_rejects_misuse():
    task = Countdown()
    problem = task.problems(0, 1)[0]
    numbers, target = problem.data["numbers"], problem.data["target"]
    assert task.check_answer(problem, problem.answer)
    assert not task.check_answer(problem, f"{target}")  # numbers not used
    assert not task.check_answer(problem, "+".join(map(str, numbers)) + f"+{numbers[0]}-{numbers[0]}")
    assert not task.check_answer(problem, problem.answer + "+0")  # a number not given
    assert not task.check_answer(problem, "1/0")
    assert not task.check_answer(problem, "__import__('os').system('true')")
    assert not task.verify(problem, format_response("", problem.answer) + "junk")


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="arithmetic"):
        make_task("sudoku")
