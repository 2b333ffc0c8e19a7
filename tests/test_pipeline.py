"""The R1 pipeline's parts without training: rejection sampling's filters on hand-made
completions, the pipeline config, the
datasets' provenance and prompt disjointness, and the results table."""

from __future__ import annotations

import csv
import json

import pytest

from moe_jax import config_flags
from moe_jax.data.pipelines import problem_at
from moe_jax.data.records import read_jsonl
from moe_jax.data.tasks import make_task, problem_language
from moe_jax.data.template import format_response
from moe_jax.data.tokenizer import UNKNOWN_ID_TEXT
from moe_jax.errors import InputError
from moe_jax.pipeline import cold_start, datasets, report
from moe_jax.pipeline.config import RUN_STAGES, ColdStartData, PipelineConfig, RejectionConfig
from moe_jax.pipeline.prompts import COLD_START_OFFSET, REJECTION_OFFSET, seen_problems
from moe_jax.pipeline.rejection import rejection_reason
from moe_jax.train import config_tree

TASK = make_task("arithmetic", max_digits=3, ops="+", languages="en+fr")
FILTERS = RejectionConfig(min_tokens=5, max_tokens=60)


def _english_problem():
    return next(p for i in range(50) if problem_language(p := problem_at(TASK, 0, i)) == "en")


def _reason(text, kept=(), length=20, truncated=False, problem=None):
    return rejection_reason(TASK, problem or _english_problem(), text, length, truncated, list(kept), FILTERS)


def test_each_filter_on_hand_made_completions():
    problem = _english_problem()
    a, b = problem.data["a"], problem.data["b"]
    right = format_response(f"so {a}+{b}={a + b}", str(a + b))
    assert _reason(right) is None
    assert _reason(f"<think>so</think> {a + b}") == "template"  # the right answer in a broken template
    assert _reason(f"<think>so</think><answer>{a + b}</answer><answer>{a + b}</answer>") == "template"
    assert _reason(format_response(f"so {UNKNOWN_ID_TEXT}", str(a + b))) == "template"  # an id past the vocabulary
    assert _reason(format_response("so", str(a + b + 1))) == "verifier"
    assert _reason(format_response(f"write {a}\ndonc {a}+{b}={a + b}", str(a + b))) == "language"  # mixed CoT
    assert _reason(format_response(f"donc {a}+{b}={a + b}", str(a + b))) == "language"  # the other language
    assert _reason(right, length=4) == "length" and _reason(right, length=61) == "length"
    assert _reason(right, truncated=True) == "length"
    assert _reason(right, kept=[right]) == "duplicate"
    assert _reason(right, kept=[format_response("so", str(a + b))]) is None  # another text of the same answer


def test_duplicates_are_dropped_once(tmp_path):
    """Of three identical right completions of a prompt the first is kept, the others dropped."""
    problem = _english_problem()
    right = format_response("so", problem.answer)
    kept, reasons = [], []
    for text in [right, right, format_response("so so", problem.answer), right]:
        reason = _reason(text, kept=kept, problem=problem)
        reasons.append(reason)
        if reason is None:
            kept.append(text)
    assert reasons == [None, "duplicate", None, "duplicate"]


def test_pipeline_config_shares_fields_and_scales():
    cfg = config_tree.override(PipelineConfig(), {"seed": 7, "model.n_layers": 2, "reasoning_rl.steps": 9})
    runs = {stage: cfg.stage_run(stage) for stage in RUN_STAGES}
    for run in runs.values():
        assert run.seed == 7 and run.model.n_layers == 2 and run.template == cfg.template
    assert runs["reasoning_rl"].task == "arithmetic" and runs["final_rl"].task == "arithmetic+number_words"
    assert "switch_rate=0.2" in runs["base"].task_options and "switch_rate" not in runs["cold_start"].task_options
    assert cfg.r1_zero().steps == 9 + cfg.final_rl.steps and "language=0," in cfg.r1_zero().rewards
    assert cfg.r1_zero().model == cfg.model
    # Derived, not mutated: the stage's part keeps its own fields; what it shares is not saved.
    assert cfg.sft.model != cfg.model and "model" not in cfg.to_dict()["sft"]
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    small = cfg.scaled(0.05)
    assert small.base.steps == 50 and small.reasoning_rl.steps == 1 and small.reasoning_rl.loop.eval_every == 1
    assert small.rejection_sampling.prompts == 26 and small.cold_start_data.examples == 50
    with pytest.raises(InputError, match="scale"):
        cfg.scaled(0.0)
    with pytest.raises(InputError, match="switch_rate"):
        PipelineConfig(task_options="switch_rate=0.5")
    with pytest.raises(InputError, match="non_reasoning_share"):
        PipelineConfig(non_reasoning_share=1.5)


