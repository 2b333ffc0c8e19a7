"""The run driver: everything a run needs but its step, its data and its evaluation.

Every kind of run — pretraining, SFT, GRPO, and each pipeline or distillation stage — is
`run(cfg, workdir, build)`. The driver owns the workdir (`moe_jax.train.workdir`: config check,
`config.json`, the tokenizer copy, `DONE`), the setup (mesh, tokenizer, task, the model and its
optimizer born sharded, `--init_from`), resume (model, optimizer, router biases, step and data
position), the loop's services (hooks, SIGTERM checkpointing, the NaN guard, evaluation, saving,
metrics, progress and the plot) and the summary it returns. `build(context) -> RunParts` is what a
kind of run writes: its step, its data iterator and its evaluation.

The loop dispatches step N before it fetches step N-1's metrics, so the host never stalls the
device for logging; it syncs only to checkpoint or evaluate, and checks the loss of every step up
to N before step N's state is saved, so a NaN state is never written.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from moe_jax.data.tasks import Task, make_task
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from moe_jax.models import Transformer
from moe_jax.parallel import init_sharded, make_mesh, parse_rules
from moe_jax.parallel.rules import Rules
from moe_jax.train import workdir as workdir_format
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.experiment_config import RunConfig, parse_options
from moe_jax.train.metrics import mfu
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer
from moe_jax.train.preemption import PreemptionWatcher
from moe_jax.train.run_log import RunLog

THROUGHPUT_WINDOW = 10  # steps over which tokens/s is measured
# `hook(step, state)` runs after step N is dispatched (e.g. a custom probe, or a test's kill).
Hook = Callable[[int, nnx.State], None]


class Checkpointable(Protocol):
    """A data iterator whose position is saved with every checkpoint (grain's iterators)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class RunContext:
    """What the driver has set up before a kind of run adds its parts: the model and optimizer
    are initialised in their shardings (and loaded from `--init_from` when the run starts)."""

    cfg: RunConfig
    mesh: Mesh
    rules: Rules
    tokenizer: Tokenizer
    task: Task
    model: Transformer
    optimizer: nnx.Optimizer


@dataclasses.dataclass
class RunParts:
    """What a kind of run supplies. `step(n, state) -> (state, metrics)` dispatches step n (it
    draws its own batch from `data`); metrics may stay on the device, and must hold `loss` and
    `grad_norm`. `evaluate(model) -> metrics` runs at `eval_every` and at the end (and at step 0
    when `evaluate_at_start`). With `tokens_per_step` and `flops_per_token` the driver reports
    tokens/s and MFU; without, the step reports its own `tokens_per_s`."""

    step: Callable[[int, nnx.State], tuple[nnx.State, dict]]
    state: nnx.State
    data: Checkpointable
    evaluate: Callable[[nnx.Module], dict[str, float]]
    data_key: str = "train"  # the data position's name inside a checkpoint
    tokens_per_step: int | None = None
    flops_per_token: int | None = None
    evaluate_at_start: bool = False
    progress_keys: Mapping[str, str] | None = None
    plot_keys: Sequence[str] | None = None


BuildRun = Callable[[RunContext], RunParts]


def resolve_compute_dtype(name: str) -> str:
    """'auto': bf16 activations on GPU/TPU (params stay fp32, the master weights), fp32 on CPU."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def init_model_and_optimizer(cfg: RunConfig, mesh: Mesh) -> tuple[Transformer, nnx.Optimizer]:
    """The model (compute dtype resolved for this platform) and its AdamW optimizer, created
    directly in their shardings over `mesh` (under `cfg.sharding_rules`)."""
    model_cfg = dataclasses.replace(cfg.model, compute_dtype=resolve_compute_dtype(cfg.compute_dtype))
    opt = cfg.optimizer
    optimizer_tx = make_optimizer(opt.learning_rate, warmup_steps=opt.warmup_steps, total_steps=cfg.steps,
                                  weight_decay=opt.weight_decay, clip_norm=opt.clip_norm)

    def make_model_and_optimizer():  # Rngs made inside: the initialiser is traced under jit
        model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, optimizer_tx, wrt=nnx.Param)

    return init_sharded(make_model_and_optimizer, mesh, parse_rules(cfg.sharding_rules))


def setup(cfg: RunConfig, mesh_spec: str | None = None, tokenizer: str | None = None) -> RunContext:
    """Mesh, tokenizer (checked against the vocabulary), task, and the model and optimizer in
    their shardings: every run's setup, and the benchmarks'. `tokenizer` overrides
    `cfg.tokenizer` (a workdir's own copy)."""
    mesh = make_mesh(mesh_spec or "auto")
    loaded = load_tokenizer(tokenizer or cfg.tokenizer)
    if loaded.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{type(cfg).__name__}.model.vocab_size: {cfg.model.vocab_size} < the tokenizer's "
                         f"{loaded.vocab_size} ids. Fix: --config.model.vocab_size={loaded.vocab_size}")
    task = make_task(cfg.task, **parse_options(cfg.task_options))
    model, optimizer = init_model_and_optimizer(cfg, mesh)
    return RunContext(cfg, mesh, parse_rules(cfg.sharding_rules), loaded, task, model, optimizer)


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
    directory, step = workdir_format.checkpoint_location(init_from)
    checkpointer = Checkpointer(directory, save_every=1)
    try:
        nnx.update(model, checkpointer.restore_model(nnx.state(model), step))
    except (ValueError, KeyError) as e:
        raise ValueError(f"--init_from={init_from}: its model does not fit config.model ({e}). Fix: "
                         "give config.model the architecture of the run it came from") from e
    finally:
        checkpointer.close()
    logging.info("initialised the model from %s (step %s)", directory, step or "latest")


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Device metrics to Python numbers; per-layer vectors also get their mean as `<name>_mean`."""
    host = {}
    for name, value in jax.device_get(dict(metrics)).items():
        if getattr(value, "ndim", 0) == 0:
            host[name] = float(value)
        else:
            host[name] = [float(v) for v in value]
            host[f"{name}_mean"] = float(value.mean())
    return host


def check_finite(step: int, metrics: Mapping[str, Any], last_good: int | None) -> None:
    """FloatingPointError when the step's loss or gradient norm is NaN/Inf (before anything of
    that step is saved)."""
    for name in ("loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
            raise FloatingPointError(
                f"step {step}: {name} is {metrics[name]}; stopping without saving this state (the last "
                f"good checkpoint is step {last_good}). Fix: lower learning_rate or raise warmup_steps, "
                "then rerun (it resumes from that checkpoint)")


def run(cfg: RunConfig, workdir: str, build: BuildRun, *, mesh_spec: str | None = None,
        init_from: str | None = None, init_from_on_resume: bool = False, hooks: Sequence[Hook] = ()
        ) -> dict[str, Any]:
    """Run (or resume) the run `build` describes in `workdir`; returns `{"status", "step",
    "metrics"}` where status is "finished" or "preempted" (SIGTERM: checkpointed, rerun to
    continue). A finished run (its `DONE`) returns its final metrics without building anything.
    A NaN/Inf loss raises FloatingPointError. `init_from` (a run, a checkpoint or `hf:<folder>`)
    gives the starting weights of a new run; a resumed run ignores it unless
    `init_from_on_resume` (GRPO: it is the KL term's reference)."""
    workdir_format.check_config(cfg, workdir)
    done = workdir_format.read_done(workdir)
    if done is not None:
        logging.info("%s finished at step %d; nothing to do", workdir, done["step"])
        return {"status": "finished", "step": done["step"], "metrics": done["metrics"]}
    context = setup(cfg, mesh_spec, tokenizer=workdir_format.tokenizer_path(workdir, cfg))
    loop = cfg.loop
    checkpointer = Checkpointer(workdir_format.checkpoint_dir(workdir), save_every=loop.checkpoint_every,
                                keep=loop.keep_checkpoints)
    if init_from and (init_from_on_resume or checkpointer.latest_step() is None):
        load_init_from(context.model, init_from)
    parts = build(context)  # a bad dataset file fails here, before the workdir is written
    is_lead = workdir_format.prepare(cfg, workdir)
    model_graphdef = nnx.graphdef(context.model)
    del context  # the state pytree is the truth from here on (it is donated each step)

    state, start = parts.state, 0
    restored = checkpointer.restore(state)
    if restored is not None:
        start, state, data_state = restored
        parts.data.set_state(data_state[parts.data_key])
        logging.info("resumed %s from step %d", workdir, start)

    schedule = learning_rate_schedule(cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps, cfg.steps)
    run_log = RunLog(workdir, steps=cfg.steps, start=start, is_lead=is_lead,
                     progress_keys=parts.progress_keys, plot_keys=parts.plot_keys)
    status, last_metrics, step = "finished", {}, start
    last_good = start or None
    fetched_at: collections.deque[float] = collections.deque(maxlen=THROUGHPUT_WINDOW + 1)

    def fetch(step: int, device_metrics: dict) -> dict:
        """Step `step`'s metrics on the host (waiting for it), checked finite, with lr and speed."""
        host = host_metrics(device_metrics)
        check_finite(step, host, last_good)
        host["lr"] = float(schedule(step - 1))
        fetched_at.append(time.perf_counter())
        if parts.tokens_per_step and len(fetched_at) > 1:  # a window: one interval alone is jittery
            tokens_per_s = parts.tokens_per_step * (len(fetched_at) - 1) / (fetched_at[-1] - fetched_at[0])
            host["tokens_per_s"] = tokens_per_s
            if parts.flops_per_token:
                host["mfu"] = mfu(parts.flops_per_token, tokens_per_s, jax.devices())
        return host

    def evaluate(step: int, state: nnx.State) -> dict:
        metrics = parts.evaluate(nnx.merge(model_graphdef, state[0]))
        logging.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    pending = None  # (step, device metrics) dispatched but not yet fetched
    try:
        if start == 0 and parts.evaluate_at_start:  # the curve's starting point
            last_metrics = evaluate(0, state)
            run_log.write(0, last_metrics)
        with PreemptionWatcher() as preemption:
            for step in range(start + 1, cfg.steps + 1):
                state, metrics = parts.step(step, state)
                data_state = parts.data.get_state()
                if pending:
                    last_metrics = fetch(*pending)
                    run_log.write(pending[0], last_metrics)
                pending = (step, metrics)
                for hook in hooks:
                    hook(step, state)
                stop = preemption.stop_requested(step, checkpointer.manager)
                final = step == cfg.steps
                save = final or stop or step % loop.checkpoint_every == 0
                evaluate_now = final or step % loop.eval_every == 0
                if not (save or evaluate_now):
                    continue
                last_metrics, pending = fetch(step, metrics), None  # checks this step's loss before saving
                if evaluate_now:
                    last_metrics.update(evaluate(step, state))
                run_log.write(step, last_metrics)
                if save:
                    checkpointer.save(step, state, {parts.data_key: data_state}, force=True)
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
    if status == "finished" and is_lead:
        workdir_format.mark_done(workdir, step, last_metrics)
    return {"status": status, "step": step, "metrics": last_metrics}
