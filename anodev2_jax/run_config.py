"""Run configuration: every field of a config with its check, and which fields a restart may change.

The fields are those of ``configs/default.py``; :func:`validate_config` checks them all
(no unknown, none missing, types and ranges) before anything runs. Imports neither optax
nor orbax, so :mod:`anodev2_jax.reproduce` reads these names cheaply.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from anodev2_jax.data import AUGMENTATIONS, DATASETS
from anodev2_jax.errors import ConfigError
from anodev2_jax.methods import DEFAULT_REMAT_BUDGET_MB, METHODS, MODELS, resolve_config

__all__ = [
    "NONFINITE_MODES",
    "COMPUTE_DTYPES",
    "KNOB_FIELDS",
    "RESUMABLE_FIELDS",
    "ADDED_FIELDS",
    "CHANGED_DEFAULTS",
    "FIELD_CHECKS",
    "config_dict",
    "json_default",
    "validate_config",
    "knobs",
    "legacy_defaults",
    "resolved_knobs",
    "fixed_fields",
    "default_workdir",
    "resolve_workdir",
    "MAX_ODE_STEPS",
    "MAX_SEED",
]

NONFINITE_MODES = ("stop", "skip")  # config.nonfinite: what a NaN / Inf loss or gradient does
# config.dtype: float32 (the default) and bfloat16 are the model knob compute_dtype (params
# stay float32); float64 is the whole model in float64 (params, activations, BatchNorm, the
# evolution), for reference runs and the exactness tests (needs JAX_ENABLE_X64=1)
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")

# Every Euler step of an ODE block is unrolled into the compiled program (DESIGN.md: a
# convolution inside a loop trains ~19x slower on XLA:CPU), so compile time grows with
# steps_z and steps_w, faster than linearly beyond a few dozen steps. The train step of
# ResNet-4, configuration 1, steps_w = steps_z, compiled at XLA's default level on a 2-core
# x86 CPU (benchmarks/compile_time.py; CPU seconds, the wall clock of a loaded machine was
# 2-4x more): 8 s at steps_z=5, 21 s at 20, 41 s at 50, 130 s at 100; 1000 compiled for over
# 10 minutes (issue 22) and a fit of these points puts it at hours. So the range stops at
# 100, where one ODE block compiles in about two minutes (models with several blocks take
# a multiple); the run's header warns beyond 64.
MAX_ODE_STEPS = 100
# Seeds become int32 on the device (the PRNG keys, the per-seed data order): seed + num_seeds - 1 must fit.
MAX_SEED = 2**31 - 1

# The config fields that are ODE knobs of the model (anodev2_jax.methods.KNOBS but bn_momentum, dtype).
KNOB_FIELDS = (
    "steps_z", "steps_w", "schedule", "solver", "remat", "adjoint", "coeff_granularity", "nonlinearity", "norm",
    "evolution", "time_kernel", "rda_parameterization",
)  # fmt: skip

# Fields a restart may change: num_epochs, to extend a run (the learning-rate boundaries are
# absolute epochs, so extending does not move them); where the data is (data_dir); how often
# to log, evaluate and checkpoint; multi-host start-up; what a non-finite step does; how
# many steps one jitted call runs (each step gets the same batch, key and learning rate;
# the numbers agree to round-off). Every
# other field must match the run directory's config.json (ODE knobs compared after
# resolving None to the method's default).
RESUMABLE_FIELDS = (
    "num_epochs",
    "data_dir",
    "eval_every_epochs",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "distributed",
    "nonfinite",
    "steps_per_call",
    # remat_budget_mb picks remat="auto"'s schedules: memory and time, not values (the
    # schedules agree to round-off, not bitwise), so a run may move to a smaller device.
    "remat_budget_mb",
)

# Fields added to the config after runs were written without them, with the value such runs
# had implicitly: a config.json that lacks the field matches a config with that value.
ADDED_FIELDS: dict[str, Any] = {
    "dtype": "float32",
    "steps_per_call": 1,
    # runs before remat="auto" had no budget (see CHANGED_DEFAULTS); resumable anyway
    "remat_budget_mb": DEFAULT_REMAT_BUDGET_MB,
    # runs before q and K were knobs: RDA (B.4) with the Dirac kernel, every parameter at
    # the schedule's learning rate; the RDA parameterization is in CHANGED_DEFAULTS
    "evolution": None,
    "time_kernel": None,
    "rda_parameterization": None,
    "evolution_lr_scale": 1.0,
    # runs before the knob trained with CIFAR's random crop and horizontal flip
    "augment": "crop_flip",
}

# Method defaults that changed after runs were written with the old ones, each keyed by the
# field added with the change. A config.json without that field was written when a knob
# left None meant the old default, so for that run directory None keeps meaning it: on both
# sides of the resume check and in the model the resumed run builds (legacy_defaults), so
# it resumes bitwise as the old code would have, and its config.json keeps lacking the field.
CHANGED_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # before remat="auto" the ODE methods checkpointed every block
    "remat_budget_mb": {m: {"remat": "block"} for m in ("anode", "anodev2_conf1", "anodev2_conf2")},
    # before the knob the RDA diffusion was d = softplus(rda_d_raw) (methods.RDA_PARAMETERIZATIONS)
    "rda_parameterization": {m: {"rda_parameterization": "softplus"} for m in ("anodev2_conf1", "anodev2_conf2")},
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _choice(allowed):
    def check(v):
        return v in allowed, f"one of {', '.join(allowed)}"

    return check


def _int_at_least(lo, optional=False):
    def check(v):
        ok = (optional and v is None) or (_is_int(v) and v >= lo)
        return ok, f"an integer >= {lo}" + (" or None" if optional else "")

    return check


def _int_in(lo, hi, optional=False, why=""):
    def check(v):
        ok = (optional and v is None) or (_is_int(v) and lo <= v <= hi)
        return ok, f"an integer in [{lo}, {hi}]" + (" or None" if optional else "") + why

    return check


def _optional(kind: type, what: str):
    def check(v):
        return v is None or isinstance(v, kind) and not isinstance(v, bool), f"{what} or None"

    return check


def _real_in(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = _is_real(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        return ok, f"a number in {lb}{lo}, {hi}{rb}"

    return check


def _boundaries(v):
    ok = (
        isinstance(v, (tuple, list))
        and all(_is_int(b) and b >= 1 for b in v)
        and all(a < b for a, b in zip(v[:-1], v[1:]))
    )
    return ok, "a strictly increasing tuple of positive epochs, e.g. (150, 300)"


def _bool(v):
    return isinstance(v, bool), "True or False"


# Every field a config may have, with its check: (ok, "what it must be").
FIELD_CHECKS: dict[str, Callable[[Any], tuple[bool, str]]] = {
    "model": _choice(MODELS),
    "method": _choice(METHODS),
    "steps_z": _int_in(1, MAX_ODE_STEPS, optional=True, why=" (each step is unrolled: compile time grows with it)"),
    "steps_w": _int_in(1, MAX_ODE_STEPS, optional=True, why=" (each step is unrolled: compile time grows with it)"),
    "schedule": _optional(str, "a string"),
    "solver": _optional(str, "a string"),
    "remat": _optional(str, "a string"),
    "adjoint": _optional(str, "a string"),
    "coeff_granularity": _optional(str, "a string"),
    "nonlinearity": _optional(str, "a string"),
    "norm": _optional(str, "a string"),
    "evolution": _optional(str, "a string"),
    "time_kernel": _optional(str, "a string"),
    "rda_parameterization": _optional(str, "a string"),
    "dtype": _choice(COMPUTE_DTYPES),
    "dataset": _choice(DATASETS),
    "data_dir": _optional(str, "a path"),
    "num_train": _int_at_least(1, optional=True),
    "num_test": _int_at_least(1, optional=True),
    "data_seed": _int_at_least(0),
    "augment": _choice(AUGMENTATIONS),
    "num_epochs": _int_at_least(1),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1, optional=True),
    "learning_rate": _real_in(0, math.inf, lo_open=True, hi_open=True),
    "lr_boundaries_epochs": _boundaries,
    "lr_decay_factor": _real_in(0, 1, lo_open=True),
    "momentum": _real_in(0, 1, hi_open=True),
    "weight_decay": _real_in(0, math.inf, hi_open=True),
    "decay_rda_coeffs": _bool,
    "evolution_lr_scale": _real_in(0, math.inf, lo_open=True, hi_open=True),
    "seed": _int_in(0, MAX_SEED, why=" (seeds are int32 on the device)"),
    "num_seeds": _int_at_least(1),
    "eval_every_epochs": _int_at_least(1),
    "log_every_steps": _int_at_least(0),
    "checkpoint_every_epochs": _int_at_least(1),
    "keep_checkpoints": _int_at_least(1),
    "distributed": _bool,
    "nonfinite": _choice(NONFINITE_MODES),
    "steps_per_call": _int_at_least(0),
    # remat="auto" (the ODE methods' default): MiB per device and ODE block
    "remat_budget_mb": _real_in(0, math.inf, lo_open=True, hi_open=True),
}


def config_dict(config) -> dict[str, Any]:
    """A plain dict of the config's fields (tuples become lists, as in JSON)."""
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(d, default=json_default))


