"""The pipeline's datasets as files of records (`moe_jax.data.records`): fresh problems, the
non-reasoning examples mixed into the rejection-sampled data, and how a stage writes and reads
them. Every record carries its task, its problem (for the verifier) and its source."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_jax.data.pipelines import problem_at
from moe_jax.data.records import write_array_record, write_jsonl
from moe_jax.data.tasks import Problem, Task
from moe_jax.errors import InputError
from moe_jax.train.workdir import write_text_atomically

DATA_FILE, ARRAY_RECORD_FILE, STATS_FILE = "data.jsonl", "data.array_record", "stats.json"
REJECTED_FILE = "rejected.jsonl"  # what the filters removed, and why (for a person to read)


def problem_identity(problem: Problem) -> str:
    """What makes two prompts the same problem whatever language they are posed in."""
    data = {k: v for k, v in problem.data.items() if k != "language"}
    return json.dumps([problem.task, data], sort_keys=True)


def fresh_problems(task: Task, seed: int, count: int, excluded: set[str]) -> list[Problem]:
    """The first `count` problems of stream `seed` whose identity is not in `excluded` (nor
    repeated): prompts no eval set and no earlier stage has seen."""
    problems, seen, index = [], set(excluded), 0
    while len(problems) < count:
        problem = problem_at(task, seed, index)
        index += 1
        if problem_identity(problem) not in seen:
            seen.add(problem_identity(problem))
            problems.append(problem)
        if index > 100 * count + 10_000:
            raise InputError(f"only {len(problems)} fresh problems in the first {index} of task {task.name!r} (the "
                             "others are in eval sets or earlier stages). Fix: ask for fewer prompts or examples, or "
                             "make the task larger (its options)")
    return problems


def task_record(problem: Problem, prompt: str, response: str, source: str) -> dict[str, Any]:
    """A dataset record of a prompt and response, with its problem for the verifier and its provenance."""
    return {"prompt": prompt, "response": response, "task": problem.task, "source": source,
            "problem": {"question": problem.question, "answer": problem.answer, "data": problem.data}}


def non_reasoning_records(task: Task, seed: int, count: int, template: str, excluded: set[str]) -> list[dict[str, Any]]:
    """`count` non-reasoning examples: fresh prompts answered by the task's own (correct) answers."""
    return [task_record(problem, task.prompt(problem, template),
                    task.completion(problem, np.random.default_rng([seed, i, 1])), "generated")
            for i, problem in enumerate(fresh_problems(task, seed, count, excluded))]


def mixed_count(reasoning: int, share: float) -> int:
    """How many non-reasoning records make them `share` of a set with `reasoning` others (the
    pipeline counts its prompts, so the mix does not hang on how many samples were kept)."""
    return round(reasoning * share / (1.0 - share)) if share < 1 else reasoning


def write_dataset(directory: str, records: Sequence[dict[str, Any]], stats: dict[str, Any],
                  array_record_above: int, rejected: Sequence[dict[str, Any]] = ()) -> str:
    """`data.jsonl` (and `data.array_record` beside it past `array_record_above` records),
    `rejected.jsonl`, then `stats.json`, each atomically; returns the file an SFT run should read."""
    write_jsonl(os.path.join(directory, DATA_FILE), records)
    path = os.path.join(directory, DATA_FILE)
    if len(records) > array_record_above:
        path = os.path.join(directory, ARRAY_RECORD_FILE)
        write_array_record(path, records)
    write_text_atomically(os.path.join(directory, REJECTED_FILE),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    write_text_atomically(os.path.join(directory, STATS_FILE), json.dumps(stats, indent=2, sort_keys=True))
    return path


def dataset_path(directory: str) -> str:
    """The file an SFT run reads from a stage's dataset folder (ArrayRecord when one was written)."""
    array_record = os.path.join(directory, ARRAY_RECORD_FILE)
    return array_record if os.path.exists(array_record) else os.path.join(directory, DATA_FILE)
