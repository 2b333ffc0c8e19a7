"""Pretraining and SFT: `train(cfg, workdir)`, the language-model kind of run.

Its parts: packed rows of the task stream (pretraining documents, or prompt/response pairs with
the loss on the response when `loss_on_prompt` is off) or of the dataset files `cfg.data` names
(`moe_jax.data.records`), the jitted train step minimising
`lm_loss` (or any `LossFn`), and the held-out loss and greedy accuracy. Everything else — the
workdir, resume, SIGTERM, the NaN guard, metrics — is the run driver's (`moe_jax.train.driver`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moe_jax.configs import flops_per_token
from moe_jax.data.pipelines import packed_batches, record_examples, task_examples
from moe_jax.parallel.distributed import global_batch_array, process_batch_slice
from moe_jax.train import driver
from moe_jax.train.context import RunContext
from moe_jax.train.evaluation import Evaluator
from moe_jax.train.experiment_config import ExperimentConfig, require_class
from moe_jax.train.step import LossFn, lm_loss, make_eval_step, make_train_step


def lm_run(loss_fn: LossFn = lm_loss) -> driver.BuildRun:
    """The parts of a language-model run minimising `loss_fn` on the config's task stream."""

    def build(context: RunContext) -> driver.RunParts:
        cfg, mesh = context.cfg, context.mesh
        train_step, state = make_train_step(context.model, context.optimizer, loss_fn=loss_fn,
                                            microbatches=cfg.microbatches, mesh=mesh, rules=context.rules)
        eval_step = make_eval_step(context.model, loss_fn=loss_fn, mesh=mesh, rules=context.rules)
        local_rows = process_batch_slice(cfg.batch_size)
        if cfg.data:
            examples = record_examples(cfg.data, context.tokenizer, seq_len=cfg.seq_len,
                                       loss_on_prompt=cfg.corpus.loss_on_prompt)
        else:
            examples = task_examples(context.task, context.tokenizer, seed=cfg.seed,
                                     error_rate=cfg.corpus.error_rate, template=cfg.template,
                                     loss_on_prompt=cfg.corpus.loss_on_prompt)
        batches = iter(packed_batches(examples, seq_len=cfg.seq_len, seed=cfg.seed,
                                      weighted=bool(cfg.data), repeat=bool(cfg.data),
                                      batch_size=local_rows.stop - local_rows.start))

        def step(_, state):
            return train_step(state, {k: global_batch_array(v, mesh) for k, v in next(batches).items()})

        flops = flops_per_token(context.model.cfg, cfg.seq_len)
        return driver.RunParts(
            step=step, state=state, data=batches,
            evaluate=Evaluator(cfg, context.task, context.tokenizer, mesh, eval_step),
            tokens_per_step=cfg.batch_size * cfg.seq_len, flops_per_token=flops["total"] + flops["mtp"])

    return build


def train(cfg: ExperimentConfig, workdir: str, *, mesh_spec: str | None = None,
          init_from: str | None = None, hooks: Sequence[driver.Hook] = (), loss_fn: LossFn = lm_loss,
          allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or resume) the run in `workdir` (`driver.run`'s contract); `init_from` (a workdir,
    checkpoint path or `hf:<folder>`) supplies the starting weights of a new run. Only an
    `ExperimentConfig` itself: a subclass (e.g. `KDRunConfig`) has its own runner."""
    require_class(cfg, ExperimentConfig, "train")
    return driver.run(cfg, workdir, lm_run(loss_fn), mesh_spec=mesh_spec, init_from=init_from, hooks=hooks,
                      allow_config_change=allow_config_change)
