"""Sampling and scoring, the public API: a policy's completions of a batch of prompts, each
scored by reward-registry functions. The GRPO loop calls it every step; rejection sampling and
evaluation call it with their own prompts and `SamplingConfig`.

Prompts are this process's share of a global batch (left-padded host rows); a prompt's
`samples_per_prompt` completions sit in consecutive rows, and the sampler prefills each prompt once
for its group. Model text is only parsed by the reward functions, never executed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.data.pipelines import left_padded_prompts, prompt_ids
from moe_jax.data.tasks import Problem, Task
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.models import Transformer
from moe_jax.models.refill_sampler import jit_generate_stream
from moe_jax.models.sampler import SamplingConfig, jit_generate
from moe_jax.parallel import use_mesh
from moe_jax.parallel.distributed import all_rows, global_batch_array, local_rows, process_batch_slice
from moe_jax.parallel.rules import Rules
from moe_jax.rl import rewards
from moe_jax.train.evaluation import completion_text


@dataclasses.dataclass
class ScoredSamples:
    """This process's B = P × G sampled rows: `rollout` (host arrays `prompt`, `prompt_segments`
    `[B, L]`; `tokens`, `logprobs`, `mask` `[B, N]`; `lengths`, `truncated` `[B]`), their `texts`,
    their `scores` (each weighted reward `[B]` and `total`, their weighted sum) and the seconds
    spent sampling."""

    rollout: dict[str, np.ndarray]
    texts: list[str]
    scores: dict[str, np.ndarray]
    sampling_s: float


@dataclasses.dataclass
class SampledProblems:
    """Every process's view of `samples_per_prompt` completions of each problem: `tokens` `[R, N]`,
    `lengths` and `truncated` `[R]`, R = problems × samples_per_prompt (a problem's consecutive)."""

    tokens: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    def texts(self, tokenizer: Tokenizer) -> list[str]:
        """The completions' text (host work: a caller timing the device leaves it out)."""
        return [completion_text(tokenizer, row) for row in self.tokens]


def sample_problems(policy: Transformer, task: Task, problems: Sequence[Problem], *, tokenizer: Tokenizer,
                    template: str, sampling: SamplingConfig, key: jax.Array | None, mesh: Mesh,
                    rules: Rules | None = None) -> SampledProblems:
    """Sample every problem's completions, each process its share of the prompts, and gather them
    all on every process. The prompts are padded with copies of the first problem to a multiple of
    the device count (so that they split evenly); the padding's samples are dropped."""
    padded = list(problems) + list(problems[:1]) * (-len(problems) % jax.device_count())
    local = process_batch_slice(len(padded))
    tokens_PxL, segments_PxL = left_padded_prompts([prompt_ids(task, tokenizer, p, template) for p in padded],
                                                   tokenizer.pad_id)
    scored = sample_and_score(policy, tokens_PxL[local], segments_PxL[local], padded[local], task=task,
                              tokenizer=tokenizer, sampling=sampling, reward_weights={}, key=key, mesh=mesh,
                              rules=rules)
    rollout = all_rows({name: scored.rollout[name] for name in ("tokens", "lengths", "truncated")})
    kept = len(problems) * sampling.samples_per_prompt
    return SampledProblems(*(rollout[name][:kept] for name in ("tokens", "lengths", "truncated")))


def stream_problems(policy: Transformer, task: Task, problems: Sequence[Problem], *, tokenizer: Tokenizer,
                    template: str, sampling: SamplingConfig, key: jax.Array, mesh: Mesh, rows: int,
                    refill_rows: int, rules: Rules | None = None) -> SampledProblems:
    """`sample_problems` through the refilling sampler (`moe_jax.models.refill_sampler`): every
    problem's completions in one program, `rows` decoding at a time, `refill_rows` refilled
    together as they finish. Sample j of problem p is drawn from `fold_in(fold_in(key, p·k + j),
    step)`, so the result is the same for any `rows`, `refill_rows` and process count."""
    k = sampling.samples_per_prompt
    tokens_PxL, segments_PxL = left_padded_prompts([prompt_ids(task, tokenizer, p, template) for p in problems],
                                                   tokenizer.pad_id)
    replicated = NamedSharding(mesh, PartitionSpec())
    prompts = [jax.make_array_from_process_local_data(replicated, np.repeat(a, k, axis=0))
               for a in (tokens_PxL, segments_PxL)]
    with use_mesh(mesh, rules):
        out = jit_generate_stream(policy, *prompts, rows=rows, refill_rows=refill_rows,
                                  max_new_tokens=sampling.max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id, rng=key, temperature=sampling.temperature,
                                  top_p=sampling.top_p, top_k=sampling.top_k)
    host = jax.tree.map(np.asarray, all_rows({name: out[name] for name in ("tokens", "lengths", "truncated")}))
    return SampledProblems(host["tokens"], host["lengths"], host["truncated"])


def score_texts(task: Task, problems: Sequence[Problem], texts: Sequence[str],
                reward_weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """`{name: [B], "total": [B]}` (float64) for the rewards `reward_weights` names."""
    components = rewards.combined_rewards(task, problems, texts, weights=reward_weights,
                                          reward_fns={name: rewards.REWARD_FUNCTIONS[name] for name in reward_weights})
    return {name: np.asarray(values, np.float64) for name, values in components.items()}


def sample_and_score(policy: Transformer, prompt_tokens_PxL: np.ndarray, prompt_segment_ids_PxL: np.ndarray,
                     problems: Sequence[Problem], *, task: Task, tokenizer: Tokenizer, sampling: SamplingConfig,
                     reward_weights: Mapping[str, float], key: jax.Array | None, mesh: Mesh,
                     rules: Rules | None = None) -> ScoredSamples:
    """`sampling.samples_per_prompt` completions of each of this process's P prompts
    (`problems[p]` is prompt p's problem), sampled on the mesh (one program over all processes)
    and scored on the host by the rewards `reward_weights` names. `key` drives the draws (None
    only for greedy sampling)."""
    start = time.perf_counter()
    G = sampling.samples_per_prompt
    prompt_BxL = np.repeat(prompt_tokens_PxL, G, axis=0)  # rows g·G .. (g+1)·G-1 share prompt g
    segments_BxL = np.repeat(prompt_segment_ids_PxL, G, axis=0)
    with use_mesh(mesh, rules):
        out = jit_generate(policy, global_batch_array(prompt_BxL, mesh), global_batch_array(segments_BxL, mesh),
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rng=key, **sampling.generate_kwargs())
    rollout = {"prompt": prompt_BxL, "prompt_segments": segments_BxL, **local_rows(out, mesh)}
    sampling_s = time.perf_counter() - start
    texts = [completion_text(tokenizer, row) for row in rollout["tokens"]]
    scores = score_texts(task, [p for p in problems for _ in range(G)], texts, reward_weights)
    return ScoredSamples(rollout, texts, scores, sampling_s)