def json_default(o):
    """``json.dumps``'s ``default``: NumPy scalars as Python numbers, anything else a TypeError."""
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def validate_config(config) -> None:
    """Checks every field of ``config`` (no unknown, none missing, types and ranges).

    Raises:
      ConfigError: one line naming the field, the bad value and the fix.
    """
    try:
        keys = set(config.keys())
    except AttributeError:
        raise ConfigError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}") from None
    unknown = sorted(keys - set(FIELD_CHECKS))
    if unknown:
        guesses = [g for u in unknown for g in difflib.get_close_matches(u, FIELD_CHECKS, n=1)]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ConfigError(
            f"unknown config field(s) {', '.join(unknown)}{hint}; remove or rename them: the fields are those of "
            "configs/default.py"
        )
    missing = [k for k in FIELD_CHECKS if k not in keys]
    if missing:
        raise ConfigError(
            f"config field(s) {', '.join(missing)} missing; build the config on configs/default.py's get_config()"
        )
    for name, check in FIELD_CHECKS.items():
        value = config[name]
        ok, what = check(value)
        if not ok:
            raise ConfigError(f"config.{name}={value!r} is invalid: it must be {what}; fix --config.{name}")
    last_seed = config["seed"] + config["num_seeds"] - 1
    if last_seed > MAX_SEED:
        raise ConfigError(
            f"config.seed={config['seed']} with num_seeds={config['num_seeds']} runs seeds up to {last_seed}, "
            f"beyond int32 ({MAX_SEED}); lower --config.seed"
        )
    if config["dtype"] == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "config.dtype='float64' needs 64-bit JAX, which is off; set JAX_ENABLE_X64=1 in the environment "
            "(or use --config.dtype=float32)"
        )
    try:
        json.dumps(config_dict(config))
    except TypeError as e:
        raise ConfigError(f"config holds a value JSON cannot store ({e}); use plain numbers, strings and tuples") from None


