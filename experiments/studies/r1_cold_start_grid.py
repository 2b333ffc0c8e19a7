"""Study 1, the grid: cold-start source × size × SFT steps (R1 §2.3.1 collects "thousands" of
cold-start examples), 3 seeds, each seed's base shared by every configuration; the claims and
columns of `r1_cold_start.py`.

    python experiments/sweep.py --sweep=experiments/studies/r1_cold_start_grid.py --workdir=/tmp/study_r1_grid

18 configurations × 3 seeds: hours on a 2-core CPU, unlike `r1_cold_start.py` (the sources at
the recipe's 1000 traces and 100 steps); `--launcher=slurm` spreads it over a cluster.
"""

import dataclasses
import os

from moe_jax.sweep.spec import Axis, Sweep, load_sweep


def sweep() -> Sweep:
    sources = load_sweep(os.path.join(os.path.dirname(os.path.abspath(__file__)), "r1_cold_start.py"))
    return dataclasses.replace(sources, axes=(Axis.of({"cold_start_data.examples": [250, 1000, 4000]}),
                                              Axis.of({"cold_start.steps": [100, 300]})))
