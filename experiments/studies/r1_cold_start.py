"""Study 1: does a faithful cold start make the R1 pipeline beat R1-Zero (R1 §2.3.1, Table 3)?

    python experiments/sweep.py --sweep=experiments/studies/r1_cold_start.py --workdir=/tmp/study_r1

The cold start's three sources (`--config.cold_start_data.source`): `inverse` (synthetic traces
whose check undoes the sum — the default recipe, which loses to R1-Zero), `commuted` (the check
works the sum again in the other order: a skill the base has) and `r1_zero` (what R1 did: R1-Zero's
own verified, one-language samples, rewritten readable; the pipeline then also trains
`r1_zero_long`, R1-Zero for all its RL steps). Each seed's base model is made once and shared by
the three sources (`--init_from`). The claims: the pipeline's final model matches or beats R1-Zero
on accuracy while mixing languages far less. Sizes and SFT steps of the cold start:
`r1_cold_start_grid.py`.
"""

from moe_jax.sweep.claims import Claim
from moe_jax.sweep.spec import Sweep

SOURCES = ("inverse", "commuted", "r1_zero")
ACCURACY = "final_rl/accuracy/arithmetic"


def sweep() -> Sweep:
    return Sweep(
        "r1_pipeline", base=("--init_from={shared:base}/base",),
        variants={source: (f"--config.cold_start_data.source={source}",) for source in SOURCES},
        seeds=(0, 1, 2), baseline="inverse",
        shared={"base": ("r1_pipeline", ("--only=base",))},
        claims=(
            *(Claim(f"R1 ({source} cold start) matches or beats R1-Zero on accuracy (R1 Table 3)", ACCURACY,
                    source, b_metric="r1_zero/accuracy/arithmetic", expect="higher") for source in SOURCES),
            Claim("R1 beats R1-Zero given every RL step of the pipeline (R1-Zero's own included)", ACCURACY,
                  "r1_zero", b_metric="r1_zero_long/accuracy/arithmetic", expect="higher"),
            *(Claim(f"R1 ({source} cold start) mixes languages less than R1-Zero (R1 §2.3.2)",
                    "final_rl/language_mixed", source, b_metric="r1_zero/language_mixed", expect="lower")
              for source in SOURCES),
            Claim("a cold start from R1-Zero's samples beats the synthetic self-check", ACCURACY, "r1_zero", "inverse",
                  expect="higher"),
        ),
        metrics=("reasoning_rl/eval/accuracy", "r1_zero/eval/accuracy", "final_rl/eval/accuracy",
                 "reasoning_rl/completions/mean_length", "r1_zero/completions/mean_length"))
