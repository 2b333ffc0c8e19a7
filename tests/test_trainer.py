"""The training loop: NaN stop, SIGTERM checkpoint + clean exit, config conflicts, kill -9 and
resume reproducing an uninterrupted run's per-step losses, init_from, and the workdir's files."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax.configs import get_preset
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config_tree import override
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.metrics import read_metrics
from moe_jax.train.trainer import train
from moe_jax.train.workdir import CHECKPOINT_DIR, ConfigConflictError, check_config, read_done

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough to compile in seconds; 8 rows so the 8 simulated devices each hold one.
CFG = ExperimentConfig(
    model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
    steps=8, batch_size=8, seq_len=48, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
    loop=LoopConfig(eval_every=4, checkpoint_every=3, eval_problems=4, eval_max_new_tokens=8),
    corpus=CorpusConfig(eval_batches=1))


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def _run_cli(workdir, config_path, *extra):
    return subprocess.run([sys.executable, "experiments/pretrain.py", f"--workdir={workdir}",
                           f"--config={config_path}", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(CFG.to_json())
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config_file):
    """The reference run, through the real command line."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    out = _run_cli(workdir, config_file)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_run_writes_config_metrics_events_plot_and_checkpoints(uninterrupted):
    workdir, out = uninterrupted
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["step"] == CFG.steps
    saved = json.loads(pathlib.Path(workdir, "config.json").read_text())
    assert ExperimentConfig.from_dict(saved) == CFG
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, CFG.steps + 1))
    for m in metrics:
        assert {"loss", "lr", "grad_norm", "maxvio", "maxvio_mean", "drop_frac_mean"} <= set(m)
        assert len(m["maxvio"]) == 2  # one MoE layer + the MTP block
    assert {"eval/loss", "eval/accuracy", "eval/format"} <= set(metrics[3]) & set(metrics[7])
    assert "tokens_per_s" in metrics[2]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert pathlib.Path(workdir, "metrics.png").read_bytes()[:4] == b"\x89PNG"
    steps = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).manager.all_steps()
    assert {6, 8} <= set(steps) and len(steps) <= CFG.loop.keep_checkpoints


KILL_SCRIPT = """
import os, signal, sys
from moe_jax.train.config_tree import override
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.trainer import train

def kill_at_step_7(step, state):
    if step == 7:
        os.kill(os.getpid(), signal.SIGKILL)

cfg = ExperimentConfig.from_dict(__import__("json").load(open(sys.argv[1])))
train(cfg, sys.argv[2], hooks=[kill_at_step_7])
"""


def test_sigkill_then_rerun_gives_the_uninterrupted_losses(uninterrupted, config_file, tmp_path):
    workdir = str(tmp_path / "killed")
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, config_file, workdir], cwd=REPO,
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(_losses(workdir)) >= 6  # it got past a checkpoint, and died mid-run
    resumed = _run_cli(workdir, config_file)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, got = _losses(uninterrupted[0]), _losses(workdir)
    assert sorted(got) == list(range(1, CFG.steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)],
                               rtol=1e-6)


def test_sigterm_saves_and_exits_then_rerun_finishes(tmp_path):
    workdir = str(tmp_path / "preempted")

    def sigterm_at_step_4(step, state):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(CFG, workdir, hooks=[sigterm_at_step_4])
    assert (result["status"], result["step"]) == ("preempted", 4)
    assert Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).latest_step() == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    # As an older version wrote it: flat (before the optimizer, loop and corpus parts), without
    # the fields added since, with one retired since.
    nested = CFG.to_dict()
    old = {**{k: v for k, v in nested.items() if k not in ("optimizer", "loop", "corpus", "data", "sharding_rules")},
           **nested["optimizer"], **{k: v for k, v in nested["loop"].items() if k != "max_seconds"},
           **nested["corpus"], "log_every": 20}
    pathlib.Path(workdir, "config.json").write_text(json.dumps(old))
    result = train(CFG, workdir)
    assert (result["status"], result["step"]) == ("finished", CFG.steps)
    assert sorted(_losses(workdir)) == list(range(1, CFG.steps + 1))
    done = json.loads(pathlib.Path(workdir, "DONE").read_text())
    assert done["step"] == CFG.steps and done["metrics"]["loss"] == _losses(workdir)[CFG.steps]
    assert train(CFG, workdir)["metrics"] == done["metrics"]  # finished: recognised, nothing built


