"""The study's configuration: named experiments, each a grid of models x settings x seeds, and the
plan of unique training runs they need (an arm shared by two experiments is one run per seed).

A study file (see `configs/study.yaml`) holds:

    recipe:      TrainConfig keys shared by every run (not model, seed or output)
    seeds:       [0, 1, 2]
    quick:       overrides for --quick: TrainConfig keys, `seeds`, and `train_fraction_scale` (every
                 train_fraction, of the recipe and of the settings, is multiplied by it)
    experiments: name -> {claim, models, settings?, evaluations?, pairs?, plot?}

- `settings`: a list of mappings of TrainConfig keys, one arm per model and mapping (default
  [{}]); e.g. [{train_fraction: 0.1}, {train_fraction: 1.0}] or
  [{model_kwargs: {layer_kwargs: {variant: complex}}}].
- `evaluations`: run at the end of each run of the experiment and kept in its record:
  `resolution: {sizes: [36, 56]}` (zero-shot top-1 at other input sizes) and `kernel_rank: {}`
  (singular values of the learned 2-D kernels).
- `pairs`: the paired comparisons over seeds, [{a, b, expect, metric?}] with arm labels; `expect`
  is "better" (a above b by more than the paired spread) or "not_worse" (a not below b by more
  than the spread); `metric` is "final_acc1" (default), "acc1@SIZE" or "effective_rank".
- `plot`: "bars" (default), "train_fraction", "resolution" or "spectrum".
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, TrainConfig, _checked

__all__ = [
    "EVALUATIONS", "Arm", "Experiment", "PlannedRun", "StudyPlan", "describe_difference", "load_study", "run_hash",
    "setting_slug",
]  # fmt: skip

_TOP_KEYS = ("recipe", "seeds", "quick", "experiments")
_EXPERIMENT_KEYS = ("claim", "models", "settings", "evaluations", "pairs", "plot")
_RUN_KEYS = ("model", "seed", "output")  # set per run, never in a recipe or a setting
_NOT_HASHED = ("output", "workers")  # where a run is written and how its data is loaded
EVALUATIONS = ("resolution", "kernel_rank")
PLOTS = ("bars", "train_fraction", "resolution", "spectrum")
EXPECTS = ("better", "not_worse")
_METRIC = re.compile(r"^(final_acc1|best_acc1|effective_rank|acc1@\d+)$")


@dataclass(frozen=True)
class Arm:
    """One model under one setting: `label` names it in tables and pairs."""

    label: str
    model: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str
    arms: list[Arm]
    evaluations: dict[str, dict[str, Any]]
    pairs: list[dict[str, str]]
    plot: str


@dataclass
class PlannedRun:
    """A unique training run: its id (also its folder under DIR/runs), resolved config and users."""

    id: str
    config: TrainConfig
    hash: str
    uses: list[dict[str, Any]] = field(default_factory=list)  # [{experiment, arm, settings}]
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StudyPlan:
    source: str
    recipe: dict[str, Any]
    seeds: list[int]
    quick: bool
    experiments: list[Experiment]
    runs: dict[str, PlannedRun]  # in training order
    arm_runs: dict[tuple[str, str], dict[int, str]]  # (experiment, arm label) -> seed -> run id

    def experiment(self, name: str) -> Experiment:
        return next(e for e in self.experiments if e.name == name)


def run_hash(config: dict[str, Any]) -> str:
    """A short hash of a resolved run config, without the keys that do not change its result."""
    kept = {k: v for k, v in config.items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model_kwargs": {"layer_kwargs": {"n_ssm": 4}}} -> {"n_ssm": 4} (the leaf names)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix))
        else:
            out[prefix + key] = value
    return out


def setting_slug(values: dict[str, Any]) -> str:
    """A folder-safe label of a setting: "train_fraction=0.1,n_ssm=4"."""
    text = ",".join(f"{k}={v}" for k, v in sorted(_flat(values).items()))
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def _diff(resolved: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k not in _RUN_KEYS and v != recipe.get(k)}


def _scaled(fraction: float, scale: float) -> float:
    """fraction x scale to 6 significant digits, so that equal fractions stay equal runs."""
    return float(f"{fraction * scale:.6g}")


def _expect_keys(source: str, values: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping, got {values!r}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    return values


def _seeds(source: str, values: Any) -> list[int]:
    ok = isinstance(values, list) and values and all(isinstance(s, int) and not isinstance(s, bool) for s in values)
    if not ok or len(set(values)) != len(values):
        raise ConfigError(f"{source}: expected a non-empty list of distinct integer seeds, got {values!r}")
    return list(values)


def _recipe(source: str, values: Any) -> dict[str, Any]:
    values = _checked(values or {}, source)
    fixed = [k for k in _RUN_KEYS if k in values]
    if fixed:
        raise ConfigError(f"{source}: {', '.join(fixed)} are set per run by the study; remove them")
    return values


def _evaluations(source: str, values: Any) -> dict[str, dict[str, Any]]:
    values = _expect_keys(source, values or {}, EVALUATIONS)
    out = {}
    if "resolution" in values:
        opts = _expect_keys(f"{source}.resolution", values["resolution"], ("sizes",), ("sizes",))
        sizes = opts["sizes"]
        if not (isinstance(sizes, list) and sizes and all(isinstance(s, int) and s >= 1 for s in sizes)):
            raise ConfigError(f"{source}.resolution.sizes: expected a list of input sizes >= 1, got {sizes!r}")
        out["resolution"] = {"sizes": sorted(set(sizes))}
    if "kernel_rank" in values:
        _expect_keys(f"{source}.kernel_rank", values["kernel_rank"] or {}, ())
        out["kernel_rank"] = {}
    return out


def _experiment(name: str, values: Any, base: dict[str, Any], scale: float) -> Experiment:
    """`base`: the resolved recipe (every TrainConfig key), against which arms are labelled;
    `scale` multiplies the settings' train_fraction (--quick)."""
    src = f"experiments.{name}"
    values = _expect_keys(src, values, _EXPERIMENT_KEYS, ("claim", "models"))
    models = values["models"]
    if not (isinstance(models, list) and models and all(isinstance(m, str) and m for m in models)):
        raise ConfigError(f"{src}.models: expected a non-empty list of model names, got {models!r}")
    settings = values.get("settings", [{}])
    if not (isinstance(settings, list) and settings):
        raise ConfigError(f"{src}.settings: expected a non-empty list of mappings of config keys, got {settings!r}")
    arms = []
    for i, setting in enumerate(settings):
        setting = _recipe(f"{src}.settings[{i}]", setting)
        slug = setting_slug(_diff({**base, **setting}, base)) or setting_slug(setting)
        if "train_fraction" in setting:
            setting["train_fraction"] = _scaled(setting["train_fraction"], scale)
        for model in models:
            arms.append(Arm(f"{model} [{slug}]" if slug else model, model, setting))
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{src}: the same model and setting appear twice ({labels})")
    pairs = []
    for i, pair in enumerate(values.get("pairs") or []):
        psrc = f"{src}.pairs[{i}]"
        pair = dict(_expect_keys(psrc, pair, ("a", "b", "expect", "metric"), ("a", "b", "expect")))
        for key in ("a", "b"):
            if pair[key] not in labels:
                raise ConfigError(f"{psrc}.{key}: expected one of the arms {labels}, got {pair[key]!r}")
        if pair["expect"] not in EXPECTS:
            raise ConfigError(f"{psrc}.expect: expected one of {', '.join(EXPECTS)}, got {pair['expect']!r}")
        pair.setdefault("metric", "final_acc1")
        if not _METRIC.match(str(pair["metric"])):
            raise ConfigError(
                f"{psrc}.metric: expected final_acc1, best_acc1, effective_rank or acc1@SIZE, got {pair['metric']!r}"
            )
        pairs.append(pair)
    plot = values.get("plot", "bars")
    if plot not in PLOTS:
        raise ConfigError(f"{src}.plot: expected one of {', '.join(PLOTS)}, got {plot!r}")
    claim = values["claim"]
    if not isinstance(claim, str) or not claim.strip():
        raise ConfigError(f"{src}.claim: expected the claim under test as text, got {claim!r}")
    evaluations = _evaluations(f"{src}.evaluations", values.get("evaluations"))
    return Experiment(name, " ".join(claim.split()), arms, evaluations, pairs, plot)


