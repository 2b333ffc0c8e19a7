"""The jitted GRPO step: μ inner iterations over the minibatches of one generation batch, each
minibatch one optimizer update of the clipped surrogate of `grpo.policy_loss` plus the MoE
balance losses (its gradient accumulated over `microbatches` scans by the shared
`train.step.accumulated_update`), each followed by the loss-free router-bias update — all one
XLA program with the state donated and, over a mesh, kept in its sharding.

The generation batch (`rollout`) holds, for B = prompts × G completions:
`tokens`/`segment_ids` `[B, S]` (prompt + completion, `policy.rollout_rows`), `mask` `[B, N]`
(completion tokens that count), `old_logp` `[B, N]` (the sampler's), `advantages` `[B]`, and
`ref_logp` `[B, N]` when the KL penalty is on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from moe_jax.models import Transformer
from moe_jax.models.sampler import SamplingConfig
from moe_jax.parallel.rules import Rules
from moe_jax.rl.config import GRPOLoss
from moe_jax.rl.grpo import policy_loss
from moe_jax.rl.policy import completion_logprobs
from moe_jax.train.step import ROUTER_LOAD, accumulated_update, jit_over_mesh

Rollout = dict[str, jax.Array]


def make_grpo_step(model: Transformer, optimizer: nnx.Optimizer, loss: GRPOLoss, *,
                   sampling: SamplingConfig, microbatches: int = 1, mesh: Mesh | None = None,
                   rules: Rules | None = None
                   ) -> tuple[Callable[[nnx.State, Rollout], tuple[nnx.State, dict]], nnx.State]:
    """(jitted `step(state, rollout) -> (state, metrics)`, initial state); metrics are means over
    the μ × minibatches updates. `sampling` is the distribution the completions were drawn from
    (the ratio's denominator), its `samples_per_prompt` the rows that share a prompt;
    `microbatches` scans accumulate each update's gradient (memory, not maths)."""
    graphdef, state = nnx.split((model, optimizer))
    updates = loss.num_iterations * loss.minibatches

    def step(state: nnx.State, rollout: Rollout) -> tuple[nnx.State, dict]:
        n_completion = rollout["mask"].shape[1]
        # DAPO's token-level normaliser from the whole generation batch (all devices), as the
        # mean token count of one minibatch, so every update sees the same scale.
        dapo_normalizer = jnp.maximum(rollout["mask"].sum(), 1) / loss.minibatches
        if loss.routing_replay and model.cfg.is_moe:
            rollout = {**rollout, "routing": _record_routing(nnx.merge(graphdef, state)[0], rollout, sampling)}
        minibatches = jax.tree.map(lambda x: x.reshape(loss.minibatches, -1, *x.shape[1:]), rollout)

        def chunk_loss(policy: Transformer, chunk: Rollout) -> tuple[jax.Array, dict]:
            """This microbatch's share of its minibatch's loss (`chunk["weight"]`: `_chunk_weight`)."""
            logp, entropy, aux = completion_logprobs(
                policy, chunk["tokens"], chunk["segment_ids"], n_completion,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                routing_LxBxSxK=chunk["routing"].swapaxes(0, 1) if "routing" in chunk else None,
                group_size=_shared_prompt_group(sampling, chunk["tokens"].shape[0]))
            value, metrics = policy_loss(
                logp, chunk["old_logp"], chunk["advantages"], chunk["mask"],
                loss_type=loss.loss_type, epsilon=loss.epsilon, epsilon_high=loss.epsilon_high or None,
                beta=loss.beta, ref_logp_BxT=chunk.get("ref_logp"),
                importance_sampling_level=loss.importance_sampling_level,
                max_completion_length=sampling.max_new_tokens,
                normalizer=dapo_normalizer if loss.loss_type == "dapo" else None, entropy_BxT=entropy)
            weight = chunk["weight"]
            metrics = {**metrics, "policy_loss": weight * value, "moe_aux_loss": aux["moe_aux_loss"]}
            if "router" in aux:
                metrics["maxvio"] = aux["router"]["max_vio"]
                metrics[ROUTER_LOAD] = aux["router"]["load"]
            return weight * value + aux["moe_aux_loss"] / microbatches, metrics

        def update(state, index):
            model, optimizer = nnx.merge(graphdef, state)
            minibatch = jax.tree.map(lambda x: x[index % loss.minibatches], minibatches)
            chunks = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), minibatch)
            chunks["weight"] = _chunk_weight(loss, chunks["mask"])
            metrics_C, update_metrics = accumulated_update(model, optimizer, chunk_loss, chunks)
            # Chunk means, except the loss: its chunks' shares add up to the minibatch's loss.
            metrics = {**{k: v.sum(0) if k == "policy_loss" else v.mean(0) for k, v in metrics_C.items()},
                       **update_metrics}
            return nnx.state((model, optimizer)), metrics

        state, metrics = jax.lax.scan(update, state, jnp.arange(updates))
        # Means over the updates; the state is finite only if it was after every one of them.
        return state, {**jax.tree.map(lambda m: m.mean(0), metrics), "state_finite": metrics["state_finite"].min()}

    return jit_over_mesh(step, state, mesh, donate=True, rules=rules), state


