"""Checkpoint mechanics without a reference library: sharded safetensors, bf16, fused expert
layouts, lazy slicing, refusal of unknown tensors, and loading onto an 8-device mesh shard by
shard (bit-identical to the single-device load)."""

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from interop_helpers import assert_bit_identical, flat_params, random_model
from jax.sharding import PartitionSpec

from moe_jax.configs import get_preset
from moe_jax.interop import load_hf, save_hf
from moe_jax.interop.hf_names import PermuteLast, Stack, read_slice, rope_permutation
from moe_jax.interop.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    PendingTensor,
    SafetensorsFolder,
    write_folder,
)
from moe_jax.models import Transformer
from moe_jax.parallel import make_mesh, state_shardings, use_mesh

TINY_MOE = dataclasses.replace(get_preset("tiny-moe"), n_layers=2)  # MLA, groups, shared expert, MTP
TINY_QWEN3_MOE = dataclasses.replace(get_preset("qwen3-30b-a3b"), vocab_size=64, d_model=32, n_layers=2, d_ff=48,
                                     n_heads=4, n_kv_heads=2, head_dim=8, n_routed_experts=4, moe_d_ff=16,
                                     top_k=2, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny_moe_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_moe"))
    model = random_model(TINY_MOE, seed=0)
    save_hf(model, TINY_MOE, folder)
    return folder, model


def test_safetensors_write_read_sharded(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
              "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
              "c": np.arange(6, dtype=np.int64).reshape(2, 3), "d": np.zeros((0, 4), np.float16)}
    pending = [PendingTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    files = write_folder(str(tmp_path), pending, max_shard_bytes=40)
    assert len(files) > 1 and os.path.exists(tmp_path / INDEX_FILE)
    reader = SafetensorsFolder(str(tmp_path))
    for name, value in arrays.items():
        got = reader.tensor(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got), value)
    write_folder(str(tmp_path), pending, max_shard_bytes=1 << 20)  # rewriting as one file drops the index
    assert os.path.exists(tmp_path / SINGLE_FILE) and not os.path.exists(tmp_path / INDEX_FILE)


def test_lazy_views_read_the_same_slices_as_the_full_arrays():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((4, 6)) for _ in range(5)]
    stack = Stack(parts)
    full = np.stack(parts)
    index = (slice(1, 4), slice(0, 2), slice(3, 6))
    np.testing.assert_array_equal(read_slice(stack, index), full[index])
    perm = np.concatenate([np.arange(2), 2 + rope_permutation(4)])
    permuted = PermuteLast(full[0], perm)
    np.testing.assert_array_equal(read_slice(permuted, (slice(1, 3), slice(2, 6))), full[0][:, perm][1:3, 2:6])
    np.testing.assert_array_equal(rope_permutation(6), [0, 2, 4, 1, 3, 5])


