"""moe_jax: DeepSeek-style Mixture-of-Experts models and GRPO reinforcement learning in JAX."""

__version__ = "0.1.0"