def _chunk_weight(loss: GRPOLoss, mask_CxBxT: jax.Array) -> jax.Array:
    """`[C]` factors that make the microbatches' losses sum to their minibatch's: a per-sequence
    mean ("grpo") or a fixed per-row denominator ("dr_grpo") weighs each of the C equal chunks
    1/C; "bnpo" divides by the minibatch's token count, so a chunk weighs its share of the tokens;
    "dapo" already divides by the generation batch's count, so every chunk weighs 1."""
    chunks = mask_CxBxT.shape[0]
    if loss.loss_type == "dapo":
        return jnp.ones((chunks,), jnp.float32)
    if loss.loss_type == "bnpo":
        tokens_C = mask_CxBxT.reshape(chunks, -1).sum(-1).astype(jnp.float32)
        return tokens_C / jnp.maximum(tokens_C.sum(), 1.0)
    return jnp.full((chunks,), 1.0 / chunks, jnp.float32)


def _shared_prompt_group(sampling: SamplingConfig, rows: int) -> int:
    """The group size to share prompts over in a forward of `rows` rows: `samples_per_prompt`
    when the rows hold whole groups (a minibatch or microbatch split inside a group runs rows in
    full)."""
    group_size = sampling.samples_per_prompt
    return group_size if rows % group_size == 0 else 1


def _record_routing(model: Transformer, rollout: Rollout, sampling: SamplingConfig) -> jax.Array:
    """The main MoE layers' expert choices `[B, L, S, K]` for the rollout under the current (old)
    policy — GSPO §5's routing replay: the μ inner updates route every token as the policy that
    produced the old log-probs did, so the ratio compares the same sub-networks. (Recorded by
    the scoring forward itself, prompts shared; the unused log-probs are compiled away.)"""
    _, _, aux = completion_logprobs(model, rollout["tokens"], rollout["segment_ids"], rollout["mask"].shape[1],
                                    group_size=_shared_prompt_group(sampling, rollout["tokens"].shape[0]))
    return jax.lax.stop_gradient(aux["router"]["expert_idx"]).swapaxes(0, 1)


def make_logprob_fn(model: Transformer, sampling: SamplingConfig, *, mesh: Mesh | None = None,
                    rules: Rules | None = None) -> Callable[[nnx.State, Rollout], jax.Array]:
    """Jitted `fn(model_state, rollout) -> logp [B, N]`: a frozen model's scores of the completions
    (the reference policy of the KL term)."""
    graphdef, state = nnx.split(model)

    def logprobs(state: nnx.State, rollout: Rollout) -> jax.Array:
        return completion_logprobs(nnx.merge(graphdef, state), rollout["tokens"], rollout["segment_ids"],
                                   rollout["mask"].shape[1], temperature=sampling.temperature,
                                   top_p=sampling.top_p, top_k=sampling.top_k,
                                   group_size=_shared_prompt_group(sampling, rollout["tokens"].shape[0]))[0]

    return jit_over_mesh(logprobs, state, mesh, donate=False, rules=rules)
