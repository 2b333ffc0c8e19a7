"""Load a Hugging Face model folder into a sharded `Transformer`, and save one back.

Loading never builds the model on the host: the model is created abstractly (`nnx.eval_shape`),
each parameter's sharding comes from its logical axes and the active mesh (`use_mesh`), and
`jax.make_array_from_callback` asks for each device's shard, which is read from the memory-mapped
safetensors and converted to the requested dtype right then. A model larger than one device (or
than host memory) therefore loads onto a mesh without a full host copy.

Saving gathers one parameter group at a time to the host of process 0 and streams the tensors
into safetensors shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding

from moe_jax.configs import ModelConfig
from moe_jax.errors import InputError
from moe_jax.interop import hf_names
from moe_jax.interop.hf_config import (
    HFFormat,
    architecture_differences,
    config_from_hf,
    config_to_hf,
    infer_family,
)
from moe_jax.interop.safetensors_io import PendingTensor, SafetensorsFolder, write_folder
from moe_jax.models import Transformer
from moe_jax.parallel.distributed import all_rows, is_lead
from moe_jax.parallel.rules import active_mesh_and_rules, state_shardings

CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Files besides the weights that make a folder usable by `transformers` and `load_tokenizer`.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def read_hf_config(folder: str) -> tuple[ModelConfig, HFFormat]:
    """`config_from_hf` of `folder/config.json`, with the MTP depth of the weights actually stored
    (transformers writes `num_nextn_predict_layers` but never MTP weights)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file. Fix: point at a Hugging Face model folder "
                                "(config.json beside the safetensors weights)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e}). Fix: download it again") from None
    if not isinstance(hf, dict):
        raise InputError(f"{path}: holds a JSON {type(hf).__name__}, not an object. Fix: download it again")
    try:
        cfg, fmt = config_from_hf(hf, name=os.path.basename(os.path.normpath(folder)) or "hf")
    except (TypeError, AttributeError) as e:  # a field of the wrong type deep in the mapping
        raise InputError(f"{path}: a field has the wrong type ({type(e).__name__}: {e}). Fix: compare it with "
                         "the model's original config.json") from None
    if cfg.mtp_depth:
        names = SafetensorsFolder(folder).names()
        stored = 0
        while stored < cfg.mtp_depth and f"model.layers.{cfg.n_layers + stored}.eh_proj.weight" in names:
            stored += 1
        cfg = dataclasses.replace(cfg, mtp_depth=stored)
    return cfg, fmt


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: parameters load as float32, bfloat16 or float16")
    return name


def _lazy_parameters(reader: SafetensorsFolder, cfg: ModelConfig, fmt: HFFormat, *,
                     skip_mtp_layers: bool = False) -> dict[str, hf_names.Lazy]:
    """Our flat parameter path -> lazy array, checking that the checkpoint has exactly the tensors
    (and shapes) the config implies; `skip_mtp_layers` skips MTP layers past `cfg.mtp_depth`."""
    names = reader.names()
    lazies: dict[str, hf_names.Lazy] = {}
    consumed: set[str] = set()
    for rule in hf_names.tensor_rules(cfg, fmt, names):
        consumed |= set(rule.hf)
        if rule.load is None:
            continue
        missing = [n for n in rule.hf if n not in names]
        if missing:
            raise ValueError(f"{reader.folder}: missing tensors {missing[:4]} (needed for "
                             f"{list(rule.ours)}). "
                             "Fix: the config.json and the weights disagree; use an intact checkpoint")
        for name, shape in rule.hf.items():
            if reader.infos[name].shape != shape:
                raise ValueError(f"{reader.folder}: tensor {name} has shape {reader.infos[name].shape}, "
                                 f"config.json implies {shape}")
        lazies.update(rule.load(reader.tensor))
    unexpected = sorted(n for n in names - consumed if not hf_names.is_ignorable(n))
    if skip_mtp_layers:
        unexpected = [n for n in unexpected if _layer_index(n) < cfg.n_layers + cfg.mtp_depth]
    if unexpected:
        raise ValueError(f"{reader.folder}: tensors moe_jax does not know how to use: {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}. Fix: check the config.json's model_type "
                         "and options; an unread weight would silently change the model")
    return lazies


