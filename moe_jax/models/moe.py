"""The DeepSeekMoE layer (Dai et al. 2024; DeepSeek-V3 §2.1.2, eq. 12):

    h'_t = u_t + Σ_{i≤N_s} FFN^(s)_i(u_t) + Σ_{i≤N_r} g_{i,t} FFN^(r)_i(u_t)

Fine-grained routed experts chosen by `router.route`, shared experts that see every token (fused
into one SwiGLU of width `n_shared_experts * moe_d_ff`, which is the same function), and a
dispatch backend from `dispatch.py`. The residual `u_t +` is added by the transformer block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import router
from moe_jax.models.dispatch import dispatch_experts
from moe_jax.models.expert_parallel import ep_dispatch_experts
from moe_jax.models.layers import MLP, make_param
from moe_jax.parallel.rules import active_mesh_and_rules


class RouterBias(nnx.Variable):
    """The per-expert selection bias of aux-loss-free balancing: state, not a parameter, so an
    optimizer built with `wrt=nnx.Param` never touches it and no gradient flows into it."""


# On CPU, at most this many tokens per MoE call run every expert densely (two 2-D matmuls)
# rather than the blocked backend, whose per-expert loop is pure overhead for the 64 tokens of a
# decode step. Measured with E=8 (D=128) and E=64 (D=256): dense is faster up to 128 tokens and
# slower from 256 (BUILD_NOTES.md, "GRPO step speed").
CPU_DENSE_MAX_TOKENS = 128


def resolve_dispatch(backend: str, n_tokens: int | None = None, platform: str | None = None) -> str:
    """`auto` picks the fastest dropless backend measured for the platform (BUILD_NOTES.md):
    on CPU, `dense` for at most `CPU_DENSE_MAX_TOKENS` tokens (decoding) and sorted fixed-size
    blocks otherwise; `ragged_dot` grouped matmuls on GPU/TPU. `n_tokens=None` means a training
    batch."""
    if backend != "auto":
        return backend
    if (platform or jax.default_backend()) != "cpu":
        return "ragged"
    return "dense" if n_tokens is not None and n_tokens <= CPU_DENSE_MAX_TOKENS else "blocked"


class MoELayer(nnx.Module):
    """Shared + routed experts. Returns `(y_BxTxD, stats)` with the layer's balance losses and
    router statistics (see `__call__`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, f = cfg.d_model, cfg.n_routed_experts, cfg.moe_d_ff
        pdt = jnp.dtype(cfg.param_dtype)
        self.w_router = make_param(rngs, (d, e), ("embed", "experts_router"), dtype=pdt)
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=("experts_router",))
        self.w_gate = make_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dtype=pdt)
        self.w_up = make_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dtype=pdt)
        self.w_down = make_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), dtype=pdt)
        self.shared = (MLP(d, cfg.n_shared_experts * f, rngs=rngs, param_dtype=pdt)
                       if cfg.n_shared_experts else None)

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array, expert_idx_BxTxK: jax.Array | None = None
                 ) -> tuple[jax.Array, dict]:
        """`mask_BxT` is False on padding. `expert_idx_BxTxK` replays recorded expert choices
        instead of routing (GSPO's routing replay); the gate values still come from this
        router's scores, so it is still trained. Returns the output and the `routing_stats` of
        the call's routing."""
        y_BxTxD, routing = self.mix(x_BxTxD, mask_BxT, expert_idx_BxTxK)
        return y_BxTxD, routing_stats(routing, self.cfg)

    def mix(self, x_BxTxD: jax.Array, mask_BxT: jax.Array, expert_idx_BxTxK: jax.Array | None = None
            ) -> tuple[jax.Array, dict]:
        """The layer's output and its routing, not yet reduced to statistics (so a caller that
        runs one batch in parts can join the parts first): `logits` and `scores` `[B, T, E]`
        (fp32), `expert_idx` `[B, T, K]`, `mask` `[B, T]` and `dropped_fraction`."""
        cfg = self.cfg
        b, t, d = x_BxTxD.shape
        x_NxD, mask_N = x_BxTxD.reshape(b * t, d), mask_BxT.reshape(b * t)
        # The gate runs in fp32: top-k choices are sensitive to rounding.
        logits_NxE = x_NxD.astype(jnp.float32) @ self.w_router[...].astype(jnp.float32)
        if expert_idx_BxTxK is None:
            expert_idx_NxK, weights_NxK, scores_NxE = router.route(logits_NxE, self.router_bias[...], cfg)
        else:
            expert_idx_NxK = expert_idx_BxTxK.reshape(b * t, -1).astype(jnp.int32)
            scores_NxE = router.router_scores(logits_NxE, cfg.score_func)
            weights_NxK = router.gate_weights(scores_NxE, expert_idx_NxK, cfg)
        experts = (x_NxD, expert_idx_NxK, weights_NxK, self.w_gate[...], self.w_up[...], self.w_down[...])
        backend = resolve_dispatch(cfg.moe_dispatch, b * t)
        mesh_and_rules = active_mesh_and_rules()
        if mesh_and_rules is not None and mesh_and_rules[0].shape["expert"] > 1:
            mesh, rules = mesh_and_rules
            y_NxD, dropped_fraction = ep_dispatch_experts(
                *experts, mesh=mesh, rules=rules, local_backend=backend,
                capacity_factor=cfg.ep_capacity_factor, token_mask_N=mask_N, exchange=cfg.ep_exchange)
        else:
            y_NxD, dropped_fraction = dispatch_experts(
                *experts, backend=backend, capacity_factor=cfg.capacity_factor, token_mask_N=mask_N)
        if self.shared is not None:
            y_NxD = y_NxD + self.shared(x_NxD)
        routing = {"logits": logits_NxE.reshape(b, t, -1), "scores": scores_NxE.reshape(b, t, -1),
                   "expert_idx": expert_idx_NxK.reshape(b, t, -1), "mask": mask_BxT,
                   "dropped_fraction": dropped_fraction}
        return y_NxD.reshape(b, t, d), routing

    def update_bias(self, load_E: jax.Array) -> None:
        """Apply the loss-free bias step for the loads of one training step (outside the gradient)."""
        self.router_bias[...] = router.loss_free_bias_update(
            self.router_bias[...], load_E, self.cfg.router_bias_rate)


