"""A sweep is data: an experiment, the flags every point shares, axes, named variants and seeds.

    Sweep("pretrain", base=("--config.steps=300",), axes=(Axis.of({"model.top_k": [1, 2]}),),
          seeds=(0, 1, 2))

Axes form a product; one `Axis` over several paths zips them (`{"model.n_experts": [8, 16],
"model.top_k": [1, 2]}` is two configurations, not four). A variant is a named set of flags
(`{"aux_loss": ("--config.model.aux_loss_coef=0.01", "--config.model.router_bias_rate=0")}`), one
more axis of the product. Every point is the experiment's own command with its own workdir
(`DIR/points/<name>`), so it can be rerun by hand.

A sweep file is JSON (`{"experiment", "base", "axes": [{path: [values]}, ...], "variants",
"seeds", "baseline", "claims", "shared", "metrics"}`) or Python whose `sweep()` (or `SWEEP`) is a
`Sweep`. A study (`experiments/studies/`) is a sweep file that also states its paper's claims
(`moe_jax.sweep.claims`), judged in its `results.md`, and may share runs among its points: a
`shared` run is made once per seed before the points, which name its folder `{shared:<name>}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax.config_flags import CONFIG_PREFIX, override_fields, valid_fields
from moe_jax.errors import InputError
from moe_jax.sweep.claims import Claim
from moe_jax.sweep.experiments import Experiment, get_experiment

POINTS_DIR = "points"  # DIR/points/<name>: a point's workdir
SHARED_DIR = "shared"  # DIR/shared/<name>,seed=<s>: a run the points of a seed read (e.g. their base model)
SWEEP_DIR = "{sweep}"  # in a flag: the sweep's folder (filled in when the command runs)
_SHARED = re.compile(r"\{shared:([A-Za-z0-9_.+-]+)\}")  # in a flag: that shared run's folder, the point's seed
SWEEP_FILE = "sweep.json"  # DIR/sweep.json: the sweep as data, what aggregation reads back
SEED = "seed"
VARIANT = "variant"
_MAX_NAME = 120  # longer point names end in a hash of the whole name instead
_FLAGS_OF_THE_SWEEP = ("--workdir",)  # each point's own; a base flag may not set them


def flag_text(value: Any) -> str:
    """A value as a flag takes it (`true`, `0.01`, `dr_grpo`)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class Axis:
    """Config `paths` set together to each of `values` (a tuple per configuration, one value per path)."""

    paths: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, values_by_path: Mapping[str, Sequence[Any]]) -> Axis:
        """`{path: [values]}`; several paths are zipped (equal lengths)."""
        lengths = {path: len(values) for path, values in values_by_path.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise InputError(f"sweep axis {dict(values_by_path)}: give each path a non-empty list, zipped paths "
                             f"lists of one length (got lengths {lengths})")
        paths = tuple(values_by_path)
        return cls(paths, tuple(zip(*([flag_text(v) for v in values_by_path[p]] for p in paths))))

    @classmethod
    def parse(cls, text: str) -> Axis:
        """`path=v1,v2,...` (the command line's `--axis`)."""
        path, sep, values = text.partition("=")
        if not sep or not values:
            raise InputError(f"--axis={text}: write it path=v1,v2 (e.g. --axis=model.top_k=1,2)")
        return cls.of({path.removeprefix(CONFIG_PREFIX): values.split(",")})


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: its name (its folder under `points/`), the values it sets (axis path,
    `variant` and `seed` -> value) and its flags (besides `--workdir`)."""

    name: str
    values: Mapping[str, str]
    flags: tuple[str, ...]

    @property
    def configuration(self) -> tuple[tuple[str, str], ...]:
        """What the point's seeds share: its values without the seed."""
        return tuple((k, v) for k, v in self.values.items() if k != SEED)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """`experiment` (`moe_jax.sweep.experiments`) run with the `base` flags, over the product of
    `variants` (name -> flags; none: no variant axis), `axes` and `seeds` (`--config.seed`).
    `baseline` names the configuration the results compare against: a variant's name or
    `path=value` of one axis."""

    experiment: str
    base: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()
    variants: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    baseline: str | None = None
    claims: tuple[Claim, ...] = ()  # what a paper says the results show (`moe_jax.sweep.claims`)
    # name -> (experiment, flags): runs made once per seed before the points, which name them in a
    # flag as `{shared:name}` (`--init_from={shared:base}/base`), so N configurations share one base
    shared: Mapping[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    metrics: tuple[str, ...] = ()  # the curves and columns its table leads with (default: the experiment's)

    @property
    def spec(self) -> Experiment:
        return get_experiment(self.experiment)

    def axis_paths(self) -> list[str]:
        """The columns that tell configurations apart: `variant` (if any), then every axis path."""
        return ([VARIANT] if self.variants else []) + [p for axis in self.axes for p in axis.paths]

    def validate(self) -> None:
        """Refuse, before anything runs: a field or flag the experiment lacks (naming the valid
        ones), a flag that is each point's own, a path set twice, a bad baseline, no or repeated seeds."""
        config_paths, others = self._given_flags()
        self._check_fields([p for axis in self.axes for p in axis.paths] + config_paths)
        if others:
            self._check_script_flags(others)
        axis_paths = [p for axis in self.axes for p in axis.paths]
        twice = sorted({p for p in axis_paths if axis_paths.count(p) > 1} | ({SEED} & set(axis_paths)))
        if twice:
            raise InputError(f"sweep: {twice} set by more than one axis (the seed is --seeds, not an axis)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"sweep: seeds must be distinct and at least one, got {list(self.seeds)}")
        named = {m for flags in (self.base, *self.variants.values()) for f in flags for m in _SHARED.findall(f)}
        if named - set(self.shared):
            raise InputError(f"sweep: flags name shared run(s) {sorted(named - set(self.shared))}; the shared runs are "
                             f"{sorted(self.shared) or 'none'}")
        for experiment, flags in self.shared.values():
            Sweep(experiment, flags).validate()
        if self.baseline is not None and self.baseline_values() is None:
            raise InputError(f"sweep: --baseline={self.baseline} is neither a variant ({', '.join(self.variants)}) "
                             f"nor path=value of an axis ({', '.join(self.axis_paths())})")

    def _given_flags(self) -> tuple[list[str], list[str]]:
        """The `--config.*` paths and the other flag names of the base and the variants."""
        config_paths, others = [], []
        for flags in (self.base, *self.variants.values()):
            for flag in flags:
                name = flag.lstrip("-").split("=", 1)[0]
                if "--" + name in _FLAGS_OF_THE_SWEEP:
                    raise InputError(f"sweep: {flag} is each point's own (DIR/points/<name>); drop it from the flags")
                if name.removeprefix("no").startswith(CONFIG_PREFIX):
                    config_paths.append(name.removeprefix("no").removeprefix(CONFIG_PREFIX))
                else:
                    others.append(name)
        return config_paths, others

    def _check_fields(self, paths: Sequence[str]) -> None:
        fields = override_fields(self.spec.config_class)
        unknown = sorted({p for p in paths if CONFIG_PREFIX + p not in fields})
        if unknown:
            parts = {u.rsplit(".", 1)[0] + "." if "." in u else "" for u in unknown}
            part = parts.pop() if len(parts) == 1 else ""
            valid = valid_fields(self.spec.config_class, part) or valid_fields(self.spec.config_class)
            raise InputError(f"sweep: experiment {self.experiment!r} has no field(s) {unknown}. Valid fields: "
                             f"{', '.join(valid)}")

    def _check_script_flags(self, names: Sequence[str]) -> None:
        known = self.spec.flag_names()
        unknown = sorted({n for n in names if n not in known and n.removeprefix("no") not in known})
        if unknown:
            listed = sorted(n for n in _script_flags(known) if not n.startswith(CONFIG_PREFIX)
                            and "--" + n not in _FLAGS_OF_THE_SWEEP)
            raise InputError(f"sweep: experiments/{self.spec.script} has no flag(s) {unknown}; its flags besides "
                             f"--config.*: {', '.join(listed)}")

    def baseline_values(self) -> dict[str, str] | None:
        """The baseline as values a configuration must have (None when it names nothing)."""
        if self.baseline is None:
            return None
        if self.baseline in self.variants:
            return {VARIANT: self.baseline}
        path, _, value = self.baseline.partition("=")
        path = path.removeprefix(CONFIG_PREFIX)
        for axis in self.axes:
            if path in axis.paths and any(v[axis.paths.index(path)] == value for v in axis.values):
                return {path: value}
        return None

    def points(self) -> list[Point]:
        """Every point, in the product's order (variants, axes, then seeds)."""
        variants = list(self.variants.items()) or [(None, ())]
        points = []
        for (variant, variant_flags), *settings, seed in itertools.product(
                variants, *(axis.values for axis in self.axes), self.seeds):
            values: dict[str, str] = {} if variant is None else {VARIANT: variant}
            flags = list(self.base) + list(variant_flags)
            for axis, setting in zip(self.axes, settings):
                for path, value in zip(axis.paths, setting):
                    values[path] = value
                    flags.append(f"--{CONFIG_PREFIX}{path}={value}")
            values[SEED] = str(seed)
            flags.append(f"--{CONFIG_PREFIX}seed={seed}")
            points.append(Point(_point_name(values), values, tuple(_SHARED.sub(
                lambda m, seed=seed: shared_dir(m[1], seed), flag) for flag in flags)))
        return points

    def shared_points(self) -> list[tuple[str, Point]]:
        """(experiment, point) of every shared run: each, for each seed, in `DIR/shared/`."""
        return [(experiment, Point(f"{name},{SEED}={seed}", {SEED: str(seed)},
                                   (*flags, f"--{CONFIG_PREFIX}seed={seed}")))
                for name, (experiment, flags) in self.shared.items() for seed in self.seeds]

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "base": list(self.base),
                "axes": [{p: [v[i] for v in axis.values] for i, p in enumerate(axis.paths)} for axis in self.axes],
                "variants": {k: list(v) for k, v in self.variants.items()}, "seeds": list(self.seeds),
                "baseline": self.baseline, "claims": [c.to_json() for c in self.claims],
                "shared": {name: {"experiment": e, "flags": list(f)} for name, (e, f) in self.shared.items()},
                "metrics": list(self.metrics)}

    @classmethod
    def from_json(cls, tree: Mapping[str, Any]) -> Sweep:
        known = {"experiment", "base", "axes", "variants", "seeds", "baseline", "claims", "shared", "metrics"}
        unknown = sorted(set(tree) - known)
        if unknown or "experiment" not in tree:
            raise InputError(f"sweep file: unknown key(s) {unknown} or no 'experiment'; the keys are {sorted(known)}")
        return cls(tree["experiment"], tuple(tree.get("base", ())), tuple(Axis.of(a) for a in tree.get("axes", ())),
                   {k: tuple(v) for k, v in tree.get("variants", {}).items()}, tuple(map(int, tree.get("seeds", (0,)))),
                   tree.get("baseline"), tuple(Claim.from_json(c) for c in tree.get("claims", ())),
                   {name: (run["experiment"], tuple(run.get("flags", ()))) for name, run in tree.get("shared", {}).items()},
                   tuple(tree.get("metrics", ())))


def shared_dir(name: str, seed: int) -> str:
    """A shared run's folder as a flag names it (`{sweep}` filled in when the command runs)."""
    return f"{SWEEP_DIR}/{SHARED_DIR}/{name},{SEED}={seed}"


def _script_flags(known: frozenset[str]) -> set[str]:
    """The flags a researcher gives a script (not absl's, logging's or grain's own)."""
    library = ("help", "only_check", "pdb", "profil", "run_with", "use_cprofile", "log", "alsolog", "showprefix",
               "stderr", "verbosity", "grain_", "array_record", "experimental_", "jax_", "xla_", "tt_")
    return {n for n in known if not n.startswith(library)}


def _point_name(values: Mapping[str, str]) -> str:
    """`model.top_k=2,seed=0`: readable, one folder name (no `/` or spaces), a hash past `_MAX_NAME`."""
    name = ",".join(f"{k}={re.sub(r'[^A-Za-z0-9_.+=-]', '_', v)}" for k, v in values.items())
    if len(name) > _MAX_NAME:
        name = name[:_MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """`name:--flag=v --flag=w` (the command line's `--variant`; `name:` alone is the base)."""
    name, sep, flags = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise InputError(f"--variant={text}: write it name:--config.a=1 --config.b=2 (a name of letters, digits, "
                         "_.+-)")
    return name, tuple(flags.split())


def load_sweep(path: str) -> Sweep:
    """A sweep file: JSON, or Python whose `sweep()` or `SWEEP` is the `Sweep` (the researcher's own
    file, run as code like any experiment script)."""
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_sweep_file", path)
        if spec is None or spec.loader is None:
            raise InputError(f"--sweep={path}: cannot load it as Python")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sweep = module.sweep() if hasattr(module, "sweep") else getattr(module, "SWEEP", None)
        if not isinstance(sweep, Sweep):
            raise InputError(f"--sweep={path}: define sweep() returning a moe_jax.sweep.spec.Sweep (or SWEEP = Sweep(...))")
        return sweep
    try:
        with open(path, encoding="utf-8") as f:
            return Sweep.from_json(json.load(f))
    except json.JSONDecodeError as e:
        raise InputError(f"--sweep={path}: not JSON ({e}); a sweep file is JSON or Python (.py)") from None
