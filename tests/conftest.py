"""Test session setup: 8 simulated CPU devices, set before JAX is imported."""

import atexit
import os
import shutil
import tempfile

# The suite is compile-bound (hundreds of tiny programs, each run a few times): the CPU backend's
# LLVM at -O0 makes the whole run ~25% shorter. Results move by fp32 rounding only (a tiny-moe
# gradient: 4e-8 relative, from e.g. FMA contraction), far inside every tolerance, and runs that
# tests compare with each other all run under this flag (the subprocesses inherit it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the subprocesses the tests start:
# the training-loop tests compile the same step in several runs and processes. Only compilations
# over a second are stored (JAX's default), so the many tiny eager ops stay out of it. The process
# that makes it (not the xdist workers, which inherit it) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# References run in float64; the library's fp32 matmuls must be true fp32 to compare at 1e-5
# (an environment variable, so the subprocesses compute exactly as the test process does).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

