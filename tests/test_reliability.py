"""Runs that cannot lose or corrupt data (issue 14), each probe as a user would meet it: a second
run on a busy workdir, damaged checkpoints, a diverging optimizer, a continuation with a gentler
one, a failing disk, a diverging GRPO run, and bad values and files."""

import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax.configs import get_preset
from moe_jax.models.sampler import SamplingConfig
from moe_jax.rl.config import GRPOConfig, GRPOLoss
from moe_jax.rl.health import HealthConfig, HealthMonitor, RunHealthError
from moe_jax.train.checkpoint import Checkpointer, CheckpointError
from moe_jax.train.config_tree import override
from moe_jax.train.context import make_context
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig, OptimizerConfig
from moe_jax.train.lock import WorkdirLockedError
from moe_jax.train.metrics import read_metrics
from moe_jax.train.step import make_train_step
from moe_jax.train.trainer import train
from moe_jax.train.workdir import CONFIG_CHANGES_FILE, ConfigConflictError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2)
CFG = ExperimentConfig(model=MODEL, steps=4, batch_size=8, seq_len=48,
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
                       loop=LoopConfig(eval_every=100, checkpoint_every=2, eval_problems=2, eval_max_new_tokens=4),
                       corpus=CorpusConfig(eval_batches=0))


