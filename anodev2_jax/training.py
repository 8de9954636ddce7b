"""Training: train state, jitted train / eval steps, sharding, seeds, checkpoints, train_and_evaluate.

``train_and_evaluate(config, workdir)`` trains ``config.num_seeds`` replicas of
``get_model(config.model, config.method, **ODE knobs)`` and returns the summary it writes
to ``workdir/summary.json``. ``train.py`` is a thin command-line wrapper around it.

Recipe (Appendix C of the paper): SGD with momentum 0.9, weight decay 5e-4, learning
rate 0.1 divided by ``lr_decay_factor`` (10) at ``lr_boundaries_epochs`` (150 and 300 of
350 for the ResNets, 40, 80 and 100 of 120 for AlexNet), batch 256, cross-entropy loss,
standard CIFAR augmentation (random crop with 4 pixels of zero padding, horizontal flip)
and per-channel normalization, both on the device inside the jitted step
(:func:`anodev2_jax.data.preprocess_train`).

Decisions (where the paper and DESIGN.md are silent):

* **Weight decay** is PyTorch-style coupled L2 (``optax.add_decayed_weights`` before the
  momentum trace, exactly ``torch.optim.SGD(weight_decay=5e-4)``) on every parameter,
  BatchNorm scale/shift included, **except the RDA coefficients** (params named
  ``rda_*``), masked out with an optax mask: decaying ``rda_d_raw`` towards 0 would push
  ``d = softplus(d_raw)`` towards ``log 2``, a bias towards strong diffusion, not towards
  "no evolution". ``config.decay_rda_coeffs=True`` decays them too.
* **float32.** Params are created float32 by the model; images are normalized to float32
  on the device; the loss and metrics are float32 (explicit casts, so training runs
  unchanged with ``jax_enable_x64`` and strict dtype promotion). The learning-rate
  schedule is written here (not ``optax.piecewise_constant_schedule``) so it returns
  float32 under x64 too.
* **Train state** is a plain pytree (:class:`TrainState`: ``step``, ``params``,
  ``batch_stats``, ``opt_state``) whose every leaf has a leading **seed axis** of length
  ``num_seeds``. Replica ``i`` uses seed ``config.seed + i``: its init key, its
  augmentation keys and its data order all derive from that seed alone, so replica ``i``
  of a vmapped run equals a single run with that seed. ``num_seeds > 1`` maps the
  per-replica step with ``jax.vmap`` (one compiled program); ``num_seeds == 1`` indexes the
  axis away inside the jitted step instead, so single runs compile the plain model.
* **Randomness.** Per replica: ``root = key(seed)``; init key ``fold_in(root, 0)``;
  augmentation key of global step ``t``: ``fold_in(fold_in(root, 1), t)``, computed inside
  the step from the state's step counter; data order of epoch ``e`` (0-based):
  ``numpy.random.default_rng([seed, e])``. Nothing random lives outside (seed, epoch,
  step), which is what makes resuming exact. The last partial training batch of an epoch
  is dropped (one compiled shape).
* **Data parallelism** with ``jax.sharding``: a 1-D ``Mesh`` over all devices with axis
  ``"data"``; training batches ``(num_seeds, batch, ...)`` are sharded along the batch
  axis, the state is replicated, and one ``jax.jit`` step (state donated) lets XLA insert
  the gradient all-reduce. BatchNorm statistics are therefore global over the whole
  batch, as on one device. Batches are assembled with ``jax.make_array_from_callback``
  from the global batch every process computes identically (each process's devices
  receive only their rows), so the same code runs on several processes or hosts:
  ``config.distributed=True`` calls ``jax.distributed.initialize()`` first, configured by
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where set and
  auto-detected on a cluster otherwise; only process 0 writes the run directory's files
  (orbax coordinates the checkpoints); tested with two CPU processes
  (``tests/test_distributed.py``). ``batch_size`` (and ``eval_batch_size``) must divide by
  the global device count.
* **Evaluation** runs on the whole test split with the running BatchNorm statistics
  (``train=False``), in batches of ``eval_batch_size`` whose padded last batch is masked.
  It runs every ``eval_every_epochs`` epochs and always after the last one.
* **Checkpoints** (orbax ``CheckpointManager`` in ``workdir/checkpoints``): the whole
  train state (params, batch_stats, optimizer state with its step count, global step)
  plus the training loop's per-seed accumulators (``"loop"``: the running sums of the
  current epoch's and logging window's loss and accuracy, and the skipped-step counts),
  numbered by **global optimizer step** (``checkpoints/<step>``; after epoch ``e`` that is
  ``e * steps_per_epoch``), every ``checkpoint_every_epochs`` epochs, after the last
  epoch, and when a stop signal arrives mid-epoch; the last ``keep_checkpoints`` are
  kept. A run restarted in the same workdir resumes from the latest one: mid-epoch, it
  replays the same epoch order from the next batch on with the stored sums, so metrics
  and state end as in an uninterrupted run. A checkpoint at step ``s`` means every
  metrics record up to ``s`` was written (an epoch's record before its end-of-epoch
  checkpoint). Orbax writes each checkpoint into a temporary directory and renames it
  into place only once complete (on a local file system; a ``commit_success`` marker on
  object stores), and ``latest_step()`` never lists such temporaries, so a checkpoint
  cut off mid-write is never loaded (leftovers are deleted at start,
  ``cleanup_tmp_directories``). We rely on that rather than writing our own marker. The
  latest checkpoint is restored *before* anything is written: one that cannot be read
  (corrupt, or another model's) is a :class:`ConfigError` that names it, and the
  workdir is left as it was.
* **Stop signals** (SIGTERM from a scheduler's preemption, SIGINT from Ctrl-C): during
  the training loop a handler only records the signal; the loop finishes the current
  step, saves a checkpoint at that step (and waits for it), restores the previous
  handlers and raises :class:`Preempted` naming the signal, step and checkpoint.
  ``train.py`` prints that line and exits with ``128 + signum`` (143 for SIGTERM, 130 for
  SIGINT); rerunning the same command resumes. A second signal aborts at once
  (``KeyboardInterrupt``, nothing saved; the previous checkpoint stays valid). A signal
  arriving during the last epoch's evaluation lets the run finish; one arriving before the
  loop (while loading data or compiling the init) ends the process as usual, and the
  restart resumes from the last checkpoint. With several
  processes (``config.distributed``) no Python handler is installed: SIGTERM is agreed on
  through JAX's preemption sync point (``multihost_utils.reached_preemption_sync_point``),
  so all processes save at the same step.
* **Non-finite values.** The jitted step computes one flag per replica: loss, gradients
  and the updated params and BatchNorm statistics all finite. A non-finite step never
  changes a float leaf of the state (params, BatchNorm statistics, momentum: a
  ``jnp.where`` on the flag); integer counters (global step, optax's schedule count)
  advance, so the learning-rate schedule and data order stay on the global step. Its
  loss and accuracy are reported as 0 and left out of the means. The host reads the
  flags only where it syncs anyway: at each ``log_every_steps`` record, at the end of
  each epoch and before every checkpoint, so no state is saved before its flags are
  checked. ``config.nonfinite="stop"`` (default) then raises :class:`NonFiniteError`
  naming the first bad step and the last good checkpoint, which is left intact (nothing
  newer is written, metrics included); ``"skip"`` counts the skipped steps per seed
  (``nonfinite_skipped`` in the epoch records and ``summary.json``) and goes on.
* **Write failures** (a full disk, a quota, permissions changed mid-run) raise
  :class:`WriteError` naming the file and the OS error; a failed checkpoint write leaves
  the earlier checkpoints untouched (its temporary directory is removed at the next
  start). A workdir that is not writable is a :class:`ConfigError` before anything runs.
* **Determinism.** On CPU, training is bitwise deterministic for a fixed config and
  seed: every random choice derives from (seed, epoch, step), XLA:CPU runs the same
  program in the same order, and so a run killed (even with SIGKILL) and resumed any
  number of times ends with exactly the params, optimizer state and metrics (timings
  aside) of an uninterrupted one (``tests/test_reliability.py``). It needs the same
  jax/jaxlib version, XLA flags and device count (the gradient all-reduce sums in
  device order). On GPU this does **not** hold by default: XLA:GPU reductions and
  scatters may use atomics (the order of float additions varies run to run) and cuDNN /
  cuBLAS autotuning may choose different algorithms, so runs differ by round-off that
  training amplifies; ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (with
  ``--xla_gpu_autotune_level=0`` for fixed algorithm choice) makes them reproducible at
  some speed cost. A resumed GPU run is still a valid continuation, just not a bitwise
  copy.
* **Run directory.** ``workdir/config.json`` holds the run's config. A restart compares
  it with the new config: every field must match (ODE knobs compared after resolving
  ``None`` to the method's default) except :data:`RESUMABLE_FIELDS` (``num_epochs``, to
  extend a run: the learning-rate boundaries are absolute epochs, so extending does not
  move them; where the data is (``data_dir``); and how often to log, evaluate and
  checkpoint). Records in ``metrics.jsonl`` beyond the restored step (written after the
  last checkpoint of an interrupted run) are dropped on resume, so the file reads as one
  uninterrupted run.
* **Validation first.** Every check (config fields, model and method knobs, devices,
  data loading and validation, the workdir's config) runs before anything is created or
  written in the workdir, and raises :class:`ConfigError` or
  :class:`anodev2_jax.data.DataError` (both ``ValueError``) with one line naming the field
  and the fix.
* **Logging.** A progress line per epoch (on a terminal rewritten in place about 50 times
  an epoch with the running loss, accuracy and images/s; one line per epoch otherwise),
  ``metrics.jsonl`` (one JSON object per seed every ``log_every_steps`` steps, ``"kind":
  "step"``, and every epoch, ``"kind": "epoch"``), TensorBoard event files per seed under
  ``workdir/tensorboard/seed<N>`` (tensorboardX, no TensorFlow), and ``summary.json``.
  ``images_per_s`` counts the images of every replica (``num_seeds * batch_size`` per
  step); the summary's value leaves out each session's first step, which includes
  compilation. ``wall_time_s`` is the time of this invocation.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anodev2_jax import data as data_lib
from anodev2_jax import models as models_lib

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "Preempted",
    "WriteError",
    "NONFINITE_MODES",
    "TrainState",
    "RESUMABLE_FIELDS",
    "validate_config",
    "default_workdir",
    "make_mesh",
    "replicated",
    "batch_sharding",
    "create_model",
    "create_optimizer",
    "learning_rate_schedule",
    "weight_decay_mask",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
    "put_global",
    "train_and_evaluate",
]

# Fields a restart may change (see the module docstring); every other field must match.
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
)
_KNOB_FIELDS = ("steps_z", "steps_w", "schedule", "solver", "remat", "adjoint", "coeff_granularity", "nonlinearity", "norm")
_DATA_AXIS = "data"
_CONFIG_FILE = "config.json"
_METRICS_FILE = "metrics.jsonl"
_SUMMARY_FILE = "summary.json"


class ConfigError(ValueError):
    """A bad config or run directory; the message is one line naming the field and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


