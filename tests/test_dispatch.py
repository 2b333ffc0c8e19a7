"""Dispatch backends vs the dense reference (outputs and gradients), capacity dropping vs a
token-loop GShard reference, token masks, and a bf16 smoke test."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from moe_jax.models import blocked_experts, expert_rows
from moe_jax.models.dispatch import BACKENDS, capacity_per_expert, dispatch_experts
from moe_jax.models.moe import CPU_DENSE_MAX_TOKENS, resolve_dispatch

N, D, F, E = 64, 16, 8, 8
TOL = {"rtol": 1e-5, "atol": 1e-5}
STATIC = ("backend", "capacity_factor", "block_size")

# Compiled once per (shape, static args) for the whole module.
_dispatch = jax.jit(dispatch_experts, static_argnames=STATIC)


def _loss(x, weights, w_gate, w_up, w_down, expert_idx, probe, mask, **static):
    y, _ = dispatch_experts(x, expert_idx, weights, w_gate, w_up, w_down, token_mask_N=mask, **static)
    # A random cotangent probes the whole VJP, not just one direction of it.
    return jnp.sum(probe * y.astype(jnp.float32))


_grads = jax.jit(jax.grad(_loss, argnums=(0, 1, 2, 3, 4)), static_argnames=STATIC)
GRAD_NAMES = ("x", "weights", "w_gate", "w_up", "w_down")


def _routing(case: str, k: int, seed: int = 0) -> np.ndarray:
    """Distinct expert ids per token for a named load pattern."""
    rng = np.random.default_rng(seed)
    if case == "exact":  # every expert gets exactly N*K/E copies
        return np.stack([(np.arange(N) + 3 * j) % E for j in range(k)], axis=1).astype(np.int32)
    prefs = {
        "balanced": np.ones(E),
        "empty_experts": np.array([1.0, 1.0, 1.0, 0, 0, 0, 0, 0]),  # experts 3..7 get nothing
        "skewed": np.array([1.0] * 5 + [200.0] + [1.0] * 2),  # expert 5 takes nearly every token
    }[case]
    p = prefs / prefs.sum()
    return np.stack([rng.choice(E, size=k, replace=False, p=p) for _ in range(N)]).astype(np.int32)


def _problem(k: int, case: str = "balanced", seed: int = 0, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed + 100)
    weights = rng.uniform(0.1, 1.0, size=(N, k))
    arrays = {
        "x": rng.normal(size=(N, D)),
        "weights": weights / weights.sum(1, keepdims=True),
        "w_gate": rng.normal(size=(E, D, F)) / math.sqrt(D),
        "w_up": rng.normal(size=(E, D, F)) / math.sqrt(D),
        "w_down": rng.normal(size=(E, F, D)) / math.sqrt(F),
    }
    prob = {name: jnp.asarray(v, jnp.float32 if name == "weights" else dtype) for name, v in arrays.items()}
    prob["expert_idx"] = jnp.asarray(_routing(case, k, seed))
    prob["probe"] = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    prob["mask"] = jnp.ones((N,), bool)
    return prob


def _run(prob: dict, **static):
    return _dispatch(prob["x"], prob["expert_idx"], prob["weights"], prob["w_gate"], prob["w_up"],
                     prob["w_down"], token_mask_N=prob["mask"], **static)


def _run_grads(prob: dict, **static):
    return _grads(prob["x"], prob["weights"], prob["w_gate"], prob["w_up"], prob["w_down"],
                  prob["expert_idx"], prob["probe"], prob["mask"], **static)


# Every backend configuration that must equal `dense` exactly (no drops).
DROPLESS = {
    "ragged": {"backend": "ragged"},
    "blocked": {"backend": "blocked"},
    "blocked_b5": {"backend": "blocked", "block_size": 5},  # many blocks, odd size
    "capacity_nodrop": {"backend": "capacity", "capacity_factor": E / 1.0},  # C >= N for K >= 1
}
CASES = [(2, "balanced"), (1, "balanced"), (2, "empty_experts"), (2, "skewed"), (2, "exact")]


@pytest.mark.parametrize("k,case", CASES)
@pytest.mark.parametrize("name", list(DROPLESS))
def test_matches_dense_outputs_and_grads(name, k, case):
    prob = _problem(k, case)
    y_ref, dropped_ref = _run(prob, backend="dense")
    y, dropped = _run(prob, **DROPLESS[name])
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert float(dropped) == 0.0 == float(dropped_ref)
    for grad_name, g, g_ref in zip(GRAD_NAMES, _run_grads(prob, **DROPLESS[name]),
                                   _run_grads(prob, backend="dense")):
        assert float(jnp.max(jnp.abs(g_ref))) > 0, grad_name  # the comparison is not vacuous
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=grad_name)


def test_blocked_repeats_largest_window(monkeypatch):
    """Groups taller than the largest window run it several times, then smaller ones."""
    monkeypatch.setattr(blocked_experts, "_MAX_WINDOW_ROWS", 8)  # read at trace time
    static = {"backend": "blocked", "block_size": 2}  # unique static args: a fresh trace
    assert blocked_experts._window_sizes(2, 128) == (8, 4, 2)
    prob = _problem(2, "skewed", seed=13)  # ~60 copies (7+ windows of 8) for expert 5
    np.testing.assert_allclose(_run(prob, **static)[0], _run(prob, backend="dense")[0], **TOL)
    for grad_name, g, g_ref in zip(GRAD_NAMES, _run_grads(prob, **static),
                                   _run_grads(prob, backend="dense")):
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=grad_name)


def _capacity_reference(prob: dict, capacity_factor: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Token loop with GShard priority: all k=0 choices in token order, then k=1, ...
    Returns (y, dropped_fraction, keep_NxK)."""
    x, idx, w = (np.asarray(prob[n], np.float64) for n in ("x", "expert_idx", "weights"))
    idx = idx.astype(int)
    w_gate, w_up, w_down = (np.asarray(prob[n], np.float64) for n in ("w_gate", "w_up", "w_down"))
    mask = np.asarray(prob["mask"])
    n, k = idx.shape
    capacity = max(1, math.ceil(capacity_factor * n * k / E))
    used = np.zeros(E, int)
    keep = np.zeros((n, k), bool)
    y = np.zeros((n, D))
    for j in range(k):
        for t in range(n):
            e = idx[t, j]
            if not mask[t] or used[e] >= capacity:
                continue
            used[e] += 1
            keep[t, j] = True
            gate = x[t] @ w_gate[e]
            y[t] += w[t, j] * ((gate / (1 + np.exp(-gate)) * (x[t] @ w_up[e])) @ w_down[e])
    n_valid = mask.sum() * k
    return y, (n_valid - keep.sum()) / n_valid, keep


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
@pytest.mark.parametrize("case", ["balanced", "skewed"])
def test_capacity_drops_match_gshard_loop(case, capacity_factor):
    prob = _problem(2, case, seed=3)
    y_ref, dropped_ref, keep = _capacity_reference(prob, capacity_factor)
    assert dropped_ref > 0  # the case must actually exercise dropping
    y, dropped = _run(prob, backend="capacity", capacity_factor=capacity_factor)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(float(dropped), dropped_ref, rtol=1e-6)

    # Gradients: capacity dispatch == dense dispatch with the dropped copies' weights zeroed.
    grads = _run_grads(prob, backend="capacity", capacity_factor=capacity_factor)
    kept = dict(prob, weights=prob["weights"] * jnp.asarray(keep, jnp.float32))
    grads_ref = _run_grads(kept, backend="dense")
    for grad_name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
        if grad_name == "weights":
            g_ref = g_ref * keep  # d/dw of (w * keep)
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=grad_name)


