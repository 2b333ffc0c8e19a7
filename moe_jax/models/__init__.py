"""The model zoo: one `Transformer` covering dense GQA decoders and DeepSeek-style MoE/MLA/MTP."""

from moe_jax.models.kv_cache import cache_bytes_per_token, init_cache
from moe_jax.models.sampler import generate, jit_generate
from moe_jax.models.transformer import Transformer

__all__ = ["Transformer", "cache_bytes_per_token", "generate", "init_cache", "jit_generate"]
