import json
import os
import subprocess
import sys

import pytest
from absl import app, flags

from moe_jax import config_flags
from moe_jax.configs import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv: list[str]) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values=flag_values)
    flag_values(["prog", *argv])
    return flag_values


def test_config_overrides_apply_typed_values():
    cfg = config_flags.config_from_flags(_parse(
        ["--config=tiny-moe", "--config.top_k=3", "--config.moe_dispatch=capacity",
         "--config.capacity_factor=2.0", "--config.norm_topk_prob=false", "--config.n_kv_heads=2"]))
    assert (cfg.top_k, cfg.moe_dispatch, cfg.capacity_factor, cfg.norm_topk_prob) == (
        3, "capacity", 2.0, False)
    assert cfg.n_kv_heads == 2 and cfg.n_routed_experts == get_preset("tiny-moe").n_routed_experts


def test_config_from_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"name": "mine", "d_model": 32, "n_heads": 2}}))
    cfg = config_flags.config_from_flags(_parse([f"--config={path}", "--config.n_layers=1"]))
    assert (cfg.name, cfg.d_model, cfg.n_layers) == ("mine", 32, 1)


@pytest.mark.parametrize("argv, message", [
    (["--config.top_k=99"], "ModelConfig.top_k"),
    (["--config=nope"], "known presets"),
])
def test_bad_config_is_a_usage_error_naming_the_problem(argv, message):
    with pytest.raises(app.UsageError, match=message):
        config_flags.config_from_flags(_parse(argv))


def test_demo_runs_and_reports_json():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "experiments/demo.py", "--seq_len=16", "--batch=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "params/total" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["logits_shape"] == [2, 16, 256]
    assert len(report["max_vio_per_moe_layer"]) == 3  # 2 MoE layers + the MTP block
