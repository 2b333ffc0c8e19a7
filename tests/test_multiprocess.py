"""Multi-process runs for real: two JAX processes of 4 CPU devices each, connected through
`jax.distributed` (gloo collectives) by the experiments' own `--coordinator_address` flags, against
one process of 8 devices. The GRPO loop must give the same metrics step by step: each process
samples and scores only its rows, and every global quantity (reward metrics, "batch" advantage
scaling) is reduced over the processes. (DAPO dynamic sampling is left out of the comparison: each
process refills its own share of groups, so which groups are kept depends on the process count.)"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.configs import get_preset
from moe_jax.models.sampler import SamplingConfig
from moe_jax.rl.config import GRPOConfig, GRPOLoss
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.metrics import read_metrics
from moe_jax.train.workdir import CHECKPOINT_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2)
# A base that writes the template (greedy format 1.0, accuracy 0): sampled completions then earn
# different rewards, so the advantages and their "batch" scaling matter (the test fails if the
# scaling uses one process's rewards only).
BASE = ExperimentConfig(model=MODEL, steps=300, batch_size=16, seq_len=80,
                        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10),
                        loop=LoopConfig(eval_every=300, checkpoint_every=300, eval_problems=16, eval_max_new_tokens=56),
                        corpus=CorpusConfig(eval_batches=0))
CFG = GRPOConfig(model=MODEL, steps=2, batch_size=16, seq_len=80,
                 sampling=SamplingConfig(samples_per_prompt=4, max_new_tokens=56),
                 optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1),
                 loop=LoopConfig(eval_every=2, checkpoint_every=2, eval_problems=8, eval_max_new_tokens=56),
                 loss=GRPOLoss(num_iterations=2, scale_rewards="batch", beta=0.04))
COMPARED = ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "grad_norm", "entropy",
            "completions/mean_length", "clip_ratio/region_mean")


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
    base_config, config_path = tmp_path / "base.json", tmp_path / "config.json"
    base_config.write_text(BASE.to_json())
    config_path.write_text(CFG.to_json())
    base = str(tmp_path / "base")
    _finish(_launch(base, str(base_config), 8, script="experiments/pretrain.py"))
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    two = [_launch(str(tmp_path / "two"), str(config_path), 4, coordinator, "--num_processes=2",
                   f"--process_id={i}", f"--init_from={base}") for i in range(2)]
    for process in two:
        _finish(process)
    _finish(_launch(str(tmp_path / "one"), str(config_path), 8, f"--init_from={base}"))

    one_metrics, two_metrics = (read_metrics(str(tmp_path / run / "metrics.jsonl")) for run in ("one", "two"))
    assert [m["step"] for m in two_metrics] == [m["step"] for m in one_metrics] == [0, 1, 2]
    for expected, got in zip(one_metrics, two_metrics, strict=True):
        for name in (*COMPARED, "eval/accuracy"):
            if name in expected:
                np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7,
                                           err_msg=f"step {expected['step']}: {name}")
    assert all(m["reward_std"] > 0 for m in two_metrics[1:]), "the rewards must differ for the test to bite"
    assert two_metrics[2]["kl"] > 0

    # Dynamic sampling: the processes must agree on every extra sampling round (a collective).
    dynamic_path = tmp_path / "dynamic.json"
    dynamic_path.write_text(dataclasses.replace(CFG, dynamic_sampling=True, max_resamples=2).to_json())
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    dynamic = [_launch(str(tmp_path / "dynamic"), str(dynamic_path), 4, coordinator, "--num_processes=2",
                       f"--process_id={i}", f"--init_from={base}") for i in range(2)]
    for process in dynamic:
        _finish(process)
    metrics = read_metrics(str(tmp_path / "dynamic" / "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(m["dynamic_sampling/batches"] >= 1 for m in metrics[1:])


@pytest.mark.slow
def test_two_process_pretraining_runs_and_saves(tmp_path):
    """The pretraining loop on two processes: each packs its own share of the stream (so the
    batches, unlike GRPO's, depend on the process count); it must train, evaluate and checkpoint."""
    config = ExperimentConfig(model=MODEL, steps=2, batch_size=8, seq_len=48,
                              optimizer=OptimizerConfig(warmup_steps=1), corpus=CorpusConfig(eval_batches=1),
                              loop=LoopConfig(eval_every=2, checkpoint_every=2, eval_problems=4, eval_max_new_tokens=8))
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


REJECTION_SCRIPT = """
import sys
from moe_jax.parallel.distributed import initialize_distributed
out, processes = sys.argv[1], int(sys.argv[2])
if processes > 1:
    initialize_distributed(sys.argv[3], processes, int(sys.argv[4]))
import jax
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import CharTokenizer
from moe_jax.models.sampler import SamplingConfig
from moe_jax.parallel import make_mesh
from moe_jax.pipeline import datasets
from moe_jax.pipeline.config import RejectionConfig
from moe_jax.pipeline.rejection import rejection_sample
from moe_jax.train.context import init_model_and_optimizer
from moe_jax.train.experiment_config import ExperimentConfig
from tests.test_multiprocess import MODEL

mesh = make_mesh("auto")
model, _ = init_model_and_optimizer(ExperimentConfig(model=MODEL, seed=3), mesh)
task = make_task("arithmetic", max_digits=2, languages="en+fr")
problems = datasets.fresh_problems(task, 11, 24, set())
cfg = RejectionConfig(prompts=24, prompts_per_batch=8, min_tokens=1, max_tokens=24,
                      sampling=SamplingConfig(temperature=1.0, max_new_tokens=24, samples_per_prompt=4))
result = rejection_sample(model, task, problems, tokenizer=CharTokenizer(), template="compact", cfg=cfg,
                          key=jax.random.key(5), mesh=mesh)
if jax.process_index() == 0:
    datasets.write_dataset(out, result.records, result.stats, 10**6, result.rejected)
"""


@pytest.mark.slow
def test_rejection_sampling_dataset_is_the_same_on_one_and_two_processes(tmp_path):
    """Every sample of the stage (kept or removed, with its reason) and its stats, compared."""
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    for path in runs.values():
        path.mkdir()

    def launch(out, devices, *args):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        return subprocess.Popen([sys.executable, "-c", REJECTION_SCRIPT, str(out), *args], cwd=REPO, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    coordinator = f"localhost:{_free_port()}"
    two = [launch(runs["two"], 4, "2", coordinator, str(i)) for i in range(2)]
    for process in [*two, launch(runs["one"], 8, "1")]:
        _finish(process)
    for name in ("data.jsonl", "rejected.jsonl", "stats.json"):
        assert (runs["one"] / name).read_text() == (runs["two"] / name).read_text(), name
    assert len((runs["one"] / "rejected.jsonl").read_text().splitlines()) + len(
        (runs["one"] / "data.jsonl").read_text().splitlines()) == 24 * 4


EXECUTOR_SCRIPT = """
import json, os, sys
from moe_jax.parallel.distributed import initialize_distributed, is_lead

workdir, change, coordinator, index = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
initialize_distributed(coordinator, 2, index)
import jax
from moe_jax.pipeline.executor import Step, run_steps
from moe_jax.train.workdir import mark_done

calls = []

def step(name, inputs, config):
    def fn(step_dir, input_dirs):
        calls.append(name)
        if is_lead():
            with open(os.path.join(step_dir, "output.txt"), "a") as f:
                f.write(f"{config} of {jax.process_count()}\\n")
            mark_done(step_dir, 1, {})
    return Step(name, fn, config, inputs, ("output.txt",))

keys = run_steps(workdir, [step("a", (), {"x": 1}), step("b", ("a",), {"y": 2 + change}), step("c", ("b",), {"z": 3})])
print("RESULT " + json.dumps({"calls": calls, "keys": keys}))
"""


@pytest.mark.slow
def test_the_executor_on_two_processes_runs_skips_and_redoes_each_step_once(tmp_path):
    """Both processes run every step (one program); the lead alone writes; a rerun skips; a change
    supersedes the step and its reader on both."""
    workdir = tmp_path / "graph"

    def run(change: int) -> list[dict]:
        coordinator = f"localhost:{_free_port()}"
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        processes = [subprocess.Popen([sys.executable, "-c", EXECUTOR_SCRIPT, str(workdir), str(change), coordinator,
                                       str(i)], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT) for i in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in processes]
        assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
        return [json.loads(line.split("RESULT ", 1)[1]) for out in outputs for line in out.splitlines()
                if line.startswith("RESULT ")]

    first = run(0)
    assert [r["calls"] for r in first] == [["a", "b", "c"]] * 2 and first[0]["keys"] == first[1]["keys"]
    assert (workdir / "b" / "output.txt").read_text() == "{'y': 2} of 2\n"  # written once, by the lead
    assert [r["calls"] for r in run(0)] == [[], []]
    changed = run(1)
    assert [r["calls"] for r in changed] == [["b", "c"]] * 2
    assert sorted(os.listdir(workdir / "superseded")) == [f"b-{first[0]['keys']['b']}", f"c-{first[0]['keys']['c']}"]
