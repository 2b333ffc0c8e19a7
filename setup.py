"""moe_jax: DeepSeek-style Mixture-of-Experts models and GRPO reinforcement learning in JAX."""

from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="DeepSeek-V3-class MoE transformers and GRPO/R1 training in JAX/Flax NNX",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "numpy",
        "absl-py",
        "tokenizers",
        "tensorboardX",
        "matplotlib",
        "tqdm",
        "array-record",  # ArrayRecord dataset files (moe_jax.data.records), read through grain
        "safetensors",  # Hugging Face weights (moe_jax.interop): header validation, sliced reads
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "ruff"],
        # Hugging Face parity tests (tests/test_interop_*.py); moe_jax.interop itself needs none of it.
        "hf": ["torch==2.13.0", "transformers"],
        # SLURM job arrays for sweeps (experiments/sweep.py --launcher=slurm); nothing else needs it.
        "sweep": ["submitit"],
    },
)
