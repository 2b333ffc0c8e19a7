"""Write a run's model as a Hugging Face folder (config.json + safetensors) that `transformers`
opens, e.g. after SFT or GRPO that started from `--init_from=hf:<folder>`:

    python experiments/export_hf.py --run=/tmp/sft_qwen --out=/tmp/sft_qwen_hf \
        --companion_files_from=$HOME/models/Qwen2.5-0.5B-Instruct

The architecture comes from the run's config.json; the family (qwen2, deepseek_v3, ...) is
inferred from it unless `--family` is given, and a model the family cannot express is refused.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.interop import FAMILIES, save_hf
from moe_jax.models import Transformer
from moe_jax.parallel import init_sharded, make_mesh, parse_rules
from moe_jax.train import workdir as workdir_format
from moe_jax.train.context import load_init_from

flags.DEFINE_string("run", None, "the run's workdir (holds config.json and checkpoints/)", required=True)
flags.DEFINE_integer("step", None, "checkpoint step to export (default: the latest)")
flags.DEFINE_string("out", None, "output folder", required=True)
flags.DEFINE_enum("family", None, list(FAMILIES), "Hugging Face family (default: inferred)")
flags.DEFINE_string("dtype", None, "tensor dtype on disk, e.g. bfloat16 (default: the parameters')")
flags.DEFINE_string("companion_files_from", None, "copy tokenizer / generation config files from here")
flags.DEFINE_string("mesh", "auto", "device mesh to restore onto, e.g. 'fsdp=8'")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    saved = workdir_format.read_config(FLAGS.run)
    if saved is None:
        raise app.UsageError(f"--run={FLAGS.run}: no {workdir_format.CONFIG_FILE} there. Fix: give the "
                             "workdir of a moe_jax run")
    cfg = ModelConfig(**saved["model"])
    rules = parse_rules(saved.get("sharding_rules", ""))  # the run's layout, if it changed one
    model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), make_mesh(FLAGS.mesh), rules)
    checkpoint = FLAGS.run if FLAGS.step is None else os.path.join(workdir_format.checkpoint_dir(FLAGS.run), str(FLAGS.step))
    load_init_from(model, checkpoint)
    files = save_hf(model, cfg, FLAGS.out, family=FLAGS.family, dtype=FLAGS.dtype,
                    companion_files_from=FLAGS.companion_files_from)
    print(json.dumps({"out": FLAGS.out, "files": files}))


if __name__ == "__main__":
    app.run(main)
