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
  from the global batch every process computes identically, so the same code runs on
  several hosts (``config.distributed=True`` calls ``jax.distributed.initialize()``
  first). ``batch_size`` (and ``eval_batch_size``) must divide by the device count.
* **Evaluation** runs on the whole test split with the running BatchNorm statistics
  (``train=False``), in batches of ``eval_batch_size`` whose padded last batch is masked.
  It runs every ``eval_every_epochs`` epochs and always after the last one.
* **Checkpoints** (orbax ``CheckpointManager`` in ``workdir/checkpoints``): the whole
  train state (params, batch_stats, optimizer state with its step count, global step)
  under the checkpoint step = number of completed epochs, every
  ``checkpoint_every_epochs`` epochs and after the last, the last ``keep_checkpoints``
  kept. A run restarted in the same workdir resumes from the latest one. Orbax writes
  each checkpoint into a temporary directory and renames it into place only once
  complete (on a local file system; a ``commit_success`` marker on object stores), and
  ``latest_step()`` never lists such temporaries, so a checkpoint cut off mid-write is
  never loaded (leftovers are deleted at start, ``cleanup_tmp_directories``). We rely on
  that rather than writing our own marker.
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

import datetime
import functools
import json
import math
import os
import sys
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


def _check_workdir(workdir: Path, cfg: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Checks that ``workdir`` is new or holds a run of a compatible config; writes nothing.

    Returns the stored config (a dict) or None for a fresh workdir.
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
    epochs_done = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
    if epochs_done and max(epochs_done) > cfg["num_epochs"]:
        raise ConfigError(
            f"workdir {workdir} already holds a checkpoint of epoch {max(epochs_done)} > "
            f"num_epochs={cfg['num_epochs']}; use --config.num_epochs={max(epochs_done)} or more, or a new --workdir"
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


def _train_step_one(model, tx, state: TrainState, images, labels, seed):
    """One SGD step of one replica: augment (key from seed and step), forward, backward, update."""
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
    return new_state, {"loss": loss, "accuracy": jnp.mean(_correct(logits, labels))}


def make_train_step(model, tx, mesh: Mesh, num_seeds: int) -> Callable:
    """The jitted, data-parallel train step over all replicas; the state is donated.

    Returns:
      ``step(state, images, labels, seeds) -> (state, {"loss", "accuracy"})`` with
      ``images`` uint8 ``(num_seeds, batch, 32, 32, 3)`` and ``labels`` int32
      ``(num_seeds, batch)`` sharded along the batch axis, ``seeds`` int32
      ``(num_seeds,)``; metrics are float32 ``(num_seeds,)`` batch means.
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


class _Logger:
    """metrics.jsonl and TensorBoard (one writer per seed); only process 0 writes."""

    def __init__(self, workdir: Path, seeds: Sequence[int], resume_step: int, active: bool):
        self.active, self.seeds = active, list(seeds)
        if not active:
            return
        path = workdir / _METRICS_FILE
        kept = _read_metrics(path, resume_step)
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        from tensorboardX import SummaryWriter  # imported late: it is only needed once training starts

        self.writers = [SummaryWriter(str(workdir / "tensorboard" / f"seed{s}")) for s in self.seeds]

    def write(self, kind: str, epoch: int, step: int, per_seed: dict[str, np.ndarray], shared: dict[str, float]):
        if not self.active:
            return
        for i, seed in enumerate(self.seeds):
            rec = {"kind": kind, "epoch": epoch, "step": step, "seed": seed}
            rec.update({k: float(v[i]) for k, v in per_seed.items()})
            rec.update({k: float(v) for k, v in shared.items()})
            self.file.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k not in ("kind", "epoch", "step", "seed"):
                    self.writers[i].add_scalar(self._tag(kind, k), v, step)
        self.file.flush()

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


def _maybe_initialize_distributed(config) -> None:
    if config.get("distributed", False) is True:
        try:
            jax.distributed.initialize()
        except RuntimeError as e:
            if "already" not in str(e).lower():  # initialized by the caller: fine
                raise


def _checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _as_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


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
      ConfigError, anodev2_jax.data.DataError: bad input, raised before anything is written.
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
    _check_workdir(workdir, cfg)
    seeds = [config.seed + i for i in range(config.num_seeds)]
    tx, schedule, init, train_step, eval_step = _programs(
        model, _OptimizerSpec.from_config(config, steps_per_epoch), mesh, len(seeds)
    )
    abstract_one = jax.eval_shape(functools.partial(_init_one, model, tx), jnp.zeros((), jnp.int32))
    num_params = models_lib.count_params(abstract_one.params)

    # ---- the run directory
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / _CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    repl = replicated(mesh)
    seeds_arr = put_global(np.asarray(seeds, np.int32), repl)
    start_epoch = manager.latest_step() or 0
    if start_epoch:
        import orbax.checkpoint as ocp

        abstract = jax.eval_shape(init, seeds_arr)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), _as_dict(abstract))
        state = TrainState(**manager.restore(start_epoch, args=ocp.args.StandardRestore(target)))
    else:
        state = init(seeds_arr)
    step = int(np.asarray(state.step)[0])
    logger = _Logger(workdir, seeds, step, is_main)
    progress = _Progress(is_main)
    progress_every = max(1, steps_per_epoch // 50)  # each update syncs with the device
    if is_main:
        print(
            f"{config.model} {config.method} seeds {seeds}: {num_params:,} params, {num_devices} device(s), "
            f"{steps_per_epoch} steps/epoch, epochs {start_epoch + 1}..{config.num_epochs}, workdir {workdir}"
            + (f" (resumed from epoch {start_epoch})" if start_epoch else ""),
            flush=True,
        )

    train_sharding = batch_sharding(mesh)
    images_per_step = len(seeds) * batch_size
    train_time, train_images = 0.0, 0  # for images_per_s, without each session's first (compiling) step
    last_train = {"train_loss": None, "train_accuracy": None}
    test_loss = test_acc = None

    try:
        for epoch in range(start_epoch, config.num_epochs):
            lr = float(schedule(step))
            sums = {"loss": 0.0, "accuracy": 0.0}
            window = {"loss": 0.0, "accuracy": 0.0}
            t_epoch = t_window = time.perf_counter()
            first_step_done = None
            for i, idx in enumerate(_epoch_indices(num_train, batch_size, seeds, epoch), start=1):
                images = put_global(ds.x_train[idx], train_sharding)
                labels = put_global(ds.y_train[idx], train_sharding)
                state, metrics = train_step(state, images, labels, seeds_arr)
                step += 1
                for k in sums:  # device-side sums: no host sync per step
                    sums[k] = sums[k] + metrics[k]
                    window[k] = window[k] + metrics[k]
                if first_step_done is None and epoch == start_epoch:
                    jax.block_until_ready(metrics)
                    first_step_done = time.perf_counter()
                if progress.tty and (i % progress_every == 0 or i == steps_per_epoch):
                    loss, acc = (float(np.mean(sums[k])) / i for k in ("loss", "accuracy"))  # syncs
                    seconds = time.perf_counter() - t_epoch
                    progress.update(
                        f"epoch {epoch + 1}/{config.num_epochs} step {i}/{steps_per_epoch} "
                        f"loss {loss:.4f} acc {acc:.4f} {i * images_per_step / max(seconds, 1e-9):.0f} img/s"
                    )
                if config.log_every_steps and step % config.log_every_steps == 0:
                    n_win = min(config.log_every_steps, i)
                    w = {f"train_{k}": np.asarray(v, np.float64) / n_win for k, v in window.items()}
                    now = time.perf_counter()
                    ips = n_win * images_per_step / max(now - t_window, 1e-9)
                    logger.write("step", epoch + 1, step, w, {"learning_rate": float(schedule(step - 1)), "images_per_s": ips})
                    window, t_window = {"loss": 0.0, "accuracy": 0.0}, now
            train = {f"train_{k}": np.asarray(v, np.float64) / steps_per_epoch for k, v in sums.items()}
            t_end = time.perf_counter()
            epoch_time = t_end - t_epoch
            if first_step_done is not None:
                train_time += t_end - first_step_done
                train_images += (steps_per_epoch - 1) * images_per_step
            else:
                train_time += epoch_time
                train_images += steps_per_epoch * images_per_step
            last_train = {k: v.tolist() for k, v in train.items()}
            per_seed = dict(train)
            done = epoch + 1
            if done % config.eval_every_epochs == 0 or done == config.num_epochs:
                test_loss, test_acc = _evaluate(eval_step, state, ds, eval_batch_size, mesh)
                per_seed.update(test_loss=test_loss, test_accuracy=test_acc)
            ips = steps_per_epoch * images_per_step / max(epoch_time, 1e-9)
            logger.write("epoch", done, step, per_seed, {"learning_rate": lr, "images_per_s": ips, "epoch_time_s": epoch_time})
            text = (
                f"epoch {done}/{config.num_epochs} loss {train['train_loss'].mean():.4f} "
                f"acc {train['train_accuracy'].mean():.4f}"
            )
            if "test_accuracy" in per_seed:
                text += f" test_loss {per_seed['test_loss'].mean():.4f} test_acc {per_seed['test_accuracy'].mean():.4f}"
            progress.done(text + f" lr {lr:.4g} {ips:.0f} img/s {epoch_time:.1f}s")
            if done % config.checkpoint_every_epochs == 0 or done == config.num_epochs:
                import orbax.checkpoint as ocp

                manager.save(done, args=ocp.args.StandardSave(_as_dict(state)))
        if test_acc is None:  # resumed a finished run: evaluate the restored state
            test_loss, test_acc = _evaluate(eval_step, state, ds, eval_batch_size, mesh)
        manager.wait_until_finished()
    finally:
        logger.close()
        manager.close()

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
        "wall_time_s": time.perf_counter() - t_start,
        "images_per_s": train_images / train_time if train_time > 0 else None,
        "ode": {k: getattr(ode_config, k) for k in _KNOB_FIELDS},
        "config": cfg,
    }
    if is_main:
        (workdir / _SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"test accuracy over {len(seeds)} seed(s): min {100 * acc.min():.2f}% max {100 * acc.max():.2f}% "
            f"avg {100 * acc.mean():.2f}% ({config.model} {config.method}; summary in {workdir / _SUMMARY_FILE})",
            flush=True,
        )
    return summary
