"""Distillation as stages, end to end on tiny models: the teacher writes filtered traces, the student
is pretrained, distilled and measured beside the teacher; a rerun skips every stage; switching to
logit KD adds the top-k cache and redoes the student alone. Also the config's shared fields and
refusals, and the Table 6 study's graph."""

from __future__ import annotations

import csv
import dataclasses
import os

import pytest
from absl import flags

from moe_jax import config_flags
from moe_jax.configs import get_preset
from moe_jax.data.records import write_jsonl
from moe_jax.distill.config import DistillConfig, KDConfig
from moe_jax.distill.distillation import Distillation, run_distillation
from moe_jax.distill.table6 import study_stages
from moe_jax.errors import InputError
from moe_jax.pipeline.executor import read_step, run_steps
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import ExperimentConfig, LoopConfig
from moe_jax.train.trainer import train
from moe_jax.train.workdir import read_done

_LOOP = {"loop.eval_every": 2, "loop.checkpoint_every": 2, "loop.eval_problems": 8, "loop.eval_max_new_tokens": 24}


def _tiny(teacher: str) -> DistillConfig:
    return config_tree.override(DistillConfig(), {
        "model.n_layers": 1, "model.d_model": 32, "pipeline.task_options": "max_digits=2,ops=+,languages=en+fr",
        "teacher.source": teacher, "teacher.rejection.prompts": 8, "teacher.rejection.prompts_per_batch": 8,
        "teacher.rejection.sampling.max_new_tokens": 24, "teacher.rejection.sampling.samples_per_prompt": 2,
        "student_base.steps": 2, "student_base.seq_len": 64, "student_base.corpus.eval_batches": 0,
        **{f"student_base.{k}": v for k, v in _LOOP.items()},
        "student.steps": 2, "student.batch_size": 8, "student.seq_len": 128, **{f"student.{k}": v for k, v in _LOOP.items()},
        "kd.top_k": 8, "kd.sampling.max_new_tokens": 24, "study.seeds": 2,
        "report.problems": 16, "report.pass_k": 2, "report.max_new_tokens": 24})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A one-step tiny MoE on the pipeline's tasks (what it writes hardly matters: the filters judge)."""
    corpus = _tiny("x").pipeline.stage_run("base")
    run = ExperimentConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2,
                                                     max_seq_len=256),
                           steps=1, batch_size=8, seq_len=128, task=corpus.task, task_options=corpus.task_options,
                           loop=LoopConfig(eval_problems=4, eval_max_new_tokens=8))
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train(run, workdir)
    return workdir


def test_the_config_shares_fields_refuses_moe_students_and_scales():
    cfg = config_tree.override(DistillConfig(), {"seed": 4, "model.n_layers": 3, "kd.mode": "logit"})
    base, student, rl = (cfg.stage_run(name) for name in ("student_base", "student", "rl"))
    for run in (base, student, rl):
        assert run.seed == 4 and run.model == cfg.model and run.template == cfg.pipeline.template
    assert student.kd.mode == "logit" and student.task == cfg.pipeline.stage_run("sft").task
    assert base.task_options == cfg.pipeline.stage_run("base").task_options  # the teacher's base corpus
    assert rl.task == cfg.pipeline.stage_run("reasoning_rl").task and "language=0," in rl.rewards
    small = cfg.scaled(0.05)
    assert small.student.steps == 15 and small.student_base.steps == 50 and small.pipeline.base.steps == 50
    with pytest.raises(InputError, match="DistillConfig.model: 'tiny-moe' is an MoE"):
        DistillConfig(model=get_preset("tiny-moe"))
    with pytest.raises(InputError, match=r"kd.top_k: 300 > the vocabulary \(256 ids\)"):
        config_tree.override(DistillConfig(), {"kd.mode": "logit", "kd.top_k": 300})
    with pytest.raises(InputError, match="KDConfig.mode: unknown mode 'soft'"):
        KDConfig(mode="soft")
    with pytest.raises(InputError, match="KDConfig.beta"):
        KDConfig(beta=1.5)
    with pytest.raises(InputError, match=r"study.sizes \(StudyConfig.sizes\): 'tiny-moe' is an MoE"):
        config_tree.override(DistillConfig(), {"study.sizes": "tiny-dense,tiny-moe"})
    values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=values, config_class=DistillConfig)
    assert "config.teacher.source" in values and "config.student.steps" in values and "config.kd.beta" in values
    assert "config.student.model.n_layers" not in values and "config.student.kd.mode" not in values


