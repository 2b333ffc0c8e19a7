import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from moe_jax import config_flags
from moe_jax.configs import ModelConfig, get_preset
from moe_jax.errors import InputError
from moe_jax.train import config_tree
from moe_jax.train.experiment_config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv: list[str]) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=flag_values)
    flag_values(["prog", *argv])
    return flag_values


def test_config_overrides_apply_typed_values():
    cfg = config_flags.config_from_flags(_parse(
        ["--config=tiny-moe", "--config.model.top_k=3", "--config.model.moe_dispatch=capacity",
         "--config.model.capacity_factor=2.0", "--config.model.norm_topk_prob=false",
         "--config.model.n_kv_heads=2", "--config.steps=7", "--config.optimizer.learning_rate=1e-4",
         "--noconfig.corpus.loss_on_prompt"]))
    model = cfg.model
    assert (model.top_k, model.moe_dispatch, model.capacity_factor, model.norm_topk_prob) == (
        3, "capacity", 2.0, False)
    assert model.n_kv_heads == 2 and model.n_routed_experts == get_preset("tiny-moe").n_routed_experts
    assert (cfg.steps, cfg.optimizer.learning_rate, cfg.corpus.loss_on_prompt) == (7, 1e-4, False)


def test_script_defaults_then_preset_or_file_then_flags(tmp_path):
    cfg = config_flags.config_from_flags(_parse(["--config=tiny-dense"]), defaults={"steps": 5})
    assert (cfg.model, cfg.steps, cfg.seq_len) == (get_preset("tiny-dense"), 5, ExperimentConfig().seq_len)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"name": "mine", "d_model": 32, "n_heads": 2}, "steps": 9,
                                "batch_size": 4}))
    cfg = config_flags.config_from_flags(_parse([f"--config={path}", "--config.model.n_layers=1",
                                                 "--config.batch_size=2"]), defaults={"steps": 5})
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layers, cfg.steps, cfg.batch_size) == (
        "mine", 32, 1, 9, 2)
    path.write_text(json.dumps({"name": "bare", "d_model": 32, "n_heads": 2}))  # ModelConfig fields only
    assert config_flags.config_from_flags(_parse([f"--config={path}"])).model.name == "bare"


def test_script_model_defaults_sit_under_the_file_and_the_flags(tmp_path):
    """A script's model defaults (r1_zero's countdown recipe needs longer sequences) apply to a
    preset, lose to a config file's model fields and to `--config.model.*` flags."""
    model_defaults = {"max_seq_len": 192, "n_layers": 5}
    cfg = config_flags.config_from_flags(_parse(["--config=tiny-moe", "--config.model.n_layers=1"]),
                                         defaults={"seq_len": 176}, model_defaults=model_defaults)
    assert (cfg.model.max_seq_len, cfg.model.n_layers, cfg.seq_len) == (192, 1, 176)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"name": "mine", "max_seq_len": 256, "d_model": 32, "n_heads": 2}}))
    cfg = config_flags.config_from_flags(_parse([f"--config={path}"]), model_defaults=model_defaults)
    assert (cfg.model.max_seq_len, cfg.model.n_layers) == (256, 5)


def test_a_workdir_config_json_round_trips():
    cfg = ExperimentConfig(model=get_preset("tiny-moe"), steps=3, task="countdown",
                           task_options="max_numbers=3")
    assert ExperimentConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("argv, message", [
    (["--config.model.top_k=99"], "ModelConfig.top_k"),
    (["--config=nope"], "known presets"),
    (["--config.seq_len=1024"], "ExperimentConfig.seq_len: 1024 > model.max_seq_len"),
    (["--config.microbatches=3"], "ExperimentConfig.microbatches"),
    (["--config.task=sudoku"], "ExperimentConfig.task"),
    (["--config.task_options=digits=3"], "ExperimentConfig.task_options"),
    (["--config.sharding_rules=embed=pipeline"], "ExperimentConfig.sharding_rules: bad rule 'embed=pipel"),
    (["--config.sharding_rules=pipeline=data"], r"sharding_rules: unknown logical axes \['pipeline'\]"),
])
def test_bad_config_is_one_fatal_line_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        config_flags.config_from_flags(_parse(argv))
    err = capsys.readouterr().err
    assert err.startswith("FATAL bad --config: ") and err.count("\n") == 1 and re.search(message, err)


@pytest.mark.parametrize("flag, listed", [("--config.stepz=3", "steps, batch_size"),
                                          ("--config.model.n_layer=3", "model.n_layers")])
def test_unknown_config_field_fails_listing_the_valid_ones(flag, listed, capsys):
    with pytest.raises(SystemExit):
        config_flags.parse_flags(["prog", flag], _parse([]))
    err = capsys.readouterr().err
    assert flag.split("=")[0].lstrip("-") in err and listed in err


def test_demo_runs_and_reports_json():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "experiments/demo.py", "--config.seq_len=16",
                          "--config.batch_size=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "params/total" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["logits_shape"] == [2, 16, 256]
    assert len(report["max_vio_per_moe_layer"]) == 3  # 2 MoE layers + the MTP block


@dataclasses.dataclass(frozen=True)
class _Teacher:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class _WithTeacher(ExperimentConfig):
    """A config three levels deep, the shape the distillation runs will have."""

    teacher: _Teacher = dataclasses.field(default_factory=_Teacher)


def test_flags_reach_nested_parts_three_levels_deep():
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=flag_values, config_class=_WithTeacher)
    flag_values(["prog", "--config.teacher.model.n_layers=4", "--config.teacher.temperature=2.0",
                 "--config.optimizer.clip_norm=0.5"])
    cfg = config_flags.config_from_flags(flag_values, config_class=_WithTeacher)
    assert (cfg.teacher.model.n_layers, cfg.teacher.temperature, cfg.optimizer.clip_norm) == (4, 2.0, 0.5)
    assert cfg.teacher.model.d_model == ModelConfig().d_model and cfg.model == get_preset("tiny-moe")
    assert _WithTeacher.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(InputError, match=r"^teacher.model.n_layers \(ModelConfig.n_layers\): must be"):
        config_tree.override(cfg, {"teacher.model.n_layers": 0})


@pytest.mark.parametrize("flag, says", [
    ("--config.learning_rate=1e-3", "config.learning_rate: moved, now --config.optimizer.learning_rate"),
    ("--config.eval_every=5", "config.eval_every: moved, now --config.loop.eval_every"),
    ("--config.log_every=5", "config.log_every: removed, it was read by nothing"),
])
def test_a_flag_whose_field_moved_names_its_new_path(flag, says, capsys):
    with pytest.raises(SystemExit):
        config_flags.parse_flags(["prog", flag], _parse([]))
    assert says in capsys.readouterr().err


def test_an_old_flat_grpo_config_json_loads_into_the_parts():
    from moe_jax.rl.config import GRPOConfig

    old = {"model": dataclasses.asdict(get_preset("tiny-moe")), "steps": 40, "learning_rate": 2e-4,
           "group_size": 4, "temperature": 0.7, "loss_type": "dr_grpo", "eval_every": 10, "error_rate": 0.7,
           "accuracy_weight": 1.0, "format_weight": 0.5, "log_every": 5, "eval_batches": 0}
    cfg = GRPOConfig.from_dict(old)
    assert (cfg.optimizer.learning_rate, cfg.sampling.samples_per_prompt, cfg.sampling.temperature,
            cfg.loss.loss_type, cfg.loop.eval_every, cfg.rewards) == (2e-4, 4, 0.7, "dr_grpo", 10,
                                                                       "accuracy=1.0,format=0.5")
