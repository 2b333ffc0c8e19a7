"""Logical axis names -> mesh axes.

Every parameter carries `logical_axes` metadata (`moe_jax.models.layers.make_param`); a rule table
maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated). The defaults
shard parameters FSDP-style over `fsdp`, experts over `expert`, and heads / MLP widths over
`tensor`; activations shard their batch over every axis that holds different tokens.
Change a rule with `make_rules({"embed": None})` (e.g. to replicate instead of FSDP); from a
script, `--config.sharding_rules=embed=None,mlp=fsdp+tensor` (`parse_rules`).

Activations are annotated inside the model with `constrain(x, ("batch", "length", "act_embed"))`,
a no-op unless a mesh is activated with `use_mesh(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.parallel.mesh import BATCH_AXES, MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "q_lora": None,
    "kv_lora": None,
    "experts_router": None,
    "experts": "expert",
    "expert_mlp": "tensor",
    "mtp_concat": None,
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_vocab": "tensor",
}


def make_rules(overrides: Rules | None = None) -> dict[str, MeshAxes]:
    """The default table with `overrides` applied; unknown logical names are an error."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(DEFAULT_RULES)
    if unknown:
        raise ValueError(f"unknown logical axes {sorted(unknown)}; known: {sorted(DEFAULT_RULES)}")
    return {**DEFAULT_RULES, **overrides}


def parse_rules(text: str) -> dict[str, MeshAxes]:
    """The rule table with the overrides in `text` (`""`: the defaults). `text` is comma-separated
    `logical=axes`, axes being `None` (replicated), one mesh axis, or several joined by `+`:
    `"embed=None,mlp=fsdp+tensor"`."""
    overrides: dict[str, MeshAxes] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        axes = tuple(a.strip() for a in value.split("+"))
        bad_axes = value != "None" and (not set(axes) <= set(MESH_AXES) or len(set(axes)) < len(axes))
        if not sep or not name or not value or bad_axes or name in overrides:
            raise ValueError(f"bad rule {part!r}. Fix: write logical=axes pairs, each logical axis once, "
                             f"axes being None or distinct mesh axes from {MESH_AXES} joined by '+', e.g. "
                             "'embed=None,mlp=fsdp+tensor'")
        if name == "batch":
            raise ValueError("the rule 'batch' is not configurable: a batch is split over every mesh "
                             f"axis that holds different tokens, {BATCH_AXES}. Fix: size those axes in "
                             "--mesh")
        overrides[name] = None if value == "None" else axes[0] if len(axes) == 1 else axes
    return make_rules(overrides)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec for one array from its logical axis names."""
    entries = []
    for name in logical_axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; add it to the rule table")
        axes = _as_tuple(rules.get(name) if name is not None else None)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Fail with the parameter, dimension and fix when a mesh axis does not divide a dimension
    or one mesh axis shards two dimensions."""
    used: list[str] = []
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        axes = _as_tuple(axes)
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            raise ValueError(f"{name}: dimension {dim} (size {size}) is not divisible by mesh axes "
                             f"{axes} ({ways} devices). Fix: pick a mesh whose {'x'.join(axes)} "
                             f"size divides {size}, or map this logical axis to None in the rules")
        used += axes
    if len(used) != len(set(used)):
        raise ValueError(f"{name}: spec {spec} uses a mesh axis twice. Fix: change the rules so "
                         "its logical axes map to different mesh axes")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """NamedShardings for every variable of a (possibly abstract) state, checked against the mesh.

    Every variable but scalars must carry `logical_axes` metadata (optimizer moments inherit it
    from their parameter)."""
    rules = make_rules() if rules is None else rules

    def sharding(path, variable: nnx.Variable) -> NamedSharding:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        logical = variable.get_metadata().get("logical_axes")
        if logical is None and not variable.get_value().shape:  # a scalar (e.g. the step count)
            return NamedSharding(mesh, PartitionSpec())
        if logical is None:
            raise ValueError(f"{name} has no logical_axes metadata; create it with make_param")
        spec = logical_to_spec(logical, rules)
        check_divisible(name, variable.get_value().shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "moe_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Activate `mesh` (and the rules) for `constrain` and `jax.set_mesh` while tracing."""
    token = _ACTIVE.set((mesh, make_rules() if rules is None else rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh_and_rules() -> tuple[Mesh, Rules] | None:
    """The mesh and rules activated by `use_mesh`, if any."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under `use_mesh`; identity otherwise. A mesh axis
    that does not divide a dimension (e.g. a batch of 1 when decoding) leaves it replicated."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    entries = []
    for size, axes in zip(x.shape, logical_to_spec(logical_axes, rules), strict=True):
        axes = _as_tuple(axes)
        entries.append(axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*entries)))
