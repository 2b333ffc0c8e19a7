"""The executor's guarantees on graphs of counting steps (no training): skip, resume, supersede and
the downstream redo; keys from the configs' identity (a cadence change redoes nothing, a numeric
change redoes the step and its readers; a field added at its neutral value keeps the keys; a folder
keyed by the older rule is re-keyed, not redone); a step that did not finish stops the graph; a
damaged or missing output is refused before anything moves; a step holds its lock;
only a config's own runner trains it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from moe_jax import runs
from moe_jax.distill.config import KDRunConfig
from moe_jax.errors import InputError
from moe_jax.pipeline.executor import Step, StepIncomplete, read_step, run_independent, run_steps, step_key
from moe_jax.pipeline.steps import finished_run
from moe_jax.rl.trainer import train_grpo
from moe_jax.train import config_tree
from moe_jax.train import workdir as workdir_format
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.lock import WorkdirLockedError
from moe_jax.train.trainer import train


def _counting_step(name, inputs, config, calls, *, fail_first=False, finish=True, outputs=()):
    def fn(step_dir, input_dirs):
        calls.append(name)
        assert set(input_dirs) == set(inputs)
        with open(os.path.join(step_dir, "output.txt"), "a") as f:
            f.write(f"{config}\n")
        if fail_first and calls.count(name) == 1:
            raise KeyboardInterrupt  # killed midway: no DONE
        if finish:
            workdir_format.mark_done(step_dir, 1, {})
    return Step(name, fn, config, tuple(inputs), tuple(outputs))


EDGES = {"a": (), "b": ("a",), "c": ("b",), "d": ("a",)}


def _graph(calls, changes=None, fail=None, unfinished=(), outputs=()):
    configs = {"a": {"x": 1}, "b": {"y": 2}, "c": {"z": 3}, "d": {"w": 4}, **(changes or {})}
    return [_counting_step(n, EDGES[n], configs[n], calls, fail_first=n == fail, finish=n not in unfinished,
                           outputs=("output.txt",) if n in outputs else ()) for n in "abcd"]


def test_steps_skip_resume_and_redo_downstream(tmp_path):
    workdir, calls = str(tmp_path), []
    keys = run_steps(workdir, _graph(calls))
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    assert run_steps(workdir, _graph(calls)) == keys and calls == []  # all done: all skipped
    # b changes: b and c (which reads b) are redone; a and d are not.
    new_keys = run_steps(workdir, _graph(calls, {"b": {"y": 3}}))
    assert calls == ["b", "c"]
    assert new_keys["a"] == keys["a"] and new_keys["d"] == keys["d"]
    assert new_keys["b"] != keys["b"] and new_keys["c"] != keys["c"]
    superseded = sorted(os.listdir(os.path.join(workdir, workdir_format.SUPERSEDED_DIR)))
    assert superseded == [f"b-{keys['b']}", f"c-{keys['c']}"]  # moved aside, never deleted
    with open(os.path.join(workdir, workdir_format.SUPERSEDED_DIR, f"b-{keys['b']}", "output.txt")) as f:
        assert f.read() == "{'y': 2}\n"
    # A step killed midway is resumed in its own folder (same key), then skipped.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_steps(workdir, _graph(calls, {"b": {"y": 3}, "d": {"w": 5}}, fail="d"))
    run_steps(workdir, _graph(calls, {"b": {"y": 3}, "d": {"w": 5}}, fail="d"))
    assert calls == ["d", "d"]
    with open(os.path.join(workdir, "d", "output.txt")) as f:
        assert f.read() == "{'w': 5}\n{'w': 5}\n"  # the second attempt found the first one's files
    assert len(read_step(os.path.join(workdir, "d"))["attempts"]) == 1  # the killed attempt is not timed
    calls.clear()
    run_steps(workdir, _graph(calls, {"b": {"y": 3}, "d": {"w": 5}}), only=["c"])
    assert calls == []


def test_independent_steps_are_launched_together_and_each_outcome_recorded(tmp_path):
    calls = []
    steps = [_counting_step(n, (), {"n": n}, calls) for n in ("p", "q", "r", "s")]
    launched = []

    def launch(todo):  # p computed here; q fails; r another process finished; s returns without DONE
        launched.append([pending.step.name for pending in todo])
        todo[0].step.fn(todo[0].step_dir, {})
        workdir_format.mark_done(todo[2].step_dir, 1, {})
        return {"p": 2.5, "q": RuntimeError("exit status 1"), "r": None, "s": 1.0}

    keys, errors = run_independent(str(tmp_path), steps, launch)
    assert launched == [["p", "q", "r", "s"]] and set(keys) == {"p", "q", "r", "s"}
    assert set(errors) == {"q", "s"} and isinstance(errors["s"], StepIncomplete)
    assert read_step(str(tmp_path / "p"))["attempts"] == [{"seconds": 2.5}]
    assert read_step(str(tmp_path / "r"))["attempts"] == []  # the other process's record is not ours to write
    _, errors = run_independent(str(tmp_path), steps, lambda todo: launched.append([p.step.name for p in todo]) or {})
    assert launched[-1] == ["q", "s"] and set(errors) == {"q", "s"}  # done ones skipped; the rest not launched


def test_a_graph_folder_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "graph").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file. Fix: give a directory"):
        run_steps(str(tmp_path / "graph"), _graph([]))


def test_only_runs_what_a_step_reads(tmp_path):
    calls = []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")  # a folder the graph did not make: kept aside
    run_steps(str(tmp_path), _graph(calls), only=["b"])
    assert calls == ["a", "b"]
    assert (tmp_path / workdir_format.SUPERSEDED_DIR / "a-unkeyed" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown step"):
        run_steps(str(tmp_path), _graph(calls), only=["sft"])


def _run_graph(calls, runs_by_name):
    """a -> b -> c with run configs (like a pipeline's stages)."""
    return [_counting_step(n, EDGES[n], {"run": runs_by_name[n]}, calls) for n in "abc"]


def test_a_cadence_change_redoes_nothing_and_a_numeric_change_redoes_the_step_and_its_readers(tmp_path):
    run = ExperimentConfig(steps=5)
    calls = []
    keys = run_steps(str(tmp_path), _run_graph(calls, {n: run for n in "abc"}))
    cadence = config_tree.override(run, {"loop.eval_every": 7, "loop.checkpoint_every": 3, "loop.keep_checkpoints": 9,
                                         "loop.max_seconds": 60.0, "sharding_rules": "embed=None"})
    calls.clear()
    assert run_steps(str(tmp_path), _run_graph(calls, {"a": run, "b": cadence, "c": run})) == keys
    assert calls == []
    numeric = config_tree.override(run, {"optimizer.learning_rate": 1e-4})
    new_keys = run_steps(str(tmp_path), _run_graph(calls, {"a": run, "b": numeric, "c": run}))
    assert calls == ["b", "c"] and new_keys["a"] == keys["a"]


@dataclasses.dataclass(frozen=True)
class _Before:
    rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class _After:
    rate: float = 0.1
    schedule: str = config_tree.added("constant")  # came later; "constant" computes what _Before did


def test_a_field_added_at_its_neutral_value_keeps_the_keys():
    assert step_key({"run": _After()}, ["k"]) == step_key({"run": _Before()}, ["k"])
    assert step_key({"run": _After(schedule="cosine")}, ["k"]) != step_key({"run": _Before()}, ["k"])


def _old_rule_key(settings, input_keys):
    """How a key was computed before identities were declared: the whole config."""
    blob = json.dumps({"settings": settings, "inputs": list(input_keys)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_a_folder_keyed_by_the_older_rule_is_rekeyed_not_redone(tmp_path, caplog):
    run = ExperimentConfig(steps=5)
    calls = []
    keys = run_steps(str(tmp_path), _run_graph(calls, {n: run for n in "abc"}))
    old_keys = {}
    for name in "abc":  # rewrite each record as the older code wrote it
        record = read_step(str(tmp_path / name))
        old_keys[name] = _old_rule_key({"run": run.to_dict()}, [old_keys[i] for i in EDGES[name]])
        record.update(key=old_keys[name], inputs={i: old_keys[i] for i in EDGES[name]})
        (tmp_path / name / workdir_format.STEP_FILE).write_text(json.dumps(record))
    assert old_keys["b"] != keys["b"]
    calls.clear()
    with caplog.at_level("INFO"):
        assert run_steps(str(tmp_path), _run_graph(calls, {n: run for n in "abc"})) == keys
    assert calls == [] and caplog.text.count("re-keyed") == 3
    assert read_step(str(tmp_path / "b"))["rekeyed_from"] == [old_keys["b"]]
    assert not (tmp_path / workdir_format.SUPERSEDED_DIR).exists()
    # A folder whose recorded config differs on the identity is not re-keyed: it is redone.
    record = read_step(str(tmp_path / "c"))
    record.update(key="0" * 16, settings={"run": {**run.to_dict(), "steps": 6}})
    (tmp_path / "c" / workdir_format.STEP_FILE).write_text(json.dumps(record))
    run_steps(str(tmp_path), _run_graph(calls, {n: run for n in "abc"}))
    assert calls == ["c"]


def test_a_step_that_did_not_finish_stops_the_graph_and_the_rerun_resumes_it(tmp_path):
    calls = []
    with pytest.raises(StepIncomplete, match="'b' stopped before it finished.*rerun the same command"):
        run_steps(str(tmp_path), _graph(calls, unfinished="b"))
    assert calls == ["a", "b"]  # c (reads b) and d (after it) did not run
    assert not (tmp_path / "b" / workdir_format.DONE_FILE).exists()
    calls.clear()
    run_steps(str(tmp_path), _graph(calls))
    assert calls == ["b", "c", "d"] and (tmp_path / "b" / "output.txt").read_text().count("\n") == 2  # resumed


def test_a_changed_output_is_refused_naming_the_file_before_anything_moves(tmp_path):
    calls = []
    run_steps(str(tmp_path), _graph(calls, outputs="a"))
    record = read_step(str(tmp_path / "a"))
    assert record["outputs"]["output.txt"]["bytes"] == len("{'x': 1}\n")
    (tmp_path / "a" / "output.txt").write_text("{'x': 2}\n")  # same size, other contents
    calls.clear()
    with pytest.raises(InputError, match=r"a/output.txt changed since step 'a' wrote it.*delete .*a"):
        run_steps(str(tmp_path), _graph(calls, {"b": {"y": 3}}, outputs="a"))
    assert calls == [] and not (tmp_path / workdir_format.SUPERSEDED_DIR).exists()  # b was not moved aside
    (tmp_path / "a" / "output.txt").unlink()
    with pytest.raises(InputError, match="output.txt is gone"):
        run_steps(str(tmp_path), _graph(calls, {"b": {"y": 3}}, outputs="a"))


_HOLD = """
import sys, time
from moe_jax.train.lock import lock_workdir
with lock_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_step_another_process_holds_is_not_computed_twice(tmp_path):
    calls = []
    (tmp_path / "b").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match="in use by another run"):
            run_steps(str(tmp_path), _graph(calls))
        assert calls == ["a"]
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run_steps(str(tmp_path), _graph(calls))
    assert calls == ["a", "b", "c", "d"]


def test_an_outside_run_must_have_finished_unless_accepted(tmp_path):
    run = tmp_path / "teacher"
    run.mkdir()
    with pytest.raises(InputError, match="teacher.source: .* has not finished.*--config.teacher.allow_unfinished"):
        finished_run(str(run), "DistillConfig.teacher.source", allow_flag="--config.teacher.allow_unfinished")
    assert finished_run(str(run), "f", allow_unfinished=True) == "unfinished"
    workdir_format.mark_done(str(run), 7, {})
    assert finished_run(str(run), "f")[0] == 7
    with pytest.raises(InputError, match="does not exist"):
        finished_run(str(tmp_path / "none"), "f")


def test_a_config_no_runner_trains_is_refused(tmp_path):
    """A `KDRunConfig` (an `ExperimentConfig` with a `kd` part) never reaches the plain LM loss or GRPO."""
    kd_run = KDRunConfig(steps=1)
    with pytest.raises(InputError, match="no runner here trains a KDRunConfig.*train_kd"):
        runs.runner_for(kd_run)
    with pytest.raises(InputError, match="train trains a ExperimentConfig, not a KDRunConfig"):
        train(kd_run, str(tmp_path))
    with pytest.raises(InputError, match="train_grpo trains a GRPOConfig, not a KDRunConfig"):
        train_grpo(kd_run, str(tmp_path))
    assert not os.listdir(tmp_path)
    assert runs.runner_for(ExperimentConfig()) is train


def test_a_distillation_teacher_step_recorded_with_the_stages_copies_is_rekeyed():
    """Before stage configs were derived, a pipeline's record held each stage's copies of the shared
    fields (and its cadence); a step recorded so answers to today's key."""
    from moe_jax.pipeline.config import RUN_STAGES, PipelineConfig
    from moe_jax.pipeline.executor import _rekeyable

    cfg = PipelineConfig()
    old = {**dataclasses.asdict(cfg), **{s: dataclasses.asdict(cfg.stage_run(s)) for s in RUN_STAGES}}
    step = Step("teacher", lambda d, i: None, {"pipeline": cfg})
    assert _rekeyable({"settings": {"pipeline": old}, "inputs": {}}, step, {})
    changed = {**old, "sft": {**old["sft"], "steps": 7}}
    assert not _rekeyable({"settings": {"pipeline": changed}, "inputs": {}}, step, {})
