"""`jax.lax.ragged_all_to_all` built from `all_gather` and masked gathers, for CPU tests.

XLA:CPU has no ragged-all-to-all, so tests put this in its place to run the ragged expert-parallel
exchange on simulated devices. It follows the documented semantics literally (the receive loop of
the docstring): every device gathers every operand and offset, then writes the `recv_sizes[i]`
rows of slice `i` that the source sent, at the offset the source chose. The contract that a
source's `send_sizes` equal its receivers' `recv_sizes` is checked: where they disagree the result
is poisoned (NaN, or the smallest integer), so a caller that breaks it fails its test instead of
passing where the real collective would misbehave. It moves n_ep times the data of the real
collective — a reference, not a transport.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                               send_sizes: jax.Array, output_offsets: jax.Array,
                               recv_sizes: jax.Array, *, axis_name: str) -> jax.Array:
    n_devices = jax.lax.axis_size(axis_name)
    slices_per_device = input_offsets.shape[0] // n_devices
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [src, rows, ...]
    sources_input_offsets = jax.lax.all_gather(input_offsets, axis_name)  # [src, slices]
    sources_output_offsets = jax.lax.all_gather(output_offsets, axis_name)
    sources_send_sizes = jax.lax.all_gather(send_sizes, axis_name)
    rows = jnp.arange(output.shape[0])
    result, consistent = output, jnp.bool_(True)
    for src in range(n_devices):
        for j in range(slices_per_device):
            i = me * slices_per_device + j  # the source's slice that comes to me
            start_out = sources_output_offsets[src, i]
            size = recv_sizes[src * slices_per_device + j]
            consistent &= sources_send_sizes[src, i] == size
            source_row = jnp.clip(sources_input_offsets[src, i] + rows - start_out, 0, operand.shape[0] - 1)
            inside = (rows >= start_out) & (rows < start_out + size)
            inside = inside.reshape((-1,) + (1,) * (output.ndim - 1))
            result = jnp.where(inside, operands[src][source_row], result)
    poison = jnp.nan if jnp.issubdtype(output.dtype, jnp.floating) else jnp.iinfo(output.dtype).min
    return jnp.where(consistent, result, jnp.asarray(poison, output.dtype))
