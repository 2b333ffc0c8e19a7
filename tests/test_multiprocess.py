"""Multi-process runs for real: two JAX processes of 4 CPU devices each, connected through
`jax.distributed` (gloo collectives) by the experiments' own `--coordinator_address` flags, against
one process of 8 devices. The GRPO loop must give the same metrics step by step: each process
samples and scores only its rows, and every global quantity (reward metrics, "batch" advantage
scaling, dynamic sampling's decision to sample again) is reduced over the processes."""

import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.configs import get_preset
from moe_jax.rl.config import GRPOConfig
from moe_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GRPOConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
                 steps=2, batch_size=16, group_size=4, seq_len=40, max_new_tokens=16, learning_rate=1e-3,
                 warmup_steps=1, eval_every=2, checkpoint_every=2, eval_batches=0, eval_problems=8,
                 eval_max_new_tokens=16, num_iterations=2, scale_rewards="batch", dynamic_sampling=True,
                 max_resamples=1, beta=0.04)
COMPARED = ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "grad_norm", "entropy",
            "completions/mean_length", "clip_ratio/region_mean", "dynamic_sampling/batches")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: str, config_path: str, devices: int, *flags: str,
            script: str = "experiments/grpo.py") -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, script, f"--workdir={workdir}",
                             f"--config={config_path}", *flags], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(CFG.to_json())
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    two = [_launch(str(tmp_path / "two"), str(config_path), 4, coordinator, "--num_processes=2",
                   f"--process_id={i}") for i in range(2)]
    for process in two:
        _finish(process)
    _finish(_launch(str(tmp_path / "one"), str(config_path), 8))

    one_metrics, two_metrics = (read_metrics(str(tmp_path / run / "metrics.jsonl")) for run in ("one", "two"))
    assert [m["step"] for m in two_metrics] == [m["step"] for m in one_metrics] == [0, 1, 2]
    for expected, got in zip(one_metrics, two_metrics, strict=True):
        for name in (*COMPARED, "eval/accuracy"):
            if name in expected:
                np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7,
                                           err_msg=f"step {expected['step']}: {name}")
    assert two_metrics[1]["kl"] > 0 or two_metrics[2]["kl"] > 0


@pytest.mark.slow
def test_two_process_pretraining_runs_and_saves(tmp_path):
    """The pretraining loop on two processes: each packs its own share of the stream (so the
    batches, unlike GRPO's, depend on the process count); it must train, evaluate and checkpoint."""
    config = ExperimentConfig(model=CFG.model, steps=2, batch_size=8, seq_len=48, warmup_steps=1,
                              eval_every=2, checkpoint_every=2, eval_batches=1, eval_problems=4,
                              eval_max_new_tokens=8)
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    runs = [_launch(str(tmp_path / "run"), str(config_path), 4, coordinator, "--num_processes=2",
                    f"--process_id={i}", script="experiments/pretrain.py") for i in range(2)]
    for process in runs:
        _finish(process)
    metrics = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics) and "eval/accuracy" in metrics[-1]
    assert Checkpointer(str(tmp_path / "run" / CHECKPOINT_DIR), save_every=2).latest_step() == 2
