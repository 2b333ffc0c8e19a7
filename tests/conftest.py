"""Test session setup: 8 simulated CPU devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

# References run in float64; the library's fp32 matmuls must be true fp32 to compare at 1e-5.
jax.config.update("jax_default_matmul_precision", "highest")

