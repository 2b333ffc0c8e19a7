"""Sweeps run for real: a 2 x 2-seed sweep of a tiny pretraining config through the local launcher,
its tables against the points' own files and a hand computation, reruns, a killed point, a failing
point, an added seed, printed commands run by hand, and SLURM through submitit's local executor."""

import csv
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moe_jax.stats import t_quantile
from moe_jax.sweep.aggregate import aggregate
from moe_jax.sweep.run import commands, run_sweep
from moe_jax.sweep.slurm import SlurmOptions
from moe_jax.sweep.spec import Axis, Sweep
from moe_jax.train.metrics import read_metrics

TINY = ("--config.steps=4", "--config.batch_size=8", "--config.seq_len=48", "--config.model.max_seq_len=64",
        "--config.model.n_layers=1", "--config.loop.eval_every=2", "--config.loop.eval_problems=8",
        "--config.loop.eval_max_new_tokens=8")
SWEEP = Sweep("pretrain", base=TINY, axes=(Axis.parse("model.top_k=1,2"),), seeds=(0, 1), baseline="model.top_k=1")
NAMES = ["model.top_k=1,seed=0", "model.top_k=1,seed=1", "model.top_k=2,seed=0", "model.top_k=2,seed=1"]


def _text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _json(path):
    return json.loads(_text(path))


def _files(folder):
    """Every file under `folder` (but the lock, rewritten by each run's lock probe) -> sha256 and mtime."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name != "LOCK":
                with open(path, "rb") as f:
                    found[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return found


def _losses(point_dir):
    """Step -> train loss, the last record of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(point_dir, "metrics.jsonl")) if "loss" in r}


