"""The cold start's three sources: synthetic traces checked by undoing the result or by working it
again in the other order, and R1-Zero's own samples — filters applied (on a hand-made stream of
samples standing in for the sampler), one per prompt, rewritten readable — keyed on the r1_zero
stage in the pipeline's graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_jax.data.language import languages_used
from moe_jax.data.pipelines import problem_at
from moe_jax.data.tasks import make_task, problem_language
from moe_jax.data.template import format_response
from moe_jax.data.tokenizer import load_tokenizer
from moe_jax.errors import InputError
from moe_jax.pipeline import cold_start, datasets, rejection
from moe_jax.pipeline.config import ColdStartData, PipelineConfig
from moe_jax.pipeline.executor import step_key
from moe_jax.pipeline.r1 import R1Pipeline
from moe_jax.rl.sampling import SampledProblems

TASK = make_task("arithmetic", max_digits=3, ops="+", languages="en+fr")


def test_commuted_check_works_the_sum_again_in_the_other_order():
    for i in range(40):
        problem = problem_at(TASK, 7, i)
        a, b = problem.data["a"], problem.data["b"]
        thinking, answer = TASK.readable_solution(problem, np.random.default_rng(i), 0.5, check="commuted")
        assert TASK.verify(problem, format_response(thinking, answer)) and answer == str(a + b)
        assert len(languages_used(thinking) - {problem_language(problem)}) == 0
        lines = thinking.splitlines()
        so, check, ok = ({"en": ("so", "check", "ok"), "fr": ("donc", "verifie", "bon")})[problem_language(problem)]
        # the check's block: "check", the column steps of b+a, "so b+a=…", the verdict
        start = len(lines) - 1 - lines[::-1].index(check)
        assert lines[-2] == f"{so} {b}+{a}={a + b}" and lines[-1] == ok
        assert lines[start - 1] == f"{so} {a}+{b}={a + b}"
        units = f"{b % 10}+{a % 10}={a % 10 + b % 10}"
        assert lines[start + 1].startswith(units)
    # the inverse check undoes the sum: "check 46-34=12 ok"
    problem = next(p for i in range(50) if problem_language(p := problem_at(TASK, 0, i)) == "en")
    a, b = problem.data["a"], problem.data["b"]
    thinking, _ = TASK.readable_solution(problem, np.random.default_rng(3), 0.0)
    assert thinking.splitlines()[-1] == f"check {a + b}-{b}={a} ok"
    with pytest.raises(ValueError, match="countdown checks by"):
        make_task("countdown").readable_solution(problem_at(make_task("countdown"), 0, 0), np.random.default_rng(0),
                                                 0.0, check="commuted")


def test_readable_rewrite_one_step_a_line_and_a_summary():
    problem = next(p for i in range(50) if problem_language(p := problem_at(TASK, 0, i)) == "fr")
    a, b = problem.data["a"], problem.data["b"]
    messy = f"<think>\n  {a}+{b}  \n\n ecris x \n</think><answer> {a + b} </answer>"
    assert cold_start.readable(TASK, problem, messy) == format_response(
        f"{a}+{b}\necris x\ndonc {a}+{b}={a + b}", str(a + b))
    ends = format_response(f"ecris 1\ndonc {a}+{b}={a + b}", str(a + b))
    assert cold_start.readable(TASK, problem, ends) == ends  # already summarised: unchanged
    with pytest.raises(ValueError, match="well-formed"):
        cold_start.readable(TASK, problem, "no template")


def test_r1_zero_source_keeps_verified_one_language_samples_one_per_prompt(monkeypatch):
    """A hand-made stream stands in for R1-Zero's sampler: per prompt 4 samples — a broken
    template, a wrong answer, a mixed-language chain, then (for even prompts only) a right one
    twice. Only the right ones pass, one per prompt, and the rounds go on until `examples`."""
    tokenizer = load_tokenizer("char")
    seen_prompts = []

    def fake_stream(policy, task, problems, *, tokenizer, template, sampling, key, mesh, rows, refill_rows,
                    rules=None):
        texts = []
        for problem in problems:
            seen_prompts.append(problem)
            a, b, so = problem.data["a"], problem.data["b"], "so" if problem_language(problem) == "en" else "donc"
            right = format_response(f" {a}+{b} \n\n{so} {a}+{b}={a + b}", str(a + b))
            good = (problem.data["a"] + problem.data["b"]) % 2 == 0
            texts += [f"<think>{a}", format_response(so, str(a + b + 1)),
                      format_response(f"write 1 ecris 2 {so}", str(a + b)), right if good else right[:-3]]
        width = 200
        tokens = np.full((len(texts), width), tokenizer.eos_id, np.int32)
        for row, text in enumerate(texts):
            ids = tokenizer.encode(text)
            tokens[row, :len(ids)] = ids
        lengths = np.asarray([len(tokenizer.encode(t)) for t in texts])
        return SampledProblems(tokens, lengths, np.zeros(len(texts), bool))

    monkeypatch.setattr(rejection, "stream_problems", fake_stream)
    data = ColdStartData(source="r1_zero", examples=12, max_tokens=200)
    records, rejected, stats = cold_start.r1_zero_records(None, TASK, tokenizer, data, "compact", seed=5,
                                                          excluded=set(), mesh=None)
    assert len(records) == 12 and stats["kept"] == 12 and stats["rounds"] >= 2  # about half the prompts give one
    by_prompt = {TASK.prompt(p, "compact"): p for p in seen_prompts}
    assert len({r["prompt"] for r in records}) == 12
    for record in records:
        problem = by_prompt[record["prompt"]]
        a, b = problem.data["a"], problem.data["b"]
        so = "so" if problem_language(problem) == "en" else "donc"
        assert record["source"] == "cold_start" and (a + b) % 2 == 0
        assert record["response"] == format_response(f"{a}+{b}\n{so} {a}+{b}={a + b}", str(a + b))
    assert stats["removed"]["template"] >= stats["prompts"] and stats["removed"]["verifier"] >= stats["prompts"]
    assert stats["removed"]["language"] >= stats["prompts"]
    assert stats["sampled"] == 4 * stats["prompts"] and len(rejected) == sum(stats["removed"].values())
    # each round's prompts are the next fresh ones of the stream
    assert seen_prompts == datasets.fresh_problems(TASK, 5, len(seen_prompts), set())


def _keys(cfg: PipelineConfig) -> dict[str, str]:
    keys: dict[str, str] = {}
    for step in R1Pipeline(cfg, "/unused").stages():
        keys[step.name] = step_key(step.config, [keys[name] for name in step.inputs])
    return keys


def test_the_r1_zero_source_is_keyed_on_the_r1_zero_stage():
    cfg = PipelineConfig()
    sourced = dataclasses.replace(cfg, cold_start_data=ColdStartData(source="r1_zero"))
    steps = {s.name: s for s in R1Pipeline(sourced, "/unused").stages()}
    assert list(steps)[:3] == ["base", "r1_zero", "cold_start"]  # R1-Zero runs before the cold start reads it
    assert steps["cold_start"].inputs == ("base", "r1_zero") and "r1_zero_long" in steps
    assert steps["r1_zero_long"].config["run"].steps == 80 + 40 + 40  # R1-Zero's, then both RL stages'
    assert "r1_zero_long" not in {s.name for s in R1Pipeline(cfg, "/unused").stages()}
    # R1-Zero's rewards change what the cold start is written from: its key and everything after it
    reweighed = dataclasses.replace(sourced, r1_zero_rewards="accuracy=1.0")
    before, after = _keys(sourced), _keys(reweighed)
    assert before["base"] == after["base"]
    assert all(before[s] != after[s] for s in ("r1_zero", "cold_start", "reasoning_rl", "final_rl"))
    # ... but not the synthetic cold start's
    assert _keys(cfg)["cold_start"] == _keys(dataclasses.replace(cfg, r1_zero_rewards="accuracy=1.0"))["cold_start"]


def test_cold_start_source_errors_name_the_field():
    with pytest.raises(InputError, match="ColdStartData.source: unknown 'human'"):
        ColdStartData(source="human")
    with pytest.raises(InputError, match="cold_start_data.source.*'commuted'.*countdown"):
        PipelineConfig(task="countdown", task_options="min_numbers=3,max_numbers=3",
                       cold_start_data=ColdStartData(source="commuted"))


def test_r1_zero_source_that_keeps_nothing_stops_after_a_round_with_a_fix(monkeypatch):
    tokenizer = load_tokenizer("char")
    calls = []

    def nothing_right(policy, task, problems, *, sampling, **_):
        calls.append(len(problems))
        texts = ["<think>no"] * (len(problems) * sampling.samples_per_prompt)
        ids = tokenizer.encode(texts[0])
        tokens = np.full((len(texts), 16), tokenizer.eos_id, np.int32)
        tokens[:, :len(ids)] = ids
        return SampledProblems(tokens, np.full(len(texts), len(ids)), np.zeros(len(texts), bool))

    monkeypatch.setattr(rejection, "stream_problems", nothing_right)
    with pytest.raises(InputError, match=r"none of 20 samples.*Fix: train R1-Zero"):
        cold_start.r1_zero_records(None, TASK, tokenizer, ColdStartData(source="r1_zero", examples=5), "compact",
                                   seed=0, excluded=set(), mesh=None)
    assert calls == [5]