def _layer_index(name: str) -> int:
    """`model.layers.{i}.…` -> i (-1 for anything else): layers past the loaded MTP depth are skipped."""
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return -1


class ArchitectureMismatchError(InputError):
    """A checkpoint's config.json describes another architecture than the model's."""


class NonFiniteWeightsError(InputError):
    """A checkpoint holds NaN or Inf weights."""


def _fill_state(state: nnx.State, lazies: dict[str, hf_names.Lazy],
                placement: Callable[[str, nnx.Variable], tuple[Sharding, np.dtype]], folder: str,
                allow_nonfinite: bool = False) -> nnx.State:
    """Every variable of `state` (abstract or concrete) with its value read shard by shard; a
    shard with NaN/Inf values is refused unless `allow_nonfinite`."""
    remaining = dict(lazies)

    def fill(path, variable: nnx.Variable) -> nnx.Variable:
        key = _path_key(path)
        if key not in remaining:
            raise ValueError(f"no Hugging Face tensor maps to parameter {key} (an interop bug)")
        lazy = remaining.pop(key)
        shape = tuple(variable.get_value().shape)
        if tuple(lazy.shape) != shape:
            raise ValueError(f"{key}: checkpoint gives shape {tuple(lazy.shape)}, the model wants {shape}")
        sharding, dtype = placement(key, variable)
        read: dict[tuple, np.ndarray] = {}  # replicas of one shard are read from disk once

        def shard(index, lazy=lazy, dtype=dtype):
            bounds = tuple((s.start, s.stop) for s in index)
            if bounds not in read:
                read[bounds] = hf_names.read_slice(lazy, index).astype(dtype)
                if not allow_nonfinite and not np.isfinite(read[bounds]).all():
                    raise NonFiniteWeightsError(
                        f"{folder}: the weights of {key} hold NaN or Inf values. Fix: use an intact checkpoint, or "
                        "load it anyway with allow_nonfinite=True (moe_jax.interop.load_hf / load_hf_into)")
            return read[bounds]

        array = jax.make_array_from_callback(shape, sharding, shard)
        read.clear()
        return variable.replace(array)

    filled = jax.tree.map_with_path(fill, state, is_leaf=_is_var)
    if remaining:
        raise ValueError(f"checkpoint tensors for parameters the model lacks: {sorted(remaining)[:6]}")
    return filled


def load_hf(folder: str, dtype: Any = None, *, compute_dtype: str | None = None,
            allow_nonfinite: bool = False) -> tuple[ModelConfig, Transformer]:
    """A Hugging Face model folder (config.json + safetensors) as `(ModelConfig, Transformer)`.

    Parameters are stored in `dtype` (default float32, the master-weight dtype training expects;
    "bfloat16" halves the memory of a model only used for inference); a bf16 checkpoint loads
    either way. Under `use_mesh(mesh)` every parameter is placed in its sharding on the mesh,
    shard by shard; otherwise on the default device."""
    cfg, fmt = read_hf_config(folder)
    cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(dtype or "float32"),
                              **({"compute_dtype": compute_dtype} if compute_dtype else {}))
    reader = SafetensorsFolder(folder)
    lazies = _lazy_parameters(reader, cfg, fmt)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    active = active_mesh_and_rules()
    if active is not None:
        mesh, rules = active
        shardings = state_shardings(abstract_state, mesh, rules)
        by_key: dict[str, NamedSharding] = {}
        jax.tree.map_with_path(lambda p, s: by_key.__setitem__(_path_key(p), s), shardings,
                               is_leaf=lambda x: isinstance(x, NamedSharding))
    device = SingleDeviceSharding(jax.devices()[0])

    def placement(key: str, variable: nnx.Variable) -> tuple[Sharding, np.dtype]:
        sharding = by_key[key] if active is not None else device
        return sharding, np.dtype(variable.get_value().dtype)

    state = _fill_state(abstract_state, lazies, placement, folder, allow_nonfinite)
    return cfg, nnx.merge(graphdef, state)


