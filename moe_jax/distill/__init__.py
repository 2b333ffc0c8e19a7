"""Distillation: a teacher's knowledge into a (small, dense) student — sequence-level (SFT on the
teacher's verified traces, what DeepSeek-R1 did), logit (GKD's generalized JSD on the teacher's
cached top-k) and on-policy (GKD: the student's own samples scored by the teacher); and R1's
Table 6 in miniature (`moe_jax.distill.table6`).

`generalized_jsd` is GKD's divergence (Agarwal et al. 2024, eq. 1) with TRL's conventions;
`topk_generalized_jsd` the same on a teacher's cached top-k log-probs."""

from moe_jax.distill.config import DistillConfig, KDConfig, KDRunConfig
from moe_jax.distill.distillation import run_distillation
from moe_jax.distill.losses import generalized_jsd, teacher_topk, topk_generalized_jsd
from moe_jax.distill.run import train_kd
from moe_jax.distill.table6 import run_table6
from moe_jax.distill.teacher import load_teacher, write_topk_cache

__all__ = ["DistillConfig", "KDConfig", "KDRunConfig", "generalized_jsd", "load_teacher", "run_distillation",
           "run_table6", "teacher_topk", "topk_generalized_jsd", "train_kd", "write_topk_cache"]
