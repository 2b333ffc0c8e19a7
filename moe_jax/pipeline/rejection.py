"""Rejection sampling (R1 §2.3.3): the reasoning-RL model writes its own SFT data.

k samples per fresh prompt (prompts disjoint from every eval set and from the RL stage's); a
completion is kept only if it passes, in order, these filters — each removal is counted against
the first one it fails, per task, in `stats.json`:

    template    it follows the task's template (`<think>…</think><answer>…</answer>`), and every
                token is one the tokenizer can write back (no id past its vocabulary)
    verifier    the task's verifier accepts its answer
    language    every word of its chain of thought is in the prompt's language
    length      [min_tokens, max_tokens] tokens, and it ended (not cut at the budget)
    duplicate   not the same text as a kept completion of the same prompt

The pipeline then mixes in its non-reasoning share (`moe_jax.pipeline.datasets`: the generator's
answers to non-reasoning prompts, the analogue of R1 reusing DeepSeek-V3's SFT data).

All samples are drawn in one program by the refilling sampler (`moe_jax.models.refill_sampler`):
`prompts_per_batch × k` rows decode at once and a sixteenth of them refill together as they finish,
so a row that ends early takes the next prompt instead of idling until the longest row ends.
Every sample depends only on its index and the stage's key, so the dataset is the same for any
process count. Model text is parsed, never executed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from absl import logging

from moe_jax.data.language import language_share
from moe_jax.data.tasks import Problem, Task, problem_language
from moe_jax.data.tokenizer import UNKNOWN_ID_TEXT, Tokenizer
from moe_jax.models import Transformer
from moe_jax.parallel.distributed import is_lead, sync
from moe_jax.parallel.rules import Rules
from moe_jax.pipeline import datasets
from moe_jax.pipeline.config import PipelineConfig, RejectionConfig
from moe_jax.pipeline.datasets import task_record
from moe_jax.pipeline.prompts import NON_REASONING_OFFSET, identities
from moe_jax.rl.sampling import stream_problems
from moe_jax.train import workdir as workdir_format
from moe_jax.train.experiment_config import run_task

FILTERS = ("template", "verifier", "language", "length", "duplicate")
# A sixteenth of the rows refill together: few rows wait idle for a refill, and each refill's
# prefill (R rows × the prompt) is small. Measured with bench_rejection.py on the trained
# reasoning_rl model (256 rows): 1/16 gave 0.72–0.74 of decode tokens/s, 1/8 0.71, 1/4 0.69–0.71.
REFILL_DIVISOR = 16


def rejection_reason(task: Task, problem: Problem, text: str, length: int, truncated: bool, kept: Iterable[str],
                     cfg: RejectionConfig) -> str | None:
    """The first filter `text` fails (None: keep it). `kept`: the prompt's completions kept so far."""
    parsed = task.parse(problem, text)
    if not parsed.format_ok or UNKNOWN_ID_TEXT in text:  # an id the tokenizer cannot write is not text
        return "template"
    if not task.check_answer(problem, parsed.answer):
        return "verifier"
    reasoning = parsed.thinking if parsed.thinking is not None else parsed.answer
    if language_share(reasoning, problem_language(problem)) < 1.0:
        return "language"
    if truncated or not cfg.min_tokens <= length <= cfg.max_tokens:
        return "length"
    if text in kept:
        return "duplicate"
    return None


@dataclasses.dataclass
class RejectionResult:
    records: list[dict[str, Any]]
    rejected: list[dict[str, Any]]  # each removed sample: its prompt, completion and the filter it failed
    stats: dict[str, Any]  # per task: prompts, sampled, removed by each filter, kept
    tokens: int  # completion tokens sampled
    seconds: dict[str, float]  # sampling (on the devices), filtering (on the host)


