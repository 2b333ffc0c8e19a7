"""What every run (and every benchmark) sets up before its own parts: the mesh, the tokenizer
(checked against the vocabulary), the task, and the model with its optimizer, born in their
shardings; and the starting weights `--init_from` names."""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from moe_jax.configs import ModelConfig
from moe_jax.data.tasks import Task
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from moe_jax.errors import InputError
from moe_jax.models import Transformer
from moe_jax.parallel import init_sharded, make_mesh, parse_rules
from moe_jax.parallel.rules import Rules
from moe_jax.train import workdir as workdir_format
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.experiment_config import RunConfig, run_task
from moe_jax.train.optimizer import make_optimizer, run_schedule


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
    optimizer_tx = make_optimizer(run_schedule(cfg), weight_decay=opt.weight_decay, clip_norm=opt.clip_norm)

    def make_model_and_optimizer():  # Rngs made inside: the initialiser is traced under jit
        model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, optimizer_tx, wrt=nnx.Param)

    return init_sharded(make_model_and_optimizer, mesh, parse_rules(cfg.sharding_rules))


def make_context(cfg: RunConfig, mesh_spec: str | None = None, tokenizer: str | None = None) -> RunContext:
    """Mesh, tokenizer (checked against the vocabulary), task, and the model and optimizer in
    their shardings: every run's setup, and the benchmarks'. `tokenizer` overrides
    `cfg.tokenizer` (a workdir's own copy)."""
    mesh = make_mesh(mesh_spec or "auto")
    model, optimizer = init_model_and_optimizer(cfg, mesh)
    task = run_task(cfg)
    loaded = load_tokenizer(tokenizer or cfg.tokenizer)
    if loaded.vocab_size > cfg.model.vocab_size:
        raise InputError(f"{type(cfg).__name__}.model.vocab_size: {cfg.model.vocab_size} < the tokenizer's "
                         f"{loaded.vocab_size} ids. Fix: --config.model.vocab_size={loaded.vocab_size}")
    return RunContext(cfg, mesh, parse_rules(cfg.sharding_rules), loaded, task, model, optimizer)


def load_model(model_cfg: ModelConfig, source: str, mesh: Mesh, rules: Rules | None = None,
               compute_dtype: str = "auto") -> Transformer:
    """A model of architecture `model_cfg` born in its shardings on `mesh` and loaded from `source`
    (a run, a checkpoint or `hf:<folder>`): for measuring, sampling or teaching — no optimizer."""
    cfg = dataclasses.replace(model_cfg, compute_dtype=resolve_compute_dtype(compute_dtype))
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    load_init_from(model, source)
    return model


def load_init_from(model: Transformer, init_from: str) -> None:
    """Starting weights: a run or Orbax checkpoint path, or `hf:<folder>`, a Hugging Face model
    folder, read shard by shard straight into the model's shardings."""
    if init_from.startswith("hf:"):
        _load_hf(model, init_from)
        return
    directory, step = workdir_format.checkpoint_location(init_from)
    checkpointer = Checkpointer(directory, save_every=1)
    try:
        nnx.update(model, checkpointer.restore_model(nnx.state(model), step))
    except (ValueError, KeyError) as e:
        raise InputError(f"--init_from={init_from}: its model does not fit config.model ({e}). Fix: "
                         "give config.model the architecture of the run it came from") from e
    finally:
        checkpointer.close()
    logging.info("initialised the model from %s (step %s)", directory, step or "latest")


def _load_hf(model: Transformer, init_from: str) -> None:
    """`--init_from=hf:<folder>`: the Hugging Face model folder's weights, shard by shard."""
    from moe_jax.interop import load_hf_into  # only runs that ask for it pay the import
    from moe_jax.interop.hf_checkpoint import ArchitectureMismatchError

    folder = init_from[len("hf:"):]
    try:
        load_hf_into(model, folder)
    except ArchitectureMismatchError as e:
        raise InputError(f"--init_from={init_from}: {e}. Fix: give config.model the checkpoint's "
                         "architecture (a preset such as --config=qwen2.5-0.5b, or "
                         "--config.model.<field>=... overrides)") from e
    except (InputError, FileNotFoundError) as e:  # a damaged folder: its message names the file and fix
        raise type(e)(f"--init_from={init_from}: {e}") from e
    logging.info("initialised the model from the Hugging Face folder %s", folder)


