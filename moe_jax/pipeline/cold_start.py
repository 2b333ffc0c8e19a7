"""R1 §2.3.1's cold-start set, from the source `ColdStartData.source` names: synthetic readable
traces that check their result (by undoing it, or by working it again in the other order), or —
what R1 did, "gathering DeepSeek-R1-Zero outputs in a readable format" — the R1-Zero model's own
samples of fresh prompts, kept by rejection sampling's filters (`rejection.rejection_reason`:
template, verifier, one language, length, duplicate), one per prompt, rewritten readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from moe_jax.data.language import STEP_WORDS
from moe_jax.data.tasks import Problem, Task, problem_language
from moe_jax.data.template import format_response
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.errors import InputError
from moe_jax.models import Transformer
from moe_jax.parallel.rules import Rules
from moe_jax.pipeline.config import ColdStartData
from moe_jax.pipeline.datasets import fresh_problems, task_record
from moe_jax.pipeline.rejection import FILTERS, rejection_sample, removal_summary

SOURCE = "cold_start"  # the records' provenance


def synthetic_records(task: Task, problems: Sequence[Problem], data: ColdStartData, template: str, *,
                      seed: int) -> list[dict[str, Any]]:
    """A readable solution (`Task.readable_solution`, checked by `data.source`) of each problem,
    its draws from the stream `(seed, i)`."""
    records = []
    for i, problem in enumerate(problems):
        thinking, answer = task.readable_solution(problem, np.random.default_rng([seed, i, 2]), data.retry_rate,
                                                  data.source)
        records.append(task_record(problem, task.prompt(problem, template), format_response(thinking, answer), SOURCE))
    return records


def readable(task: Task, problem: Problem, completion: str) -> str:
    """A well-formed completion in the cold start's readable pattern: one step a line (blank
    lines and the spaces around lines dropped), then a closing summary in the prompt's language
    ("so 34+12=46"; not repeated when the chain already ends with it), the answer trimmed."""
    parsed = task.parse(problem, completion)
    if not parsed.format_ok:
        raise ValueError(f"not a well-formed completion: {completion[:80]!r}")
    lines = [line.strip() for line in parsed.thinking.splitlines() if line.strip()]
    summary = f"{STEP_WORDS[problem_language(problem)]['so']} {task.summary(problem, parsed.answer)}"
    if not lines or lines[-1] != summary:
        lines.append(summary)
    return format_response("\n".join(lines), parsed.answer)


def r1_zero_records(policy: Transformer, task: Task, tokenizer: Tokenizer, data: ColdStartData, template: str, *,
                    seed: int, excluded: set[str], mesh: jax.sharding.Mesh, rules: Rules | None = None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(records, rejected samples, stats): rounds of fresh prompts (stream `seed`, none of
    `excluded`), `data.sampling`'s k samples of each from `policy` (R1-Zero's model), the first
    sample of a prompt that passes every filter rewritten `readable`, until `data.examples`
    records or `data.max_rounds` rounds. A round asks for as many prompts as the rate kept so far
    says are missing (at least 1 in 20 kept), and none after a round that kept nothing; every
    process returns the same. No record at all is an error (SFT on nothing would teach nothing)."""
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    removed = dict.fromkeys(FILTERS, 0)
    stats: dict[str, Any] = {"source": "r1_zero", "rounds": 0, "prompts": 0, "sampled": 0, "removed": removed,
                             "second_of_a_prompt": 0, "tokens_sampled": 0}
    for round_ in range(data.max_rounds):
        missing = data.examples - len(records)
        if missing <= 0:
            break
        kept_per_prompt = len(records) / stats["prompts"] if stats["prompts"] else 1.0
        count = math.ceil(missing / max(kept_per_prompt, 0.05))
        problems = fresh_problems(task, seed, stats["prompts"] + count, excluded)[stats["prompts"]:]
        result = rejection_sample(policy, task, problems, tokenizer=tokenizer, template=template,
                                  cfg=data.rejection(count), key=jax.random.fold_in(jax.random.key(seed), round_),
                                  mesh=mesh, rules=rules, source=SOURCE)
        by_prompt = {task.prompt(p, template): p for p in problems}
        firsts: dict[str, dict[str, Any]] = {}
        for record in result.records:
            if record["prompt"] in firsts:
                stats["second_of_a_prompt"] += 1
                continue
            firsts[record["prompt"]] = {**record, "response": readable(task, by_prompt[record["prompt"]],
                                                                       record["response"])}
        records += list(firsts.values())[:missing]
        if not firsts:  # nothing passed: more rounds of the same model would not either
            logging.warning("the cold start from R1-Zero's samples: round %d kept none of %d samples (%s)",
                            round_ + 1, 4 * count, removal_summary(result.stats))
        rejected += result.rejected
        for counts in result.stats.values():
            for name, n in counts["removed"].items():
                removed[name] += n
            stats["sampled"] += counts["sampled"]
        stats.update(rounds=round_ + 1, prompts=stats["prompts"] + count,
                     tokens_sampled=stats["tokens_sampled"] + result.tokens)
        if not firsts:
            break
    stats["kept"] = len(records)
    if not records:
        raise InputError(f"cold_start_data.source=r1_zero: R1-Zero's model passed none of {stats['sampled']} samples "
                         f"(removed by {removed}). Fix: train R1-Zero to answer some prompts (its steps: "
                         "--config.reasoning_rl.steps, --config.final_rl.steps; at --scale=0.05 it learns nothing), or "
                         "take a synthetic source (--config.cold_start_data.source=inverse)")
    return records, rejected, stats