NONFINITE_MODES = ("stop", "skip")  # config.nonfinite: what a NaN / Inf loss or gradient does


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; rerun to resume.

    Attributes:
      signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
      step: the global step saved.
      checkpoint: the checkpoint directory written (``workdir/checkpoints/<step>``).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, steps_per_epoch: int):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        epoch, i = divmod(self.step, steps_per_epoch)
        where = f"end of epoch {epoch}" if i == 0 else f"step {i}/{steps_per_epoch} of epoch {epoch + 1}"
        super().__init__(
            f"received {signal.Signals(self.signum).name} at step {self.step} ({where}): saved checkpoint "
            f"{checkpoint}; rerun the same command to resume"
        )


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN / Inf (``config.nonfinite="stop"``); nothing newer was saved.

    Attributes:
      step: the first global step whose loss, gradients or update was not finite.
      seeds: the seeds of the replicas it happened in.
      checkpoint: the last good checkpoint (left intact), or None if none was written yet.
    """

    def __init__(self, step: int, epoch: int, seeds: Sequence[int], checkpoint: Optional[Path]):
        self.step, self.seeds, self.checkpoint = int(step), list(seeds), checkpoint
        last = (
            f"the last good checkpoint {checkpoint} is left intact"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"non-finite loss or gradients at step {self.step} (epoch {epoch}, seed {', '.join(map(str, self.seeds))}); "
            f"training stopped and wrote nothing newer: {last}; lower --config.learning_rate (in a new --workdir) "
            "or check the data, or rerun with --config.nonfinite=skip to skip such steps"
        )


class WriteError(RuntimeError):
    """Writing the run directory failed (disk full, quota, permissions); earlier checkpoints are intact."""

    def __init__(self, what: str, cause: BaseException, last_checkpoint: Optional[Path]):
        self.cause = cause
        resume = (
            f"it resumes from the last complete checkpoint {last_checkpoint}"
            if last_checkpoint is not None
            else "it starts over (no complete checkpoint yet)"
        )
        super().__init__(
            f"writing {what} failed: {_os_error_text(cause)}; free disk space or fix the permissions there, then "
            f"rerun the same command: {resume}"
        )


def _os_error_text(e: BaseException) -> str:
    """``"No space left on device (ENOSPC)"`` for an OSError or an orbax / tensorstore write error."""
    code = getattr(e, "errno", None)
    if not isinstance(code, int):  # tensorstore: "... [os_error_code='28']"
        found = re.search(r"os_error_code='?(\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------- validation


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
_FIELD_CHECKS: dict[str, Callable[[Any], tuple[bool, str]]] = {
    "model": _choice(models_lib.MODELS),
    "method": _choice(models_lib.METHODS),
    "steps_z": _int_at_least(1, optional=True),
    "steps_w": _int_at_least(1, optional=True),
    "schedule": _optional(str, "a string"),
    "solver": _optional(str, "a string"),
    "remat": _optional(str, "a string"),
    "adjoint": _optional(str, "a string"),
    "coeff_granularity": _optional(str, "a string"),
    "nonlinearity": _optional(str, "a string"),
    "norm": _optional(str, "a string"),
    "dataset": _choice(data_lib.DATASETS),
    "data_dir": _optional(str, "a path"),
    "num_train": _int_at_least(1, optional=True),
    "num_test": _int_at_least(1, optional=True),
    "data_seed": _int_at_least(0),
    "num_epochs": _int_at_least(1),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1, optional=True),
    "learning_rate": _real_in(0, math.inf, lo_open=True, hi_open=True),
    "lr_boundaries_epochs": _boundaries,
    "lr_decay_factor": _real_in(0, 1, lo_open=True),
    "momentum": _real_in(0, 1, hi_open=True),
    "weight_decay": _real_in(0, math.inf, hi_open=True),
    "decay_rda_coeffs": _bool,
    "seed": _int_at_least(0),
    "num_seeds": _int_at_least(1),
    "eval_every_epochs": _int_at_least(1),
    "log_every_steps": _int_at_least(0),
    "checkpoint_every_epochs": _int_at_least(1),
    "keep_checkpoints": _int_at_least(1),
    "distributed": _bool,
    "nonfinite": _choice(NONFINITE_MODES),
}


def _config_dict(config) -> dict[str, Any]:
    """A plain dict of the config's fields (tuples become lists, as in JSON)."""
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(d, default=_json_default))


