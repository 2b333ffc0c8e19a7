"""The training loop shared by pretraining and SFT: `train(cfg, workdir)`.

A run lives in its workdir: `config.json`, `checkpoints/<step>/`, `metrics.jsonl`, TensorBoard
events and `metrics.png`. Running the same command again resumes from the latest checkpoint
(model, optimizer, router biases, step and the data iterator's position), so a run killed at any
moment and resumed computes the same per-step losses as one that never stopped. A workdir whose
`config.json` disagrees with the new config is refused.

The loop dispatches step N before it fetches step N-1's metrics, so the host never stalls the
device for logging; it syncs only to checkpoint or evaluate, and checks the loss of every step up
to N before step N's state is saved, so a NaN state is never written.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from moe_jax.configs import flops_per_token
from moe_jax.data.pipelines import packed_batches, task_examples
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.models import Transformer
from moe_jax.parallel import init_sharded, make_mesh, parse_rules
from moe_jax.parallel.distributed import global_batch_array, process_batch_slice
from moe_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, checkpoint_location
from moe_jax.train.evaluation import Evaluator
from moe_jax.train.experiment_config import ExperimentConfig, config_differences, parse_task_options
from moe_jax.train.metrics import mfu
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer
from moe_jax.train.preemption import PreemptionWatcher
from moe_jax.train.run_log import RunLog
from moe_jax.train.step import make_eval_step, make_train_step

CONFIG_FILE = "config.json"
THROUGHPUT_WINDOW = 10  # steps over which tokens/s is measured
# `hook(step, state)` runs after step N is dispatched (e.g. a custom probe, or a test's kill).
Hook = Callable[[int, nnx.State], None]


class ConfigConflictError(ValueError):
    """The workdir holds a run whose config differs from the one asked for."""


def check_workdir_config(cfg: ExperimentConfig, workdir: str) -> None:
    """Refuse to mix runs: a saved `config.json` must agree with `cfg` (cadence and layout fields
    aside)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    differences = config_differences(saved, cfg.to_dict())
    if differences:
        raise ConfigConflictError(
            f"{workdir} holds a run with a different config:\n  " + "\n  ".join(differences)
            + f"\nFix: resume it with its own config (--config={path}), or give this run a new "
              "--workdir (--init_from=<that workdir> starts from its weights)")


def prepare_workdir(cfg: ExperimentConfig, workdir: str) -> bool:
    """Create the workdir, refuse a conflicting saved config, write `config.json` (from process 0);
    returns whether this process is the one that writes (process 0)."""
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(cfg, workdir)
    is_lead = jax.process_index() == 0
    if is_lead:
        write_json_atomically(os.path.join(workdir, CONFIG_FILE), cfg.to_json())
    return is_lead


def write_json_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def resolve_compute_dtype(name: str) -> str:
    """'auto': bf16 activations on GPU/TPU (params stay fp32, the master weights), fp32 on CPU."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def init_model_and_optimizer(cfg: ExperimentConfig, mesh: Mesh) -> tuple[Transformer, nnx.Optimizer]:
    """The model (compute dtype resolved for this platform) and its AdamW optimizer, created
    directly in their shardings over `mesh` (under `cfg.sharding_rules`)."""
    model_cfg = dataclasses.replace(cfg.model, compute_dtype=resolve_compute_dtype(cfg.compute_dtype))
    optimizer_tx = make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                  weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)

    def make_model_and_optimizer():  # Rngs made inside: the initialiser is traced under jit
        model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, optimizer_tx, wrt=nnx.Param)

    return init_sharded(make_model_and_optimizer, mesh, parse_rules(cfg.sharding_rules))


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    """Device metrics to Python numbers; per-layer router stats also get their mean."""
    host = {}
    for name, value in jax.device_get(metrics).items():
        if getattr(value, "ndim", 0) == 0:
            host[name] = float(value)
        else:
            host[name] = [float(v) for v in value]
            host[f"{name}_mean"] = float(value.mean())
    return host


def check_finite(step: int, metrics: dict[str, Any], last_good: int | None) -> None:
    """FloatingPointError when the step's loss or gradient norm is NaN/Inf (before anything of
    that step is saved)."""
    for name in ("loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
            raise FloatingPointError(
                f"step {step}: {name} is {metrics[name]}; stopping without saving this state (the last "
                f"good checkpoint is step {last_good}). Fix: lower learning_rate or raise warmup_steps, "
                "then rerun (it resumes from that checkpoint)")


def load_init_from(model: Transformer, init_from: str) -> None:
    """Starting weights: a run or Orbax checkpoint path, or `hf:<folder>`, a Hugging Face model
    folder, read shard by shard straight into the model's shardings."""
    if init_from.startswith("hf:"):
        from moe_jax.interop import load_hf_into  # only runs that ask for it pay the import

        folder = init_from[len("hf:"):]
        try:
            load_hf_into(model, folder)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--init_from={init_from}: {e}. Fix: give config.model the checkpoint's "
                             "architecture (a preset such as --config=qwen2.5-0.5b, or "
                             "--config.model.<field>=... overrides)") from e
        logging.info("initialised the model from the Hugging Face folder %s", folder)
        return
    directory, step = checkpoint_location(init_from)
    checkpointer = Checkpointer(directory, save_every=1)
    try:
        nnx.update(model, checkpointer.restore_model(nnx.state(model), step))
    except (ValueError, KeyError) as e:
        raise ValueError(f"--init_from={init_from}: its model does not fit config.model ({e}). Fix: "
                         "give config.model the architecture of the run it came from") from e
    finally:
        checkpointer.close()
    logging.info("initialised the model from %s (step %s)", directory, step or "latest")