def test_two_operand_sort_fallback_matches_fused_key(monkeypatch):
    """Inputs too large for the int32 fused sort key take a stable two-operand sort."""
    prob = _problem(2, "skewed", seed=17)
    mask = jnp.arange(N) % 4 != 1
    fused = expert_rows.sort_copies(prob["expert_idx"], mask, E)  # eager: no trace cache
    monkeypatch.setattr(expert_rows, "_MAX_FUSED_SORT_KEY", 0)
    fallback = expert_rows.sort_copies(prob["expert_idx"], mask, E)
    for name, a, b in zip(fused._fields, fused, fallback):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # Ranks follow GShard priority: a k=0 copy always ranks before its expert's k=1 copies.
    copy, expert, rank = (np.asarray(v) for v in fused[:3])
    for e in range(E):
        ranked = copy[(expert == e)][np.argsort(rank[expert == e])]
        assert np.all(np.diff(ranked) > 0), e


def test_capacity_formula():
    assert capacity_per_expert(64, 2, 8, 1.25) == 20  # ceil(1.25 * 128 / 8)
    assert capacity_per_expert(64, 2, 8, 1.3) == math.ceil(1.3 * 16)
    assert capacity_per_expert(4, 1, 64, 0.1) == 1  # never zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_mask(backend):
    """Padding tokens: output 0, no gradient, no capacity taken; valid tokens unaffected."""
    prob = _problem(2, "skewed", seed=5)
    mask = np.arange(N) % 3 != 0
    # Padding first in priority order, with garbage values, all wanting expert 5.
    x = np.asarray(prob["x"]).copy()
    x[~mask] = 1e3
    idx = np.asarray(prob["expert_idx"]).copy()
    idx[~mask] = [5, 0]
    masked = dict(prob, x=jnp.asarray(x), expert_idx=jnp.asarray(idx), mask=jnp.asarray(mask))
    # capacity_factor only where it matters, so the other backends reuse compiled functions.
    static = {"backend": backend, **({"capacity_factor": 1.0} if backend == "capacity" else {})}

    y, dropped = _run(masked, **static)
    np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
    grads = dict(zip(GRAD_NAMES, _run_grads(masked, **static)))
    np.testing.assert_array_equal(np.asarray(grads["x"])[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["weights"])[~mask], 0.0)

    if backend == "capacity":  # valid tokens must see exactly the drops of the loop reference
        y_ref, dropped_ref, _ = _capacity_reference(masked, 1.0)
        np.testing.assert_allclose(float(dropped), dropped_ref, rtol=1e-6)
    else:  # valid tokens equal the dense reference (which ignores the mask by construction)
        y_ref = np.array(_run(dict(masked, mask=jnp.ones((N,), bool)), backend="dense")[0])
        y_ref[~mask] = 0.0
        assert float(dropped) == 0.0
    np.testing.assert_allclose(y, y_ref, **TOL)


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_smoke(backend, param_dtype):
    """bf16 activations with bf16 or fp32 (the model's default) expert weights."""
    prob32 = _problem(2, "balanced", seed=7)
    prob16 = _problem(2, "balanced", seed=7, dtype=jnp.bfloat16)
    for name in ("w_gate", "w_up", "w_down"):
        prob16[name] = prob16[name].astype(param_dtype)
    static = {"backend": backend, "capacity_factor": float(E)}
    y16, _ = _run(prob16, **static)
    y32, _ = _run(prob32, backend="dense")
    assert y16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y16)))
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.03 * scale, rtol=0)
    grads16 = _run_grads(prob16, **static)
    for grad_name, g, g32 in zip(GRAD_NAMES, grads16, _run_grads(prob32, backend="dense")):
        assert g.dtype == (prob16[grad_name].dtype), grad_name
        assert bool(jnp.all(jnp.isfinite(g))), grad_name
        g_scale = float(jnp.max(jnp.abs(g32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), g32, atol=0.05 * g_scale, rtol=0,
                                   err_msg=grad_name)


def test_unknown_backend_raises():
    prob = _problem(2)
    with pytest.raises(ValueError, match="unknown backend"):
        _run(prob, backend="onehot")


@pytest.mark.parametrize("k,case", [(2, "balanced"), (2, "empty_experts")])
def test_dense_equals_token_loop(k, case):
    """The dense backend (the others' reference) against a per-token numpy loop over its experts."""
    prob = _problem(k, case)
    p = {name: np.asarray(v, np.float64) for name, v in prob.items() if name not in ("expert_idx", "mask")}
    expected = np.stack([
        sum(p["weights"][n, j] * ref.swiglu(p["x"][n], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
            for j, e in enumerate(np.asarray(prob["expert_idx"][n])))
        for n in range(N)])
    np.testing.assert_allclose(_run(prob, backend="dense")[0], expected, **TOL)


def test_auto_dispatch_by_platform_and_token_count():
    assert resolve_dispatch("auto", CPU_DENSE_MAX_TOKENS, platform="cpu") == "dense"
    assert resolve_dispatch("auto", CPU_DENSE_MAX_TOKENS + 1, platform="cpu") == "blocked"
    assert resolve_dispatch("auto", None, platform="cpu") == "blocked"
    assert resolve_dispatch("auto", 8, platform="gpu") == "ragged"
    assert resolve_dispatch("capacity", 8, platform="cpu") == "capacity"
