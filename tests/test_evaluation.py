"""The held-out evaluation's balance measures: MaxVio_global (Wang et al. 2024) over the whole eval
set against a count of every token's expert choices, and the per-batch MaxVio beside it."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.train.context import make_context
from moe_jax.train.evaluation import Evaluator, maxvio_global
from moe_jax.train.experiment_config import CorpusConfig, ExperimentConfig, LoopConfig
from moe_jax.train.step import make_eval_step


def test_maxvio_global_of_hand_loads():
    # layer 0: loads 3, 1 → mean 2, (3 − 2) / 2 = 0.5; layer 1: balanced → 0; their mean 0.25
    assert maxvio_global(np.array([[3.0, 1.0], [2.0, 2.0]])) == pytest.approx(0.25, abs=1e-7)
    # 4 experts, one takes every token: (8 − 2) / 2 = 3
    assert maxvio_global(np.array([[8.0, 0.0, 0.0, 0.0]])) == pytest.approx(3.0, abs=1e-7)


def _violation(counts: Counter, experts: int) -> float:
    loads = [counts[e] for e in range(experts)]
    mean = sum(loads) / experts
    return (max(loads) - mean) / mean


def test_eval_maxvio_global_and_batch_equal_a_count_of_the_choices():
    """Every expert choice of every real token of the eval batches, counted in Python: the global
    MaxVio is the set's count's; the batch one, the mean of each batch's (per layer, then over layers)."""
    cfg = ExperimentConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
                           batch_size=8, seq_len=48, corpus=CorpusConfig(eval_batches=3),
                           loop=LoopConfig(eval_problems=2, eval_max_new_tokens=4))
    context = make_context(cfg)
    model = context.model
    evaluator = Evaluator(cfg, context.task, context.tokenizer, context.mesh, make_eval_step(model, mesh=context.mesh))
    measured = evaluator.loss(nnx.state(model))

    experts = cfg.model.n_routed_experts
    whole: dict[int, Counter] = {}
    per_batch = []
    for batch in evaluator.batches:
        _, aux = model(batch["tokens"], segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"])
        choices_LxBxTxK = np.asarray(aux["router"]["expert_idx"])
        real_BxT = np.asarray(batch["segment_ids"]) > 0
        layers = []
        for layer, choices_BxTxK in enumerate(choices_LxBxTxK):
            counts = Counter(int(e) for e in choices_BxTxK[real_BxT].ravel())
            whole.setdefault(layer, Counter()).update(counts)
            layers.append(_violation(counts, experts))
        per_batch.append(np.mean(layers))
    assert len(whole) == 2  # the MoE layer and the MTP block's
    expected_global = np.mean([_violation(counts, experts) for counts in whole.values()])
    assert measured["eval/maxvio_global"] == pytest.approx(expected_global, rel=1e-6)
    assert measured["eval/maxvio_mean"] == pytest.approx(np.mean(per_batch), rel=1e-6)
    assert measured["eval/maxvio_global"] != pytest.approx(measured["eval/maxvio_mean"], rel=1e-3)
    assert {"eval/ce", "eval/loss", "eval/drop_frac_mean"} <= set(measured)