def train(cfg: ExperimentConfig, workdir: str, *, mesh_spec: str | None = None,
          init_from: str | None = None, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns `{"status", "step", "metrics"}` where status is
    "finished" or "preempted" (SIGTERM: checkpointed, rerun to continue). A NaN/Inf loss raises
    FloatingPointError. `init_from` (a workdir or checkpoint path) supplies the starting weights of
    a new run; a workdir that already has checkpoints resumes and ignores it."""
    is_lead = prepare_workdir(cfg, workdir)
    mesh = make_mesh(mesh_spec or "auto")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"ExperimentConfig.model.vocab_size: {cfg.model.vocab_size} < the tokenizer's "
                         f"{tokenizer.vocab_size} ids. Fix: --config.model.vocab_size={tokenizer.vocab_size}")
    task = make_task(cfg.task, **parse_task_options(cfg.task_options))
    model, optimizer = init_model_and_optimizer(cfg, mesh)
    model_cfg = model.cfg
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    if init_from and checkpointer.latest_step() is None:
        load_init_from(model, init_from)
    rules = parse_rules(cfg.sharding_rules)
    train_step, state = make_train_step(model, optimizer, microbatches=cfg.microbatches, mesh=mesh,
                                        rules=rules)
    model_graphdef = nnx.graphdef(model)
    evaluator = Evaluator(cfg, task, tokenizer, make_eval_step(model, mesh=mesh, rules=rules), mesh)
    del model, optimizer  # the state pytree is the truth from here on (it is donated each step)

    local_rows = process_batch_slice(cfg.batch_size)
    examples = task_examples(task, tokenizer, seed=cfg.seed, error_rate=cfg.error_rate,
                             template=cfg.template, loss_on_prompt=cfg.loss_on_prompt)
    train_iter = iter(packed_batches(examples, seq_len=cfg.seq_len, seed=cfg.seed,
                                     batch_size=local_rows.stop - local_rows.start))
    start = 0
    restored = checkpointer.restore(state)
    if restored is not None:
        start, state, data_state = restored
        train_iter.set_state(data_state["train"])
        logging.info("resumed %s from step %d", workdir, start)

    schedule = learning_rate_schedule(cfg.learning_rate, cfg.warmup_steps, cfg.steps)
    step_flops = flops_per_token(model_cfg, cfg.seq_len)
    flops = step_flops["total"] + step_flops["mtp"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    run_log = RunLog(workdir, steps=cfg.steps, start=start, is_lead=is_lead)
    status, last_metrics, step = "finished", {}, start
    last_good = start or None
    fetched_at: collections.deque[float] = collections.deque(maxlen=THROUGHPUT_WINDOW + 1)

    def fetch(step: int, device_metrics: dict) -> dict:
        """Step `step`'s metrics on the host (waiting for it), checked finite, with lr and speed."""
        host = _host_metrics(device_metrics)
        check_finite(step, host, last_good)
        host["lr"] = float(schedule(step - 1))
        fetched_at.append(time.perf_counter())
        if len(fetched_at) > 1:  # over a window of steps: one interval alone is jittery
            host["tokens_per_s"] = tokens_per_step * (len(fetched_at) - 1) / (fetched_at[-1] - fetched_at[0])
            host["mfu"] = mfu(flops, host["tokens_per_s"], jax.devices())
        return host

    def log(step: int, host: dict) -> dict:
        run_log.write(step, host)
        return host

    pending = None  # (step, device metrics) dispatched but not yet fetched
    try:
        with PreemptionWatcher() as preemption:
            for step in range(start + 1, cfg.steps + 1):
                batch = {k: global_batch_array(v, mesh) for k, v in next(train_iter).items()}
                data_state = train_iter.get_state()
                state, metrics = train_step(state, batch)
                if pending:
                    last_metrics = log(pending[0], fetch(*pending))
                pending = (step, metrics)
                for hook in hooks:
                    hook(step, state)
                stop = preemption.stop_requested(step, checkpointer.manager)
                final = step == cfg.steps
                save = final or stop or step % cfg.checkpoint_every == 0
                evaluate = final or step % cfg.eval_every == 0
                if not (save or evaluate):
                    continue
                host, pending = fetch(step, metrics), None  # checks this step's loss before saving
                if evaluate:
                    eval_metrics = evaluator(nnx.merge(model_graphdef, state[0]))
                    logging.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    host.update(eval_metrics)
                last_metrics = log(step, host)
                if save:
                    checkpointer.save(step, state, {"train": data_state}, force=True)
                    last_good = step
                fetched_at.clear()  # the next interval would include this sync's work
                if stop:
                    status = "preempted"
                    logging.warning("preemption notice: saved step %d; rerun to resume", step)
                    break
    finally:
        run_log.close()
        checkpointer.close()
    run_log.plot()
    return {"status": status, "step": step, "metrics": last_metrics}
