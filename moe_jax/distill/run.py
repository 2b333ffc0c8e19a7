"""The student's KD run on the run driver: `train_kd(cfg, workdir, teacher=…)`.

- `kd.mode = "sequence"`: plain SFT on the traces (`moe_jax.train.trainer.lm_run`).
- `"logit"`: packed rows of the traces with the teacher's cached top-k (`cache`), or the teacher's
  top-k computed by its jitted forward on each batch when there is no cache; the `kd_loss` step.
- `"on_policy"` (GKD): each step, with probability λ (`kd.on_policy_rate`, a coin drawn from
  (seed, step), so a resumed run draws the same), the batch is instead prompts completed by the
  student as it is now (the RL sampler) and scored by the teacher on the fly.

The teacher is only ever called, never trained; its state is an argument of its own jitted
function, never donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe_jax.configs import flops_per_token
from moe_jax.data.pipelines import longest_prompt, packed_batches, record_examples, rl_prompt_batches
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.distill.config import KDRunConfig
from moe_jax.distill.objective import kd_loss
from moe_jax.distill.teacher import (
    TEACHER_FIELDS,
    Teacher,
    cached_examples,
    check_vocabulary,
    make_topk_fn,
    topk_width,
)
from moe_jax.models import Transformer
from moe_jax.models.kv_cache import segment_positions
from moe_jax.models.sampler import SamplingConfig, jit_generate
from moe_jax.parallel import use_mesh
from moe_jax.parallel.distributed import global_batch_array, local_rows, process_batch_slice
from moe_jax.parallel.rules import Rules
from moe_jax.rl.policy import rollout_rows
from moe_jax.train import driver
from moe_jax.train.context import RunContext
from moe_jax.train.evaluation import Evaluator
from moe_jax.train.experiment_config import config_error
from moe_jax.train.step import make_train_step
from moe_jax.train.trainer import lm_run

ON_POLICY_COIN = 7  # the third word of the coin's seed sequence (seed, step, 7)


def on_policy_step(seed: int, step: int, rate: float) -> bool:
    """Whether step `step` trains on the student's own samples (λ = `rate`): the same on every
    process and on a resumed run."""
    return bool(np.random.default_rng([seed, step, ON_POLICY_COIN]).random() < rate)


def on_policy_batch(student: Transformer, prompts: dict[str, np.ndarray], *, sampling: SamplingConfig,
                    tokenizer: Tokenizer, key: jax.Array, seq_len: int, mesh: Mesh, rules: Rules | None = None
                    ) -> dict[str, np.ndarray]:
    """This process's rows of a batch the student writes: its completions of the left-padded
    `prompts` (`prompt_tokens`, `prompt_segment_ids` `[P, L]`), as rows of `seq_len` (prompt then
    completion, right-padded) with the loss on the completion (eos included), and the sampler's
    log-prob of each completion token `sample_logp` `[P, N]` (what the tests hold against the
    student's own distribution)."""
    with use_mesh(mesh, rules):
        out = jit_generate(student, global_batch_array(prompts["prompt_tokens"], mesh),
                           global_batch_array(prompts["prompt_segment_ids"], mesh), eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, rng=key, **sampling.generate_kwargs())
    rollout = local_rows(out, mesh)
    tokens, segments = rollout_rows(prompts["prompt_tokens"], prompts["prompt_segment_ids"], rollout["tokens"],
                                    rollout["mask"])
    prompt_len = prompts["prompt_tokens"].shape[1]
    loss_mask = np.concatenate([np.zeros_like(prompts["prompt_tokens"]), rollout["mask"]], axis=1)
    pad = seq_len - tokens.shape[1]
    if pad < 0:
        raise ValueError(f"prompts of {prompt_len} tokens + {sampling.max_new_tokens} new ones > seq_len={seq_len}")

    def right_padded(x: Any, value: int = 0) -> np.ndarray:
        return np.pad(np.asarray(x, np.int32), ((0, 0), (0, pad)), constant_values=value)

    segments = right_padded(segments)
    return {"tokens": right_padded(tokens, tokenizer.pad_id), "segment_ids": segments,
            "positions": np.asarray(segment_positions(segments)), "loss_mask": right_padded(loss_mask),
            "loss_weight": (segments != 0).astype(np.float32), "sample_logp": rollout["logprobs"]}


@dataclasses.dataclass
class KDStreams:
    """The run's data: the traces' packed rows and (on-policy) the prompt stream, whose positions
    are checkpointed together."""

    records: Iterator[dict[str, np.ndarray]]
    prompts: Iterator[dict[str, np.ndarray]] | None = None

    def get_state(self) -> dict[str, Any]:
        state = {"records": self.records.get_state()}
        if self.prompts is not None:
            state["prompts"] = self.prompts.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.records.set_state(state["records"])
        if self.prompts is not None:
            self.prompts.set_state(state["prompts"])


def kd_run(cfg: KDRunConfig, teacher: Teacher | None, cache: str | None = None) -> driver.BuildRun:
    """The parts of the student's KD run (module docstring); `cache` is a top-k cache folder of
    `cfg.data` (`write_topk_cache`), optional."""
    kd = cfg.kd
    if kd.mode == "sequence":
        return lm_run()
    if teacher is None:
        raise ValueError(f"kd.mode={kd.mode} needs a teacher")

    def build(context: RunContext) -> driver.RunParts:
        mesh, rules, tokenizer = context.mesh, context.rules, context.tokenizer
        check_vocabulary(teacher.tokenizer, tokenizer, kd.mode)
        loss_fn, topk_fn = kd_loss(kd), make_topk_fn(teacher, kd.top_k, mesh, rules)
        if cache:
            width = topk_width(kd.top_k, teacher.model.cfg.vocab_size)  # what on-policy steps compute too
            examples = cached_examples(cfg.data, cache, tokenizer, seq_len=cfg.seq_len, k=width)
            fields = TEACHER_FIELDS
        else:
            examples, fields = record_examples(cfg.data, tokenizer, seq_len=cfg.seq_len), ()
        train_step, state = make_train_step(context.model, context.optimizer, loss_fn=loss_fn,
                                            microbatches=cfg.microbatches, mesh=mesh, rules=rules)
        local = process_batch_slice(cfg.batch_size)
        rows = local.stop - local.start
        streams = KDStreams(iter(packed_batches(examples, seq_len=cfg.seq_len, seed=cfg.seed, weighted=True,
                                                repeat=True, batch_size=rows, fields=fields)))
        if kd.mode == "on_policy":
            prompt_len = cfg.seq_len - kd.sampling.max_new_tokens
            longest = longest_prompt(context.task, tokenizer, seed=cfg.seed, template=cfg.template)
            if longest > prompt_len:
                raise config_error(cfg, "seq_len", f"prompts take up to {longest} tokens, but on-policy rows leave "
                                   f"them seq_len - kd.sampling.max_new_tokens = {prompt_len}",
                                   f"raise seq_len to at least {longest + kd.sampling.max_new_tokens}")
            streams.prompts = iter(rl_prompt_batches(context.task, tokenizer, seed=cfg.seed, batch_size=rows,
                                                     prompt_len=prompt_len, template=cfg.template))
        graphdef = nnx.graphdef(context.model)

        def step(n: int, state: nnx.State) -> tuple[nnx.State, dict]:
            on_policy = streams.prompts is not None and on_policy_step(cfg.seed, n, kd.on_policy_rate)
            if on_policy:
                host = on_policy_batch(nnx.merge(graphdef, state[0]), next(streams.prompts), sampling=kd.sampling,
                                       tokenizer=tokenizer, key=jax.random.fold_in(jax.random.key(cfg.seed), n),
                                       seq_len=cfg.seq_len, mesh=mesh, rules=rules)
                host.pop("sample_logp")
            else:
                host = next(streams.records)
            batch = {name: global_batch_array(value, mesh) for name, value in host.items()}
            if "teacher_ids" not in batch:
                batch.update(topk_fn(batch))
            state, metrics = train_step(state, batch)
            return state, {**metrics, "on_policy": float(on_policy)}

        flops = flops_per_token(context.model.cfg, cfg.seq_len)
        return driver.RunParts(step=step, state=state, data=streams,
                               evaluate=Evaluator(cfg, context.task, tokenizer, mesh),
                               tokens_per_step=cfg.batch_size * cfg.seq_len, flops_per_token=flops["total"],
                               progress_keys={"jsd": "jsd", "eval/accuracy": "acc"},
                               plot_keys=["loss", "jsd", "ce", "eval/accuracy", "grad_norm"])

    return build


def train_kd(cfg: KDRunConfig, workdir: str, *, teacher: Teacher | None = None, cache: str | None = None,
             mesh_spec: str | None = None, init_from: str | None = None, hooks: Sequence[driver.Hook] = (),
             allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) the student's KD run in `workdir` (`driver.run`'s contract); `init_from` is
    the student's base."""
    return driver.run(cfg, workdir, kd_run(cfg, teacher, cache), mesh_spec=mesh_spec, init_from=init_from,
                      hooks=hooks, allow_config_change=allow_config_change)
