"""Study 2: auxiliary-loss-free balancing (Wang et al. 2024, Table 2: MaxVio_global 0.04 with the
bias update against 0.72 with the auxiliary loss, at a better perplexity).

    python experiments/sweep.py --sweep=experiments/studies/balance.py --workdir=/tmp/study_balance

The `tiny-moe` pretraining main job (500 steps, so that 36 runs fit) with the capacity dispatch
(so that imbalance drops tokens: `eval/drop_frac_mean`), at 8 and at 32 routed experts; six ways
to balance: the bias update at two rates, the auxiliary loss at two weights, neither, both (the
sequence-wise loss off in all). Measured: `eval/maxvio_global` (the whole held-out set's loads),
`eval/maxvio_mean` (batch by batch, and `maxvio_mean` over training), eval CE, dropped tokens.
"""

from moe_jax.sweep.claims import Claim
from moe_jax.sweep.spec import Axis, Sweep


def _balance(bias: float, aux: float) -> tuple[str, ...]:
    return (f"--config.model.router_bias_rate={bias}", f"--config.model.aux_loss_coef={aux}",
            "--config.model.seq_aux_loss_coef=0")


def sweep() -> Sweep:
    return Sweep(
        "pretrain",
        base=("--config.steps=500", "--config.model.moe_dispatch=capacity", "--config.corpus.eval_batches=8",
              "--config.loop.eval_every=100", "--config.loop.checkpoint_every=500"),
        axes=(Axis.of({"model.n_routed_experts": [8, 32]}),),
        variants={"bias_1e-3": _balance(1e-3, 0), "bias_1e-2": _balance(1e-2, 0), "aux_1e-3": _balance(0, 1e-3),
                  "aux_1e-2": _balance(0, 1e-2), "neither": _balance(0, 0), "both": _balance(1e-3, 1e-2)},
        seeds=(0, 1, 2), baseline="aux_1e-2",
        claims=(
            Claim("the bias update balances the whole set better than the auxiliary loss (Table 2)",
                  "eval/maxvio_global/final", "bias_1e-3", "aux_1e-2", expect="lower"),
            Claim("... at a lower (better) held-out loss (Table 2)", "eval/ce/final", "bias_1e-3", "aux_1e-2",
                  expect="lower"),
            Claim("the bias update balances better than no balancing at all", "eval/maxvio_global/final", "bias_1e-3",
                  "neither", expect="lower"),
            Claim("the bias update drops fewer tokens than the auxiliary loss (capacity 1.25)",
                  "eval/drop_frac_mean/final", "bias_1e-3", "aux_1e-2", expect="lower"),
        ),
        metrics=("eval/ce", "eval/maxvio_global", "eval/maxvio_mean", "maxvio_mean", "eval/drop_frac_mean"))