def load_hf_into(model: Transformer, folder: str, *, allow_nonfinite: bool = False) -> None:
    """Overwrite an existing (e.g. sharded, freshly initialised) model with a checkpoint's weights,
    keeping each parameter's sharding and dtype. The checkpoint's architecture must equal
    `model.cfg`'s (MTP modules the model lacks are skipped); a mismatch raises ValueError listing
    the fields."""
    hf_cfg, fmt = read_hf_config(folder)
    skip_mtp = hf_cfg.mtp_depth > model.cfg.mtp_depth  # a base model for fine-tuning needs no MTP
    if skip_mtp:
        hf_cfg = dataclasses.replace(hf_cfg, mtp_depth=model.cfg.mtp_depth)
    differences = architecture_differences(model.cfg, hf_cfg)
    if differences:
        raise ArchitectureMismatchError(f"{folder}: its config.json describes another architecture than the model's "
                         "(model vs checkpoint): " + "; ".join(differences))
    lazies = _lazy_parameters(SafetensorsFolder(folder), model.cfg, fmt, skip_mtp_layers=skip_mtp)

    def placement(key: str, variable: nnx.Variable) -> tuple[Sharding, np.dtype]:
        value = variable.get_value()
        return value.sharding, np.dtype(value.dtype)

    nnx.update(model, _fill_state(nnx.state(model), lazies, placement, folder, allow_nonfinite))


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(all_rows(array))


def save_hf(model: Transformer, cfg: ModelConfig | None, folder: str, *, family: str | None = None,
            dtype: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            companion_files_from: str | None = None) -> list[str]:
    """Write `model` as a Hugging Face folder: config.json (family inferred from the config unless
    given) and safetensors, sharded with an index above `max_shard_bytes`. Tensors are written in
    `dtype` (default: the parameters' own). `companion_files_from` copies the tokenizer and
    generation config of another folder (e.g. the one the model was loaded from). Returns the
    weight files written. Every process must call it (gathers); process 0 writes."""
    cfg = cfg or model.cfg
    family = family or infer_family(cfg)
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    hf_config = config_to_hf(cfg, family, dtype=out_dtype.name)
    fmt = HFFormat(family, rope_interleave=family in ("deepseek_v3", "deepseek_v2"),
                   declared_mtp_layers=cfg.mtp_depth)
    arrays: dict[str, jax.Array] = {}
    jax.tree.map_with_path(lambda p, v: arrays.__setitem__(_path_key(p), v.get_value()),
                           nnx.state(model), is_leaf=_is_var)
    rules = hf_names.tensor_rules(cfg, fmt)
    covered = {our for rule in rules for our in rule.ours}
    if covered != set(arrays):
        raise ValueError(f"parameters without a Hugging Face tensor: {sorted(set(arrays) - covered)[:6]}; "
                         f"expected but absent: {sorted(covered - set(arrays))[:6]}")

    pending, cache, left = [], {}, {}
    for index, rule in enumerate(rules):
        left[index] = len(rule.hf)
        if not rule.hf:  # nothing to write, but the rule may refuse (a nonzero router bias)
            rule.save({our: _to_host(arrays[our]) for our in rule.ours})
        for name, shape in rule.hf.items():
            def produce(index=index, rule=rule, name=name):
                if index not in cache:
                    cache[index] = rule.save({our: _to_host(arrays[our]) for our in rule.save_inputs})
                out = cache[index][name]
                left[index] -= 1
                if not left[index]:
                    del cache[index]
                return out
            pending.append(PendingTensor(name, shape, np.dtype(np.float32) if rule.keep_fp32 else out_dtype,
                                         produce))
    files: list[str] = []
    if is_lead():
        files = write_folder(folder, pending, max_shard_bytes)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if companion_files_from:
            for name in COMPANION_FILES:
                source = os.path.join(companion_files_from, name)
                if os.path.exists(source) and os.path.abspath(source) != os.path.abspath(
                        os.path.join(folder, name)):
                    shutil.copyfile(source, os.path.join(folder, name))
    else:  # the others still take part in the gathers
        for t in pending:
            t.produce()
    return files
