"""Sweep specs (points, names, zipped axes, variants, validation) and the paired difference, without
running anything."""

import json

import pytest

from moe_jax.errors import InputError
from moe_jax.stats import paired_difference, t_quantile
from moe_jax.sweep.spec import Axis, Sweep, load_sweep, parse_variant


def test_points_are_the_product_of_variants_axes_and_seeds_with_readable_names():
    sweep = Sweep("pretrain", base=("--config.steps=5",),
                  axes=(Axis.parse("model.top_k=1,2"), Axis.of({"model.n_experts": [8, 16], "loss.x": [1, 2]})),
                  variants={"a": ("--config.model.aux_loss_coef=0.01",), "b": ()}, seeds=(0, 3))
    points = sweep.points()
    assert len(points) == 2 * 2 * 2 * 2  # variants x top_k x the zipped pair x seeds
    first = points[0]
    assert first.name == "variant=a,model.top_k=1,model.n_experts=8,loss.x=1,seed=0"
    assert first.flags == ("--config.steps=5", "--config.model.aux_loss_coef=0.01", "--config.model.top_k=1",
                           "--config.model.n_experts=8", "--config.loss.x=1", "--config.seed=0")
    assert [p.values["loss.x"] for p in points if p.values["model.n_experts"] == "16"] == ["2"] * 8  # zipped
    assert points[1].configuration == first.configuration and points[1].values["seed"] == "3"
    assert len({p.name for p in points}) == len(points)


def test_a_field_the_experiment_lacks_fails_naming_the_valid_ones():
    with pytest.raises(InputError, match=r"no field\(s\) \['model.topk'\]. Valid fields: model.name, .*model.top_k"):
        Sweep("pretrain", axes=(Axis.parse("model.topk=1,2"),)).validate()
    with pytest.raises(InputError, match=r"no field\(s\) \['stepz'\]. Valid fields: steps, batch_size"):
        Sweep("pretrain", base=("--config.stepz=3",)).validate()
    with pytest.raises(InputError, match="no field"):  # a GRPO field on a pretraining sweep
        Sweep("pretrain", variants={"v": ("--config.loss.beta=0.1",)}).validate()
    Sweep("grpo", axes=(Axis.parse("loss.loss_type=grpo,dr_grpo"),)).validate()
    Sweep("r1_pipeline", axes=(Axis.parse("cold_start.steps=10,20"),)).validate()
    Sweep("distill", axes=(Axis.parse("kd.mode=sequence,logit"),)).validate()
    with pytest.raises(InputError, match=r"r1_pipeline.py has no flag\(s\) \['scael'\]; its flags .*, scale"):
        Sweep("r1_pipeline", base=("--scael=0.05",)).validate()  # asks the script (--helpxml)
    Sweep("r1_pipeline", base=("--scale=0.05", "--recipe=countdown", "--noconfig.base.corpus.loss_on_prompt")).validate()
    with pytest.raises(InputError, match="each point's own"):
        Sweep("pretrain", base=("--workdir=/tmp/x",)).validate()
    with pytest.raises(InputError, match="more than one axis"):
        Sweep("pretrain", axes=(Axis.parse("steps=1,2"), Axis.parse("steps=3"))).validate()
    with pytest.raises(InputError, match="neither a variant"):
        Sweep("pretrain", axes=(Axis.parse("steps=1,2"),), baseline="steps=3").validate()
    with pytest.raises(ValueError, match="unknown experiment"):
        Sweep("pretrian").validate()


