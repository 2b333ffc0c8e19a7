"""The GRPO loop (R1-Zero's recipe): `train_grpo(cfg, workdir)`.

Each step: a batch of prompts → `group_size` sampled completions each (KV-cache sampler, the
sampling log-probs kept as the old policy's) → rule-based rewards on the host → group advantages
→ one jitted step of μ × minibatch updates. The workdir, resume, SIGTERM, NaN and config-conflict
behaviour is the run driver's (`moe_jax.train.driver`); the sampling key of step N is
`fold_in(key(seed), N)`, so a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe_jax.data.pipelines import longest_prompt, problem_at, rl_prompt_batches
from moe_jax.data.tasks import Task
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.parallel.distributed import all_rows, global_batch_array, process_batch_slice
from moe_jax.parallel.rules import Rules
from moe_jax.rl import grpo
from moe_jax.rl.config import MEAN_LENGTH, GRPOConfig
from moe_jax.rl.health import HealthMonitor
from moe_jax.rl.policy import completion_width, rollout_rows
from moe_jax.rl.rewards import parse_reward_weights
from moe_jax.rl.sampling import sample_and_score
from moe_jax.rl.step import make_grpo_step, make_logprob_fn
from moe_jax.train import driver
from moe_jax.train.context import RunContext
from moe_jax.train.evaluation import Evaluator
from moe_jax.train.experiment_config import config_error, require_class


def reward_metrics(scores: dict[str, np.ndarray], group_size: int) -> dict[str, float]:
    """TRL's reward metrics of a whole generation batch (the reward arrays of all processes' rows)."""
    total_B = scores["total"]
    metrics = {f"rewards/{name}/mean": float(np.mean(values)) for name, values in scores.items() if name != "total"}
    metrics.update({"reward": float(total_B.mean()),
                    "reward_std": float(total_B.reshape(-1, group_size).std(axis=1, ddof=1).mean()),
                    "frac_reward_zero_std": float(np.mean(grpo.zero_std_groups(total_B, group_size))),
                    "frac_reward_zero": float(np.mean(total_B == 0))})
    return metrics


def length_metrics(lengths_B: np.ndarray, correct_B: np.ndarray) -> dict[str, float]:
    """Completion lengths (tokens) of a generation batch: `completions/mean_length`, and split by
    the verifier's verdict on each completion, `…/mean_length_correct` and `…_incorrect` and
    `completions/length_ratio` (incorrect over correct) — Liu et al. 2025 (Dr. GRPO, §3.1) show
    GRPO's length normalisation letting wrong answers grow longer while right ones do not. A
    split with no completion in it is left out (no value, rather than a made-up one)."""
    lengths_B, correct_B = np.asarray(lengths_B, np.float64), np.asarray(correct_B, bool)
    metrics = {MEAN_LENGTH: float(lengths_B.mean())}
    if correct_B.any():
        metrics[f"{MEAN_LENGTH}_correct"] = float(lengths_B[correct_B].mean())
    if not correct_B.all():
        metrics[f"{MEAN_LENGTH}_incorrect"] = float(lengths_B[~correct_B].mean())
    if correct_B.any() and not correct_B.all():
        metrics["completions/length_ratio"] = (metrics[f"{MEAN_LENGTH}_incorrect"]
                                               / max(metrics[f"{MEAN_LENGTH}_correct"], 1e-9))
    return metrics


def grpo_run(cfg: GRPOConfig) -> driver.BuildRun:
    """The parts of a GRPO run: prompt batches, the sample-score-update step (`GRPOStepper`),
    greedy held-out accuracy (also at step 0, the curve's starting point)."""

    def build(context: RunContext) -> driver.RunParts:
        mesh, rules = context.mesh, context.rules
        health = HealthMonitor(cfg.health)
        grpo_step, state = make_grpo_step(context.model, context.optimizer, cfg.loss, sampling=cfg.sampling,
                                          microbatches=cfg.microbatches, mesh=mesh, rules=rules)
        # The KL anchor is the policy we start from; it is only kept (and scored) when beta > 0.
        reference = (make_logprob_fn(context.model, cfg.sampling, mesh=mesh, rules=rules),
                     jax.tree.map(jnp.copy, nnx.state(context.model))) if cfg.loss.beta > 0 else None
        evaluate = Evaluator(cfg, context.task, context.tokenizer, mesh)
        longest = longest_prompt(context.task, context.tokenizer, seed=cfg.seed, template=cfg.template)
        if longest > cfg.prompt_len:
            raise config_error(cfg, "seq_len", f"prompts of task {cfg.task!r} take up to {longest} tokens, but a "
                               f"row leaves them seq_len - sampling.max_new_tokens = {cfg.prompt_len}",
                               f"raise seq_len to at least {longest + cfg.max_new_tokens}, or lower "
                               "sampling.max_new_tokens")
        local = process_batch_slice(cfg.prompts_per_step)
        prompts = iter(rl_prompt_batches(context.task, context.tokenizer, seed=cfg.seed,
                                         batch_size=local.stop - local.start, prompt_len=cfg.prompt_len,
                                         template=cfg.template))
        stepper = GRPOStepper(cfg, context.task, context.tokenizer, mesh, rules, prompts,
                              nnx.graphdef(context.model), grpo_step, reference)
        return driver.RunParts(
            step=stepper, state=state, data=prompts, data_key="prompts",
            evaluate=evaluate, evaluate_at_start=True,
            progress_keys={"reward": "reward", "eval/accuracy": "acc"}, check=health,
            plot_keys=["reward", "eval/accuracy", "rewards/format/mean", MEAN_LENGTH, f"{MEAN_LENGTH}_correct",
                       f"{MEAN_LENGTH}_incorrect", "kl",
                       "entropy", "clip_ratio/region_mean", "grad_norm"])

    return build


def train_grpo(cfg: GRPOConfig, workdir: str, *, mesh_spec: str | None = None,
               init_from: str | None = None, hooks: Sequence[driver.Hook] = (),
               allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) GRPO in `workdir` (`driver.run`'s contract). `init_from` gives the starting
    policy, which is also the frozen reference when `loss.beta` > 0 (then it is read on resume too)."""
    require_class(cfg, GRPOConfig, "train_grpo")
    return driver.run(cfg, workdir, grpo_run(cfg), mesh_spec=mesh_spec, init_from=init_from,
                      init_from_on_resume=cfg.loss.beta > 0, hooks=hooks, allow_config_change=allow_config_change)


def _informative_groups(cfg: GRPOConfig, first: dict[str, np.ndarray], sample_more) -> tuple[dict, int]:
    """DAPO's dynamic sampling (§3.2): keep the groups whose rewards differ, sampling more batches
    (at most `max_resamples`) until this process has as many as it sampled at first (its share of
    `prompts_per_step`); if the cap is hit, the batch is topped up with uninformative groups
    (advantage 0: shapes stay static, no gradient).
    Returns (the rollout, the number of sampled batches)."""
    G, wanted = cfg.group_size, len(first["reward"]) // cfg.group_size  # this process's prompts
    kept, spare, batches, rollout = [], [], 1, first
    while True:
        zero_G = np.asarray(grpo.zero_std_groups(rollout["reward"], G))
        for g in range(wanted):
            group = {k: v[g * G:(g + 1) * G] for k, v in rollout.items()}
            (spare if zero_G[g] else kept).append(group)
        # Sampling is one program over all processes: every one samples again while any is short.
        if not np.any(all_rows(np.asarray([len(kept) < wanted]))) or batches > cfg.max_resamples:
            break
        rollout, batches = sample_more(batches), batches + 1
    groups = (kept + spare)[:wanted]
    return {k: np.concatenate([g[k] for g in groups]) for k in first}, batches


@dataclasses.dataclass
class Rollout:
    """One step's generation batch, ready for the update (tunix's training example): the global
    `batch` arrays the GRPO step reads (tokens, segment ids, completion mask, old log-probs,
    advantages, and the reference's log-probs when beta > 0), the host `metrics` of what was
    sampled (rewards of the first sampled batch, completion lengths), the completion tokens of that
    batch and the seconds sampling took."""

    batch: dict[str, jax.Array]
    metrics: dict[str, Any]
    completion_tokens: int
    sampling_s: float


@dataclasses.dataclass
class GRPOStepper:
    """`stepper(step, state) -> (state, metrics)`: `rollout` (sample, score, advantages → a
    batch), then `update` (one jitted GRPO step). Reward metrics describe the first sampled batch:
    the policy as it is, before any filtering."""

    cfg: GRPOConfig
    task: Task
    tokenizer: Tokenizer
    mesh: Mesh
    rules: Rules
    prompts: Iterator[dict[str, np.ndarray]]
    model_graphdef: nnx.GraphDef
    grpo_step: Callable[[nnx.State, dict], tuple[nnx.State, dict]]
    # (jitted log-prob function, frozen model state) of the KL reference, when beta > 0
    reference: tuple[Callable[[nnx.State, dict], jax.Array], nnx.State] | None = None

    def __call__(self, step: int, state: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
        start = time.perf_counter()
        rollout = self.rollout(step, state)
        made = time.perf_counter()
        state, metrics = self.update(state, rollout)
        done = time.perf_counter()
        metrics.update({"time/sampling": rollout.sampling_s, "time/scoring": made - start - rollout.sampling_s,
                        "time/training": done - made, "tokens_per_s": rollout.completion_tokens / (done - start)})
        return state, metrics

    def rollout(self, step: int, state: nnx.State) -> Rollout:
        """Step `step`'s generation batch from the policy in `state` (the sampling key of step N is
        `fold_in(key(seed), N)`: a resumed run draws what an uninterrupted one would have)."""
        cfg = self.cfg
        policy = nnx.merge(self.model_graphdef, state[0])
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        sampling_s = [0.0]

        def sample(attempt: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
            rollout, scores, seconds = self._sample(policy, jax.random.fold_in(step_key, attempt))
            sampling_s[0] += seconds
            return rollout, scores

        rollout, scores = sample(0)
        first = all_rows({**scores, **{name: rollout[name] for name in ("lengths", "truncated", "correct")}})
        metrics: dict[str, Any] = reward_metrics({name: first[name] for name in scores}, cfg.group_size)
        if cfg.dynamic_sampling:
            rollout, metrics["dynamic_sampling/batches"] = _informative_groups(
                cfg, rollout, lambda attempt: sample(attempt)[0])
        batch = self._training_batch(rollout)
        metrics.update({**length_metrics(first["lengths"], first["correct"]),
                        "completions/clipped_ratio": float(first["truncated"].mean())})
        return Rollout(batch, metrics, int(first["lengths"].sum()), sampling_s[0])

    def update(self, state: nnx.State, rollout: Rollout) -> tuple[nnx.State, dict[str, Any]]:
        """One jitted GRPO step (μ × minibatch updates) on the rollout's batch; its metrics on the host."""
        state, metrics = self.grpo_step(state, rollout.batch)
        host = {**rollout.metrics, **jax.device_get(metrics)}
        host["loss"] = host["policy_loss"]
        return state, host

    def _sample(self, policy: nnx.Module, key: jax.Array) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
        """This process's share of the next prompt batch, sampled and scored: (the rollout with its
        total reward and the verifier's verdict on each completion, every reward component, the
        seconds sampling took). A group never spans processes."""
        cfg = self.cfg
        batch = next(self.prompts)
        problems = [problem_at(self.task, cfg.seed, int(i)) for i in batch["problem_index"]]
        scored = sample_and_score(
            policy, batch["prompt_tokens"], batch["prompt_segment_ids"], problems,
            task=self.task, tokenizer=self.tokenizer, sampling=cfg.sampling,
            reward_weights=parse_reward_weights(cfg.rewards), key=key, mesh=self.mesh, rules=self.rules)
        scores = scored.scores
        if cfg.loss.overlong_buffer:  # DAPO's soft overlong punishment, a reward of its own
            scores["overlong"] = np.asarray(grpo.overlong_penalty(
                scored.rollout["lengths"], cfg.max_new_tokens, cfg.loss.overlong_buffer), np.float64)
            scores["total"] = scores["total"] + scores["overlong"]
        G = cfg.group_size
        correct_B = np.asarray([self.task.verify(problems[row // G], text) for row, text in enumerate(scored.texts)])
        return {**scored.rollout, "reward": scores["total"], "correct": correct_B}, scores, scored.sampling_s

    def _training_batch(self, rollout: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The GRPO step's global batch from this process's rollout rows: group advantages, the
        completions trimmed to the longest one (the same width on every process), prompt and
        completion as one row, and the reference's log-probs when beta > 0."""
        cfg = self.cfg
        # "batch" scaling needs every process's rewards (each process keeps its own rows'
        # advantages), and the trimmed width must be the same on every process.
        kept = all_rows({"reward": rollout["reward"], "lengths": rollout["lengths"]})
        advantages_B = grpo.group_advantages(jnp.asarray(kept["reward"], jnp.float32), cfg.group_size,
                                             scale=cfg.loss.scale_rewards)[process_batch_slice(len(kept["reward"]))]
        width = completion_width(int(kept["lengths"].max()), cfg.max_new_tokens)
        completion = {name: rollout[name][:, :width] for name in ("tokens", "mask", "logprobs")}
        mask_BxN = completion["mask"]
        if cfg.loss.mask_truncated_completions:
            mask_BxN = np.asarray(grpo.mask_truncated(mask_BxN, rollout["truncated"]))
        tokens_BxS, segment_ids_BxS = rollout_rows(rollout["prompt"], rollout["prompt_segments"],
                                                   completion["tokens"], completion["mask"])
        local = {"tokens": tokens_BxS, "segment_ids": segment_ids_BxS, "mask": mask_BxN,
                 "old_logp": completion["logprobs"], "advantages": advantages_B}
        batch = {name: global_batch_array(np.asarray(rows), self.mesh) for name, rows in local.items()}
        if self.reference is not None:
            logprob_fn, reference_state = self.reference
            batch["ref_logp"] = logprob_fn(reference_state, batch)
        return batch
