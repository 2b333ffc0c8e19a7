"""The R1 pipeline end to end on a tiny model: every stage runs and the table is written; a
pipeline preempted (SIGTERM) inside `sft` stops there, exits non-zero, and its rerun gives the
numbers of one never interrupted; a rerun of a finished pipeline skips every stage; a changed stage
is redone with what follows it, nothing else; a cadence change redoes nothing."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from moe_jax.pipeline.config import PipelineConfig
from moe_jax.pipeline.executor import read_step
from moe_jax.train import config_tree
from moe_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOOP = {"loop.eval_problems": 16, "loop.eval_max_new_tokens": 32}
_SFT = {"steps": 6, "batch_size": 8, "seq_len": 192, "loop.eval_every": 6, "loop.checkpoint_every": 2,
        "optimizer.warmup_steps": 1, **_LOOP}
_RL = {"steps": 2, "batch_size": 16, "seq_len": 64, "sampling.samples_per_prompt": 4, "sampling.max_new_tokens": 32,
       "loop.eval_every": 2, "loop.checkpoint_every": 2, "optimizer.warmup_steps": 1, **_LOOP}
TINY = config_tree.override(
    PipelineConfig(), {
        "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "task_options": "max_digits=1,ops=+,languages=en+fr",
        "base.steps": 4, "base.seq_len": 64, "base.loop.eval_every": 4, "base.loop.checkpoint_every": 4,
        "base.corpus.eval_batches": 0, **{f"base.{k}": v for k, v in _LOOP.items()},
        "cold_start_data.examples": 40, **{f"cold_start.{k}": v for k, v in _SFT.items()},
        **{f"sft.{k}": v for k, v in _SFT.items()},
        **{f"{rl}.{k}": v for rl in ("reasoning_rl", "final_rl") for k, v in _RL.items()},
        "rejection_sampling.prompts": 8, "rejection_sampling.prompts_per_batch": 8,
        "rejection_sampling.sampling.max_new_tokens": 32, "rejection_sampling.sampling.samples_per_prompt": 2,
        "report.problems": 16, "report.pass_k": 2, "report.max_new_tokens": 32})

# Runs the pipeline; with a third argument, sends itself SIGTERM (a preemption notice) at that step
# of the sft stage.
SCRIPT = """
import json, os, signal, sys
from absl import logging
from moe_jax import runs
from moe_jax.pipeline import r1
from moe_jax.pipeline.config import PipelineConfig
from moe_jax.train.experiment_config import ExperimentConfig

cfg = PipelineConfig.from_dict(json.load(open(sys.argv[1])))
kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
train = runs.RUNNERS[ExperimentConfig]

def train_with_kill(run, workdir, **kwargs):
    def kill(step, state):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
    hooks = [kill] if kill_at is not None and os.path.basename(workdir) == "sft" else []
    return train(run, workdir, hooks=hooks, **kwargs)

runs.RUNNERS[ExperimentConfig] = train_with_kill
logging.set_verbosity(logging.INFO)  # the stages say what they do: run, resume, skip
r1.run_pipeline(cfg, sys.argv[2])
"""


def _pipeline(config_path, workdir, *kill_at) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(config_path), str(workdir), *map(str, kill_at)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=900)


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "results.csv")) as f:
        return list(csv.DictReader(f))


def _numbers(workdir) -> list[dict]:
    """The results table without the wall times (the only column a kill may change)."""
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in _rows(workdir)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted pipeline (and its config file)."""
    root = tmp_path_factory.mktemp("pipeline")
    config_path = root / "config.json"
    config_path.write_text(json.dumps(TINY.to_dict()))
    done = _pipeline(config_path, root / "uninterrupted")
    assert done.returncode == 0, done.stderr[-4000:]
    return root, config_path


def test_every_stage_runs_and_the_table_is_written(finished):
    root, _ = finished
    workdir = root / "uninterrupted"
    rows = {row["stage"]: row for row in _rows(workdir)}
    assert list(rows) == ["base", "cold_start", "reasoning_rl", "rejection_sampling", "sft", "final_rl", "r1_zero"]
    assert all(float(rows[s]["wall_s"]) > 0 and int(rows[s]["tokens"]) > 0 for s in rows)
    assert (workdir / "results.md").exists() and (workdir / "results.png").exists()
    stats = json.loads((workdir / "rejection_sampling" / "stats.json").read_text())
    assert stats["arithmetic"]["sampled"] == 16 and stats["number_words"]["generated"] == 2  # 8 prompts x 20%/80%
    sft_config = json.loads((workdir / "sft" / "config.json").read_text())
    assert sft_config["data"].endswith("rejection_sampling/data.jsonl")
    r1_zero = json.loads((workdir / "r1_zero" / "config.json").read_text())
    assert r1_zero["steps"] == 4 and "language=0," in r1_zero["rewards"]