def test_a_distillation_runs_then_skips_then_redoes_only_the_student(teacher, tmp_path):
    workdir = str(tmp_path / "kd")
    cfg = _tiny(teacher)
    rows = run_distillation(cfg, workdir)
    assert list(rows) == ["teacher", "student_base", "student (sequence KD)"]
    assert rows["teacher"]["params"] > rows["student_base"]["params"]
    stats = read_done(os.path.join(workdir, "traces"))["metrics"]
    assert stats["sampled"] == 16 and stats["records"] >= 2  # the non-reasoning share at least
    with open(os.path.join(workdir, "results.csv")) as f:
        assert [r["stage"] for r in csv.DictReader(f)] == list(rows)
    attempts = {s: len(read_step(os.path.join(workdir, s))["attempts"]) for s in
                ("teacher", "traces", "student_base", "student")}
    assert set(attempts.values()) == {1}

    run_distillation(cfg, workdir)  # done: every stage skipped
    assert {s: len(read_step(os.path.join(workdir, s))["attempts"]) for s in attempts} == attempts

    logit = config_tree.override(cfg, {"kd.mode": "logit"})
    rows = run_distillation(logit, workdir)
    again = {s: len(read_step(os.path.join(workdir, s))["attempts"]) for s in attempts}
    assert again == {"teacher": 1, "traces": 1, "student_base": 1, "student": 1}
    assert read_step(os.path.join(workdir, "student"))["settings"]["run"]["kd"]["mode"] == "logit"
    assert os.path.exists(os.path.join(workdir, "topk", "topk.array_record"))
    assert any(name.startswith("student-") for name in os.listdir(os.path.join(workdir, "superseded")))
    assert "student (logit KD)" in rows


def test_given_traces_are_read_not_written(teacher, tmp_path):
    """`teacher.traces` names a dataset (a file, or a folder such as a pipeline's rejection_sampling):
    the stage records it; changing the file changes the key."""
    folder = tmp_path / "rejection_sampling"
    folder.mkdir()
    write_jsonl(str(folder / "data.jsonl"), [{"prompt": "1+1\n", "response": "<answer>2</answer>"}])
    cfg = config_tree.override(_tiny(teacher), {"teacher.traces": str(folder)})
    d = Distillation(cfg, str(tmp_path / "kd"))
    keys = run_steps(d.workdir, d.stages(), only=("traces",))
    assert d.traces_data == str(folder / "data.jsonl")
    assert read_done(d.path("traces"))["metrics"]["source"] == d.traces_data
    assert not os.path.exists(os.path.join(d.path("traces"), "data.jsonl"))  # nothing sampled
    write_jsonl(str(folder / "data.jsonl"), [{"prompt": "1+2\n", "response": "<answer>3</answer>"}] * 2)
    assert run_steps(d.workdir, d.stages(), only=("traces",))["traces"] != keys["traces"]
    with pytest.raises(InputError, match="teacher.traces: .* does not exist"):
        Distillation(config_tree.override(cfg, {"teacher.traces": str(tmp_path / "none")}), str(tmp_path)).traces_stage()


def test_the_table6_graph(teacher, tmp_path):
    """Per size: one base, the seeded seq-KD and RL-only runs (RL only once the budgets are known,
    each with its seq-KD twin's wall time), KD then RL from seed 0's KD, logit and on-policy KD."""
    d = Distillation(_tiny(teacher), str(tmp_path))
    names = [s.name for s in study_stages(d, None)]
    assert names[:3] == ["teacher", "traces", "topk"]
    assert names[3:] == [f"{size}/{v}" for size in ("tiny-dense-s", "tiny-dense") for v in
                         ("base", "seq_kd-seed0", "seq_kd-seed1", "seq_kd_rl", "logit_kd", "on_policy_kd")]
    budgets = {f"{size}/seq_kd-seed{i}": 10.0 + i for size in ("tiny-dense-s", "tiny-dense") for i in range(2)}
    stages = {s.name: s for s in study_stages(d, budgets)}
    rl = stages["tiny-dense/rl_only-seed1"]
    assert rl.inputs == ("tiny-dense/base",) and rl.config["run"].loop.max_seconds == 11.0
    assert rl.config["run"].seed == 1 and rl.config["run"].model.name == "tiny-dense"
    assert stages["tiny-dense-s/seq_kd_rl"].inputs == ("tiny-dense-s/seq_kd-seed0",)
    assert stages["tiny-dense-s/logit_kd"].config["run"].kd.mode == "logit"
    assert "topk" in stages["tiny-dense-s/on_policy_kd"].inputs and "topk" not in stages["tiny-dense-s/seq_kd-seed1"].inputs