def rejection_sample(policy: Transformer, task: Task, problems: Sequence[Problem], *, tokenizer: Tokenizer,
                     template: str, cfg: RejectionConfig, key: jax.Array, mesh: jax.sharding.Mesh,
                     rules: Rules | None = None, source: str = "rejection_sampling") -> RejectionResult:
    """Sample `cfg.sampling.samples_per_prompt` completions of every problem (`prompts_per_batch`
    × k rows decoding at a time) and filter them; every process returns the same records and stats."""
    k = cfg.sampling.samples_per_prompt
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    rows = cfg.prompts_per_batch * k
    sampled = stream_problems(policy, task, problems, tokenizer=tokenizer, template=template, sampling=cfg.sampling,
                              key=key, mesh=mesh, rules=rules, rows=rows, refill_rows=max(1, rows // REFILL_DIVISOR))
    t1 = time.perf_counter()
    tokens = int(sampled.lengths.sum())
    texts = sampled.texts(tokenizer)
    for p, problem in enumerate(problems):
        counts = stats.setdefault(problem.task, {"prompts": 0, "sampled": 0,
                                                 "removed": dict.fromkeys(FILTERS, 0), "kept": 0})
        counts["prompts"] += 1
        prompt, kept = task.prompt(problem, template), []
        for row in range(p * k, (p + 1) * k):
            text = texts[row]
            reason = rejection_reason(task, problem, text, int(sampled.lengths[row]), bool(sampled.truncated[row]),
                                      kept, cfg)
            counts["sampled"] += 1
            if reason is None:
                kept.append(text)
                records.append(task_record(problem, prompt, text, source))
                counts["kept"] += 1
            else:
                counts["removed"][reason] += 1
                rejected.append({"prompt": prompt, "completion": text, "task": problem.task, "reason": reason})
    sampling_s, filtering_s = t1 - t0, time.perf_counter() - t1
    return RejectionResult(records, rejected, stats, tokens, {"sampling": sampling_s, "filtering": filtering_s})


def removal_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Totals over tasks: sampled, kept and removed by each filter."""
    totals = collections.Counter()
    for counts in stats.values():
        if "sampled" in counts:
            totals["sampled"] += counts["sampled"]
            totals["kept"] += counts["kept"]
            totals.update({f"removed/{name}": n for name, n in counts["removed"].items()})
    return dict(totals)


def write_rejection_dataset(stage_dir: str, policy: Transformer, tokenizer: Tokenizer, cfg: PipelineConfig,
                            rs: RejectionConfig, *, seed: int, excluded: set[str], mesh: jax.sharding.Mesh,
                            rules: Rules | None = None) -> None:
    """R1 §2.3.3 into `stage_dir`: `rs.prompts` fresh reasoning problems (stream `seed`, none of
    `excluded`), `policy`'s samples kept by the filters, the non-reasoning share mixed in; the
    dataset, `rejected.jsonl`, `stats.json` and `DONE` (written by the lead process)."""
    task = run_task(cfg.stage_run("reasoning_rl"))
    problems = datasets.fresh_problems(task, seed, rs.prompts, excluded)
    result = rejection_sample(policy, task, problems, tokenizer=tokenizer, template=cfg.template, cfg=rs,
                              key=jax.random.key(seed), mesh=mesh, rules=rules)
    non_reasoning = cfg.non_reasoning_task()
    if not result.records:
        logging.warning("rejection sampling kept no sample (%s): the SFT data is the non-reasoning examples "
                        "alone. Train the policy longer, or sample more", removal_summary(result.stats))
    extra = datasets.mixed_count(rs.prompts, cfg.non_reasoning_share)
    mixed = datasets.non_reasoning_records(non_reasoning, cfg.seed + NON_REASONING_OFFSET, extra, cfg.template,
                                           excluded | identities(problems))
    stats = {**result.stats, non_reasoning.name: {"generated": len(mixed)},
             "total": {**removal_summary(result.stats), "records": len(result.records) + len(mixed),
                       "tokens_sampled": result.tokens, "seconds": result.seconds}}
    if is_lead():
        datasets.write_dataset(stage_dir, result.records + mixed, stats, rs.array_record_above, result.rejected)
        workdir_format.mark_done(stage_dir, 0, stats["total"])
    sync("rejection sampling written")
