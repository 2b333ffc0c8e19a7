"""Device meshes, logical-axis sharding rules and sharded initialization."""

from moe_jax.parallel.mesh import BATCH_AXES, MESH_AXES, make_mesh, parse_mesh_spec
from moe_jax.parallel.rules import (
    DEFAULT_RULES,
    constrain,
    make_rules,
    parse_rules,
    state_shardings,
    use_mesh,
)
from moe_jax.parallel.sharded_init import init_sharded

__all__ = ["BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "constrain", "init_sharded", "make_mesh",
           "make_rules", "parse_mesh_spec", "parse_rules", "state_shardings", "use_mesh"]
