"""The jitted, data-parallel steps: train state, init, train step, eval step (all replicas at once).

The train state is a plain pytree (:class:`TrainState`) whose every leaf has a leading
**seed axis** of length ``num_seeds``. Replica ``i`` uses seed ``config.seed + i``: its init
key, augmentation keys and data order all derive from that seed alone, so replica ``i`` of
a vmapped run equals a single run with that seed. ``num_seeds > 1`` maps the per-replica
step with ``jax.vmap`` (one compiled program); ``num_seeds == 1`` indexes the axis away
inside the jitted step instead, so single runs compile the plain model. Randomness per
replica: ``root = key(seed)``; init key ``fold_in(root, 0)``; augmentation key of global
step ``t``: ``fold_in(fold_in(root, 1), t)``, computed inside the step from the state's
step counter. Images are normalized to float32 on the device; the loss and metrics are
float32 (explicit casts, so training runs unchanged with ``jax_enable_x64`` and strict
dtype promotion).

Two ways to feed a step: :func:`make_train_step` takes a batch gathered on the host (one
call per step); :func:`make_train_call` takes the whole training split resident on the
devices and the epoch's index array, and runs ``length`` steps in one call (``lax.scan``),
each gathering its own batch on the device (:func:`anodev2_jax.data.gather_rows`) at the
row the state's step counter points to. Both run the same :func:`train_step_one`, so every
step gets the same batch, key and learning rate either way; they are different compiled
programs, so the numbers agree to round-off, not bitwise (see :mod:`anodev2_jax.engine`).
:func:`make_eval_call` is the evaluation counterpart.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from anodev2_jax import data as data_lib
from anodev2_jax import models, optim, run_config, sharding
from anodev2_jax.errors import ConfigError

__all__ = [
    "TrainState",
    "Programs",
    "create_model",
    "root_key",
    "init_one",
    "over_seeds",
    "init_train_state",
    "cross_entropy",
    "correct",
    "all_finite",
    "train_step_one",
    "make_train_step",
    "eval_step_one",
    "make_eval_step",
    "make_train_call",
    "make_eval_call",
    "programs",
    "evaluate",
]


def create_model(config, num_devices: Optional[int] = None, defaults: Optional[dict[str, Any]] = None):
    """``get_model(config.model, config.method, **ODE knobs)``; bad knobs raise :class:`ConfigError`.

    ``defaults``: values for knobs the config leaves None, before the method's defaults
    (:func:`anodev2_jax.run_config.legacy_defaults` of a run directory written before a
    default changed).

    ``config.remat_budget_mb`` is per device; the model gets it for the arrays it sees:
    inside the jitted step an ODE block sees the global batch of one replica, while a
    device holds ``1 / num_devices`` of the batch (the mesh spans all devices,
    ``jax.device_count()`` by default) of each of the ``num_seeds`` vmapped replicas, so
    the model's budget is ``remat_budget_mb * num_devices / num_seeds``.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    budget = config.remat_budget_mb * num_devices / config.num_seeds
    try:
        knobs = {k: (defaults or {}).get(k) if v is None else v for k, v in run_config.knobs(config).items()}
        return models.get_model(config.model, config.method, **knobs, remat_budget_mb=budget)
    except ValueError as e:
        raise ConfigError(
            f"bad ODE settings for model={config.model!r}, method={config.method!r}: {e} "
            f"(set with --config.<knob>; None means the method's default)"
        ) from e


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


def root_key(seed):
    """The replica's root PRNG key: every random choice of the replica derives from it."""
    return jax.random.key(seed)


def init_one(model, tx, seed) -> TrainState:
    """One replica's state from its seed (int32 scalar, may be traced)."""
    sample = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.fold_in(root_key(seed), 0), sample, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def over_seeds(fn: Callable, num_seeds: int, in_axes: tuple) -> Callable:
    """``fn`` applied per replica: ``jax.vmap`` for several seeds, plain indexing for one."""
    if num_seeds > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)]
        return jax.tree.map(lambda a: a[None], fn(*args))

    return single