def test_baselines_variants_and_sweep_files(tmp_path):
    sweep = Sweep("pretrain", axes=(Axis.parse("model.top_k=1,2"),), baseline="model.top_k=2")
    assert sweep.baseline_values() == {"model.top_k": "2"}
    assert parse_variant("aux:--config.a=1 --config.b=2") == ("aux", ("--config.a=1", "--config.b=2"))
    assert parse_variant("base:") == ("base", ())
    with pytest.raises(InputError, match="name:--config"):
        parse_variant("--config.a=1")
    (tmp_path / "s.json").write_text(json.dumps(sweep.to_json()))
    assert load_sweep(str(tmp_path / "s.json")) == sweep
    (tmp_path / "s.py").write_text("from moe_jax.sweep.spec import Axis, Sweep\n"
                                   "def sweep():\n    return Sweep('grpo', axes=(Axis.of({'loss.beta': [0.0, 0.1]}),))\n")
    assert [p.name for p in load_sweep(str(tmp_path / "s.py")).points()] == ["loss.beta=0.0,seed=0", "loss.beta=0.1,seed=0"]
    (tmp_path / "bad.json").write_text(json.dumps({"experiment": "sft", "axis": []}))
    with pytest.raises(InputError, match=r"unknown key\(s\) \['axis'\]"):
        load_sweep(str(tmp_path / "bad.json"))


def test_paired_difference_is_the_paired_t_test():
    difference, p = paired_difference([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])  # differences 0.5, 1, 1.5
    half = t_quantile(0.975, 2) * 0.5 / 3 ** 0.5
    assert (difference.mean, difference.std, difference.n) == (1.0, 0.5, 3)
    assert difference.low == pytest.approx(1 - half, abs=1e-12) and difference.high == pytest.approx(1 + half, abs=1e-12)
    t = 1.0 / (0.5 / 3 ** 0.5)
    assert p == pytest.approx(1 - t / (2 + t * t) ** 0.5, abs=1e-12)  # two-sided p of T with 2 degrees of freedom
    assert paired_difference([1.0], [0.0])[1] != paired_difference([1.0], [0.0])[1]  # NaN: one pair


def test_shared_runs_claims_and_metrics_in_a_sweep_file(tmp_path):
    from moe_jax.pipeline.executor import step_key
    from moe_jax.sweep.claims import Claim
    from moe_jax.sweep.run import commands, point_steps, shared_steps

    sweep = Sweep("grpo", base=("--init_from={shared:base}/base",), axes=(Axis.parse("loss.beta=0,0.1"),),
                  seeds=(0, 4), shared={"base": ("r1_zero", ("--base_only", "--config.steps=3"))},
                  claims=(Claim("beta helps", "eval/accuracy/final", "loss.beta=0.1", "loss.beta=0"),),
                  metrics=("reward",))
    sweep.validate()
    assert [p.flags[0] for p in sweep.points()] == ["--init_from={sweep}/shared/base,seed=0/base",
                                                    "--init_from={sweep}/shared/base,seed=4/base"] * 2
    assert [p.name for _, p in sweep.shared_points()] == ["base,seed=0", "base,seed=4"]
    (tmp_path / "s.json").write_text(json.dumps(sweep.to_json()))
    assert load_sweep(str(tmp_path / "s.json")) == sweep
    printed = commands(sweep, str(tmp_path / "w"))
    assert f"--workdir={tmp_path}/w/shared/base,seed=0" in printed[0] and "--config.seed=0" in printed[0]
    assert f"--init_from={tmp_path}/w/shared/base,seed=4/base" in printed[3]  # {sweep} filled in when run
    # a point reads its seed's shared run: the run's key is in the point's, so changing it redoes the points
    keys = [step_key(s.config, []) for s in point_steps(sweep)]
    assert point_steps(sweep)[0].config.reads == (step_key(shared_steps(sweep)[0].config, []),)
    changed = Sweep("grpo", sweep.base, sweep.axes, seeds=sweep.seeds, shared={"base": ("r1_zero", ("--base_only",))})
    assert all(a != b for a, b in zip(keys, [step_key(s.config, []) for s in point_steps(changed)]))
    with pytest.raises(InputError, match=r"name shared run\(s\) \['basis'\]; the shared runs are \['base'\]"):
        Sweep("grpo", base=("--init_from={shared:basis}",), shared=sweep.shared).validate()
    with pytest.raises(InputError, match=r"r1_zero.py has no flag\(s\) \['base_onyl'\]"):
        Sweep("grpo", shared={"base": ("r1_zero", ("--base_onyl",))}).validate()
