"""Rotary position embedding (Su et al. 2021) with YaRN context extension (Peng et al. 2023).

The YaRN variant is the one DeepSeek-V2/V3 ship: per-frequency interpolation between the original
("extrapolated") frequencies and frequencies divided by the scaling factor s, blended by a linear
ramp between the correction dimensions of `beta_fast` and `beta_slow` rotations; cos/sin are
scaled by `mscale(s, mscale) / mscale(s, mscale_all_dim)` and the attention softmax scale by
`mscale(s, mscale_all_dim)^2` (see `yarn_softmax_scale`).

Channels are rotated in the "half" layout: channel i pairs with channel i + d/2. (DeepSeek's
reference code rotates interleaved pairs; importing its weights permutes the RoPE columns.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.configs import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature `0.1 * mscale * ln(s) + 1` (1 when s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, original_max_len: int) -> float:
    """The rotary dimension whose wavelength fits `num_rotations` times in the original context."""
    return dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[rope_dim/2]` of RoPE, YaRN-interpolated when rope_scaling_factor > 1."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    freq_extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_scaling_factor <= 1.0:
        return freq_extra.astype(np.float32)
    freq_inter = freq_extra / cfg.rope_scaling_factor
    low = max(math.floor(_correction_dim(cfg.rope_beta_fast, dim, base, cfg.rope_original_max_len)), 0)
    high = min(math.ceil(_correction_dim(cfg.rope_beta_slow, dim, base, cfg.rope_original_max_len)),
               dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # 0 for the high-frequency dims (kept as they are), 1 for the low ones (interpolated by s).
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return (freq_inter * ramp + freq_extra * (1.0 - ramp)).astype(np.float32)


def rope_cos_sin_scale(cfg: ModelConfig) -> float:
    """YaRN's magnitude correction folded into cos/sin (1 without YaRN)."""
    s = cfg.rope_scaling_factor
    return yarn_mscale(s, cfg.rope_mscale) / yarn_mscale(s, cfg.rope_mscale_all_dim)


def yarn_softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale: `1/sqrt(d_qk)`, times `mscale(s, mscale_all_dim)^2` under YaRN."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling_factor > 1.0 and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def rope_tables(cfg: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, each `[B, T, rope_dim]` in fp32, for integer positions."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxR = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    scale = rope_cos_sin_scale(cfg)
    return jnp.cos(angles_BxTxR) * scale, jnp.sin(angles_BxTxR) * scale


def apply_rope(x_BxTxHxR: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array) -> jax.Array:
    """Rotate channel pairs (i, i + R/2) of every head by the position's angle, in fp32."""
    x = x_BxTxHxR.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_BxTxR[:, :, None, :], sin_BxTxR[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BxTxHxR.dtype)