def _losses(workdir):
    return [m["loss"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4: each test damages a copy."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    assert train(CFG, workdir)["status"] == "finished"
    return workdir


def _copy(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    return workdir


HOLD_SCRIPT = """
import pathlib, sys, time
from moe_jax.train.lock import lock_workdir

with lock_workdir(sys.argv[1]):  # what a run does for its whole life
    pathlib.Path(sys.argv[2]).write_text("holding")
    time.sleep(600)
"""


def test_1_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_holder(tmp_path):
    workdir, ready = str(tmp_path / "run"), tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, workdir, str(ready)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read()[-3000:] if holder.poll() else ""
            time.sleep(0.1)
        with pytest.raises(WorkdirLockedError, match=rf"in use by another run: pid {holder.pid} on host .*Fix:"):
            train(CFG, workdir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing anything: its lock is taken over, and the run goes on.
    assert train(CFG, workdir)["status"] == "finished"


def _data_files(step_dir, item):
    """The OCDBT data files of one item of a checkpoint (the larger ones: the array chunks)."""
    return [f for f in glob.glob(f"{step_dir}/{item}/ocdbt.process_0/d/*") if os.path.getsize(f) >= 4096]


def _orbax_model(workdir, step):
    """Step `step`'s model arrays as Orbax restores them, or None when it cannot."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        return manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))["model"]
    except Exception:  # noqa: BLE001 - any failure means "not silent"
        return None
    finally:
        manager.close()


def _flip_bits(workdir, step):
    """Flip 4 bits in each model data file where Orbax still restores without a word and some
    array's values changed: inside a stored array's bytes, not a compressed block's header nor
    bytes no array reads (where the files' layout puts those depends on the order the async writes
    landed in, so a few places are tried)."""
    files = [pathlib.Path(f) for f in _data_files(f"{workdir}/checkpoints/{step}", "model")]
    originals = {path: path.read_bytes() for path in files}
    intact = jax.tree.leaves(_orbax_model(workdir, step))
    for fraction in (0.5, 0.55, 0.45, 0.6, 0.4, 0.65, 0.35, 0.7):
        for path, original in originals.items():
            data = bytearray(original)
            for i in range(4):
                data[int(len(data) * fraction) + 37 * i] ^= 0x10
            path.write_bytes(bytes(data))
        damaged = _orbax_model(workdir, step)
        if damaged is not None and any(not np.array_equal(a, b) for a, b in zip(intact, jax.tree.leaves(damaged))):
            return
    raise AssertionError(f"no place in step {step}'s files where flipped bits restore silently")


def test_2_flipped_bits_are_caught_moved_aside_and_the_run_resumes_from_the_good_one(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    _flip_bits(workdir, 4)
    # The storage layer alone restores the damaged arrays without a word (what happened before):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    manager.restore(4, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
    manager.close()
    os.remove(os.path.join(workdir, "DONE"))
    assert train(CFG, workdir)["status"] == "finished"  # resumes from step 2, redoes 3 and 4
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["4"]
    np.testing.assert_allclose(_losses(workdir), _losses(finished), rtol=1e-6)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):
    with open(path, "r+b") as f:
        f.write(b"\x00garbled{[")


def _each(function, files):
    for file in files:
        function(file)


DAMAGE = {
    "truncated data files": lambda d: _each(_truncate, _data_files(d, "model")),
    "deleted data files": lambda d: _each(os.remove, _data_files(d, "optimizer")),
    "garbled data files": lambda d: _each(_garble, _data_files(d, "model")),
    "missing manifest": lambda d: os.remove(f"{d}/model/manifest.ocdbt"),
    "garbled metadata": lambda d: _garble(f"{d}/model/_METADATA"),
    "garbled data position": lambda d: _garble(f"{d}/data/metadata"),
}


@pytest.fixture(scope="module")
def abstract_state():
    context = make_context(CFG)
    return make_train_step(context.model, context.optimizer)[1]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_3_a_broken_newest_checkpoint_is_named_moved_aside_and_the_previous_one_restored(
        finished, tmp_path, abstract_state, damage, caplog):
    workdir = _copy(finished, tmp_path)
    DAMAGE[damage](os.path.join(workdir, "checkpoints", "4"))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                                damaged_dir=os.path.join(workdir, "checkpoints_damaged"))
    step, _, data = checkpointer.restore(abstract_state)
    checkpointer.close()
    assert step == 2 and "train" in data
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["4"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "4"))
    assert "checkpoint step 4 is damaged" in caplog.text and "newest good one" in caplog.text


def test_3_no_loadable_checkpoint_is_one_clear_error_and_nothing_moves(finished, tmp_path, abstract_state):
    workdir = _copy(finished, tmp_path)
    for step in (2, 4):
        _flip_bits(workdir, step)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    with pytest.raises(CheckpointError, match=r"step 4: CheckpointError: .* step 2: .*Nothing was moved. Fix: "):
        checkpointer.restore(abstract_state)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_4_5_a_non_finite_state_is_never_saved_and_the_run_goes_on_with_a_gentler_optimizer(tmp_path):
    """At lr 3.4e38 (near float32's largest) the step-2 update overflows the weights while its
    loss and gradient norm (from before the update) are finite: the guard stops before the save
    and names step 1; the run then continues from step 1 with a lower learning rate, and its
    record says so."""
    workdir = str(tmp_path / "run")
    wild = override(CFG, {"optimizer.learning_rate": 3.4e38, "optimizer.warmup_steps": 1,
                          "loop.checkpoint_every": 1})
    with pytest.raises(FloatingPointError, match=r"step 2: the parameters or optimizer state are not all finite"
                                                 r".*last good checkpoint is step 1.*--allow_config_change"):
        train(wild, workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    assert checkpointer.manager.all_steps() == [1]
    restored = checkpointer.manager.restore(1, args=ocp.args.Composite(model=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["model"]))
    checkpointer.close()

    gentle = override(wild, {"optimizer.learning_rate": 1e-3})
    with pytest.raises(ConfigConflictError, match="--allow_config_change=optimizer.learning_rate"):
        train(gentle, workdir)
    assert train(gentle, workdir, allow_config_change=["optimizer"])["status"] == "finished"
    record = [json.loads(line) for line in pathlib.Path(workdir, CONFIG_CHANGES_FILE).read_text().splitlines()]
    assert record[0]["at_checkpoint"] == 1
    assert record[0]["changes"] == ["optimizer.learning_rate: 3.4e+38 (saved) -> 0.001 (this command)"]
    assert json.loads(pathlib.Path(workdir, "config.json").read_text())["optimizer"]["learning_rate"] == 1e-3


GRPO = GRPOConfig(model=MODEL, steps=4, batch_size=16, seq_len=40,
                  sampling=SamplingConfig(samples_per_prompt=4, max_new_tokens=16),
                  optimizer=OptimizerConfig(learning_rate=1.0, warmup_steps=1, weight_decay=0.0),
                  loop=LoopConfig(eval_every=100, checkpoint_every=100, eval_problems=2, eval_max_new_tokens=4),
                  loss=GRPOLoss())


def test_6_a_diverging_grpo_run_stops_naming_the_signal(tmp_path, monkeypatch):
    """A random policy earns no accuracy or format reward (no advantage, no gradient), so the
    run is given a reward that varies — the completion's length — and a learning rate of 1."""
    from moe_jax.rl import rewards
    from moe_jax.rl.trainer import train_grpo

    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_length", lambda task, problem, completion: len(completion) / 16)
    with pytest.raises(RunHealthError, match=r"param_norm is .* more than health.max_param_growth=10"):
        train_grpo(override(GRPO, {"rewards": "test_length=1.0", "steps": 20}), str(tmp_path / "grpo"))


def test_6_collapsed_signals_are_warned_loudly_after_the_patience(caplog):
    monitor = HealthMonitor(HealthConfig(collapse_patience=2))
    healthy = {"param_norm": 50.0, "clip_ratio/region_mean": 0.1, "completions/clipped_ratio": 0.0,
               "frac_reward_zero_std": 0.5, "frac_reward_zero": 0.2}
    monitor(1, healthy)
    monitor(2, {**healthy, "completions/clipped_ratio": 1.0, "frac_reward_zero": 1.0})
    assert "HEALTH WARNING" not in caplog.text
    monitor(3, {**healthy, "completions/clipped_ratio": 1.0, "frac_reward_zero": 1.0})
    assert "completions/clipped_ratio = 1 for 2 steps" in caplog.text and "every completion scores 0" in caplog.text
    with pytest.raises(RunHealthError, match="param_norm is inf"):
        monitor(4, {**healthy, "param_norm": float("inf")})


SAVE_FAILS_SCRIPT = """
import json, os, resource, signal, sys, time
from moe_jax.experiment_main import quiet_libraries
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.trainer import train

quiet_libraries()  # what the scripts do

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead

def disk_full_after_step_2(step, state):
    if step == 3:  # once step 2's checkpoint is on disk, no file may pass 64 KB
        while not os.path.exists(os.path.join(sys.argv[2], "checkpoints", "2", "commit_success.txt")):
            time.sleep(0.05)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))

train(ExperimentConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2], hooks=[disk_full_after_step_2])
"""


def test_7_a_failed_save_stops_the_run_at_once_in_one_line(tmp_path, abstract_state):
    config, workdir = tmp_path / "config.json", str(tmp_path / "run")
    config.write_text(override(CFG, {"steps": 8}).to_json())
    out = subprocess.run([sys.executable, "-c", SAVE_FAILS_SCRIPT, str(config), workdir], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode != 0
    # One line, though the checkpointer's threads dying at exit may print into stderr before it on
    # the same line (their writes interleave with the traceback's): find it anywhere in a line.
    prefix = "moe_jax.train.checkpoint.CheckpointError: "
    (message,) = [line.split(prefix, 1)[1] for line in out.stderr.splitlines() if prefix in line]
    assert "saving a checkpoint to" in message and "File too large" in message
    assert "The previous checkpoint (step 2) is intact" in message
    # Nothing else: no traceback per array and thread from the checkpoint library, no "Event loop is
    # closed" from its writes that finish after the save failed.
    assert "Event loop is closed" not in out.stderr and not re.search(r"^E\d{4} ", out.stderr, re.MULTILINE)
    # Stopped no later than the next save (step 6, of 8): the failure is found as soon as the
    # background write ends, at the latest when the next save waits for it.
    assert max(m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))) <= 6
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    assert checkpointer.restore(abstract_state)[0] == 2
    checkpointer.close()


@pytest.mark.parametrize("changes, message", [
    ({"optimizer.clip_norm": -1.0}, r"optimizer.clip_norm \(OptimizerConfig.clip_norm\): must be a finite number in \(0"),
    ({"optimizer.learning_rate": float("nan")},
     r"optimizer.learning_rate \(OptimizerConfig.learning_rate\): must be a finite number"),
    ({"optimizer.weight_decay": float("inf")},
     r"optimizer.weight_decay \(OptimizerConfig.weight_decay\): must be a finite number"),
    ({"model.router_bias_rate": float("nan")}, "must be"),
    ({"steps": "10"}, r"ExperimentConfig.steps \(steps\): expected int, got str '10'"),
])
def test_8_9_bad_values_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        override(CFG, changes)


def test_8_grpo_prompts_that_cannot_fit_fail_before_compiling_naming_real_fields(tmp_path):
    from moe_jax.rl.trainer import train_grpo

    cramped = override(GRPO, {"seq_len": 20, "optimizer.learning_rate": 1e-4})
    with pytest.raises(ValueError, match=r"GRPOConfig.seq_len: prompts of task 'arithmetic' take up to \d+ tokens"
                                         r".*Fix: raise seq_len to at least \d+, or lower sampling.max_new_tokens"):
        train_grpo(cramped, str(tmp_path / "grpo"))
    assert not os.path.exists(tmp_path / "grpo" / "config.json")
    with pytest.raises(ValueError, match=r"sampling.temperature \(SamplingConfig.temperature\): must be a finite"):
        override(GRPO, {"sampling.temperature": float("nan")})


def _script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)


def test_8_9_command_line_mistakes_are_one_clear_line(tmp_path):
    out = _script("experiments/sft.py", f"--workdir={tmp_path / 'sft'}")
    assert out.returncode != 0 and "give --init_from=" in out.stderr and not (tmp_path / "sft").exists()
    out = _script("experiments/r1_zero.py", f"--workdir={tmp_path / 'r1'}", "--base_steps=-5")
    assert out.returncode != 0 and "--base_steps must be >= 1, got -5" in out.stderr
    not_json = tmp_path / "config.json"
    not_json.write_text("steps: 5\n")
    out = _script("experiments/pretrain.py", f"--workdir={tmp_path / 'p'}", f"--config={not_json}")
    assert out.returncode != 0 and f"--config={not_json}: not a JSON file" in out.stderr
    not_json.write_text(json.dumps({"model": {"d_model": 32, "n_heads": 2}, "steps": "ten"}))
    out = _script("experiments/pretrain.py", f"--workdir={tmp_path / 'p'}", f"--config={not_json}")
    assert "ExperimentConfig.steps (steps): expected int, got str 'ten'" in out.stderr
    out = _script("experiments/sft.py", f"--workdir={tmp_path / 'sft'}", f"--init_from={tmp_path / 'nowhere'}")
    assert out.returncode != 0 and "FATAL FileNotFoundError: --init_from=" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "sft").exists()
    (tmp_path / "a_file").write_text("x")
    out = _script("experiments/pretrain.py", f"--workdir={tmp_path / 'a_file'}", "--config.steps=1")
    assert out.returncode != 0 and "is a file" in out.stderr


def test_9_a_partial_model_in_a_config_file_is_said(tmp_path, caplog):
    from absl import flags

    from moe_jax import config_flags

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"d_model": 32, "n_heads": 2}}))
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=flag_values)
    flag_values(["prog", f"--config={path}"])
    config_flags.config_from_flags(flag_values)
    assert "take ModelConfig's defaults (not a preset's)" in caplog.text