def _json_default(o):
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
    unknown = sorted(keys - set(_FIELD_CHECKS))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(unknown)}; remove them (the fields are those of "
            "configs/default.py)"
        )
    missing = [k for k in _FIELD_CHECKS if k not in keys]
    if missing:
        raise ConfigError(
            f"config field(s) {', '.join(missing)} missing; build the config on configs/default.py's get_config()"
        )
    for name, check in _FIELD_CHECKS.items():
        value = config[name]
        ok, what = check(value)
        if not ok:
            raise ConfigError(f"config.{name}={value!r} is invalid: it must be {what}; fix --config.{name}")
    try:
        json.dumps(_config_dict(config))
    except TypeError as e:
        raise ConfigError(f"config holds a value JSON cannot store ({e}); use plain numbers, strings and tuples") from None


def _knobs(config) -> dict[str, Any]:
    return {k: config[k] for k in _KNOB_FIELDS}


def create_model(config):
    """``get_model(config.model, config.method, **ODE knobs)``; bad knobs raise :class:`ConfigError`."""
    try:
        return models_lib.get_model(config.model, config.method, **_knobs(config))
    except ValueError as e:
        raise ConfigError(
            f"bad ODE settings for model={config.model!r}, method={config.method!r}: {e} "
            f"(set with --config.<knob>; None means the method's default)"
        ) from e


def _resolved_knobs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ODE knobs of a config dict with None replaced by the method's default."""
    knobs = {k: cfg.get(k) for k in _KNOB_FIELDS}
    try:
        resolved = models_lib.resolve_config(cfg["method"], **knobs)
    except (ValueError, KeyError):
        return knobs
    return {k: getattr(resolved, k) for k in _KNOB_FIELDS}


