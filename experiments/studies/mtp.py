"""Study 5: Multi-Token Prediction (DeepSeek-V3 §2.2, Table 4: MTP improves the main model; §5.4.3:
85–90% of its second-token drafts are accepted).

    python experiments/sweep.py --sweep=experiments/studies/mtp.py --workdir=/tmp/study_mtp

The `tiny-moe` pretraining main job at MTP depth 0, 1 and 2 (equal steps and tokens; the MTP
modules are dropped at inference, so the main model is compared alone): next-token eval CE, greedy
task accuracy, and depth 1's acceptance as a draft (`eval/mtp_acceptance`: its guess of token i + 2
equals the main model's own greedy choice).
"""

from moe_jax.sweep.claims import Claim
from moe_jax.sweep.spec import Axis, Sweep


def sweep() -> Sweep:
    return Sweep(
        "pretrain", base=("--config.loop.eval_every=250", "--config.loop.checkpoint_every=1000"),
        axes=(Axis.of({"model.mtp_depth": [0, 1, 2]}),), seeds=(0, 1, 2), baseline="model.mtp_depth=0",
        claims=(
            Claim("MTP (depth 1) lowers the main model's next-token loss (Table 4)", "eval/ce/final",
                  "model.mtp_depth=1", "model.mtp_depth=0", expect="lower"),
            Claim("MTP (depth 1) raises the main model's task accuracy (Table 4)", "eval/accuracy/final",
                  "model.mtp_depth=1", "model.mtp_depth=0", expect="higher"),
            Claim("a second MTP module helps further", "eval/ce/final", "model.mtp_depth=2", "model.mtp_depth=1",
                  expect="lower"),
        ),
        metrics=("eval/ce", "eval/accuracy", "eval/mtp_acceptance", "mtp_loss"))