def test_a_wall_clock_budget_ends_the_run_saved_and_done(tmp_path):
    """`loop.max_seconds`: the run ends after the step during which its wall time (setup included)
    passes the budget — checkpointed, `DONE` at that step, and a rerun has nothing to do."""
    workdir = str(tmp_path / "budget")
    cfg = override(CFG, {"steps": 1000, "loop.max_seconds": 1e-3})
    summary = train(cfg, workdir)
    assert summary["status"] == "finished" and summary["step"] == 1
    assert read_done(workdir)["step"] == 1
    assert Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).manager.all_steps() == [1]
    assert train(cfg, workdir)["step"] == 1
    with pytest.raises(ValueError, match="LoopConfig.max_seconds"):
        override(CFG, {"loop.max_seconds": -1.0})


def test_nan_loss_stops_and_never_checkpoints_nan(tmp_path):
    workdir = str(tmp_path / "nan")
    cfg = override(CFG, {"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0, "loop.checkpoint_every": 1})
    with pytest.raises(FloatingPointError, match="loss is nan|loss is inf|grad_norm"):
        train(cfg, workdir)
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1)
    for step in checkpointer.manager.all_steps():
        restored = checkpointer.manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
        leaves = [np.asarray(x) for x in jax.tree.leaves(restored["model"])]
        assert all(np.isfinite(x).all() for x in leaves), step


def test_conflicting_config_is_refused_but_cadence_and_layout_may_change(tmp_path):
    workdir = str(tmp_path)
    (tmp_path / "config.json").write_text(CFG.to_json())
    layout_and_cadence = {"loop.eval_every": 2, "loop.checkpoint_every": 5, "sharding_rules": "embed=None"}
    check_config(override(CFG, layout_and_cadence), workdir)
    saved_before_the_field = {k: v for k, v in CFG.to_dict().items() if k != "sharding_rules"}
    (tmp_path / "config.json").write_text(json.dumps(saved_before_the_field))
    check_config(CFG, workdir)
    other = override(CFG, {"optimizer.learning_rate": 1e-3, "model.top_k": 1})
    with pytest.raises(ConfigConflictError) as error:
        train(other, workdir)
    assert "learning_rate: 0.003 (saved) -> 0.001" in str(error.value)
    assert "model.top_k: 2 (saved) -> 1" in str(error.value)


def test_sft_init_from_starts_at_the_weights_of_another_run(uninterrupted, config_file, tmp_path):
    """sft.py from the pretrained run, with one near-zero step (and no router-bias step), scored on
    the pretraining eval data: the same held-out loss as the source's final weights."""
    workdir = str(tmp_path / "sft")
    out = subprocess.run(
        [sys.executable, "experiments/sft.py", f"--workdir={workdir}", f"--config={config_file}",
         f"--init_from={uninterrupted[0]}", "--config.steps=1", "--config.loop.eval_every=1",
         "--config.optimizer.learning_rate=1e-9", "--config.optimizer.warmup_steps=0",
         "--config.model.router_bias_rate=0", "--config.corpus.loss_on_prompt=true",
         f"--config.corpus.error_rate={CFG.corpus.error_rate}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    source = read_metrics(os.path.join(uninterrupted[0], "metrics.jsonl"))[-1]
    np.testing.assert_allclose(summary["eval/loss"], source["eval/loss"], rtol=1e-4)