def _check_workdir(workdir: Path, cfg: dict[str, Any], steps_per_epoch: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Checks that ``workdir`` is new or holds a run of a compatible config; writes nothing.

    With ``steps_per_epoch``, also that no checkpoint (numbered by global step) lies beyond
    ``cfg["num_epochs"]``. Returns the stored config (a dict) or None for a fresh workdir.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; pass a directory to --workdir")
    stored_path = workdir / _CONFIG_FILE
    if not stored_path.exists():
        if (workdir / "checkpoints").exists():
            raise ConfigError(
                f"workdir {workdir} has checkpoints but no {_CONFIG_FILE}, so its config is unknown; "
                "use a new --workdir"
            )
        return None
    ckpt_dir = workdir / "checkpoints"
    steps_done = _checkpoint_steps(ckpt_dir)
    if steps_done and steps_per_epoch and max(steps_done) > cfg["num_epochs"] * steps_per_epoch:
        epochs = -(-max(steps_done) // steps_per_epoch)
        raise ConfigError(
            f"workdir {workdir} already holds a checkpoint of step {max(steps_done)} (epoch {epochs}) > "
            f"num_epochs={cfg['num_epochs']}; use --config.num_epochs={epochs} or more, or a new --workdir"
        )
    try:
        stored = json.loads(stored_path.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{stored_path} is unreadable ({type(e).__name__}: {e}); use a new --workdir") from None
    new_knobs, old_knobs = _resolved_knobs(cfg), _resolved_knobs(stored)
    for name in cfg:
        if name in RESUMABLE_FIELDS:
            continue
        old, new = (old_knobs[name], new_knobs[name]) if name in _KNOB_FIELDS else (stored.get(name), cfg[name])
        if name not in stored and name not in _KNOB_FIELDS:
            old = "<missing>"
        if old != new:
            raise ConfigError(
                f"workdir {workdir} holds a run with {name}={old!r}, but this config has {name}={new!r}; "
                f"use a new --workdir, or --config.{name}={old!r} to resume that run"
            )
    return stored


def _check_writable(workdir: Path) -> None:
    """Raises :class:`ConfigError` unless ``workdir`` (or the folder it will be made in) and its files are writable.

    ``os.access`` writes nothing; it answers for the process's real user and for read-only
    file systems (root passes any permission check, but not a read-only mount).
    """
    existing = workdir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, so workdir {workdir} cannot be created in it; pass another --workdir")
    paths = [existing]  # the workdir itself, or the folder it will be created in
    if workdir.is_dir():
        names = (_CONFIG_FILE, _METRICS_FILE, _SUMMARY_FILE, "checkpoints", "tensorboard")
        paths += [workdir / n for n in names if (workdir / n).exists()]
    for p in paths:
        if not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise ConfigError(
                f"workdir {workdir} is not writable ({p} denies writing); fix the permissions "
                f"(e.g. chmod -R u+w {workdir}) or pass another --workdir"
            )


def default_workdir(config, now: Optional[datetime.datetime] = None) -> str:
    """A readable new run directory: ``runs/<model>-<method>-seed<N>-YYYYmmdd-HHMMSS``."""
    now = now or datetime.datetime.now()
    seeds = f"seed{config.seed}" if config.num_seeds == 1 else f"seeds{config.seed}-{config.seed + config.num_seeds - 1}"
    return os.path.join("runs", f"{config.model}-{config.method}-{seeds}-{now:%Y%m%d-%H%M%S}")


# ----------------------------------------------------------------------------- optimizer


class _OptimizerSpec(NamedTuple):
    """The config fields that define the optimizer (hashable: a cache key for compiled steps)."""

    learning_rate: float
    lr_boundaries_epochs: tuple[int, ...]
    lr_decay_factor: float
    momentum: float
    weight_decay: float
    decay_rda_coeffs: bool
    steps_per_epoch: int

    @classmethod
    def from_config(cls, config, steps_per_epoch: int) -> "_OptimizerSpec":
        return cls(
            float(config.learning_rate),
            tuple(int(e) for e in config.lr_boundaries_epochs),
            float(config.lr_decay_factor),
            float(config.momentum),
            float(config.weight_decay),
            bool(config.decay_rda_coeffs),
            int(steps_per_epoch),
        )


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
    """Step-wise schedule: ``learning_rate * lr_decay_factor ** (#boundaries passed)``; float32.

    A boundary at epoch ``e`` takes effect from global step ``e * steps_per_epoch`` on
    (after ``e`` complete epochs, as PyTorch's ``MultiStepLR`` stepped per epoch).
    """
    lr0, factor = float(config.learning_rate), float(config.lr_decay_factor)
    boundaries = [int(e) * steps_per_epoch for e in config.lr_boundaries_epochs]

    def schedule(count):
        count = jnp.asarray(count)
        lr = jnp.full((), lr0, jnp.float32)
        for b in boundaries:
            lr = jnp.where(count >= b, lr * jnp.float32(factor), lr)
        return lr

    return schedule


def weight_decay_mask(params, decay_rda_coeffs: bool = False):
    """True for every leaf weight decay applies to: all but the RDA coefficients (``rda_*``)."""

    def keep(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        return decay_rda_coeffs or not str(name).startswith("rda_")

    return jax.tree_util.tree_map_with_path(keep, params)


def create_optimizer(config, steps_per_epoch: int):
    """SGD + momentum + coupled (PyTorch-style) weight decay, masked off the RDA coefficients.

    Args:
      config: anything with the optimizer fields of ``configs/default.py`` (a ConfigDict).
      steps_per_epoch: optimizer steps per epoch (places the learning-rate boundaries).

    Returns:
      ``(tx, schedule)``: the optax transformation and the learning-rate schedule.
    """
    return _create_optimizer(_OptimizerSpec.from_config(config, steps_per_epoch))


def _create_optimizer(spec: _OptimizerSpec):
    schedule = learning_rate_schedule(spec, spec.steps_per_epoch)
    decay_rda = spec.decay_rda_coeffs
    tx = optax.chain(
        optax.add_decayed_weights(spec.weight_decay, mask=lambda p: weight_decay_mask(p, decay_rda)),
        optax.sgd(schedule, momentum=spec.momentum or None),
    )
    return tx, schedule


# ----------------------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
    """Everything training changes. Leaves carry a leading seed axis in ``train_and_evaluate``.

    Attributes:
      step: int32 global step (number of optimizer updates done).
      params: float32 model parameters.
      batch_stats: BatchNorm running statistics.
      opt_state: optax state (momentum trace, schedule count).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def _root_key(seed):
    return jax.random.key(seed)


def _init_one(model, tx, seed) -> TrainState:
    """One replica's state from its seed (int32 scalar, may be traced)."""
    sample = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.fold_in(_root_key(seed), 0), sample, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def _over_seeds(fn: Callable, num_seeds: int, in_axes: tuple) -> Callable:
    """``fn`` applied per replica: ``jax.vmap`` for several seeds, plain indexing for one."""
    if num_seeds > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)]
        return jax.tree.map(lambda a: a[None], fn(*args))

    return single


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``"data"``."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (_DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the train state: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, seed_axis: bool = True) -> NamedSharding:
    """Batches split along the batch axis: ``(num_seeds, batch, ...)`` or, for eval, ``(batch, ...)``."""
    return NamedSharding(mesh, P(None, _DATA_AXIS) if seed_axis else P(_DATA_AXIS))


def init_train_state(model, tx, seeds: Sequence[int], mesh: Mesh) -> TrainState:
    """The replicated train state of ``len(seeds)`` replicas (leading seed axis), built on device."""
    init = _over_seeds(functools.partial(_init_one, model, tx), len(seeds), (0,))
    seeds_arr = put_global(np.asarray(seeds, np.int32), replicated(mesh))
    return jax.jit(init, out_shardings=replicated(mesh))(seeds_arr)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _correct(logits, labels):
    return (jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels).astype(jnp.float32)


def _all_finite(tree) -> jax.Array:
    """A bool scalar: every float leaf of ``tree`` is free of NaN and Inf."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def _train_step_one(model, tx, state: TrainState, images, labels, seed):
    """One SGD step of one replica: augment (key from seed and step), forward, backward, update.

    A step whose loss, gradients or new params / BatchNorm statistics are not all finite
    leaves every float leaf of the state as it was (counters advance) and reports
    ``finite=False`` with loss and accuracy 0 (module docstring, "Non-finite values").
    """
    aug_key = jax.random.fold_in(jax.random.fold_in(_root_key(seed), 1), state.step)
    x = data_lib.preprocess_train(aug_key, images)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(_cross_entropy(logits, labels)), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    finite = _all_finite((loss, grads, new_state.params, new_state.batch_stats))

    def unless_bad(new, old):
        return jnp.where(finite, new, old) if jnp.issubdtype(new.dtype, jnp.inexact) else new

    new_state = jax.tree.map(unless_bad, new_state, state)
    zero = jnp.zeros((), jnp.float32)
    accuracy = jnp.mean(_correct(logits, labels))
    metrics = {"loss": jnp.where(finite, loss, zero), "accuracy": jnp.where(finite, accuracy, zero), "finite": finite}
    return new_state, metrics


def make_train_step(model, tx, mesh: Mesh, num_seeds: int) -> Callable:
    """The jitted, data-parallel train step over all replicas; the state is donated.

    Returns:
      ``step(state, images, labels, seeds) -> (state, {"loss", "accuracy", "finite"})``
      with ``images`` uint8 ``(num_seeds, batch, 32, 32, 3)`` and ``labels`` int32
      ``(num_seeds, batch)`` sharded along the batch axis, ``seeds`` int32
      ``(num_seeds,)``; ``loss`` and ``accuracy`` are float32 ``(num_seeds,)`` batch
      means, ``finite`` bool ``(num_seeds,)``: False where the replica's step was not
      finite and was not applied (its loss and accuracy then read 0).
    """
    step = _over_seeds(functools.partial(_train_step_one, model, tx), num_seeds, (0, 0, 0, 0))
    repl, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, batch, batch, repl), out_shardings=(repl, repl), donate_argnums=0)


def _eval_step_one(model, state: TrainState, images, labels, mask):
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, data_lib.preprocess_eval(images), train=False
    )
    w = mask.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(_cross_entropy(logits, labels) * w),
        "correct": jnp.sum(_correct(logits, labels) * w),
    }


def make_eval_step(model, mesh: Mesh, num_seeds: int) -> Callable:
    """The jitted eval step: ``(state, images (B,...), labels (B,), mask (B,)) -> sums (num_seeds,)``."""
    step = _over_seeds(functools.partial(_eval_step_one, model), num_seeds, (0, None, None, None))
    repl, batch = replicated(mesh), batch_sharding(mesh, seed_axis=False)
    return jax.jit(step, in_shardings=(repl, batch, batch, batch), out_shardings=repl)


@functools.lru_cache(maxsize=32)
def _programs(model, spec: _OptimizerSpec, mesh: Mesh, num_seeds: int):
    """Optimizer, schedule and the jitted init / train / eval functions of one run setup.

    Cached, so runs of the same setup in one process (a sweep over seeds in a notebook, a
    resumed run, the tests) compile once: seeds enter the programs as arguments.
    """
    tx, schedule = _create_optimizer(spec)
    init = jax.jit(_over_seeds(functools.partial(_init_one, model, tx), num_seeds, (0,)), out_shardings=replicated(mesh))
    return tx, schedule, init, make_train_step(model, tx, mesh, num_seeds), make_eval_step(model, mesh, num_seeds)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ----------------------------------------------------------------------------- run helpers


class _Progress:
    """One line per epoch: rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


def _epoch_indices(num_train: int, batch_size: int, seeds: Sequence[int], epoch: int):
    """Index batches ``(num_seeds, batch)`` of epoch ``epoch``: each seed its own order."""
    streams = [data_lib.epoch_batches(num_train, batch_size, np.random.default_rng([s, epoch])) for s in seeds]
    for idx in zip(*streams):
        yield np.stack(idx)


def _evaluate(eval_step, state, ds: data_lib.Dataset, batch_size: int, mesh: Mesh):
    """Test loss and accuracy per replica, float64 ``(num_seeds,)`` each."""
    sharding = batch_sharding(mesh, seed_axis=False)
    loss_sum, correct = 0.0, 0.0
    for idx, valid in data_lib.eval_batches(len(ds.y_test), batch_size):
        mask = np.arange(batch_size) < valid
        out = eval_step(
            state,
            put_global(ds.x_test[idx], sharding),
            put_global(ds.y_test[idx], sharding),
            put_global(mask, sharding),
        )
        loss_sum, correct = loss_sum + out["loss_sum"], correct + out["correct"]  # on device: no sync per batch
    n = len(ds.y_test)
    return np.asarray(loss_sum, np.float64) / n, np.asarray(correct, np.float64) / n


def _read_metrics(path: Path, max_step: int) -> list[str]:
    """Lines of ``metrics.jsonl`` up to global step ``max_step`` (drops a crashed run's tail)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:  # a line cut off by a crash
            continue
    return keep


def _json_number(x):
    """``x``, or None (JSON null) for NaN: the mean of a window whose every step was skipped."""
    return None if isinstance(x, float) and math.isnan(x) else x


class _Logger:
    """metrics.jsonl and TensorBoard (one writer per seed); only process 0 writes."""

    def __init__(self, workdir: Path, seeds: Sequence[int], resume_step: int, active: bool):
        self.active, self.seeds = active, list(seeds)
        if not active:
            return
        path = workdir / _METRICS_FILE
        self.path = path
        kept = _read_metrics(path, resume_step)
        _write_text(path, "".join(line + "\n" for line in kept))  # atomic: a full disk loses no record
        self.file = path.open("a")
        from tensorboardX import SummaryWriter  # imported late: it is only needed once training starts

        self.writers = [SummaryWriter(str(workdir / "tensorboard" / f"seed{s}")) for s in self.seeds]

    def write(self, kind: str, epoch: int, step: int, per_seed: dict[str, np.ndarray], shared: dict[str, float]):
        if not self.active:
            return
        try:
            for i, seed in enumerate(self.seeds):
                rec = {"kind": kind, "epoch": epoch, "step": step, "seed": seed}
                rec.update({k: _json_number(np.asarray(v)[i].item()) for k, v in per_seed.items()})  # counts stay ints
                rec.update({k: float(v) for k, v in shared.items()})
                self.file.write(json.dumps(rec) + "\n")
                for k, v in rec.items():
                    if k not in ("kind", "epoch", "step", "seed") and v is not None:
                        self.writers[i].add_scalar(self._tag(kind, k), v, step)
            self.file.flush()
        except OSError as e:  # a failing write() does not name its file
            e.filename = e.filename or str(self.path)
            raise

    @staticmethod
    def _tag(kind: str, key: str) -> str:
        """TensorBoard tag: ``train/loss``, ``test/accuracy``, ``learning_rate``; step records under ``steps/``."""
        split, _, name = key.partition("_")
        tag = f"{split}/{name}" if split in ("train", "test") else key
        return tag if kind == "epoch" else f"steps/{key}"

    def close(self):
        if self.active:
            self.file.close()
            for w in self.writers:
                w.close()


_ENV_NUM_PROCESSES, _ENV_PROCESS_ID = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when ``config.distributed`` is True (skipped if already done).

    How the processes find each other is launch information, not run config (it differs
    per process), so it comes from the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port``
    of process 0; read by JAX itself), and ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read
    here; set both or neither). Whatever is unset JAX auto-detects on a cluster (Slurm, Open
    MPI, Cloud TPU...). ``JAX_LOCAL_DEVICE_IDS`` restricts a process's devices. CPU
    processes exchange collectives over gloo (TCP), JAX's default
    ``jax_cpu_collectives_implementation``. Must run before any JAX computation.
    """
    if config.get("distributed", False) is not True or jax.distributed.is_initialized():
        return
    env = {k: os.environ.get(k) for k in (_ENV_NUM_PROCESSES, _ENV_PROCESS_ID)}
    kwargs = {}
    if any(v is not None for v in env.values()):
        try:
            num, pid = int(env[_ENV_NUM_PROCESSES]), int(env[_ENV_PROCESS_ID])
        except (TypeError, ValueError):
            num = pid = -1
        if not 0 <= pid < num:
            raise ConfigError(
                f"config.distributed=True with {_ENV_NUM_PROCESSES}={env[_ENV_NUM_PROCESSES]!r}, "
                f"{_ENV_PROCESS_ID}={env[_ENV_PROCESS_ID]!r}: set both, as integers with 0 <= "
                f"{_ENV_PROCESS_ID} < {_ENV_NUM_PROCESSES} (or neither, to auto-detect on a cluster)"
            )
        if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ConfigError(
                f"config.distributed=True with {_ENV_NUM_PROCESSES} and {_ENV_PROCESS_ID} set needs "
                "JAX_COORDINATOR_ADDRESS=host:port of process 0 too"
            )
        kwargs = {"num_processes": num, "process_id": pid}
    jax.distributed.initialize(**kwargs)


def _sync_processes(name: str) -> None:
    """A barrier over all processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _as_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def _zero_loop(num_seeds: int) -> dict[str, np.ndarray]:
    """The loop's per-seed accumulators at the start of an epoch, saved with every checkpoint as ``"loop"``.

    ``epoch_*`` / ``window_*``: float32 sums of the step losses and accuracies since the
    epoch / the last ``log_every_steps`` record; ``*_skipped``: int32 counts of skipped
    (non-finite) steps in the epoch, the window and the whole run.
    """
    zeros, counts = np.zeros(num_seeds, np.float32), np.zeros(num_seeds, np.int32)
    return {
        "epoch_loss": zeros, "epoch_accuracy": zeros, "window_loss": zeros, "window_accuracy": zeros,
        "epoch_skipped": counts, "window_skipped": counts, "skipped": counts,
    }  # fmt: skip


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl warnings (orbax's, while probing a checkpoint that may be bad: our error says it better)."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore_latest(ckpt_dir: Path, target: dict[str, Any]) -> Optional[tuple[int, dict[str, Any]]]:
    """``(step, checkpoint)`` of the latest complete checkpoint in ``ckpt_dir``, or None; writes nothing.

    Raises:
      ConfigError: the checkpoint cannot be read or does not match ``target`` in tree
        structure and shapes (orbax itself returns the stored shapes whatever the target
        says; dtypes it casts to the target's).
    """
    if not ckpt_dir.is_dir():
        return None
    import orbax.checkpoint as ocp

    with _quiet_absl(), ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        path = ckpt_dir / str(step)
        fix = (
            f"it is corrupt or from another model, run or version: move {path} out of {ckpt_dir} to resume from "
            "the checkpoint before it (if any), or pass a new --workdir"
        )
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax / tensorstore raise many types for unreadable data
            raise ConfigError(f"checkpoint {path} cannot be restored ({_os_error_text(e)}); {fix}") from None
    got, want = jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree_util.tree_flatten_with_path(target)[0]
    if [p for p, _ in got] != [p for p, _ in want]:
        raise ConfigError(f"checkpoint {path} holds another tree of arrays than this run's train state; {fix}")
    for (key, a), (_, b) in zip(got, want):
        if np.shape(a) != tuple(b.shape):
            name = jax.tree_util.keystr(key)
            raise ConfigError(f"checkpoint {path} has {name} of shape {np.shape(a)}, this run expects {tuple(b.shape)}; {fix}")
    return step, restored


def _write_text(path: Path, text: str) -> None:
    """Writes ``path`` atomically (a temporary file renamed over it): a failed write leaves the old file.

    Its OSError names the file (a failing ``write()`` alone does not).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``ckpt_dir`` (orbax renames a checkpoint into place when complete)."""
    return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []


def _last_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    steps = _checkpoint_steps(ckpt_dir)
    return ckpt_dir / str(max(steps)) if steps else None


class _StopSignals:
    """SIGTERM / SIGINT during the training loop: the first is recorded (the loop saves and stops), a second aborts.

    Handlers are installed only in the main thread of a single-process run and the
    previous ones are restored on exit. With several processes, ``requested`` asks JAX's
    preemption sync point instead (all processes then agree on the step to stop at).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> "_StopSignals":
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop waiting for the save
            self._restore()
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name}): aborted without saving")
        self.signum = signum

    def requested(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (called by every process after every step)."""
        if self.signum is None and self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
            except RuntimeError:  # the preemption service is off (jax.distributed initialized without it)
                self._multiprocess = False
        return self.signum is not None


class _FiniteFlags:
    """The step's ``finite`` flags, kept on the device and read only at the loop's sync points."""

    def __init__(self, mode: str, seeds: Sequence[int], steps_per_epoch: int):
        self.mode, self.seeds, self.steps_per_epoch = mode, list(seeds), steps_per_epoch
        self.pending: list[tuple[int, jax.Array]] = []  # (global step, flags (num_seeds,))

    def add(self, step: int, flags: jax.Array) -> None:
        self.pending.append((step, flags))

    def check(self, last_checkpoint: Callable[[], Optional[Path]]) -> np.ndarray:
        """Skipped steps per seed (int32) since the last check; raises :class:`NonFiniteError` in "stop" mode."""
        if not self.pending:
            return np.zeros(len(self.seeds), np.int32)
        bad = ~np.asarray(jax.device_get([f for _, f in self.pending]), bool)  # (steps, seeds); one sync
        steps = [s for s, _ in self.pending]
        self.pending = []
        if self.mode == "stop" and bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            seeds = [self.seeds[j] for j in np.flatnonzero(bad[row])]
            step = steps[row]
            raise NonFiniteError(step, (step - 1) // self.steps_per_epoch + 1, seeds, last_checkpoint())
        return bad.sum(axis=0).astype(np.int32)


def _mean(total, count: np.ndarray) -> np.ndarray:
    """float64 ``total / count`` per seed; NaN where every step was skipped."""
    total = np.asarray(total, np.float64)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------- entry point


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``config.num_seeds`` replicas, evaluates them, and writes the run directory.

    Args:
      config: a ConfigDict with the fields of ``configs/default.py``.
      workdir: run directory; created if new, resumed from its latest checkpoint if it
        holds a run of a compatible config.

    Returns:
      The summary written to ``workdir/summary.json``: ``test_accuracy`` and ``test_loss``
      (lists, one per seed), ``test_accuracy_min / max / avg``, ``num_params``,
      ``wall_time_s``, ``images_per_s``, ``model``, ``method``, ``seeds``, ``config``...

    Raises:
      ConfigError, anodev2_jax.data.DataError: bad input (config, data, a workdir holding
        another config, an unreadable checkpoint, no write permission), raised before
        anything is written.
      Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved.
      NonFiniteError: ``config.nonfinite="stop"`` and a step was NaN / Inf; nothing newer
        than the last good checkpoint was written.
      WriteError: writing the run directory failed (disk full...); the checkpoints
        written before are intact.
    """
    t_start = time.perf_counter()
    _maybe_initialize_distributed(config)

    # ---- validation: nothing is created or written until all of it passed
    validate_config(config)
    cfg = _config_dict(config)
    model = create_model(config)
    ode_config = model.config  # resolved knobs (method defaults filled in)
    mesh = make_mesh()
    num_devices = mesh.devices.size
    batch_size, eval_batch_size = config.batch_size, config.eval_batch_size or config.batch_size
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value % num_devices:
            raise ConfigError(
                f"config.{name}={value} does not divide over the {num_devices} devices; "
                f"use a multiple of {num_devices} for --config.{name}"
            )
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir, num_train=config.num_train, num_test=config.num_test, seed=config.data_seed
    )
    num_train = len(ds.y_train)
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={batch_size} exceeds the {num_train} training examples, so an epoch has no "
            "full batch; lower --config.batch_size or raise --config.num_train"
        )
    workdir = Path(workdir)
    _check_workdir(workdir, cfg, steps_per_epoch)
    _check_writable(workdir)
    seeds = [config.seed + i for i in range(config.num_seeds)]
    tx, schedule, init, train_step, eval_step = _programs(
        model, _OptimizerSpec.from_config(config, steps_per_epoch), mesh, len(seeds)
    )
    abstract_one = jax.eval_shape(functools.partial(_init_one, model, tx), jnp.zeros((), jnp.int32))
    num_params = models_lib.count_params(abstract_one.params)
    repl = replicated(mesh)
    seeds_arr = put_global(np.asarray(seeds, np.int32), repl)
    ckpt_dir = workdir / "checkpoints"
    abstract = jax.eval_shape(init, seeds_arr)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), _as_dict(abstract))
    restored = _restore_latest(ckpt_dir, {**target, "loop": _zero_loop(len(seeds))})  # read before any write
    if restored is not None:
        ckpt_step, checkpoint = restored
        loop = {k: np.asarray(v) for k, v in checkpoint.pop("loop").items()}
        state = TrainState(**checkpoint)
        if int(np.asarray(state.step)[0]) != ckpt_step:
            raise ConfigError(
                f"checkpoint {ckpt_dir / str(ckpt_step)} holds global step {int(np.asarray(state.step)[0])}, not "
                f"{ckpt_step}: it was written by another version; pass a new --workdir"
            )

    # ---- the run directory
    is_main = jax.process_index() == 0
    _sync_processes("anodev2_jax:workdir_checked")  # no process still reads config.json as process 0 writes it
    try:
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            _write_text(workdir / _CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    except OSError as e:
        raise WriteError(e.filename or f"the run directory {workdir}", e, _last_checkpoint(ckpt_dir)) from e
    if restored is None:
        state, loop = init(seeds_arr), _zero_loop(len(seeds))
    step = start_step = int(np.asarray(state.step)[0])
    start_epoch, start_i = divmod(start_step, steps_per_epoch)  # resume at batch start_i + 1 of epoch start_epoch + 1
    tally = loop  # the accumulators of _zero_loop: on the device while training, numpy in checkpoints
    progress = _Progress(is_main)
    progress_every = max(1, steps_per_epoch // 50)  # each update syncs with the device
    flags = _FiniteFlags(config.nonfinite, seeds, steps_per_epoch)
    saved_step = start_step if restored is not None else None

    import orbax.checkpoint as ocp

    def count_skipped() -> None:
        """Reads the pending finite flags (a sync); raises NonFiniteError in "stop" mode."""
        bad = flags.check(last_good)
        for k in ("epoch_skipped", "window_skipped", "skipped"):
            tally[k] = tally[k] + bad

    def last_good() -> Optional[Path]:
        with contextlib.suppress(Exception):  # a save in flight is of a checked state: let it land
            manager.wait_until_finished()
        return _last_checkpoint(ckpt_dir)

    def wait_for_saves() -> None:
        try:
            manager.wait_until_finished()
        except Exception as e:  # orbax reports disk errors of a background write as ValueError & co.
            raise WriteError(f"a checkpoint in {ckpt_dir}", e, _last_checkpoint(ckpt_dir)) from e

    def save(state, loop_state: dict[str, Any]) -> Path:
        """Checkpoint of the current step (asynchronous); any failure is a :class:`WriteError`."""
        dtypes = {k: v.dtype for k, v in _zero_loop(1).items()}
        loop_state = {k: np.asarray(jax.device_get(loop_state[k]), dtypes[k]) for k in dtypes}  # syncs
        try:
            manager.save(step, args=ocp.args.StandardSave({**_as_dict(state), "loop": loop_state}))
        except Exception as e:  # includes the error of an earlier background write
            raise WriteError(f"a checkpoint in {ckpt_dir}", e, _last_checkpoint(ckpt_dir)) from e
        return ckpt_dir / str(step)

    train_sharding = batch_sharding(mesh)
    images_per_step = len(seeds) * batch_size
    train_time, train_images = 0.0, 0  # for images_per_s, without each session's first (compiling) step
    last_train = {"train_loss": None, "train_accuracy": None}
    test_loss = test_acc = None

    logger = None
    try:
        logger = _Logger(workdir, seeds, step, is_main)
        with _StopSignals() as stop:
            if is_main:  # after the handlers are in place: a signal from here on saves a checkpoint
                resumed = ""
                if start_step:
                    where = f", step {start_i}/{steps_per_epoch} of epoch {start_epoch + 1}" if start_i else ""
                    resumed = f" (resumed from step {start_step}{where})"
                print(
                    f"{config.model} {config.method} seeds {seeds}: {num_params:,} params, {num_devices} device(s), "
                    f"{steps_per_epoch} steps/epoch, epochs {start_epoch + 1}..{config.num_epochs}, workdir {workdir}"
                    + resumed,
                    flush=True,
                )
            for epoch in range(start_epoch, config.num_epochs):
                lr = float(schedule(epoch * steps_per_epoch))
                first = start_i if epoch == start_epoch else 0  # batches of this epoch done before the restart
                if not first:
                    tally = {**_zero_loop(len(seeds)), "skipped": tally["skipped"]}
                t_epoch = t_window = time.perf_counter()
                first_step_done = None
                for i, idx in enumerate(_epoch_indices(num_train, batch_size, seeds, epoch), start=1):
                    if i <= first:
                        continue
                    images = put_global(ds.x_train[idx], train_sharding)
                    labels = put_global(ds.y_train[idx], train_sharding)
                    state, metrics = train_step(state, images, labels, seeds_arr)
                    step += 1
                    flags.add(step, metrics["finite"])
                    for k in ("loss", "accuracy"):  # device-side sums: no host sync per step
                        tally[f"epoch_{k}"] = tally[f"epoch_{k}"] + metrics[k]
                        tally[f"window_{k}"] = tally[f"window_{k}"] + metrics[k]
                    if first_step_done is None and epoch == start_epoch:
                        jax.block_until_ready(metrics)
                        first_step_done = time.perf_counter()
                    if progress.tty and (i % progress_every == 0 or i == steps_per_epoch):
                        loss, accuracy = (float(np.mean(tally[f"epoch_{k}"])) / i for k in ("loss", "accuracy"))  # syncs
                        speed = (i - first) * images_per_step / max(time.perf_counter() - t_epoch, 1e-9)
                        progress.update(
                            f"epoch {epoch + 1}/{config.num_epochs} step {i}/{steps_per_epoch} "
                            f"loss {loss:.4f} acc {accuracy:.4f} {speed:.0f} img/s"
                        )
                    if config.log_every_steps and step % config.log_every_steps == 0:
                        count_skipped()
                        n_ok = min(config.log_every_steps, i) - tally["window_skipped"]
                        w = {f"train_{k}": _mean(tally[f"window_{k}"], n_ok) for k in ("loss", "accuracy")}
                        now = time.perf_counter()
                        ips = min(config.log_every_steps, i) * images_per_step / max(now - t_window, 1e-9)
                        shared = {"learning_rate": float(schedule(step - 1)), "images_per_s": ips}
                        logger.write("step", epoch + 1, step, w, shared)
                        zero, t_window = _zero_loop(len(seeds)), now
                        tally.update({k: zero[k] for k in ("window_loss", "window_accuracy", "window_skipped")})
                    # Asked every step (a collective sync point with several processes); acted on
                    # here mid-epoch, and after the epoch's record and checkpoint at its end.
                    if stop.requested(step) and i < steps_per_epoch:
                        count_skipped()  # never save an unchecked state
                        path = save(state, tally)
                        wait_for_saves()
                        raise Preempted(stop.signum, step, path, steps_per_epoch)
                count_skipped()  # before anything of this epoch is logged or saved
                n_ok = steps_per_epoch - tally["epoch_skipped"]
                train = {f"train_{k}": _mean(tally[f"epoch_{k}"], n_ok) for k in ("loss", "accuracy")}
                t_end = time.perf_counter()
                epoch_time = t_end - t_epoch
                steps_run = steps_per_epoch - first
                if first_step_done is not None:
                    train_time += t_end - first_step_done
                    train_images += (steps_run - 1) * images_per_step
                else:
                    train_time += epoch_time
                    train_images += steps_run * images_per_step
                last_train = {k: v.tolist() for k, v in train.items()}
                per_seed = dict(train)
                done = epoch + 1
                if done % config.eval_every_epochs == 0 or done == config.num_epochs:
                    test_loss, test_acc = _evaluate(eval_step, state, ds, eval_batch_size, mesh)
                    per_seed.update(test_loss=test_loss, test_accuracy=test_acc)
                if config.nonfinite == "skip":
                    per_seed["nonfinite_skipped"] = np.asarray(tally["skipped"])
                ips = steps_run * images_per_step / max(epoch_time, 1e-9)
                shared = {"learning_rate": lr, "images_per_s": ips, "epoch_time_s": epoch_time}
                logger.write("epoch", done, step, per_seed, shared)
                text = (
                    f"epoch {done}/{config.num_epochs} loss {train['train_loss'].mean():.4f} "
                    f"acc {train['train_accuracy'].mean():.4f}"
                )
                if "test_accuracy" in per_seed:
                    text += f" test_loss {per_seed['test_loss'].mean():.4f} test_acc {per_seed['test_accuracy'].mean():.4f}"
                progress.done(text + f" lr {lr:.4g} {ips:.0f} img/s {epoch_time:.1f}s")
                boundary = {**_zero_loop(len(seeds)), "skipped": tally["skipped"]}  # the next epoch starts from zero
                if done % config.checkpoint_every_epochs == 0 or done == config.num_epochs:
                    save(state, boundary)
                    saved_step = step
                if stop.signum is not None and done < config.num_epochs:  # between epochs
                    path = ckpt_dir / str(step) if saved_step == step else save(state, boundary)
                    wait_for_saves()
                    raise Preempted(stop.signum, step, path, steps_per_epoch)
        if test_acc is None:  # resumed a finished run: evaluate the restored state
            test_loss, test_acc = _evaluate(eval_step, state, ds, eval_batch_size, mesh)
        wait_for_saves()

        acc = np.asarray(test_acc, np.float64)
        summary = {
            "model": config.model,
            "method": config.method,
            "seeds": seeds,
            "test_accuracy": acc.tolist(),
            "test_loss": np.asarray(test_loss, np.float64).tolist(),
            "test_accuracy_min": float(acc.min()),
            "test_accuracy_max": float(acc.max()),
            "test_accuracy_avg": float(acc.mean()),
            **last_train,
            "num_params": num_params,
            "num_devices": num_devices,
            "epochs": config.num_epochs,
            "steps": step,
            "resumed_from_epoch": start_epoch,
            "resumed_from_step": start_step,
            "nonfinite_skipped": np.asarray(tally["skipped"]).tolist(),
            "wall_time_s": time.perf_counter() - t_start,
            "images_per_s": train_images / train_time if train_time > 0 else None,
            "ode": {k: getattr(ode_config, k) for k in _KNOB_FIELDS},
            "config": cfg,
        }
        if is_main:
            _write_text(workdir / _SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    except OSError as e:  # metrics, TensorBoard or summary.json: a full disk, a quota, permissions
        raise WriteError(e.filename or f"the run directory {workdir}", e, _last_checkpoint(ckpt_dir)) from e
    finally:
        with contextlib.suppress(Exception):  # an error in flight says more than a failed close
            if logger is not None:
                logger.close()
        with contextlib.suppress(Exception):
            manager.close()
    if is_main:
        print(
            f"test accuracy over {len(seeds)} seed(s): min {100 * acc.min():.2f}% max {100 * acc.max():.2f}% "
            f"avg {100 * acc.mean():.2f}% ({config.model} {config.method}; summary in {workdir / _SUMMARY_FILE})",
            flush=True,
        )
    return summary
