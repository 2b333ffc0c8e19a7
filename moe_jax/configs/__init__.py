"""Model configuration: the `ModelConfig` dataclass, named presets, parameter/FLOP accounting."""

from moe_jax.configs.accounting import count_params, decode_weight_params, flops_per_token
from moe_jax.configs.model_config import ModelConfig
from moe_jax.configs.presets import get_preset, list_presets

__all__ = ["ModelConfig", "count_params", "decode_weight_params", "flops_per_token", "get_preset",
           "list_presets"]
