"""Aggregation of runs no sweep launched: R1 pipeline folders of different seeds, grouped by their
configs, summarized by a hand computation (what experiments/r1_seeds.py did before sweeps)."""

import csv
import json
import math

import pytest

from moe_jax.pipeline import report
from moe_jax.stats import t_quantile
from moe_jax.sweep.aggregate import aggregate, lower_is_better


def _pipeline_folder(folder, seed, accuracy, tokens):
    folder.mkdir()
    (folder / "pipeline.json").write_text(json.dumps({"seed": seed, "task": "arithmetic", "cold_start": {"steps": 5}}))
    report.write_results(str(folder), {"final_rl": {"acc": accuracy, "tokens": tokens}, "r1_zero": {"acc": 0.1}},
                         ["stage", "acc", "tokens"], "t")
    for stage in ("reasoning_rl", "r1_zero"):
        (folder / stage).mkdir()
        lines = [{"step": s, "eval/accuracy": accuracy * s / 10} for s in (0, 5, 10)]
        (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "DONE").write_text(json.dumps({"step": 0, "metrics": {}}))
    return str(folder)


def test_pipeline_folders_of_three_seeds_are_one_configuration_summarized(tmp_path):
    runs = [_pipeline_folder(tmp_path / f"s{seed}", seed, accuracy, 2000.0 + seed)
            for seed, accuracy in enumerate((0.5, 0.7, 0.9))]
    table = aggregate(str(tmp_path / "summary"), runs)
    assert table.axes == [] and [r["seed"] for r in table.rows] == ["0", "1", "2"]
    assert table.curves[runs[1]]["reasoning_rl/eval/accuracy"] == {0: 0.0, 5: 0.35, 10: 0.7}
    with open(tmp_path / "summary" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["final_rl/acc"]) for r in rows] == [0.5, 0.7, 0.9]
    text = (tmp_path / "summary" / "results.md").read_text()
    half = t_quantile(0.975, 2) * 0.2 / math.sqrt(3)  # std 0.2 over 3 seeds
    assert f"| (all) | 0.7000 ± 0.2000 | [{0.7 - half:.4f}, {0.7 + half:.4f}] | 3 |" in text
    assert "## final_rl/tokens (lower is better)" in text and "| (all) | 2001.0 ± 1.0 |" in text
    assert (tmp_path / "summary" / "curves.png").stat().st_size > 1000


def test_runs_that_differ_in_a_field_are_grouped_by_it(tmp_path):
    runs = [_pipeline_folder(tmp_path / f"r{i}", seed, 0.5, 1.0) for i, seed in enumerate((0, 1, 0))]
    config = json.loads((tmp_path / "r2" / "pipeline.json").read_text())
    (tmp_path / "r2" / "pipeline.json").write_text(json.dumps({**config, "cold_start": {"steps": 9}}))
    table = aggregate(str(tmp_path / "summary"), runs)
    assert table.axes == ["cold_start.steps"]
    assert [len(rows) for rows in table.configurations().values()] == [2, 1]
    (tmp_path / "summary" / "not_a_run").mkdir()
    assert aggregate(str(tmp_path)).rows == table.rows  # the run folders inside a folder
    with pytest.raises(FileNotFoundError, match="no sweep.json and no run folders"):
        aggregate(str(tmp_path / "summary"))


def test_which_way_is_better():
    assert lower_is_better("eval/ce/final") and lower_is_better("maxvio_mean/final")
    assert lower_is_better("final_rl/language_mixed") and lower_is_better("wall_s") and lower_is_better("tokens")
    assert not lower_is_better("eval/accuracy/final") and not lower_is_better("final_rl/pass@4")


def test_claims_are_judged_by_the_interval_of_the_paired_difference():
    """Hand-made rows: a claim that holds, one whose opposite holds, one inside the noise, one
    comparing two columns of a configuration, each judged once per value of the other axis."""
    from moe_jax.stats import paired_difference
    from moe_jax.sweep.aggregate import Table, markdown
    from moe_jax.sweep.claims import Claim

    values = {("bias", "8"): [0.10, 0.12, 0.11], ("aux", "8"): [0.70, 0.75, 0.72],
              ("bias", "32"): [0.50, 0.30, 0.70], ("aux", "32"): [0.45, 0.55, 0.40]}
    rows = [{"variant": v, "experts": e, "seed": str(s), "status": "done", "maxvio": m, "ce": 1.0 + s, "r1": 0.5,
             "zero": 0.6 + 0.01 * s}
            for (v, e), ms in values.items() for s, m in enumerate(ms)]
    claims = (Claim("bias balances better", "maxvio", "bias", "aux", expect="lower"),
              Claim("aux balances better", "maxvio", "variant=aux,experts=8", "variant=bias,experts=8",
                    expect="lower"),
              Claim("R1 beats R1-Zero", "r1", "bias", b_metric="zero", expect="higher"))
    text = markdown(Table(["variant", "experts"], rows, [], {}, claims=claims), "t")
    section = text.split("## The claims")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "claim" not in line]
    assert len(lines) == 2 + 1 + 2  # the first and last claims once per experts value
    difference, p = paired_difference(values[("bias", "8")], values[("aux", "8")])
    assert lines[0].startswith("| bias balances better (expected lower) | variant=bias, experts=8: maxvio | "
                               "variant=aux, experts=8: maxvio |")
    assert f"| [{difference.low:.4f}, {difference.high:.4f}] | {p:.4f} | **reproduced** |" in lines[0]
    assert lines[1].endswith("**inside the noise (the interval of the difference holds 0)** |")  # 32 experts
    assert lines[2].endswith("**did not reproduce: the opposite holds** |")
    assert "variant=bias, experts=8: r1 | variant=bias, experts=8: zero" in lines[3]
    assert lines[3].endswith("**did not reproduce: the opposite holds** |")
