"""A sweep as YAML: a base run config and a search space over its keys, checked before anything runs.

    name: lr-attention                 # default: the file's stem
    base:
      config: configs/tiny.yaml        # a preset from configs/ (optional)
      overrides: {train.steps: 200}    # dotted keys, as on the command line
    search:                            # dotted config key -> one distribution
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.attention: {choice: [gqa, mla]}
      optim.schedule: {grid: [cosine, wsd]}
      optim.weight_decay: {uniform: [0.0, 0.2]}
      model.n_layers: {randint: [2, 5]}     # Tune's randint: upper bound excluded
    searcher: random                   # random | grid | optuna
    num_samples: 6
    scheduler: {kind: asha, grace_period: 50, reduction_factor: 2}
    metric: val_loss
    mode: min
    resources: {num_workers: 1, cpus_per_worker: 0.99}

Every search key must exist in the config tree, and every value a distribution can produce at its
ends (each choice, both bounds) must be a valid value of that key: both are checked by building
the config with it, so the error names the key and the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from generalmodel.config import Config, ConfigError, Section, flatten, load_config, read_mapping, read_preset

# What each evaluation reports to Ray (see generalmodel.train.ray_trainer): what a sweep can rank on.
TUNE_METRICS = ("val_loss", "loss")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# Sections a trial may vary. The dataset is prepared once per sweep; where runs go and how they
# reach Ray and MLflow is the sweep's business, not a trial's.
SEARCHABLE_SECTIONS = ("model", "optim", "train", "mixture")
# Set per trial by the sweep; searching them would break checkpoints, resume or naming.
RESERVED_KEYS = ("train.run_name", "train.checkpoint_dir", "train.resume", "train.metrics_log", "train.dataset")


class SweepError(ConfigError):
    """A bad sweep file or sweep option."""


class Base(Section):
    config: str | None = Field(None, description="A run preset (configs/*.yaml) the trials start from.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted config keys over the preset.")


class Scheduler(Section):
    kind: Literal["asha", "fifo"] = Field("asha", description="asha: stop bad trials early; fifo: run all to the end.")
    grace_period: int = Field(50, gt=0, description="ASHA: steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung.")
    max_t: int | None = Field(None, gt=0, description="ASHA: the last rung, in steps (default: train.steps).")


class Resources(Section):
    """One trial: a Ray Train run of num_workers workers, plus its Tune driver."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="Leave slack on small clusters (0.9 of 1 CPU): a trial stopped by ASHA holds its "
        "resources while it shuts down, and a new trial's driver may take the rest first.",
    )
    use_gpu: bool = False
    driver_cpus: float = Field(
        0.01,
        ge=0,
        description="CPUs the trial's driver reserves: it only waits on its Ray Train run "
        "(a whole CPU would starve the workers on a small machine).",
    )


class Sweep(Section):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Names the sweep, its storage and its MLflow parent run.",
    )
    base: Base = Base()
    search: dict[str, Any] = Field(..., description="Dotted config key -> {kind: args}.")
    searcher: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(1, gt=0, description="Trials (random/optuna), or repeats of the whole grid (grid).")
    max_concurrent_trials: int | None = Field(None, gt=0)
    scheduler: Scheduler = Scheduler()
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    resources: Resources = Resources()
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue an interrupted sweep of this name (Tuner.restore); never: refuse to."
    )
    seed: int | None = Field(None, description="Seeds the searcher's sampling.")

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        if v not in TUNE_METRICS and not v.startswith("val_loss_"):
            raise ValueError(
                f"{v!r} is never reported by a trial; trials report {', '.join(TUNE_METRICS)} at each evaluation "
                "(and val_loss_NAME for each dataset NAME of a mixture)"
            )
        return v

    @field_validator("search")
    @classmethod
    def _distributions(cls, search: dict[str, Any]) -> dict[str, Any]:
        if not search:
            raise ValueError("is empty: give at least one key to search over")
        for key, dist in search.items():
            check_distribution(key, dist)
        return search

    @model_validator(mode="after")
    def _searcher_fits(self) -> Sweep:
        kinds = {key: next(iter(d)) for key, d in self.search.items()}
        if self.searcher == "grid":
            continuous = [k for k, kind in kinds.items() if kind not in ("choice", "grid")]
            if continuous:
                raise ValueError(
                    f"searcher 'grid' enumerates lists only; search.{continuous[0]} is "
                    f"{kinds[continuous[0]]} (use choice/grid, or searcher: random)"
                )
        if self.searcher == "optuna":
            grids = [k for k, kind in kinds.items() if kind == "grid"]
            if grids:
                raise ValueError(f"searcher 'optuna' samples; search.{grids[0]} is a grid (use choice)")
        return self