def test_stage_copies_of_shared_fields_are_not_flags():
    from absl import flags

    values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=values, config_class=PipelineConfig)
    assert "config.reasoning_rl.steps" in values and "config.seed" in values
    assert "config.reasoning_rl.seed" not in values and "config.sft.model.n_layers" not in values
    assert "config.sft.task" not in values and "config.sft.optimizer.learning_rate" in values


def test_stage_prompts_avoid_eval_sets_and_reasoning_rl_prompts():
    cfg = PipelineConfig().scaled(0.1)
    seen = seen_problems(cfg)
    assert len(seen) > 100
    rl = cfg.stage_run("reasoning_rl")
    task = TASK.__class__(max_digits=3, ops="+", slip="carry", languages="en+fr")
    fresh = datasets.fresh_problems(task, cfg.seed + REJECTION_OFFSET, 500, seen)
    identities = [datasets.problem_identity(p) for p in fresh]
    assert len(set(identities)) == 500 and not set(identities) & seen
    # the check is real: the raw stream would repeat eval and RL problems (2-digit sums are few)
    small = make_task("arithmetic", max_digits=1, ops="+")
    small_seen = {datasets.problem_identity(problem_at(small, rl.seed, i)) for i in range(20)}
    small_fresh = datasets.fresh_problems(small, 5, 30, small_seen)
    assert not {datasets.problem_identity(p) for p in small_fresh} & small_seen
    with pytest.raises(InputError, match="fresh problems"):
        datasets.fresh_problems(small, 5, 200, set())  # 1-digit sums: 100 problems exist


def test_cold_start_records_have_provenance_and_read_back(tmp_path):
    problems = [problem_at(TASK, COLD_START_OFFSET, i) for i in range(20)]
    records = cold_start.synthetic_records(TASK, problems, ColdStartData(retry_rate=0.5), "compact", seed=1)
    path = str(tmp_path / "data.jsonl")
    datasets.write_dataset(str(tmp_path), records, {"n": 20}, array_record_above=10,
                           rejected=[{"prompt": "p", "completion": "c", "reason": "template"}])
    assert datasets.dataset_path(str(tmp_path)).endswith(datasets.ARRAY_RECORD_FILE)  # past 10 records
    read = read_jsonl(path)
    assert [r["response"] for r in read] == [r["response"] for r in records]
    for record, problem in zip(read, problems):
        assert record["source"] == "cold_start" and record["task"] == "arithmetic"
        assert record["problem"]["data"] == problem.data
        assert TASK.verify(problem, record["response"])
    with open(tmp_path / datasets.REJECTED_FILE) as f:
        assert json.loads(f.readline())["reason"] == "template"


def test_results_table_files(tmp_path):
    rows = {"base": {"accuracy/arithmetic": 0.5, "pass@4": 0.75, "length_correct": float("nan"), "tokens": 10,
                     "wall_s": 12.25},
            "rejection_sampling": {"tokens": 3, "wall_s": 1.0}}
    columns = ["stage", "accuracy/arithmetic", "pass@4", "length_correct", "tokens", "wall_s"]
    report.write_results(str(tmp_path), rows, columns, "t")
    with open(tmp_path / report.RESULTS_CSV) as f:
        table = list(csv.reader(f))
    assert table == [columns, ["base", "0.500", "0.750", "", "10", "12.2"], ["rejection_sampling", "", "", "", "3",
                                                                              "1.000"]]
    assert "| base | 0.500 |" in (tmp_path / report.RESULTS_MD).read_text()
    assert (tmp_path / report.RESULTS_PNG).stat().st_size > 1000