def init_train_state(model, tx, seeds: Sequence[int], mesh: jax.sharding.Mesh) -> TrainState:
    """The replicated train state of ``len(seeds)`` replicas (leading seed axis), built on device."""
    init = over_seeds(functools.partial(init_one, model, tx), len(seeds), (0,))
    seeds_arr = sharding.put_global(np.asarray(seeds, np.int32), sharding.replicated(mesh))
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(seeds_arr)


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy of ``logits`` ``(N, classes)`` against integer ``labels`` ``(N,)``, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def correct(logits, labels):
    """Per-example 1.0 / 0.0: the arg-max of ``logits`` ``(N, classes)`` equals ``labels`` ``(N,)``."""
    return (jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels).astype(jnp.float32)


def all_finite(tree) -> jax.Array:
    """A bool scalar: every float leaf of ``tree`` is free of NaN and Inf."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def train_step_one(model, tx, state: TrainState, images, labels, seed, augment: str = "crop_flip"):
    """One SGD step of one replica: augment (key from seed and step), forward, backward, update.

    Augmentation (``augment``, ``config.augment``: random crop with 4 pixels of zero
    padding and horizontal flip, the crop only, or none; a static choice, fixed when the
    step is traced) and normalization run here, on the device
    (:func:`anodev2_jax.data.preprocess_train`); the loss is the mean cross-entropy. A
    step whose loss, gradients or new params / BatchNorm statistics are not all finite
    leaves every float leaf of the state (params, BatchNorm statistics, momentum) as it
    was, through a ``jnp.where`` on the flag; integer counters
    (global step, optax's schedule count) advance, so the learning-rate schedule and data
    order stay on the global step. It reports ``finite=False`` with loss and accuracy 0
    (left out of the loop's means, see :class:`anodev2_jax.stopping.FiniteFlags`).
    """
    aug_key = jax.random.fold_in(jax.random.fold_in(root_key(seed), 1), state.step)
    x = data_lib.preprocess_train(aug_key, images, augment)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(cross_entropy(logits, labels)), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    finite = all_finite((loss, grads, new_state.params, new_state.batch_stats))

    def unless_bad(new, old):
        return jnp.where(finite, new, old) if jnp.issubdtype(new.dtype, jnp.inexact) else new

    new_state = jax.tree.map(unless_bad, new_state, state)
    zero = jnp.zeros((), jnp.float32)
    accuracy = jnp.mean(correct(logits, labels))
    metrics = {"loss": jnp.where(finite, loss, zero), "accuracy": jnp.where(finite, accuracy, zero), "finite": finite}
    return new_state, metrics


def make_train_step(model, tx, mesh: jax.sharding.Mesh, num_seeds: int, augment: str = "crop_flip") -> Callable:
    """The jitted, data-parallel train step over all replicas; the state is donated.

    ``augment``: ``config.augment``, see :func:`train_step_one`.

    Returns:
      ``step(state, images, labels, seeds) -> (state, {"loss", "accuracy", "finite"})``
      with ``images`` uint8 ``(num_seeds, batch, 32, 32, 3)`` and ``labels`` int32
      ``(num_seeds, batch)`` sharded along the batch axis, ``seeds`` int32
      ``(num_seeds,)``; ``loss`` and ``accuracy`` are float32 ``(num_seeds,)`` batch
      means, ``finite`` bool ``(num_seeds,)``: False where the replica's step was not
      finite and was not applied (its loss and accuracy then read 0).
    """
    step = over_seeds(functools.partial(train_step_one, model, tx, augment=augment), num_seeds, (0, 0, 0, 0))
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, batch, batch, repl), out_shardings=(repl, repl), donate_argnums=0)


def eval_step_one(model, state: TrainState, images, labels, mask):
    """Masked sums of the test loss and of correct predictions of one replica on one batch."""
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, data_lib.preprocess_eval(images), train=False
    )
    w = mask.astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(cross_entropy(logits, labels) * w),
        "correct": jnp.sum(correct(logits, labels) * w),
    }


def make_eval_step(model, mesh: jax.sharding.Mesh, num_seeds: int) -> Callable:
    """The jitted eval step: ``(state, images (B,...), labels (B,), mask (B,)) -> sums (num_seeds,)``."""
    step = over_seeds(functools.partial(eval_step_one, model), num_seeds, (0, None, None, None))
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh, seed_axis=False)
    return jax.jit(step, in_shardings=(repl, batch, batch, batch), out_shardings=repl)


def make_train_call(
    model, tx, mesh: jax.sharding.Mesh, num_seeds: int, length: int, steps_per_epoch: int, augment: str = "crop_flip"
) -> Callable:
    """``length`` optimizer steps of every replica in one jitted call, on data resident on the devices.

    ``augment``: ``config.augment``, see :func:`train_step_one`.

    Returns:
      ``call(state, x_train, y_train, idx, seeds) -> (state, metrics)``: ``x_train`` uint8
      ``(N, 32, 32, 3)`` and ``y_train`` int32 ``(N,)`` replicated (the whole split),
      ``idx`` int32 ``(num_seeds, steps_per_epoch, batch)`` the epoch's index array sharded
      along its batch axis (:func:`anodev2_jax.sharding.index_sharding`), ``seeds`` as for
      :func:`make_train_step`. Step ``t`` (the state's counter, so no position is passed
      from the host) trains on rows ``idx[:, t % steps_per_epoch]``, gathered on the device.
      ``metrics`` holds :func:`make_train_step`'s per-step metrics stacked on a leading
      axis of length ``length``: ``(length, num_seeds)`` each. The state is donated.

    ``length == 1`` is the bare step (no loop: on XLA:CPU a convolution inside a loop runs
    several times slower, jax-ml/jax#12868); longer calls are one ``lax.scan`` whose trip
    count is ``length``. A call must not cross the end of the epoch its ``idx`` belongs to.
    """
    step = over_seeds(functools.partial(train_step_one, model, tx, augment=augment), num_seeds, (0, 0, 0, 0))
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def one(state, x, y, idx, seeds):
        pos = state.step[0] % steps_per_epoch  # every replica is at the same step
        rows = lax.dynamic_index_in_dim(idx, pos, axis=1, keepdims=False)  # (num_seeds, batch)
        images = lax.with_sharding_constraint(data_lib.gather_rows(x, rows), batch)
        labels = lax.with_sharding_constraint(data_lib.gather_rows(y, rows), batch)
        return step(state, images, labels, seeds)

    def call(state, x, y, idx, seeds):
        if length == 1:
            state, metrics = one(state, x, y, idx, seeds)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return lax.scan(lambda s, _: one(s, x, y, idx, seeds), state, None, length=length)

    in_shardings = (repl, repl, repl, sharding.index_sharding(mesh), repl)
    return jax.jit(call, in_shardings=in_shardings, out_shardings=(repl, repl), donate_argnums=0)


def make_eval_call(model, mesh: jax.sharding.Mesh, num_seeds: int, length: int) -> Callable:
    """``length`` evaluation batches in one jitted call, on the test split resident on the devices.

    Returns:
      ``call(state, x_test, y_test, idx, mask, start) -> {"loss_sum", "correct"}``, float32
      ``(num_seeds,)`` sums over batches ``start .. start + length - 1`` of ``idx`` / ``mask``
      (int32 / bool ``(num_batches, batch)`` from :func:`anodev2_jax.data.eval_index_array`,
      sharded along the batch axis); ``start`` an int32 scalar on the device. The sums run
      in batch order, as :func:`evaluate`'s.
    """
    step = over_seeds(functools.partial(eval_step_one, model), num_seeds, (0, None, None, None))
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh, seed_axis=False)

    def one(state, x, y, idx, mask, b):
        rows = lax.dynamic_index_in_dim(idx, b, axis=0, keepdims=False)
        valid = lax.dynamic_index_in_dim(mask, b, axis=0, keepdims=False)
        images = lax.with_sharding_constraint(data_lib.gather_rows(x, rows), batch)
        return step(state, images, data_lib.gather_rows(y, rows), valid)

    def call(state, x, y, idx, mask, start):
        if length == 1:
            return one(state, x, y, idx, mask, start)

        def body(sums, b):
            out = one(state, x, y, idx, mask, start + b)
            return jax.tree.map(jnp.add, sums, out), None

        zeros = {k: jnp.zeros((num_seeds,), jnp.float32) for k in ("loss_sum", "correct")}
        return lax.scan(body, zeros, jnp.arange(length, dtype=jnp.int32))[0]

    idx = sharding.index_sharding(mesh, ndim=2)
    return jax.jit(call, in_shardings=(repl, repl, repl, idx, idx, repl), out_shardings=repl)


class Programs(NamedTuple):
    """The optimizer and the jitted functions of one run setup (see :func:`programs`)."""

    tx: optax.GradientTransformation
    schedule: Callable[[Any], jax.Array]
    init: Callable  # seeds (num_seeds,) int32 -> replicated TrainState
    train_step: Callable  # make_train_step's
    eval_step: Callable  # make_eval_step's
    train_call: Callable[[int], Callable]  # length -> make_train_call's program of that length (cached)
    eval_call: Callable[[int], Callable]  # length -> make_eval_call's program of that length (cached)


@functools.lru_cache(maxsize=32)
def programs(
    model, spec: optim.OptimizerSpec, mesh: jax.sharding.Mesh, num_seeds: int, augment: str = "crop_flip"
) -> Programs:
    """Optimizer, schedule and the jitted init / train / eval functions of one run setup.

    ``augment``: ``config.augment`` (:func:`train_step_one`), part of the setup.

    Cached, so runs of the same setup in one process (a sweep over seeds in a notebook, a
    resumed run, the tests) compile once: seeds enter the programs as arguments. The call
    programs are cached per length too: an epoch needs at most two lengths (``steps_per_call``
    and the epoch's remainder).
    """
    tx, schedule = optim.make_optimizer(spec)
    init = jax.jit(over_seeds(functools.partial(init_one, model, tx), num_seeds, (0,)), out_shardings=sharding.replicated(mesh))
    train_call = functools.lru_cache(maxsize=None)(
        lambda length: make_train_call(model, tx, mesh, num_seeds, length, spec.steps_per_epoch, augment)
    )
    eval_call = functools.lru_cache(maxsize=None)(lambda length: make_eval_call(model, mesh, num_seeds, length))
    return Programs(
        tx, schedule, init, make_train_step(model, tx, mesh, num_seeds, augment), make_eval_step(model, mesh, num_seeds),
        train_call, eval_call,
    )  # fmt: skip


def evaluate(eval_step, state, ds: data_lib.Dataset, batch_size: int, mesh: jax.sharding.Mesh):
    """Test loss and accuracy per replica, float64 ``(num_seeds,)`` each.

    The whole test split with the running BatchNorm statistics (``train=False``), in batches
    of ``batch_size`` whose padded last batch is masked.
    """
    batches = sharding.batch_sharding(mesh, seed_axis=False)
    loss_sum, n_correct = 0.0, 0.0
    for idx, valid in data_lib.eval_batches(len(ds.y_test), batch_size):
        mask = np.arange(batch_size) < valid
        out = eval_step(
            state,
            sharding.put_global(ds.x_test[idx], batches),
            sharding.put_global(ds.y_test[idx], batches),
            sharding.put_global(mask, batches),
        )
        loss_sum, n_correct = loss_sum + out["loss_sum"], n_correct + out["correct"]  # on device: no sync per batch
    n = len(ds.y_test)
    return np.asarray(loss_sum, np.float64) / n, np.asarray(n_correct, np.float64) / n
