"""What a kind of run supplies to the run driver (`moe_jax.train.driver`): `RunParts`, built by a
`BuildRun` from the driver's `RunContext` — its step, its data iterator and its evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from flax import nnx

from moe_jax.train.context import RunContext


class Checkpointable(Protocol):
    """A data iterator whose position is saved with every checkpoint (grain's iterators)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class RunParts:
    """What a kind of run supplies. `step(n, state) -> (state, metrics)` dispatches step n (it
    draws its own batch from `data`); metrics may stay on the device, and must hold `loss` and
    `grad_norm`. `evaluate(model) -> metrics` runs at `eval_every` and at the end (and at step 0
    when `evaluate_at_start`). With `tokens_per_step` and `flops_per_token` the driver reports
    tokens/s and MFU; without, the step reports its own `tokens_per_s`."""

    step: Callable[[int, nnx.State], tuple[nnx.State, dict]]
    state: nnx.State
    data: Checkpointable
    evaluate: Callable[[nnx.Module], dict[str, float]]
    data_key: str = "train"  # the data position's name inside a checkpoint
    tokens_per_step: int | None = None
    flops_per_token: int | None = None
    evaluate_at_start: bool = False
    progress_keys: Mapping[str, str] | None = None
    plot_keys: Sequence[str] | None = None
    # `check(step, host metrics)` after each step's finite check: a run's own health signals
    # (it raises to stop the run, logs to warn)
    check: Callable[[int, dict[str, Any]], None] | None = None


BuildRun = Callable[[RunContext], RunParts]
