"""Study 3: GRPO's length bias (Liu et al. 2025, "Understanding R1-Zero-Like Training", §3.1 and
Figure 5: with GRPO's per-response length normalisation and std scaling, incorrect answers grow
longer while correct ones do not; Dr. GRPO removes the bias at equal accuracy), on arithmetic.

    python experiments/sweep.py --sweep=experiments/studies/dr_grpo_length.py --workdir=/tmp/study_drgrpo

R1-Zero's main job (`--recipe=r1-zero-arithmetic`) with room for length to grow (160 new tokens),
from one base per seed shared by the four objectives: GRPO (length-normalised, std-scaled), Dr.
GRPO (neither), DAPO (token-level) and GSPO (sequence-level ratios). Logged every step from the
verifier's verdicts: `completions/mean_length_correct`, `…_incorrect` and their ratio.
`dr_grpo_length_countdown.py` is the same on countdown.
"""

from moe_jax.sweep.claims import Claim
from moe_jax.sweep.spec import Sweep

LOSSES = {"grpo": ("--config.loss.loss_type=grpo", "--config.loss.scale_rewards=group"),
          "dr_grpo": ("--config.loss.loss_type=dr_grpo", "--config.loss.scale_rewards=none"),
          "dapo": ("--config.loss.loss_type=dapo", "--config.loss.scale_rewards=group"),
          "gspo": ("--config.loss.loss_type=grpo", "--config.loss.importance_sampling_level=sequence")}


def study(recipe: str, seq_len: int, base_flags: tuple[str, ...] = (), rl_flags: tuple[str, ...] = ()) -> Sweep:
    """The four objectives from a shared `recipe` base (`r1_zero.py --base_only`), rows of
    `seq_len` tokens with room for 160 new ones."""
    length = "completions/mean_length"
    room = ("--config.sampling.max_new_tokens=160", "--config.loop.eval_max_new_tokens=160",
            f"--config.seq_len={seq_len}")
    model = f"--config.model.max_seq_len={seq_len}"  # the base's architecture is the policy's
    return Sweep(
        "grpo", base=(f"--recipe={recipe}", "--init_from={shared:base}/base", model, *room, *rl_flags),
        variants=LOSSES, seeds=(0, 1, 2), baseline="grpo",
        shared={"base": ("r1_zero", (f"--recipe={recipe.removeprefix('r1-zero-')}", "--base_only", model,
                                     *base_flags))},
        claims=(
            Claim("under GRPO, incorrect completions end longer than correct ones (Liu et al. Fig. 5)",
                  f"{length}_incorrect/final", "grpo", b_metric=f"{length}_correct/final", expect="higher"),
            Claim("Dr. GRPO shortens incorrect completions against GRPO", f"{length}_incorrect/final", "dr_grpo",
                  "grpo", expect="lower"),
            Claim("Dr. GRPO keeps GRPO's accuracy (no lower)", "eval/accuracy/final", "dr_grpo", "grpo",
                  expect="higher"),
        ),
        metrics=("eval/accuracy", "reward", length, f"{length}_correct", f"{length}_incorrect",
                 "completions/length_ratio"))


def sweep() -> Sweep:
    return study("r1-zero-arithmetic", seq_len=192)