def knobs(config) -> dict[str, Any]:
    """The model knobs of ``config``: its ODE knob fields (None: the method's default) and the dtypes.

    ``config.dtype`` ``"float32"`` / ``"bfloat16"`` is the model's ``compute_dtype`` knob (its
    params, BatchNorm statistics and evolution stay float32); ``"float64"`` makes the whole
    model float64 (``dtype="float64"``, computing in it).
    """
    dtype = config.get("dtype", "float32")
    dtypes = {"dtype": "float64", "compute_dtype": None} if dtype == "float64" else {"compute_dtype": dtype}
    return {**{k: config[k] for k in KNOB_FIELDS}, **dtypes}


def legacy_defaults(stored: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The old knob defaults a stored run (its config.json dict) ran with; ``{}`` for a run of today's fields."""
    old = {}
    for field, by_method in CHANGED_DEFAULTS.items():
        if stored is not None and field not in stored:
            old.update(by_method.get(stored.get("method"), {}))
    return old


def resolved_knobs(cfg: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ODE knobs of a config dict with None replaced by ``defaults`` (:func:`legacy_defaults`), else the method's."""
    knobs = {k: cfg.get(k) if cfg.get(k) is not None else (defaults or {}).get(k) for k in KNOB_FIELDS}
    try:
        resolved = resolve_config(cfg["method"], **knobs)
    except (ValueError, KeyError):
        return knobs
    return {k: getattr(resolved, k) for k in KNOB_FIELDS}


def fixed_fields(cfg: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The fields of a config dict a restart may not change (all but :data:`RESUMABLE_FIELDS`), knobs resolved.

    What each checkpoint records of its run (``checkpoints.CONFIG_KEY``): two configs a
    restart accepts as the same run (:func:`anodev2_jax.rundir.check_workdir`) give the same
    dict (an ODE knob left None and the method default it stands for are one value), and a
    run of other values (another learning rate) does not. As JSON data (lists, not tuples),
    as the checkpoint's metadata stores it. ``defaults``: :func:`legacy_defaults` of the run.

    Example: ``fixed_fields(config_dict(config))["learning_rate"]``.
    """
    knobs = resolved_knobs(cfg, defaults)
    fixed = {k: (knobs[k] if k in KNOB_FIELDS else v) for k, v in cfg.items() if k not in RESUMABLE_FIELDS}
    return json.loads(json.dumps(fixed, default=json_default))


def resolve_workdir(workdir: str | os.PathLike) -> Path:
    """``workdir`` as a Path, ``~`` expanded (as ``data_dir`` is); an empty one is a :class:`ConfigError`.

    ``Path("")`` would be the current directory: a run would write beside whatever is there.
    """
    text = os.fspath(workdir)
    if not text.strip():
        raise ConfigError(
            "--workdir is empty; pass a directory (e.g. --workdir=runs/r4), or leave --workdir out for a new "
            "one under runs/"
        )
    return Path(os.path.expanduser(text))


def default_workdir(config, now: Optional[datetime.datetime] = None) -> str:
    """A readable new run directory: ``runs/<model>-<method>-seed<N>-YYYYmmdd-HHMMSS``."""
    now = now or datetime.datetime.now()
    seeds = f"seed{config.seed}" if config.num_seeds == 1 else f"seeds{config.seed}-{config.seed + config.num_seeds - 1}"
    return os.path.join("runs", f"{config.model}-{config.method}-{seeds}-{now:%Y%m%d-%H%M%S}")
