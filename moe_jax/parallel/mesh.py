"""Device meshes from a spec string: `"data=2,expert=4"`, unnamed axes are 1; `"auto"` puts every
device on `data`. The axes, outermost first: data (replicas), fsdp (parameter sharding over the
batch), expert (expert parallelism), tensor (within-layer model parallelism)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Axes a batch is split over: every axis but tensor holds different tokens.
BATCH_AXES = ("data", "fsdp", "expert")


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """`"data=2,expert=4"` -> sizes of all four axes; the product must equal `n_devices`."""
    if spec.strip() in ("", "auto"):
        return {axis: (n_devices if axis == "data" else 1) for axis in MESH_AXES}
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh spec {spec!r}: bad entry {part!r}. Fix: write comma-separated "
                             f"axis=size pairs with axes from {MESH_AXES}, e.g. 'data=2,expert=4'")
        sizes[name] = int(value)
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh spec {spec!r} covers {math.prod(sizes.values())} devices but "
                         f"{n_devices} are available. Fix: make the axis sizes multiply to "
                         f"{n_devices}, or use 'auto'")
    return sizes


def make_mesh(spec: str = "auto", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the four named axes, sized by `spec`."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
