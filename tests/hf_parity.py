"""Shared machinery of the Hugging Face parity tests (tests/test_interop_*.py): tiny random
`transformers` models, a left-padded batch, and the four checks every family must pass.

Only imported by tests that have already done `pytest.importorskip("torch")` /
`pytest.importorskip("transformers")`.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from interop_helpers import assert_bit_identical, flat_params, perturbed, random_model  # noqa: F401

from moe_jax.interop import load_hf, save_hf
from moe_jax.models import Transformer, jit_generate

LOGIT_TOL = 1e-4
VOCAB = 64
NEW_TOKENS = 16


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that logits, routing and norms all matter: unit-scale activations,
    norm scales 1 ± 0.2, nonzero biases and DeepSeek selection biases (transformers initialises
    norms to 1 and biases to 0, which would hide a mis-mapped one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 / p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def make_hf_model(config: transformers.PretrainedConfig, folder: str, seed: int = 0):
    """A randomised `AutoModelForCausalLM` of `config` (eager fp32 attention), saved to `folder`."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model.eval(), seed)
    model.save_pretrained(folder)
    return model


def padded_batch(seed: int = 0, batch: int = 3, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a left-padding mask (row 0 full, the others with 4 and 7 pad slots)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in zip(range(1, batch), (4, 7), strict=False):
        mask[row, :pad] = 0
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def our_logits(model: Transformer, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits, _ = nnx.jit(lambda m, t, s: m(t, segment_ids_BxT=s, mtp=False))(
        model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    return np.asarray(logits)


def max_logit_diff(hf_model, model: Transformer, seed: int = 0) -> float:
    """Max |HF - ours| over every valid (non-padding) position of a left-padded batch."""
    tokens, mask = padded_batch(seed)
    ref, ours = hf_logits(hf_model, tokens, mask), our_logits(model, tokens, mask)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref)[mask.astype(bool)].max())


def hf_greedy(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None, use_cache=True)
    return out[:, tokens.shape[1]:].numpy()


def our_greedy(model: Transformer, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = jit_generate(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                       max_new_tokens=NEW_TOKENS, eos_id=-1, pad_id=0)
    return np.asarray(out["tokens"])


@dataclasses.dataclass
class Family:
    """One loaded family: the HF reference, its folder, and our model loaded from it."""
    hf_model: object
    folder: str
    cfg: object
    model: Transformer


def load_family(config: transformers.PretrainedConfig, tmp_dir: str, seed: int = 0) -> Family:
    folder = os.path.join(tmp_dir, "hf")
    hf_model = make_hf_model(config, folder, seed)
    cfg, model = load_hf(folder)
    return Family(hf_model, folder, cfg, model)


def check_logits(fam: Family, label: str) -> float:
    diff = max_logit_diff(fam.hf_model, fam.model)
    print(f"\n[{label}] max |logit diff| vs transformers: {diff:.3e}")
    assert diff < LOGIT_TOL, diff
    return diff


def check_greedy(fam: Family) -> None:
    tokens, mask = padded_batch(seed=1)
    np.testing.assert_array_equal(our_greedy(fam.model, tokens, mask), hf_greedy(fam.hf_model, tokens, mask))


def check_round_trip(fam: Family, tmp_dir: str) -> None:
    """save -> load is bit-identical, and the saved tensors equal the original checkpoint's."""
    from moe_jax.interop.safetensors_io import SafetensorsFolder

    out = os.path.join(tmp_dir, "round_trip")
    save_hf(fam.model, fam.cfg, out)
    _, again = load_hf(out)
    assert_bit_identical(fam.model, again)
    original, ours = SafetensorsFolder(fam.folder), SafetensorsFolder(out)
    assert original.names() <= ours.names(), sorted(original.names() - ours.names())
    for name in original.names():
        np.testing.assert_array_equal(np.asarray(ours.tensor(name)), np.asarray(original.tensor(name)),
                                      err_msg=name)


def check_transformers_reads_ours(fam: Family, tmp_dir: str, label: str) -> float:
    """A model with moe_jax-made weights, saved with `save_hf`, loads in transformers with the
    same logits."""
    model = perturbed(fam.model, seed=2)
    out = os.path.join(tmp_dir, "ours")
    save_hf(model, fam.cfg, out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    diff = max_logit_diff(hf_model, model, seed=3)
    print(f"\n[{label}] moe_jax-saved model in transformers: max |logit diff| {diff:.3e}")
    assert diff < LOGIT_TOL, diff
    return diff
