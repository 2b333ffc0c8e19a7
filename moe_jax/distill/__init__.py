"""Distillation: a teacher's knowledge into a (small, dense) student. `generalized_jsd` is GKD's
divergence (Agarwal et al. 2024, eq. 1) with TRL's conventions; `topk_generalized_jsd` the same on a
teacher's cached top-k log-probs."""

from moe_jax.distill.losses import generalized_jsd, teacher_topk, topk_generalized_jsd

__all__ = ["generalized_jsd", "teacher_topk", "topk_generalized_jsd"]
