"""The GRPO loop end to end on a tiny model: TRL's metric names, checkpoints, and a rerun that
resumes instead of starting over."""

import dataclasses
import os
import signal

import numpy as np
import pytest

from moe_jax.configs import get_preset
from moe_jax.models.sampler import SamplingConfig
from moe_jax.rl.config import GRPOConfig, GRPOLoss
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config_tree import override
from moe_jax.train.experiment_config import LoopConfig, OptimizerConfig
from moe_jax.train.metrics import read_metrics
from moe_jax.train.workdir import CHECKPOINT_DIR

CFG = GRPOConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
                 steps=2, batch_size=16, seq_len=40, sampling=SamplingConfig(samples_per_prompt=4, max_new_tokens=16),
                 optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, weight_decay=0.1),
                 loop=LoopConfig(eval_every=2, checkpoint_every=1, eval_problems=8, eval_max_new_tokens=16),
                 loss=GRPOLoss(num_iterations=2, minibatches=2, beta=0.04, epsilon_high=0.28, overlong_buffer=4,
                               mask_truncated_completions=True))

TRL_NAMES = {"reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "frac_reward_zero_std",
             "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy",
             "completions/mean_length", "completions/clipped_ratio", "time/sampling", "time/scoring",
             "time/training", "tokens_per_s", "loss", "grad_norm"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from moe_jax.rl.trainer import train_grpo

    workdir = str(tmp_path_factory.mktemp("grpo"))
    return workdir, train_grpo(CFG, workdir)


def test_grpo_run_logs_trl_metrics_checkpoints_and_resumes(finished_run):
    from moe_jax.rl.trainer import train_grpo

    workdir, result = finished_run
    assert (result["status"], result["step"]) == ("finished", 2)
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[2]
    for m in metrics[1:]:
        assert TRL_NAMES <= set(m), TRL_NAMES - set(m)
        # an untrained model answers nothing right: the verifier's split puts every completion in
        # "incorrect" (the accuracy reward, the same verifier, agrees)
        assert m["rewards/accuracy/mean"] == 0 and "completions/mean_length_correct" not in m
        assert m["completions/mean_length_incorrect"] == m["completions/mean_length"]
    assert Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).latest_step() == 2

    longer = dataclasses.replace(CFG, steps=3)  # `steps` is not a cadence field: a conflict
    with pytest.raises(ValueError, match="steps: 2"):
        train_grpo(longer, workdir)
    again = train_grpo(CFG, workdir)  # the same command: it finds the run finished
    assert again["step"] == 2
    assert [m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [0, 1, 2]


def test_preempted_and_resumed_grpo_equals_uninterrupted_with_the_same_kl_reference(finished_run, tmp_path):
    """Started from another run's weights with a KL term: the resumed run must rebuild the same
    reference policy and draw the same samples, so step 2 matches the uninterrupted run."""
    from moe_jax.rl.trainer import train_grpo

    source = finished_run[0]
    cfg = override(CFG, {"loop.eval_every": 10, "loop.eval_problems": 1})
    straight = train_grpo(cfg, str(tmp_path / "straight"), init_from=source)

    def sigterm_at_step_1(step, state):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path / "resumed")
    assert train_grpo(cfg, workdir, init_from=source, hooks=[sigterm_at_step_1])["status"] == "preempted"
    resumed = train_grpo(cfg, workdir, init_from=source)
    for name in ("loss", "kl", "reward", "grad_norm", "clip_ratio/region_mean"):
        np.testing.assert_allclose(resumed["metrics"][name], straight["metrics"][name], rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    assert resumed["metrics"]["kl"] > 0


def test_dynamic_sampling_keeps_informative_groups_and_tops_up_at_the_cap():
    from moe_jax.rl.trainer import _informative_groups

    cfg = dataclasses.replace(CFG, dynamic_sampling=True, max_resamples=2)  # 4 groups of 4 per step

    def rollout(rewards):
        rewards = np.asarray(rewards, np.float64)
        return {"reward": rewards, "row": np.arange(len(rewards)) + 100 * len(calls)}

    calls = []
    flat, mixed = [0, 0, 0, 0], [0, 1, 0, 0]
    batches = [rollout(flat + mixed + flat + flat)]
    later = [flat + flat + mixed + mixed, flat * 4]

    def sample_more(attempt):
        calls.append(attempt)
        return rollout(later[attempt - 1])

    out, n = _informative_groups(cfg, batches[0], sample_more)
    assert n == 3 and calls == [1, 2]  # two more batches: the cap
    groups = out["reward"].reshape(4, 4)
    assert [g.std() > 0 for g in groups] == [True, True, True, False]  # 3 informative, topped up
    out, n = _informative_groups(cfg, rollout(mixed * 4), sample_more)
    assert n == 1 and (out["reward"] == mixed * 4).all()


def test_a_step_is_its_rollout_then_its_update():
    """The rollout (sample, score, advantages → a batch) and the update, each run alone, make the
    step the stepper makes: the same metrics and the same parameters after it."""
    import jax

    from moe_jax.rl.trainer import grpo_run
    from moe_jax.train.context import make_context

    cfg = override(CFG, {"loss.beta": 0.0})
    steppers = [grpo_run(cfg)(make_context(cfg)) for _ in range(2)]  # equal inits, prompt streams
    whole_state, whole = steppers[0].step(1, steppers[0].state)
    stepper = steppers[1].step
    rollout = stepper.rollout(1, steppers[1].state)
    advantages_GxK = np.asarray(rollout.batch["advantages"]).reshape(-1, cfg.group_size)
    np.testing.assert_allclose(advantages_GxK.mean(axis=1), 0.0, atol=1e-6)  # group-normalised
    assert rollout.batch["tokens"].shape[0] == cfg.batch_size and rollout.completion_tokens > 0
    split_state, split = stepper.update(steppers[1].state, rollout)
    timings = {"time/sampling", "time/scoring", "time/training", "tokens_per_s"}
    assert {k: v for k, v in whole.items() if k not in timings} == split
    for a, b in zip(jax.tree.leaves(whole_state), jax.tree.leaves(split_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_length_metrics_split_a_hand_made_batch_by_verdict():
    from moe_jax.rl.trainer import length_metrics

    lengths, correct = np.array([10, 30, 20, 40, 5, 7]), np.array([True, False, True, False, False, True])
    assert length_metrics(lengths, correct) == pytest.approx({
        "completions/mean_length": 112 / 6, "completions/mean_length_correct": 37 / 3,
        "completions/mean_length_incorrect": 75 / 3, "completions/length_ratio": 75 / 37}, rel=1e-12)
    assert length_metrics(lengths[:1], correct[:1]) == {"completions/mean_length": 10.0,
                                                        "completions/mean_length_correct": 10.0}
