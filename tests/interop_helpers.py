"""Torch-free helpers of the interop tests: random moe_jax models drawn on the host, and
bit-for-bit parameter comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.models import Transformer


def flat_params(model: Transformer) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model))
    return {"/".join(map(str, path)): np.asarray(jax.device_get(v.get_value())) for path, v in flat}


def assert_bit_identical(a: Transformer, b: Transformer) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert pa[key].dtype == pb[key].dtype and pa[key].shape == pb[key].shape, key
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def perturbed(model: Transformer, seed: int) -> Transformer:
    """`model` with every parameter (norm scales included) moved by noise, so a weight the export
    mis-maps cannot hide behind its initial value of 0 or 1. Router selection biases get noise
    only where the family stores them (DeepSeek-V3, i.e. sigmoid routing). Host-side numpy: eager
    JAX ops per parameter would dominate the test time."""
    rng = np.random.default_rng(seed)
    noisy_bias = model.cfg.is_moe and model.cfg.score_func == "sigmoid"

    def noise(variable):
        x = np.asarray(jax.device_get(variable.get_value()))
        if isinstance(variable, nnx.Param) or noisy_bias:
            x = x + (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
        return variable.replace(jnp.asarray(x))

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(noise, state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def random_model(cfg, seed: int, base: Transformer | None = None) -> Transformer:
    """A model of `cfg` drawn on the host (no compile): `base`'s parameters where it has them,
    noise of the right scale elsewhere (norm scales around 1, embeddings unit normal)."""
    rng = np.random.default_rng(seed)
    known = flat_params(base) if base is not None else {}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def draw(path, variable):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if key in known:
            return variable.replace(jnp.asarray(known[key]))
        x = rng.standard_normal(shape)
        if "norm" in key:
            x = 1.0 + 0.2 * x
        elif "router_bias" in key:
            x = 0.05 * x if cfg.score_func == "sigmoid" else 0.0 * x
        elif "embed" not in key:
            x = x * 0.7 / np.sqrt(shape[-2] if len(shape) > 1 else 25.0)
        return variable.replace(jnp.asarray(x, dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, abstract, is_leaf=lambda v: isinstance(v, nnx.Variable)))
