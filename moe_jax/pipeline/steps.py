"""The generic step kinds graphs are declared with (`moe_jax.pipeline.executor`), each written once:

- `train_step`: train a run config with its kind's runner (`moe_jax.runs`), from an input's model
  or a given one, optionally on an input's dataset;
- `record_step`: record an outside source (a run, a Hugging Face folder, a dataset) as a step,
  refusing a run that has not finished unless told to accept it;
- `dataset_step`: a step that writes a dataset (`moe_jax.pipeline.datasets`), its files recorded
  as outputs and checked before any step reads them;
- `measure_step`: the results-table columns of a step's model, measured once per key (`report`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from moe_jax import runs
from moe_jax.configs import count_params
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from moe_jax.errors import InputError
from moe_jax.models import Transformer
from moe_jax.parallel import parse_rules
from moe_jax.parallel.distributed import is_lead
from moe_jax.pipeline import datasets, report
from moe_jax.pipeline.config import ReportConfig
from moe_jax.pipeline.executor import Step, step_keys, step_seconds
from moe_jax.pipeline.prompts import heldout_problems
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_model
from moe_jax.train.evaluation import heldout_seed
from moe_jax.train.experiment_config import RunConfig, run_task

DATASET_FILES = (datasets.DATA_FILE, datasets.ARRAY_RECORD_FILE, datasets.STATS_FILE)


def train_step(name: str, run: RunConfig, *, inputs: Sequence[str] = (), init_from: str | None = None,
               data_from: str | None = None, mesh_spec: str | None = None) -> Step:
    """Train `run` into the step's folder. `init_from`: an input's name (its model) or a run,
    checkpoint or `hf:<folder>` outside the graph; `data_from`: the input whose dataset it trains on."""

    def train(step_dir: str, input_dirs: Mapping[str, str]) -> None:
        cfg = run if data_from is None else dataclasses.replace(run, data=datasets.dataset_path(input_dirs[data_from]))
        source = input_dirs.get(init_from, init_from) if init_from else None
        runs.run(cfg, step_dir, mesh_spec=mesh_spec, init_from=source)

    runs.runner_for(run)  # a config no runner trains is refused when the graph is declared
    return Step(name, train, {"run": run}, tuple(inputs), outputs=(workdir_format.CHECKPOINT_DIR,))


def record_step(name: str, config: Mapping[str, Any], source: str, inputs: Sequence[str] = ()) -> Step:
    """A step that computes nothing: it records `source` (described by `config`, its key) and
    is done at once."""

    def record(step_dir: str, input_dirs: Mapping[str, str]) -> None:
        if is_lead():
            workdir_format.mark_done(step_dir, 0, {"source": source})

    return Step(name, record, dict(config), tuple(inputs))


def finished_run(source: str, field: str, *, allow_unfinished: bool = False, allow_flag: str = ""
                 ) -> list[Any] | str | None:
    """What identifies an outside run that a graph reads: `[its final step, when it finished]`;
    None for a Hugging Face folder. A run without `DONE` (still training, or dead) is refused,
    naming `field` and the flag that accepts it (`allow_flag`), unless `allow_unfinished`
    ("unfinished" is then recorded in the step's key)."""
    local = source.removeprefix("hf:")
    if not os.path.exists(local):
        raise InputError(f"{field}: {source} does not exist. Fix: give a run's workdir (e.g. an R1 pipeline's "
                         "DIR/final_rl) or hf:<folder>")
    if source.startswith("hf:"):
        return None
    done = workdir_format.read_done(local)
    if done is None and not allow_unfinished:
        raise InputError(f"{field}: {source} has not finished (no DONE: still training, or stopped). Fix: let it "
                         f"finish (rerun its command), or accept its latest checkpoint on purpose with {allow_flag}")
    return "unfinished" if done is None else [done["step"], done["finished_at"]]


def dataset_step(name: str, write: Callable[[str, Mapping[str, str]], None], config: Any,
                 inputs: Sequence[str] = ()) -> Step:
    """A step whose `write(step_dir, input_dirs)` writes a dataset and its `DONE`; the dataset's
    files are its outputs."""
    return Step(name, write, config, tuple(inputs), outputs=DATASET_FILES)


def run_model_loader(run: RunConfig, source: str, step_dir: str
                     ) -> Callable[[jax.sharding.Mesh], tuple[Transformer, Tokenizer]]:
    """Loads the model of `run`'s architecture from `source` and the run's tokenizer (its copy in
    `step_dir` when it has one)."""

    def load(mesh: jax.sharding.Mesh) -> tuple[Transformer, Tokenizer]:
        model = load_model(run.model, source, mesh, parse_rules(run.sharding_rules), run.compute_dtype)
        return model, load_tokenizer(workdir_format.tokenizer_path(step_dir, run))

    return load


def measure_step(step_dir: str, load: Callable[[jax.sharding.Mesh], tuple[Transformer, Tokenizer]],
                 evaluated: RunConfig, cfg: ReportConfig, *, seed: int, template: str, mesh: jax.sharding.Mesh
                 ) -> dict[str, Any]:
    """The results-table columns (`report.measure`, and `params`) of the model `load` gives, on the
    first `cfg.problems` held-out problems of `evaluated`'s task (stream `seed`), computed once per
    step key and report settings (kept in the step's `report.json`), and the step's wall time."""

    def measure() -> dict[str, float]:
        model, tokenizer = load(mesh)
        task = run_task(evaluated)
        problems = heldout_problems(task, seed, cfg.problems)
        measures = report.measure(model, task, problems, cfg, tokenizer=tokenizer, template=template,
                                  key=jax.random.key(heldout_seed(seed)), mesh=mesh)
        return {**measures, "params": count_params(model.cfg)["total"]}

    return {**report.cached_measures(step_dir, step_keys(step_dir), cfg, measure), "wall_s": step_seconds(step_dir)}
