"""The KV-cache sampler against a naive reference that re-runs the full forward (no cache) on each
row's unpadded, growing sequence."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer
from moe_jax.models.sampler import first_argmax, jit_generate, sample_token, sampling_logits

MODELS = {
    "mla-moe": dataclasses.replace(get_preset("tiny-moe"), n_layers=2),
    "gqa": get_preset("tiny-dense"),
}
PROMPTS = [[5, 17, 33, 9, 101], [42, 7], [88, 3, 250]]  # different lengths, left-padded below
P, N, PAD, NO_EOS = 5, 6, 0, -1


@jax.jit
def _forward(model, tokens_BxT, segment_ids_BxT):
    return model(tokens_BxT, segment_ids_BxT=segment_ids_BxT)[0]


def _init_model(cfg):
    """Every weight perturbed (on the host: cheaper than compiling a random op per shape), so that
    unit norm scales and zero biases do not make the greedy continuations repetitive."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.1 * rng.normal(size=p.shape), p.dtype),
                                   nnx.state(model, nnx.Param)))
    return model


class Setup:
    """A model, left-padded prompts, and their greedy continuation by the sampler and the reference."""

    def __init__(self, cfg):
        self.model = _init_model(cfg)
        self.prompt_BxP = jnp.array([[PAD] * (P - len(p)) + p for p in PROMPTS], jnp.int32)
        self.segments_BxP = jnp.array([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS], jnp.int32)
        self.greedy = self.generate(eos_id=NO_EOS)
        self.ref_tokens, self.ref_logprobs = self.reference_greedy()

    def generate(self, **kwargs):
        out = jit_generate(self.model, self.prompt_BxP, self.segments_BxP, max_new_tokens=N, pad_id=PAD,
                           **kwargs)
        return {k: np.asarray(v) for k, v in out.items()}

    def full_logits(self, rows):
        """Full-forward logits `[B, P + N, V]` of unpadded rows, right-padded to one length (causal
        attention makes the right padding invisible to the real tokens)."""
        tokens = np.full((len(rows), P + N), PAD, np.int32)
        segments = np.zeros_like(tokens)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], segments[i, :len(row)] = row, 1
        return np.asarray(_forward(self.model, jnp.asarray(tokens), jnp.asarray(segments)), np.float64)

    def reference_greedy(self):
        rows, logprobs = [list(p) for p in PROMPTS], []
        for _ in range(N):
            logits = self.full_logits(rows)
            last_BxV = np.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])
            step = np.argmax(last_BxV, -1)
            logprobs.append(np.take_along_axis(_log_softmax(last_BxV), step[:, None], -1)[:, 0])
            for row, t in zip(rows, step, strict=True):
                row.append(int(t))
        return np.array([r[-N:] for r in rows]), np.stack(logprobs, 1)

    def sampled_logits(self, out):
        """Full-forward logits `[B, N, V]` that predicted each returned token."""
        rows = [p + list(t[:n]) for p, t, n in zip(PROMPTS, out["tokens"], out["lengths"], strict=True)]
        logits = self.full_logits(rows)
        return np.stack([logits[i, len(p) - 1:len(p) - 1 + N] for i, p in enumerate(PROMPTS)])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@functools.cache
def _setup(name):
    return Setup(MODELS[name])


@pytest.fixture(params=list(MODELS))
def setup(request):
    return _setup(request.param)


@pytest.fixture
def moe_setup():
    return _setup("mla-moe")


def test_greedy_equals_naive_full_forward(setup):
    out = setup.greedy
    np.testing.assert_array_equal(out["tokens"], setup.ref_tokens)
    np.testing.assert_allclose(out["logprobs"], setup.ref_logprobs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["mask"], 1)
    np.testing.assert_array_equal(out["lengths"], N)
    assert out["tokens"].dtype == np.int32 and out["logprobs"].dtype == np.float32


