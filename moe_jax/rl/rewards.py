"""Rule-based rewards (DeepSeek-R1 §2.2.2): an accuracy reward from the task's verifier and a format
reward for the `<think>…</think><answer>…</answer>` template (the answer block alone for a
non-reasoning task), combined with weights; and R1's language-consistency reward (§2.3.2) with
its companion metric, the share of completions that mix languages.

Rewards are a registry by name (`REWARD_FUNCTIONS`): a new reward is one function under
`@register_reward("name")`, and a run weighs the ones it wants by name
(`GRPOConfig.rewards = "accuracy=1.0,format=0.1"`).

Model text is only ever *parsed*, never executed: the template is matched by a linear-time regex
(`moe_jax.data.template.parse_completion`), arithmetic answers by an integer regex, countdown answers
by the bounded recursive-descent evaluator of `moe_jax.data.expression` (numbers, + − × ÷ and
parentheses only; at most `expression.MAX_LENGTH` characters). A reward function never raises on
model text: anything malformed scores 0, and a completion longer than `MAX_COMPLETION_CHARS` scores
0 on every component without being parsed (the sampler's budget keeps real completions far below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moe_jax.data.tasks.base import Problem, Task
from moe_jax.data.template import parse_completion
from moe_jax.train.experiment_config import parse_options

# 256 Ki characters (~16 ms of parsing on a 2-core CPU; 4 Mi took 0.25 s): a bound on the work one
# call does, not a length policy — a 32k-token completion of a BPE tokenizer fits.
MAX_COMPLETION_CHARS = 1 << 18

# (task, problem, completion) -> reward; must not raise on any completion text.
RewardFn = Callable[[Task, Problem, str], float]

DEFAULT_WEIGHTS: Mapping[str, float] = {"accuracy": 1.0, "format": 0.1}

# What a verifier may raise on malformed text (ExpressionError is a ValueError; ZeroDivisionError and
# OverflowError are ArithmeticErrors; RecursionError only if the evaluator's length bound is raised).
_VERIFIER_ERRORS = (ValueError, ArithmeticError, RecursionError)


def _scorable(completion: str) -> bool:
    return isinstance(completion, str) and len(completion) <= MAX_COMPLETION_CHARS


REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """`@register_reward("name")` puts a `(task, problem, completion) -> float` in the registry."""
    if name == "total":
        raise ValueError("'total' is the weighted sum; name the reward something else")

    def register(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        return fn

    return register


def parse_reward_weights(text: str) -> dict[str, float]:
    """`"accuracy=1.0,format=0.1"` -> `{"accuracy": 1.0, "format": 0.1}`, every name registered
    and every weight a finite number."""
    weights = parse_options(text, field="GRPOConfig.rewards")  # name=value pairs, numbers parsed
    for name, weight in weights.items():
        if name not in REWARD_FUNCTIONS:
            raise ValueError(f"unknown reward {name!r}. Fix: use registered rewards: {sorted(REWARD_FUNCTIONS)}")
        if isinstance(weight, str) or not math.isfinite(weight):
            raise ValueError(f"bad weight {name}={weight}. Fix: write name=weight pairs, e.g. "
                             "'accuracy=1.0,format=0.1'")
    if not weights:
        raise ValueError("no rewards. Fix: weigh at least one, e.g. 'accuracy=1.0'")
    return {name: float(weight) for name, weight in weights.items()}


@register_reward("accuracy")
def accuracy_reward(task: Task, problem: Problem, completion: str) -> float:
    """1.0 when the completion follows the template and its answer passes the task's verifier
    (`Task.verify`: the answer is parsed, never executed), else 0.0."""
    if not _scorable(completion):
        return 0.0
    try:
        return 1.0 if task.verify(problem, completion) else 0.0
    except _VERIFIER_ERRORS:
        return 0.0


def format_reward(completion: str) -> float:
    """1.0 for exactly one think block followed by one answer block (whitespace around them only,
    no nested or repeated tags), else 0.0."""
    if not _scorable(completion):
        return 0.0
    return 1.0 if parse_completion(completion).format_ok else 0.0


@register_reward("format")
def task_format_reward(task: Task, problem: Problem, completion: str) -> float:
    """1.0 when the completion follows the template `problem` is answered in (`Task.parse`)."""
    if not _scorable(completion):
        return 0.0
    return 1.0 if task.parse(problem, completion).format_ok else 0.0


@register_reward("language")
def language_reward(task: Task, problem: Problem, completion: str) -> float:
    """R1 §2.3.2: the share of the chain of thought's words in the language the prompt names
    (`Task.language_consistency`); 0.0 when there is no chain of thought to measure (the template
    is broken)."""
    return task.language_consistency(problem, completion) if _scorable(completion) else 0.0


@register_reward("language_mixed")
def language_mixed(task: Task, problem: Problem, completion: str) -> float:
    """A metric more than a reward (weigh it 0 to log `rewards/language_mixed/mean`): 1.0 when
    the chain of thought has words of two languages."""
    return float(_scorable(completion) and task.mixes_languages(problem, completion))


def combined_rewards(task: Task, problems: Sequence[Problem], completions: Sequence[str],
                     weights: Mapping[str, float] | None = None,
                     reward_fns: Mapping[str, RewardFn] | None = None) -> dict[str, np.ndarray]:
    """Every reward component and their weighted sum, each float32 `[B]`:
    `{"accuracy": …, "format": …, "total": Σ_name weights[name]·component}`, for the loop to
    log `rewards/<name>/mean` and train on `total`.

    `problems[i]` is the problem completion i answers (repeat each prompt's problem G times).
    `reward_fns` defaults to accuracy, format and the registry's functions `weights` names; every
    one given is computed and returned, and one missing from `weights` weighs 0. `weights`
    defaults to R1-Zero-style accuracy 1, format 0.1.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    if reward_fns is None:
        reward_fns = {name: REWARD_FUNCTIONS[name] for name in {**DEFAULT_WEIGHTS, **weights}
                      if name in REWARD_FUNCTIONS}
    unknown = sorted(set(weights) - set(reward_fns))
    if unknown:
        raise ValueError(f"weights for unknown rewards {unknown}; known: {sorted(reward_fns)}")
    if "total" in reward_fns:
        raise ValueError("'total' is the weighted sum; name the reward something else")
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems for {len(completions)} completions; "
                         "repeat each problem once per sample")
    components = {name: np.asarray([fn(task, problem, completion)
                                    for problem, completion in zip(problems, completions)], np.float32)
                  for name, fn in reward_fns.items()}
    total = np.zeros(len(completions), np.float32)
    for name, weight in weights.items():
        total += np.float32(weight) * components[name]
    return {**components, "total": total}