def test_a_pipeline_preempted_inside_sft_stops_there_and_its_rerun_equals_an_uninterrupted_one(finished):
    root, config_path = finished
    workdir = root / "preempted"
    workdir.mkdir()
    for stage in ("base", "cold_start", "reasoning_rl", "rejection_sampling"):  # the same stages, already done
        shutil.copytree(root / "uninterrupted" / stage, workdir / stage)
    preempted = _pipeline(config_path, workdir, 3)
    assert preempted.returncode != 0 and "StepIncomplete: step 'sft' stopped before it finished" in preempted.stderr
    assert not (workdir / "sft" / "DONE").exists() and not (workdir / "final_rl").exists()
    assert not (workdir / "r1_zero").exists() and not (workdir / "results.csv").exists()
    rerun = _pipeline(config_path, workdir)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "stage sft: resuming" in rerun.stderr
    assert _numbers(workdir) == _numbers(root / "uninterrupted")
    for stage in ("sft", "final_rl"):
        losses = [[m.get("loss") for m in read_metrics(str(w / stage / "metrics.jsonl"))]
                  for w in (workdir, root / "uninterrupted")]
        assert losses[0][-1] == losses[1][-1]


def test_a_rerun_skips_and_a_changed_stage_redoes_only_what_follows(finished, tmp_path):
    root, _ = finished
    workdir = tmp_path / "copy"
    shutil.copytree(root / "uninterrupted", workdir)
    attempts = {s: len(read_step(str(workdir / s))["attempts"]) for s in ("base", "sft", "final_rl", "r1_zero")}
    same = _pipeline(root / "config.json", workdir)
    assert same.returncode == 0 and same.stderr.count("skipped") == 7, same.stderr[-3000:]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(config_tree.override(TINY, {"sft.optimizer.learning_rate": 5e-4}).to_dict()))
    redo = _pipeline(changed, workdir)
    assert redo.returncode == 0, redo.stderr[-3000:]
    now = {s: len(read_step(str(workdir / s))["attempts"]) for s in attempts}
    assert now == {**attempts, "sft": 1, "final_rl": 1}  # new folders: one attempt each
    assert sorted(os.listdir(workdir / "superseded")) == [f"final_rl-{read_step(str(root / 'uninterrupted' / 'final_rl'))['key']}",
                                                           f"sft-{read_step(str(root / 'uninterrupted' / 'sft'))['key']}"]
    assert "stage r1_zero: done" in redo.stderr and "stage base: done" in redo.stderr
    cadence = tmp_path / "cadence.json"  # how often stages evaluate and save: not what they compute
    cadence.write_text(json.dumps(config_tree.override(TINY, {
        "sft.optimizer.learning_rate": 5e-4, "reasoning_rl.loop.eval_every": 1, "final_rl.loop.keep_checkpoints": 7,
        "base.loop.checkpoint_every": 3}).to_dict()))
    again = _pipeline(cadence, workdir)
    assert again.returncode == 0 and again.stderr.count("skipped") == 7, again.stderr[-3000:]


def test_a_base_from_elsewhere_is_read_not_trained(finished, tmp_path):
    """`init_from` (a run here; `hf:<folder>` takes the same path) replaces the base stage."""
    from moe_jax.pipeline.r1 import run_pipeline
    from moe_jax.train.workdir import read_done

    root, _ = finished
    base = str(root / "uninterrupted" / "base")
    run_pipeline(TINY, str(tmp_path), init_from=base, only=["cold_start"])
    assert read_done(str(tmp_path / "base"))["metrics"] == {"source": base}
    assert not (tmp_path / "base" / "checkpoints").exists()
    assert json.loads((tmp_path / "cold_start" / "stage.json").read_text())["inputs"]["base"] == read_step(
        str(tmp_path / "base"))["key"]
    assert not (tmp_path / "reasoning_rl").exists()
    # It started from those weights: its losses are the ones the pipeline that trained the base had.
    losses = [[m["loss"] for m in read_metrics(str(w / "cold_start" / "metrics.jsonl")) if "loss" in m]
              for w in (tmp_path, root / "uninterrupted")]
    assert losses[0] == losses[1]