def test_eos_stops_the_row(moe_setup):
    ref_BxN = moe_setup.ref_tokens
    row = next(i for i, r in enumerate(ref_BxN) if r[2] not in r[:2])
    eos = int(ref_BxN[row, 2])  # that row's third greedy token, seen there for the first time
    out = moe_setup.generate(eos_id=eos)
    for i, ref in enumerate(ref_BxN):
        stop = list(ref).index(eos) + 1 if eos in ref else N
        np.testing.assert_array_equal(out["tokens"][i, :stop], ref[:stop])
        np.testing.assert_array_equal(out["tokens"][i, stop:], PAD)
        np.testing.assert_allclose(out["logprobs"][i, :stop], moe_setup.ref_logprobs[i, :stop], atol=1e-5)
        np.testing.assert_array_equal(out["logprobs"][i, stop:], 0.0)
        np.testing.assert_array_equal(out["mask"][i], np.arange(N) < stop)
        assert out["lengths"][i] == stop
    assert out["lengths"][row] == 3


def test_temperature_logprobs_match_full_forward(moe_setup):
    temperature = 0.7
    out = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(3), temperature=temperature)
    logp_BxNxV = _log_softmax(moe_setup.sampled_logits(out) / temperature)
    expected = np.take_along_axis(logp_BxNxV, out["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], expected, rtol=0, atol=1e-5)
    assert not np.array_equal(out["tokens"], moe_setup.ref_tokens)  # it did sample

    again = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(3), temperature=temperature)
    np.testing.assert_array_equal(again["tokens"], out["tokens"])
    np.testing.assert_array_equal(again["logprobs"], out["logprobs"])
    other = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(4), temperature=temperature)
    assert not np.array_equal(other["tokens"], out["tokens"])


