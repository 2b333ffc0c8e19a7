"""Which problems each stage of a graph poses: every dataset stage draws from a stream of its own
(the seed plus an offset), the held-out sets are the evaluators' own stream, and the prompts a
stage writes data for avoid every eval set and every prompt reasoning RL poses (`seen_problems`).
"""

from __future__ import annotations

from collections.abc import Sequence

from moe_jax.data.pipelines import problem_at, rl_prompt_order
from moe_jax.data.tasks import Problem, Task
from moe_jax.pipeline.config import RUN_STAGES, PipelineConfig
from moe_jax.pipeline.datasets import problem_identity
from moe_jax.pipeline.executor import step_key
from moe_jax.train.evaluation import heldout_seed
from moe_jax.train.experiment_config import run_task

# Each dataset stage draws its problems from a stream of its own (seed + offset), so that no two
# stages, and no eval set, share a stream.
COLD_START_OFFSET, REJECTION_OFFSET, NON_REASONING_OFFSET = 2_000_003, 3_000_017, 4_000_037
TRACES_OFFSET = 5_000_011  # a distillation teacher's trace prompts


def heldout_problems(task: Task, seed: int, count: int) -> list[Problem]:
    """The report's held-out problems: the first `count` of the held-out stream (the evaluators' own)."""
    return [problem_at(task, heldout_seed(seed), i) for i in range(count)]


def identities(problems: Sequence[Problem]) -> set[str]:
    """The problems' identities (`datasets.problem_identity`)."""
    return {problem_identity(p) for p in problems}


def seen_problems(cfg: PipelineConfig) -> set[str]:
    """The identities of every problem an eval set or the reasoning-RL stage poses: what the
    cold-start and rejection-sampling prompts must avoid."""
    seen: set[str] = set()
    for run in map(cfg.stage_run, RUN_STAGES):
        seen |= identities(heldout_problems(run_task(run), cfg.seed, run.loop.eval_problems))
    seen |= identities(heldout_problems(run_task(cfg.stage_run("final_rl")), cfg.seed, cfg.report.problems))
    rl = cfg.stage_run("reasoning_rl")
    order = rl_prompt_order(rl.seed)
    seen |= identities([problem_at(run_task(rl), rl.seed, int(order[j])) for j in range(rl.prompts_consumed)])
    return seen


def seen_problems_key(cfg: PipelineConfig) -> str:
    """A short hash of the problems rejection sampling must avoid (they follow from the config)."""
    return step_key({"seen": sorted(seen_problems(cfg))}, [])