def check_distribution(key: str, dist: Any) -> None:
    where = f"search.{key}"
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ValueError(f"{where} must be one {{kind: args}} with kind one of {', '.join(KINDS)}; got {dist!r}")
    ((kind, args),) = dist.items()
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; kinds: {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return
    if not (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    ):
        raise ValueError(f"{where}: {kind} needs [lower, upper] numbers, got {args!r}")
    low, high = args
    if low >= high:
        raise ValueError(f"{where}: {kind} lower bound {low} must be below the upper bound {high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs a positive lower bound, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where}: randint needs integer bounds, got {args!r}")


def end_values(dist: dict[str, Any]) -> list[Any]:
    """The values a distribution can produce that are worth validating: every choice, or both
    ends of a range (randint's upper bound is excluded)."""
    ((kind, args),) = dist.items()
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def load_sweep(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> tuple[Sweep, Config]:
    """The sweep at `path` and its base config. `overrides` are dotted keys: those under a config
    section (train.steps, tracking.uri, ...) go over the base config, the rest over the sweep."""
    path = Path(path)
    known = sorted(str(p) for p in Path("sweeps").glob("*.yaml")) if Path("sweeps").is_dir() else []
    tree = read_mapping(path, "sweep file", SweepError, f"; sweeps: {', '.join(known)}" if known else "")
    tree.setdefault("name", path.stem)
    base_overrides: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key.split(".")[0] in Config.model_fields:
            base_overrides[key] = value
        elif key.startswith("search."):  # search keys are dotted config keys themselves
            tree.setdefault("search", {})[key[len("search.") :]] = value
        else:
            _set(tree, key, value)
    try:
        sweep = Sweep.model_validate(tree)
    except ValidationError as e:
        raise SweepError(_explain(e, path)) from None
    # The trials get the base as dotted keys, not a path: a trial's working directory (and node)
    # is not the driver's.
    try:
        preset = flatten(read_preset(Path(sweep.base.config))) if sweep.base.config else {}
    except ConfigError as e:
        raise SweepError(f"sweep {str(path)!r}, base config: {e}") from None
    sweep.base.overrides = {**preset, **sweep.base.overrides, **base_overrides}
    return sweep, check_against_config(sweep, path)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise SweepError(f"sweep option {dotted!r}: {part!r} is a value, not a section")
    tree[leaf] = value


def _explain(error: ValidationError, path: Path) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option; options: " + ", ".join(Sweep.model_fields)
        lines.append(f"{key}: {msg}" if key else msg)
    return f"invalid sweep {str(path)!r}:\n  " + "\n  ".join(lines)


def check_against_config(sweep: Sweep, path: Path) -> Config:
    """The base config, after checking that every search key is a searchable key of it and that
    every end value of its distribution is valid there."""

    def build(extra: dict[str, Any]) -> Config:
        return load_config(None, {**sweep.base.overrides, **extra})

    try:
        base = build({})
    except ConfigError as e:
        raise SweepError(f"sweep {str(path)!r}, base config: {e}") from None
    if sweep.metric.startswith("val_loss_") and sweep.metric[len("val_loss_") :] not in base.mixture.datasets:
        raise SweepError(
            f"sweep {str(path)!r}: metric {sweep.metric!r} is never reported: val_loss_NAME is a mixture's, and "
            f"mixture.datasets names {', '.join(base.mixture.datasets) or 'no dataset'}"
        )
    for key, dist in sweep.search.items():
        section = key.split(".")[0]
        if key in RESERVED_KEYS or (section in Config.model_fields and section not in SEARCHABLE_SECTIONS):
            raise SweepError(
                f"sweep {str(path)!r}: search.{key} cannot be searched (the sweep sets it, or it is not "
                f"per trial); searchable sections: {', '.join(SEARCHABLE_SECTIONS)}"
            )
        if key == "model.preset":
            fixed = sorted(
                k for k in sweep.base.overrides if k.startswith("model.") and k not in ("model.preset", "model.name")
            )
            if fixed:
                raise SweepError(
                    f"sweep {str(path)!r}: search.model.preset would be overridden by the base config's "
                    f"{', '.join(fixed)}; leave the model section out of the base when searching presets"
                )
        for value in end_values(dist):
            try:
                build({key: value})
            except ConfigError as e:
                raise SweepError(f"sweep {str(path)!r}: search.{key} = {value!r} is not a valid value: {e}") from None
    if sweep.scheduler.kind == "asha":
        max_t = sweep.scheduler.max_t or base.train.steps
        if sweep.scheduler.grace_period >= max_t:
            raise SweepError(
                f"sweep {str(path)!r}: scheduler.grace_period {sweep.scheduler.grace_period} must be below "
                f"max_t {max_t} (train.steps unless scheduler.max_t), else ASHA never stops a trial"
            )
    return base


def trial_config(sweep: Sweep, params: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The config one trial runs: the base, its sampled params, then the keys the sweep sets."""
    return load_config(None, {**sweep.base.overrides, **params, **overrides})