def test_top_p_samples_inside_the_nucleus(moe_setup):
    temperature, top_p = 0.5, 0.3
    out = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(5), temperature=temperature, top_p=top_p)
    probs_BxNxV = np.exp(_log_softmax(moe_setup.sampled_logits(out) / temperature))
    sorted_BxNxV = -np.sort(-probs_BxNxV, -1)
    size_BxN = (np.cumsum(sorted_BxNxV, -1) - sorted_BxNxV < top_p).sum(-1)
    cutoff_BxN = np.take_along_axis(sorted_BxNxV, size_BxN[..., None] - 1, -1)[..., 0]
    token_p_BxN = np.take_along_axis(probs_BxNxV, out["tokens"][..., None], -1)[..., 0]
    assert (token_p_BxN >= cutoff_BxN - 1e-6).all()
    assert (size_BxN < probs_BxNxV.shape[-1] // 2).all()  # the filter removes most of the vocabulary
    mass_BxN = np.where(probs_BxNxV >= cutoff_BxN[..., None], probs_BxNxV, 0).sum(-1)
    np.testing.assert_allclose(out["logprobs"], np.log(token_p_BxN / mass_BxN), rtol=0, atol=1e-5)


def test_tiny_top_p_is_greedy(moe_setup):
    out = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(6), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(out["tokens"], moe_setup.ref_tokens)
    np.testing.assert_allclose(out["logprobs"], 0.0, atol=1e-6)  # the nucleus is one token


def test_top_k_samples_among_the_k_best(moe_setup):
    temperature, top_k = 1.0, 3
    out = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(7), temperature=temperature, top_k=top_k)
    logits_BxNxV = moe_setup.sampled_logits(out) / temperature
    kth_BxN = -np.sort(-logits_BxNxV, -1)[..., top_k - 1]
    token_logit_BxN = np.take_along_axis(logits_BxNxV, out["tokens"][..., None], -1)[..., 0]
    assert (token_logit_BxN >= kth_BxN - 1e-5).all()
    kept_BxNxV = np.where(logits_BxNxV >= kth_BxN[..., None], logits_BxNxV, -np.inf)
    expected = np.take_along_axis(_log_softmax(kept_BxNxV), out["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], expected, rtol=0, atol=1e-5)
    top1 = moe_setup.generate(eos_id=NO_EOS, rng=jax.random.key(7), temperature=temperature, top_k=1)
    np.testing.assert_array_equal(top1["tokens"], moe_setup.ref_tokens)


def test_truncated_flags_rows_without_eos(moe_setup):
    assert moe_setup.greedy["truncated"].all()  # no eos id at all: every row ran out of tokens
    eos = int(moe_setup.ref_tokens[0, 1])
    out = moe_setup.generate(eos_id=eos)
    expected = [eos not in row for row in moe_setup.ref_tokens]
    np.testing.assert_array_equal(out["truncated"], expected)


def test_sampling_on_a_mesh_equals_one_device(moe_setup):
    """The rollout path of GRPO: the model sharded over 8 devices (data × expert), the prompts
    split over the batch axes and each group's prompt prefilled once (4 prompts of 5 slots: the
    expert layer pads 20 tokens to 8 shards): the same tokens and log-probs as one device
    prefilling every row."""
    from moe_jax.parallel import init_sharded, make_mesh, use_mesh
    from moe_jax.parallel.distributed import global_batch_array

    mesh = make_mesh("data=2,expert=4")
    sharded = init_sharded(lambda: moe_setup.model, mesh)
    group = 2  # 4 prompts × 2 samples: 8 rows, divisible by the 8 batch shards
    prompt_BxP = np.repeat(np.resize(np.asarray(moe_setup.prompt_BxP), (4, P)), group, axis=0)
    segments_BxP = np.repeat(np.resize(np.asarray(moe_setup.segments_BxP), (4, P)), group, axis=0)
    kwargs = {"max_new_tokens": N, "eos_id": NO_EOS, "pad_id": PAD, "rng": jax.random.key(9), "temperature": 1.0}
    single = jit_generate(moe_setup.model, jnp.asarray(prompt_BxP), jnp.asarray(segments_BxP), **kwargs)
    assert not np.array_equal(single["tokens"][0], single["tokens"][1])  # a group's rows sample apart
    with use_mesh(mesh):
        spread = jit_generate(sharded, global_batch_array(prompt_BxP, mesh), global_batch_array(segments_BxP, mesh),
                              group_size=group, **kwargs)
    np.testing.assert_array_equal(np.asarray(spread["tokens"]), np.asarray(single["tokens"]))
    np.testing.assert_allclose(np.asarray(spread["logprobs"]), np.asarray(single["logprobs"]), atol=1e-5)


def test_first_argmax_is_argmax_with_ties():
    logits_BxV = jax.random.normal(jax.random.key(0), (16, 40))
    logits_BxV = logits_BxV.at[3, 7].set(9.0).at[3, 30].set(9.0)  # a tie: the lower index wins
    logits_BxV = logits_BxV.at[5].set(-jnp.inf).at[5, 12].set(0.0)  # filtered rows
    np.testing.assert_array_equal(first_argmax(logits_BxV), jnp.argmax(logits_BxV, axis=-1))
    assert int(first_argmax(logits_BxV)[3]) == 7


def test_sampled_token_frequencies_follow_the_filtered_distribution():
    """20k draws of one distribution (top-k 4, T 0.8): frequencies within 4.5 standard errors of
    the probabilities, the same tokens as `jax.random.categorical` for the same key, and never a
    token outside the top k."""
    rows = 20_000
    logits_V = jnp.asarray([1.0, 0.2, -0.5, 2.0, 0.7, -3.0, 1.5, 0.0])
    logits_BxV = jnp.broadcast_to(logits_V, (rows, 8))
    key = jax.random.key(3)
    tokens_B, logp_B = jax.jit(sample_token, static_argnums=(2, 3, 4))(logits_BxV, key, 0.8, 1.0, 4)
    filtered_V = sampling_logits(logits_V[None], 0.8, 1.0, 4)[0]
    np.testing.assert_array_equal(tokens_B, jax.random.categorical(key, sampling_logits(logits_BxV, 0.8, 1.0, 4)))
    probs_V = np.asarray(jax.nn.softmax(filtered_V))
    freq_V = np.bincount(np.asarray(tokens_B), minlength=8) / rows
    assert set(np.flatnonzero(freq_V)) <= {0, 3, 4, 6}
    np.testing.assert_array_less(np.abs(freq_V - probs_V), 4.5 * np.sqrt(probs_V * (1 - probs_V) / rows) + 1e-12)
    np.testing.assert_allclose(logp_B, np.log(probs_V[np.asarray(tokens_B)]), rtol=1e-6)


def test_bad_arguments_fail_before_compiling(moe_setup):
    prompt = (moe_setup.prompt_BxP, moe_setup.segments_BxP)  # 3 rows
    with pytest.raises(ValueError, match="do not split into groups of group_size=2"):
        jit_generate(moe_setup.model, *prompt, max_new_tokens=N, eos_id=NO_EOS, pad_id=PAD, group_size=2)
    with pytest.raises(ValueError, match="top_p"):
        jit_generate(moe_setup.model, *prompt, max_new_tokens=N, eos_id=NO_EOS, pad_id=PAD, top_p=0.0)
