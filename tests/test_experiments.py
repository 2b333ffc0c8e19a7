import json
import os
import subprocess
import sys

import pytest
from absl import app, flags

from moe_jax import config_flags
from moe_jax.configs import get_preset
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
         "--config.model.n_kv_heads=2", "--config.steps=7", "--config.learning_rate=1e-4",
         "--noconfig.loss_on_prompt"]))
    model = cfg.model
    assert (model.top_k, model.moe_dispatch, model.capacity_factor, model.norm_topk_prob) == (
        3, "capacity", 2.0, False)
    assert model.n_kv_heads == 2 and model.n_routed_experts == get_preset("tiny-moe").n_routed_experts
    assert (cfg.steps, cfg.learning_rate, cfg.loss_on_prompt) == (7, 1e-4, False)


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
def test_bad_config_is_a_usage_error_naming_the_problem(argv, message):
    with pytest.raises(app.UsageError, match=message):
        config_flags.config_from_flags(_parse(argv))


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