def load_study(path: str | Path, quick: bool = False) -> StudyPlan:
    """Read and check a study file; with `quick`, apply its `quick` overrides (recipe keys and seeds)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: expected a study YAML file at {path}, found none")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from err
    raw = _expect_keys(str(path), raw, _TOP_KEYS, ("recipe", "seeds", "experiments"))
    recipe = _recipe(f"{path}: recipe", raw["recipe"])
    seeds = _seeds(f"{path}: seeds", raw["seeds"])
    scale = 1.0
    if quick:
        overrides = dict(raw.get("quick") or {})
        if "seeds" in overrides:
            seeds = _seeds(f"{path}: quick.seeds", overrides.pop("seeds"))
        if "train_fraction_scale" in overrides:
            scale = overrides.pop("train_fraction_scale")
            if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale <= 1):
                raise ConfigError(f"{path}: quick.train_fraction_scale: expected a number in (0, 1], got {scale!r}")
        recipe = {**recipe, **_recipe(f"{path}: quick", overrides)}
    labels_base = TrainConfig(**recipe).to_dict()  # arms keep their labels under --quick's scale
    if scale != 1.0:
        recipe["train_fraction"] = _scaled(recipe.get("train_fraction", 1.0), scale)
    base = TrainConfig(**recipe).to_dict()  # also checks ranges that relate two keys
    experiments_raw = raw["experiments"]
    if not isinstance(experiments_raw, dict) or not experiments_raw:
        raise ConfigError(f"{path}: experiments: expected a mapping of experiment names, got {experiments_raw!r}")
    experiments = [_experiment(str(name), values, labels_base, scale) for name, values in experiments_raw.items()]

    runs: dict[str, PlannedRun] = {}
    arm_runs: dict[tuple[str, str], dict[int, str]] = {}
    for exp in experiments:
        for seed in seeds:  # seed-major: every arm gets its first seed before any gets a second
            for arm in exp.arms:
                cfg = TrainConfig.from_dict({**recipe, **arm.settings, "model": arm.model, "seed": seed}, exp.name)
                resolved = cfg.to_dict()
                slug = setting_slug(_diff(resolved, base))
                run_id = f"{arm.model}/{slug}/seed{seed}" if slug else f"{arm.model}/seed{seed}"
                run = runs.setdefault(run_id, PlannedRun(run_id, cfg, run_hash(resolved)))
                run.uses.append({"experiment": exp.name, "arm": arm.label, "settings": arm.settings})
                run.evaluations.update(exp.evaluations)
                arm_runs.setdefault((exp.name, arm.label), {})[seed] = run_id
    return StudyPlan(str(path), recipe, seeds, quick, experiments, runs, arm_runs)


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """"epochs: 5 -> 6, lr: ..." between two resolved configs (hashed keys only)."""
    keys = sorted((set(old) | set(new)) - set(_NOT_HASHED))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))