def test_9_setup_errors_come_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="model.vocab_size: 64 < the tokenizer's"):
        train(override(CFG, {"model.vocab_size": 64}), str(workdir))
    assert not (workdir / "config.json").exists()
    with pytest.raises(ValueError):
        train(CFG, str(workdir), mesh_spec="data=3")
    assert not (workdir / "config.json").exists()
    train(CFG, str(workdir))  # the corrected command is not refused as a conflict


def _hf_folder(tmp_path):
    from interop_helpers import random_model

    from moe_jax.interop import save_hf

    cfg = dataclasses.replace(get_preset("qwen2.5-0.5b"), vocab_size=256, d_model=64, n_layers=1, d_ff=128,
                              n_heads=4, n_kv_heads=2, max_seq_len=256)
    folder = tmp_path / "hf"
    save_hf(random_model(cfg, seed=0), cfg, str(folder))
    return folder


def _write_header_length(path, n):
    data = bytearray(path.read_bytes())
    data[:8] = n.to_bytes(8, "little")
    path.write_bytes(bytes(data))


HF_DAMAGE = {
    "truncated weights": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors: not a readable"),
    "garbled header": (lambda f: _garble_at(f / "model.safetensors", 8), "model.safetensors: not a readable"),
    "huge header length": (lambda f: _write_header_length(f / "model.safetensors", 1 << 60),
                           "model.safetensors: not a readable"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{hidden_size: 64"), "config.json: not a JSON"),
    "config.json wrong type": (lambda f: _edit_config(f, num_hidden_layers="one"), "config.json"),
}


def _garble_at(path, offset):
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff\x00{[\xfe\x01\x02]"
    path.write_bytes(bytes(data))


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_10_a_damaged_hugging_face_folder_names_the_file_and_the_fix(tmp_path, damage):
    from moe_jax.interop import load_hf

    folder = _hf_folder(tmp_path)
    do, says = HF_DAMAGE[damage]
    do(folder)
    with pytest.raises(ValueError, match="Fix: ") as error:
        load_hf(str(folder))
    assert says in str(error.value) and str(folder) in str(error.value)


def test_10_nan_weights_are_refused_unless_asked_for(tmp_path):
    from safetensors.numpy import load_file, save_file

    from moe_jax.interop import load_hf

    folder = _hf_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights of final_norm/scale hold NaN or Inf values.*allow_nonfinite=True"):
        load_hf(str(folder))
    _, model = load_hf(str(folder), allow_nonfinite=True)
    assert np.isnan(np.asarray(model.final_norm.scale.get_value())).sum() == 1
