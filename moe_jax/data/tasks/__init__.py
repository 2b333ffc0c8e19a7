"""Verifiable tasks by name: `make_task("countdown", max_numbers=3)`, and mixtures of them:
`make_task("arithmetic+number_words", max_digits=3, languages="en+fr", **{"number_words.share": 0.2})`.

In a mixture, an option `<task>.<knob>` goes to that task only (`<task>.share` is its share of the
problems; tasks without one split what is left equally), and a bare `<knob>` goes to every task
that has it (an error if none has).
"""

from __future__ import annotations

import inspect
from typing import Any

from moe_jax.data.tasks.arithmetic import Arithmetic
from moe_jax.data.tasks.base import Problem, Task, problem_language
from moe_jax.data.tasks.countdown import Countdown
from moe_jax.data.tasks.mixture import Mixture
from moe_jax.data.tasks.number_words import NumberWords

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "countdown": Countdown, "number_words": NumberWords}


def _knobs(name: str) -> set[str]:
    return set(inspect.signature(TASKS[name].__init__).parameters) - {"self"}


def make_task(name: str, **knobs: Any) -> Task:
    """The task `name` (or mixture "a+b") with its knobs; an unknown name lists the known ones."""
    names = name.split("+")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {sorted(TASKS)} (or several joined by '+')")
    if len(names) == 1:
        return TASKS[name](**knobs)
    per_task: dict[str, dict[str, Any]] = {n: {} for n in names}
    shares: dict[str, float] = {}
    for key, value in knobs.items():
        task, dot, knob = key.rpartition(".")
        if dot and task not in per_task:
            raise ValueError(f"option {key!r} names task {task!r}, which is not in the mixture {names}")
        if knob == "share" and dot:
            shares[task] = float(value)
            continue
        owners = [task] if dot else [n for n in names if knob in _knobs(n)]
        if not owners:
            raise ValueError(f"no task of {names} has the option {knob!r}")
        for owner in owners:
            per_task[owner][knob] = value
    rest = [n for n in names if n not in shares]
    left = 1.0 - sum(shares.values())
    if rest and left <= 0:
        raise ValueError(f"the shares {shares} leave nothing for {rest}")
    shares.update({n: left / len(rest) for n in rest})
    return Mixture([(TASKS[n](**per_task[n]), shares[n]) for n in names])


__all__ = ["TASKS", "Arithmetic", "Countdown", "Mixture", "NumberWords", "Problem", "Task", "make_task",
           "problem_language"]