def test_sharded_save_and_load_round_trip(tiny_moe_folder, tmp_path):
    _, model = tiny_moe_folder
    files = save_hf(model, TINY_MOE, str(tmp_path), max_shard_bytes=64 * 1024)
    assert len(files) > 2
    with open(tmp_path / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(files)
    cfg, again = load_hf(str(tmp_path))
    assert cfg.mtp_depth == 1
    assert_bit_identical(model, again)


def test_bf16_load_and_save(tiny_moe_folder, tmp_path):
    _, model = tiny_moe_folder
    save_hf(model, TINY_MOE, str(tmp_path), dtype="bfloat16")
    reader = SafetensorsFolder(str(tmp_path))
    assert reader.infos["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    assert reader.infos["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32  # kept fp32
    _, as_f32 = load_hf(str(tmp_path))  # default: fp32 master weights, upcast exactly
    cfg, as_bf16 = load_hf(str(tmp_path), dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    ours, f32, bf16 = flat_params(model), flat_params(as_f32), flat_params(as_bf16)
    for key, value in ours.items():
        expected = value if key.endswith("router_bias") else value.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(bf16[key], expected, err_msg=key)
        np.testing.assert_array_equal(f32[key], expected.astype(np.float32), err_msg=key)
    save_hf(as_bf16, cfg, str(tmp_path / "again"))  # bf16 -> bf16 is bit-identical
    again = SafetensorsFolder(str(tmp_path / "again"))
    for name in reader.names():
        assert again.infos[name].dtype == reader.infos[name].dtype
        np.testing.assert_array_equal(np.asarray(again.tensor(name)), np.asarray(reader.tensor(name)))


def test_fused_expert_layout_loads_like_per_expert(tmp_path):
    """transformers' in-memory `experts.gate_up_proj` / `experts.down_proj` layout, if a checkpoint
    stores it, loads to the same model as the per-expert tensors of released checkpoints."""
    model = random_model(TINY_QWEN3_MOE, seed=3)
    per_expert = str(tmp_path / "per_expert")
    save_hf(model, TINY_QWEN3_MOE, per_expert)
    reader = SafetensorsFolder(per_expert)
    tensors = {name: np.asarray(reader.tensor(name)) for name in reader.names()}
    e = TINY_QWEN3_MOE.n_routed_experts
    for layer in range(TINY_QWEN3_MOE.n_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate, up, down = ([tensors.pop(f"{p}.{i}.{w}_proj.weight") for i in range(e)] for w in ("gate", "up", "down"))
        tensors[f"{p}.gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)
        tensors[f"{p}.down_proj"] = np.stack(down)
    fused = tmp_path / "fused"
    write_folder(str(fused), [PendingTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                 1 << 30)
    os.link(os.path.join(per_expert, "config.json"), fused / "config.json")
    _, loaded = load_hf(str(fused))
    assert_bit_identical(model, loaded)


def test_unknown_and_missing_tensors_are_refused(tiny_moe_folder, tmp_path):
    folder, _ = tiny_moe_folder
    reader = SafetensorsFolder(folder)
    tensors = {name: np.asarray(reader.tensor(name)) for name in reader.names()}

    def write(arrays, where):
        os.makedirs(where, exist_ok=True)
        write_folder(where, [PendingTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()],
                     1 << 30)
        with open(os.path.join(folder, "config.json")) as src, open(os.path.join(where, "config.json"), "w") as dst:
            dst.write(src.read())

    extra = str(tmp_path / "extra")
    write({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(3, np.float32)}, extra)
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf(extra)
    missing = str(tmp_path / "missing")
    write({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}, missing)
    with pytest.raises(ValueError, match="experts.3.up_proj"):
        load_hf(missing)


def test_load_onto_an_8_device_mesh_equals_the_single_device_load(tiny_moe_folder):
    folder, model = tiny_moe_folder
    assert jax.device_count() == 8
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    with use_mesh(mesh):
        _, sharded = load_hf(folder)
    _, single = load_hf(folder)
    assert_bit_identical(single, sharded)
    assert_bit_identical(model, single)
    experts = sharded.blocks[1].ffn.w_gate[...]
    assert experts.sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
    assert len({s.device for s in experts.addressable_shards}) == 8
    assert experts.addressable_shards[0].data.shape == (4, 32, 16)  # each device holds a slice only


def _zeros_sharded(cfg, mesh) -> Transformer:
    """A model of `cfg` already laid out on `mesh` (zeros: no init compile), as a run has it."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh)
    state = jax.tree.map(lambda v, s: v.replace(jax.device_put(np.zeros(v.shape, v.get_value().dtype), s)),
                         abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def test_init_from_hf_loads_into_the_runs_sharded_model(tiny_moe_folder):
    """`--init_from=hf:<folder>`: the run's freshly initialised sharded model takes the checkpoint's
    weights in place (MTP modules the run does not use are skipped); a run whose config.model is
    another architecture is refused, naming the fields."""
    from moe_jax.train.context import load_init_from

    folder, model = tiny_moe_folder
    cfg = dataclasses.replace(TINY_MOE, mtp_depth=0, router_bias_rate=1e-3)  # training knobs may differ
    mesh = make_mesh("data=2,expert=2,tensor=2")
    target = _zeros_sharded(cfg, mesh)
    load_init_from(target, f"hf:{folder}")
    ours, theirs = flat_params(target), flat_params(model)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert target.blocks[1].ffn.w_up[...].sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
    wrong = nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, top_k=3, d_ff=96), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"--init_from=hf:.*d_ff: 96 != 128; top_k: 3 != 2.*Fix"):
        load_init_from(wrong, f"hf:{folder}")


def test_sft_cli_starts_from_a_hugging_face_folder_and_exports_back(tmp_path):
    """README's `--init_from=hf:<folder>` path end to end, then `export_hf.py` back to a Hugging
    Face folder, on a Qwen2.5-shaped model small enough for CPU (the 0.5B preset, sizes overridden)."""
    import subprocess
    import sys

    sizes = {"vocab_size": 256, "d_model": 64, "n_layers": 2, "d_ff": 128, "n_heads": 4, "n_kv_heads": 2,
             "max_seq_len": 256}
    cfg = dataclasses.replace(get_preset("qwen2.5-0.5b"), **sizes)
    save_hf(random_model(cfg, seed=5), cfg, str(tmp_path / "qwen"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "experiments/sft.py", "--config=qwen2.5-0.5b", f"--workdir={tmp_path / 'run'}",
            f"--init_from=hf:{tmp_path / 'qwen'}", "--config.steps=2", "--config.batch_size=8",
            "--config.loop.eval_every=2", "--config.loop.checkpoint_every=2", "--config.loop.eval_problems=2",
            *(f"--config.model.{k}={v}" for k, v in sizes.items())]
    out = subprocess.run(argv, check=False, cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialised the model from the Hugging Face folder" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["status"] == "finished"
    export = subprocess.run([sys.executable, "experiments/export_hf.py", f"--run={tmp_path / 'run'}",
                             f"--out={tmp_path / 'exported'}", "--dtype=bfloat16"],
                            check=False, cwd=repo, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    exported_cfg, _ = load_hf(str(tmp_path / "exported"))
    assert exported_cfg.d_model == 64 and exported_cfg.qkv_bias and exported_cfg.tie_embeddings