def routing_stats(routing: dict, cfg: ModelConfig) -> dict:
    """Balance losses and router statistics of one routing (`MoELayer.mix`): `aux_loss` (the
    weighted sum of the enabled balance losses), each loss unweighted, `load` (tokens per
    expert), `max_vio`, `dropped_fraction`, `router_entropy` and the choices, `expert_idx`
    `[B, T, K]`. Padding (mask False) counts in none of them."""
    b, t, e = routing["scores"].shape
    logits_NxE, scores_NxE = routing["logits"].reshape(b * t, e), routing["scores"].reshape(b * t, e)
    expert_idx_NxK, mask_N = routing["expert_idx"].reshape(b * t, -1), routing["mask"].reshape(b * t)
    losses = {
        "switch_loss": (cfg.aux_loss_coef,
                        lambda: router.switch_balance_loss(scores_NxE, expert_idx_NxK, mask_N)),
        "seq_loss": (cfg.seq_aux_loss_coef,
                     lambda: router.sequence_balance_loss(routing["scores"], routing["expert_idx"],
                                                          routing["mask"])),
        "z_loss": (cfg.router_z_loss_coef, lambda: router.router_z_loss(logits_NxE, mask_N)),
    }
    stats = {name: fn() for name, (coef, fn) in losses.items() if coef > 0}
    stats["aux_loss"] = sum((losses[name][0] * value for name, value in stats.items()),
                            jnp.zeros((), jnp.float32))
    load_E = router.expert_counts(expert_idx_NxK, mask_N, cfg.n_routed_experts)
    stats["load"] = load_E
    stats["max_vio"] = router.max_violation(load_E)
    stats["router_entropy"] = router.router_entropy(jax.lax.stop_gradient(scores_NxE), mask_N)
    stats["dropped_fraction"] = routing["dropped_fraction"]
    stats["expert_idx"] = routing["expert_idx"]
    return stats
