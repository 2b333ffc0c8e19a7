"""Study 4: fine-grained expert segmentation and shared-expert isolation (DeepSeekMoE, Dai et al.
2024, §3 and Figure 3: at equal total and activated parameters, finer experts and an isolated
shared expert each lower the loss).

    python experiments/sweep.py --sweep=experiments/studies/fine_grained.py --workdir=/tmp/study_fine

The `tiny-moe` pretraining job (1000 steps, the same tokens for all) with its MoE layers' routed
experts as (experts, top-k, width) = (8, 1, 64), (16, 2, 32), (32, 4, 16): 512 total and 64
activated expert units each; "+shared" isolates one expert of the finer sizes as shared and routes
one fewer (15 → top 1 + 1 shared of 32; 31 → top 3 + 1 shared of 16), so totals and activations stay
equal (DeepSeekMoE §3.2). `dense`: the same model with dense MLPs only, 88 wide (131.7k activated
parameters against the MoEs' 131.2–134.3k: `moe_jax.configs.count_params`).
"""

from moe_jax.sweep.claims import Claim
from moe_jax.sweep.spec import Sweep


def _moe(experts: int, top_k: int, width: int, shared: int = 0) -> tuple[str, ...]:
    return (f"--config.model.n_routed_experts={experts}", f"--config.model.top_k={top_k}",
            f"--config.model.moe_d_ff={width}", f"--config.model.n_shared_experts={shared}",
            # group-limited routing needs groups that divide the experts: one group (plain top-k)
            "--config.model.n_group=1", "--config.model.topk_group=1")


VARIANTS = {"e8k1": _moe(8, 1, 64), "e16k2": _moe(16, 2, 32), "e32k4": _moe(32, 4, 16),
            "e16k2+shared": _moe(15, 1, 32, 1), "e32k4+shared": _moe(31, 3, 16, 1),
            "dense": ("--config.model.n_routed_experts=0", "--config.model.n_shared_experts=0",
                      "--config.model.top_k=0", "--config.model.n_group=1", "--config.model.topk_group=1",
                      "--config.model.router_bias_rate=0", "--config.model.seq_aux_loss_coef=0",
                      "--config.model.d_ff=88")}


def sweep() -> Sweep:
    return Sweep(
        "pretrain", base=("--config.loop.eval_every=250", "--config.loop.checkpoint_every=1000"),
        variants=VARIANTS, seeds=(0, 1, 2), baseline="e8k1",
        claims=(
            Claim("finer experts lower the loss: 16 × top-2 against 8 × top-1", "eval/ce/final", "e16k2", "e8k1",
                  expect="lower"),
            Claim("finer experts lower the loss: 32 × top-4 against 16 × top-2", "eval/ce/final", "e32k4", "e16k2",
                  expect="lower"),
            Claim("an isolated shared expert lowers the loss (16 experts)", "eval/ce/final", "e16k2+shared", "e16k2",
                  expect="lower"),
            Claim("an isolated shared expert lowers the loss (32 experts)", "eval/ce/final", "e32k4+shared", "e32k4",
                  expect="lower"),
            Claim("the MoE beats the dense model of its activated FLOPs", "eval/ce/final", "e8k1", "dense",
                  expect="lower"),
        ),
        metrics=("eval/ce", "eval/accuracy", "maxvio_mean"))
