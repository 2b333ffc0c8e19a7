"""Hugging Face checkpoint import/export: `load_hf(folder) -> (ModelConfig, Transformer)` and
`save_hf(model, cfg, folder)` for DeepSeek-V3/V2 (and Moonlight), Qwen2/Qwen2.5, Qwen3, Qwen3-MoE,
Mixtral and OLMoE. Needs neither torch nor transformers (safetensors are read and written here)."""

from moe_jax.interop.hf_checkpoint import load_hf, load_hf_into, read_hf_config, save_hf
from moe_jax.interop.hf_config import FAMILIES, config_from_hf, config_to_hf, infer_family

__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "infer_family", "load_hf", "load_hf_into",
           "read_hf_config", "save_hf"]
