"""Verifiable reasoning tasks by name: `make_task("countdown", max_numbers=3)`."""

from moe_jax.data.tasks.arithmetic import Arithmetic
from moe_jax.data.tasks.base import Problem, Task
from moe_jax.data.tasks.countdown import Countdown

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "countdown": Countdown}


def make_task(name: str, **knobs) -> Task:
    """The task `name` with its difficulty knobs; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**knobs)


__all__ = ["TASKS", "Arithmetic", "Countdown", "Problem", "Task", "make_task"]
