"""Multi-digit addition and multiplication, solved the way it is taught: column by column with
carries, and long multiplication by partial products."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from moe_jax.data.language import Phrasebook
from moe_jax.data.tasks.base import Problem, Task

_INTEGER = re.compile(r"-?[0-9]{1,40}")  # ASCII digits only


def _slip(digit: int, rng: np.random.Generator) -> int:
    """A wrong digit, one off the right one."""
    return (digit + int(rng.choice([-1, 1]))) % 10


SLIP_KINDS = ("digit", "carry")


class Arithmetic(Task):
    """`a + b` or `a * b` with operands of `min_digits`..`max_digits` digits.

    `slip` is what a flawed solution gets wrong: "digit" writes one digit one off (a random
    lapse), "carry" forgets every carry of an addition (a consistent misconception, as a corpus
    written by people who never learned carrying would teach; multiplications keep the digit
    slip). A base model pretrained on "carry" traces learns the misconception as a competing
    habit, which is what RL on a verifiable reward can unlearn."""

    name = "arithmetic"

    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+*", slip: str = "digit",
                 languages: str = "en", switch_rate: float = 0.0):
        super().__init__(languages, switch_rate)
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not ops or set(ops) - set("+*"):
            raise ValueError(f"ops must be a non-empty subset of '+*', got {ops!r}")
        if slip not in SLIP_KINDS:
            raise ValueError(f"slip must be one of {SLIP_KINDS}, got {slip!r}")
        self.min_digits, self.max_digits, self.ops, self.slip = min_digits, max_digits, ops, slip

    def _operand(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def generate(self, rng: np.random.Generator) -> Problem:
        a, b = self._operand(rng), self._operand(rng)
        op = str(rng.choice(list(self.ops)))
        value = a + b if op == "+" else a * b
        return self._posed(f"{a}{op}{b}", str(value), {"a": a, "b": b, "op": op}, rng)

    def solve(self, problem: Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, str]:
        return self._attempt(problem, rng, rng.random() < error_rate, self.phrasebook(problem, rng))

    def _attempt(self, problem: Problem, rng: np.random.Generator, slip: bool, say: Phrasebook) -> tuple[str, str]:
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        return self._add(a, b, rng, slip, say) if op == "+" else self._multiply(a, b, rng, slip, say)

    readable_checks = ("inverse", "commuted")

    def readable_solution(self, problem: Problem, rng: np.random.Generator, retry_rate: float,
                          check: str = "inverse") -> tuple[str, str]:
        """Column steps, then a check that recomputes the result another way: `check="inverse"`
        undoes it ("check 46-34=12 ok": a sum minus an operand, a product with its factors
        swapped), a skill the base corpus never shows; `"commuted"` works the same operation again
        with the operands swapped, step by step ("check", "2+4=6, write 6", …, "so 12+34=46",
        "ok"), the one skill the base already has. A first attempt with a slip (at
        `retry_rate`) fails its check ("wrong, again") and is redone."""
        if check not in self.readable_checks:
            raise ValueError(f"unknown check {check!r}; arithmetic checks by {self.readable_checks}")
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        say, lines = self.phrasebook(problem, rng, readable=True), []
        for slip in ([True] if rng.random() < retry_rate else []) + [False]:
            thinking, answer = self._attempt(problem, rng, slip, say)
            result = int(answer)
            right = result == (a + b if op == "+" else a * b)
            verdict = say("ok") if right else f"{say('wrong')}, {say('again')}"
            if check == "inverse":
                recomputed = f"{result}-{b}={result - b}" if op == "+" else f"{b}*{a}={a * b}"
                lines += [thinking, f"{say('check')} {recomputed} {verdict}"]
            else:  # the other order, by the same method, without a slip
                swapped = dataclasses.replace(problem, data={**problem.data, "a": b, "b": a})
                lines += [thinking, say("check"), self._attempt(swapped, rng, False, say)[0], verdict]
            if right:
                return "\n".join(lines), answer
        raise AssertionError("an attempt without a slip is always right")

    def summary(self, problem: Problem, answer: str) -> str:
        return f"{problem.data['a']}{problem.data['op']}{problem.data['b']}={answer}"

    def _add(self, a: int, b: int, rng: np.random.Generator, slip: bool, say: Phrasebook) -> tuple[str, str]:
        """Column addition from the units; a slip writes one column's digit wrong, or (slip kind
        "carry") drops every carry."""
        da, db = str(a)[::-1], str(b)[::-1]
        columns = max(len(da), len(db))
        drop_carries = slip and self.slip == "carry"
        wrong_column = int(rng.integers(columns)) if slip and not drop_carries else -1
        steps, written, carry = [], [], 0
        for i in range(columns):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            total = x + y + carry
            digit = _slip(total % 10, rng) if i == wrong_column else total % 10
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}, {say('write')} {digit}")
            written.append(str(digit))
            carry = 0 if drop_carries else total // 10
        if carry:
            written.append(str(carry))
            steps.append(f"{say('carry')} {carry}")
        result = str(int("".join(reversed(written))))
        return "\n".join(steps) + f"\n{say('so')} {a}+{b}={result}", result

    def _multiply(self, a: int, b: int, rng: np.random.Generator, slip: bool, say: Phrasebook) -> tuple[str, str]:
        """Long multiplication: one partial product per digit of b, then their sum; a slip gets
        one partial product's digit wrong."""
        digits = str(b)[::-1]
        wrong = int(rng.integers(len(digits))) if slip else -1
        partials, steps = [], []
        for i, d in enumerate(digits):
            partial = a * int(d) * 10**i
            if i == wrong:
                text = str(partial)
                at = int(rng.integers(len(text)))
                right = int(text[at])
                bad = _slip(right, rng)
                if at == 0 and bad == 0:  # no leading zero: step the other way (1 -> 2, 9 -> 8)
                    bad = 2 if right == 1 else 8
                partial = int(text[:at] + str(bad) + text[at + 1:])
            partials.append(partial)
            steps.append(f"{a}*{int(d) * 10**i}={partial}")
        result = sum(partials)
        if len(partials) > 1:
            steps.append("+".join(map(str, partials)) + f"={result}")
        return "\n".join(steps) + f"\n{say('so')} {a}*{b}={result}", str(result)

    def check_answer(self, problem: Problem, answer: str) -> bool:
        answer = answer.strip()
        return bool(_INTEGER.fullmatch(answer)) and int(answer) == int(problem.answer)