def _final(point_dir):
    """The DONE metrics but the speed."""
    metrics = _json(os.path.join(point_dir, "DONE"))["metrics"]
    return {k: v for k, v in metrics.items() if not k.endswith("per_s")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sweep"))
    out = io.StringIO()
    outcome = run_sweep(SWEEP, workdir, parallel=2, out=out)  # one core each, on a machine with two or more
    assert not outcome.failures, out.getvalue()
    aggregate(workdir)
    return workdir, out.getvalue()


def test_the_table_holds_each_points_own_numbers(finished):
    workdir, log = finished
    assert "4 points: 4 done" in log and "running  points/model.top_k=2,seed=1" in log
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == NAMES and {r["status"] for r in rows} == {"done"}
    for row in rows:
        records = read_metrics(os.path.join(workdir, "points", row["point"], "metrics.jsonl"))
        evals = [r for r in records if "eval/ce" in r]
        assert float(row["eval/ce/final"]) == evals[-1]["eval/ce"]
        assert float(row["eval/ce/best"]) == min(r["eval/ce"] for r in evals)
        assert float(row["maxvio_mean/final"]) == records[-1]["maxvio_mean"]
        assert row["point"] == f"model.top_k={row['model.top_k']},seed={row['seed']}"
        assert int(row["tokens"]) == 4 * 8 * 48 and float(row["wall_s"]) > 0
    for name in NAMES:  # every point's command is on file, with its output
        command = _text(os.path.join(workdir, "points", name, "command"))
        assert f"--workdir={workdir}/points/{name}" in command and "--config.seed=" + name[-1] in command
        assert os.path.getsize(os.path.join(workdir, "points", name, "output.log")) > 0
    for png in ("curves.png", "finals.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000


def test_the_markdown_summary_equals_a_hand_computation(finished):
    workdir, _ = finished
    with open(os.path.join(workdir, "results.csv")) as f:
        ce = {r["point"]: float(r["eval/ce/final"]) for r in csv.DictReader(f)}
    text = _text(os.path.join(workdir, "results.md"))
    section = text.split("## eval/ce/final")[1].split("##")[0]
    for k in ("1", "2"):
        a, b = ce[f"model.top_k={k},seed=0"], ce[f"model.top_k={k},seed=1"]
        mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)
        half = t_quantile(0.975, 1) * std / math.sqrt(2)  # 12.706 std / sqrt 2
        line = next(line for line in section.splitlines() if line.startswith(f"| model.top_k={k}"))
        assert f"{mean:.4f} ± {std:.4f} | [{mean - half:.4f}, {mean + half:.4f}] | 2 |" in line
    # The difference from the baseline, paired by seed: two differences, their mean and t-interval.
    d0 = ce["model.top_k=2,seed=0"] - ce["model.top_k=1,seed=0"]
    d1 = ce["model.top_k=2,seed=1"] - ce["model.top_k=1,seed=1"]
    mean, std = (d0 + d1) / 2, abs(d0 - d1) / math.sqrt(2)
    line = next(line for line in section.splitlines() if line.startswith("| model.top_k=2"))
    assert f"| {mean:.4f} ± {std:.4f} (n=2) |" in line
    assert "within noise" in line or "better" in line or "worse" in line
    assert "| model.top_k=1" in section and "| baseline |" in section


def test_a_rerun_starts_nothing_and_changes_no_file_of_a_point(finished):
    workdir, _ = finished
    before = _files(os.path.join(workdir, "points"))
    out = io.StringIO()
    start = time.time()
    outcome = run_sweep(SWEEP, workdir, parallel=2, out=out)
    assert not outcome.failures and "every point finished before" in out.getvalue()
    assert time.time() - start < 30  # no point process started (each takes longer to import JAX and compile)
    assert _files(os.path.join(workdir, "points")) == before


def test_printed_commands_run_by_hand_give_the_points_numbers(finished, tmp_path):
    workdir, _ = finished
    printed = commands(SWEEP, workdir)
    assert len(printed) == 4
    recorded = _text(os.path.join(workdir, "points", NAMES[3], "command")).strip()
    # The sweep ran the printed command, pinned to its share of the cores (`taskset -c <cores>`,
    # which the recorded command keeps: on CPU the numbers depend on how many cores a run may use).
    assert recorded.endswith(printed[3]) and recorded.removesuffix(printed[3]) in ("", "taskset -c 0 ", "taskset -c 1 ")
    by_hand = f"--workdir={tmp_path}/by_hand"
    argv = [by_hand if a.startswith("--workdir=") else a for a in shlex.split(recorded)]
    subprocess.run(argv, check=True, capture_output=True)
    assert _losses(str(tmp_path / "by_hand")) == _losses(os.path.join(workdir, "points", NAMES[3]))
    assert _final(str(tmp_path / "by_hand")) == _final(os.path.join(workdir, "points", NAMES[3]))


def test_a_failing_point_does_not_stop_the_others_and_an_added_seed_runs_only_new_points(finished, tmp_path):
    workdir = str(tmp_path / "sweep")
    shutil.copytree(finished[0], workdir)
    grown = Sweep("pretrain", base=TINY, axes=(Axis.parse("model.top_k=1,2,99"),), seeds=(0, 1, 2))
    result = subprocess.run([sys.executable, "experiments/sweep.py", f"--workdir={workdir}", "--experiment=pretrain",
                             "--axis=model.top_k=1,2,99", "--seeds=0,1,2", "--parallel=2", *TINY],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    failed = ", ".join(f"model.top_k=99,seed={seed}" for seed in range(3))
    assert f"3 of 9 points did not finish: {failed}" in result.stderr
    assert "FAILED points/model.top_k=99,seed=0: exit status 1" in result.stdout and "top_k" in result.stdout
    # 4 finished before; 2 new (seed 2 of each good configuration) ran; 3 failed.
    assert "(4 finished before; 5 to run, 2 at a time" in result.stdout
    with open(os.path.join(workdir, "results.csv")) as f:
        status = {r["point"]: r["status"] for r in csv.DictReader(f)}
    assert status == {p.name: "failed" if "99" in p.name else "done" for p in grown.points()}
    log = _text(os.path.join(workdir, "points", "model.top_k=99,seed=1", "output.log"))
    assert "model.top_k" in log and "FATAL" in log


def test_a_killed_point_resumes_and_ends_with_the_uninterrupted_losses(finished, tmp_path):
    workdir = str(tmp_path / "sweep")
    one = Sweep("pretrain", base=TINY, axes=(Axis.parse("model.top_k=2"),), seeds=(1,))
    # One core, as the fixture's points had; a checkpoint every step (a cadence flag: the point's
    # numbers and key are the fixture's).
    argv = [sys.executable, "experiments/sweep.py", f"--workdir={workdir}", "--experiment=pretrain",
            "--axis=model.top_k=2", "--seeds=1", "--parallel=2", *TINY, "--config.loop.checkpoint_every=1"]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    point = os.path.join(workdir, "points", one.points()[0].name)
    while not os.path.isdir(os.path.join(point, "checkpoints", "2")):  # killed after its second step's checkpoint
        assert sweep.poll() is None, sweep.stdout.read()
        time.sleep(0.2)
    os.kill(_json(os.path.join(point, "LOCK"))["pid"], signal.SIGKILL)
    output = sweep.communicate()[0]
    assert sweep.returncode == 1 and "FAILED points/model.top_k=2,seed=1: exit status -9" in output
    rerun = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resum" in _text(os.path.join(point, "output.log"))
    assert _losses(point) == _losses(os.path.join(finished[0], "points", "model.top_k=2,seed=1"))


@pytest.mark.slow
def test_slurm_runs_the_points_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    workdir = str(tmp_path / "sweep")
    one = Sweep("pretrain", base=TINY, axes=(Axis.parse("model.top_k=1,2"),), seeds=(0,))
    out = io.StringIO()
    outcome = run_sweep(one, workdir, launcher="slurm", slurm=SlurmOptions(cluster="local"), out=out)
    assert not outcome.failures, out.getvalue()
    assert "as one SLURM job array" in out.getvalue() and "done     points/model.top_k=2,seed=0  job" in out.getvalue()
    assert os.path.isdir(os.path.join(workdir, "slurm"))
    assert all(os.path.exists(os.path.join(d, "DONE")) for d in outcome.point_dirs.values())


@pytest.mark.slow  # 3 runs as processes, ~1 min; the spec test checks the flags and keys without running
def test_points_start_from_their_seeds_shared_run_made_once(tmp_path):
    """A base model per seed, made once before the points (`Sweep.shared`); each point starts from
    its seed's (`--init_from={shared:base}`); a rerun makes nothing again."""
    sweep = Sweep("pretrain", base=(*TINY, "--init_from={shared:base}"),
                  axes=(Axis.parse("optimizer.learning_rate=1e-3,3e-3"),), seeds=(0,), shared={"base": ("pretrain", TINY)})
    out = io.StringIO()
    outcome = run_sweep(sweep, str(tmp_path), parallel=2, out=out)
    assert not outcome.failures, out.getvalue()
    shared = tmp_path / "shared" / "base,seed=0"
    assert _json(shared / "DONE")["step"] == 4
    for name in ("optimizer.learning_rate=1e-3,seed=0", "optimizer.learning_rate=3e-3,seed=0"):
        assert f"--init_from={shared} " in _text(tmp_path / "points" / name / "command")
        assert f"initialised the model from {shared}" in _text(tmp_path / "points" / name / "output.log")
    before = _files(str(tmp_path / "shared")) | _files(str(tmp_path / "points"))
    again = io.StringIO()
    assert not run_sweep(sweep, str(tmp_path), parallel=2, out=again).failures
    assert again.getvalue().count("every point finished before") == 2
    assert _files(str(tmp_path / "shared")) | _files(str(tmp_path / "points")) == before
