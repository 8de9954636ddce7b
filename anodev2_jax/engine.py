"""Where an epoch runs: the data resident on the devices and ``steps_per_call`` steps per jitted call.

:class:`DeviceEngine` (the default whenever the data fits) places the training and test
splits (uint8 images, int32 labels) on every device once per run, replicated, and the
epoch's index array once per epoch; each call then runs ``steps_per_call`` optimizer
steps (:func:`anodev2_jax.steps.make_train_call`: a ``lax.scan`` whose steps gather their
batches on the device) with no host work and no host-device transfer in between, and
evaluation runs the test split the same way (:func:`~anodev2_jax.steps.make_eval_call`).
:class:`HostEngine` is the per-step path of before: batches gathered on the host and copied
to the devices every step. It is used when the dataset does not fit the devices
(:func:`anodev2_jax.sharding.fits_on_devices`), with ``steps_per_call = 1``.

Decisions:

* **The epoch's order is computed on the host and placed on the device.** The issue asks
  for "the per-epoch permutation computed on the device from the run's key"; the data
  order of every existing run is numpy's ``default_rng([seed, epoch]).permutation``
  (:func:`epoch_indices`), which the committed pre-layout run
  (``tests/test_checkpoints.py``) and every user's resumed run depend on, and no JAX PRNG
  reproduces it. So the host computes the epoch's index array ``(num_seeds,
  steps_per_epoch, batch)`` int32 once per epoch (milliseconds, ~1 MB for CIFAR-10 x 5
  seeds) and places it on the devices explicitly, sharded along its batch axis; inside a
  call each step reads its row from the state's step counter. Nothing per step crosses
  the host-device boundary; the augmentation keys were already derived on the device
  from (seed, step). Every process computes the same indices, as before.
* **Call lengths.** ``steps_per_call = 0`` (automatic) means the whole epoch on GPU / TPU
  and 1 on CPU, where a convolution inside a loop runs several times slower than
  unrolled (jax-ml/jax#12868; measured here on a ResNet-4 step at batch 256: 3-4x, see
  ``benchmarks/host_overhead.py``). Calls are aligned on the epoch: they end at multiples
  of ``steps_per_call`` and at the epoch's end, so one run needs at most two programs per
  epoch length (and a third after a resume with another ``steps_per_call``). Larger
  values are capped at the epoch. Logging windows need not end at a call boundary: a call
  returns its per-step metrics (three ``(steps, num_seeds)`` arrays) and the host folds
  them into the loop's sums step by step, in order (``training.Trainer``), so the records,
  sums and checkpoints are those of the per-step loop. Calls that stopped at every log
  boundary would need up to ~40 distinct program lengths at CIFAR-10's 195 steps per epoch
  and ``log_every_steps=100``.
* **Stops act at call boundaries.** A stop signal waits for the running call, so at most
  one call (with whole-epoch calls, one epoch: about a second for ResNet-4 on an H100,
  minutes on a CPU, hence 1 there); checkpoints, non-finite checks and records happen at
  call boundaries only.
* **When the data does not fit** (its replicated bytes exceed
  :data:`~anodev2_jax.sharding.DEVICE_DATA_FRACTION` of a device's memory) the automatic
  choice is the host path; an explicit ``steps_per_call > 1`` is refused before any work.
  CIFAR-10 takes 180 MB per device.
* **Bitwise equality.** On XLA:CPU at its default optimization level, a step inside the
  scan computes exactly what the standalone step computes (checked for ResNet-4 baseline,
  configurations 1 and 2, batch 8 to 256): results do not depend on ``steps_per_call``.
  At ``--xla_backend_optimization_level=0`` (the test suite's compile-speed setting)
  XLA:CPU compiles the transposed (input-gradient) convolution inside a loop differently
  and results differ by round-off from the first step; ``tests/test_engine.py`` therefore
  compares in a subprocess at the default level.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from anodev2_jax import data as data_lib
from anodev2_jax import sharding, steps
from anodev2_jax.errors import ConfigError

__all__ = [
    "dataset_bytes",
    "resolve_steps_per_call",
    "call_lengths",
    "epoch_indices",
    "epoch_index_array",
    "DeviceEngine",
    "HostEngine",
]


def dataset_bytes(ds: data_lib.Dataset) -> int:
    """Bytes of the four splits, as placed on each device (uint8 images, int32 labels)."""
    return sum(np.asarray(a).nbytes for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))


def resolve_steps_per_call(requested: int, steps_per_epoch: int, fits: bool, backend: str) -> int:
    """``config.steps_per_call`` resolved: 0 is the whole epoch on GPU / TPU and 1 on CPU (or when the data does not fit).

    Capped at ``steps_per_epoch``. Raises :class:`ConfigError` for ``requested > 1`` when
    the data does not fit on the devices.
    """
    if requested == 0:
        return steps_per_epoch if fits and backend != "cpu" else 1
    if requested > 1 and not fits:
        raise ConfigError(
            f"config.steps_per_call={requested} needs the dataset on every device, but it exceeds "
            f"{sharding.DEVICE_DATA_FRACTION:.0%} of the device memory; use --config.steps_per_call=1 "
            "(batches gathered on the host) or 0 (automatic)"
        )
    return min(requested, steps_per_epoch)


def call_lengths(first: int, steps_per_epoch: int, steps_per_call: int) -> list[int]:
    """The lengths of an epoch's calls from in-epoch position ``first``: ending at multiples of ``steps_per_call`` and at the epoch's end."""
    lengths, i = [], first
    while i < steps_per_epoch:
        n = min(steps_per_call - i % steps_per_call, steps_per_epoch - i)
        lengths.append(n)
        i += n
    return lengths


def epoch_indices(num_train: int, batch_size: int, seeds: Sequence[int], epoch: int) -> Iterator[np.ndarray]:
    """Index batches ``(num_seeds, batch)`` of epoch ``epoch`` (0-based): each seed its own order.

    Seed ``s``'s order is ``numpy.random.default_rng([s, epoch])``'s permutation: nothing
    random lives outside (seed, epoch, step), which is what makes resuming exact. The last
    partial batch of an epoch is dropped (one compiled shape).
    """
    streams = [data_lib.epoch_batches(num_train, batch_size, np.random.default_rng([s, epoch])) for s in seeds]
    for idx in zip(*streams):
        yield np.stack(idx)


def epoch_index_array(num_train: int, batch_size: int, seeds: Sequence[int], epoch: int) -> np.ndarray:
    """All of :func:`epoch_indices` as one int32 array ``(num_seeds, steps_per_epoch, batch)``: row ``[:, i]`` is batch ``i``."""
    return np.stack(list(epoch_indices(num_train, batch_size, seeds, epoch)), axis=1).astype(np.int32)


class DeviceEngine:
    """The splits resident on the devices; ``steps_per_call`` optimizer steps per jitted call.

    Created once per run; places both splits (replicated) and the evaluation index and
    mask arrays (sharded along the batch axis), then :meth:`begin_epoch` places each
    epoch's index array. :meth:`train` and :meth:`evaluate` transfer nothing.
    """

    def __init__(self, programs: steps.Programs, mesh, ds: data_lib.Dataset, seeds, batch_size: int,
                 eval_batch_size: int, steps_per_call: int, seeds_arr: jax.Array):  # fmt: skip
        self.programs, self.mesh, self.seeds, self.batch_size = programs, mesh, list(seeds), batch_size
        self.seeds_arr, self.steps_per_call = seeds_arr, steps_per_call
        self.num_train = len(ds.y_train)
        repl = sharding.replicated(mesh)
        self.x_train, self.y_train, self.x_test, self.y_test = (
            sharding.put_global(a, repl) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
        )
        eval_idx, eval_mask = data_lib.eval_index_array(len(ds.y_test), eval_batch_size)
        rows = sharding.index_sharding(mesh, ndim=2)
        self.eval_idx, self.eval_mask = sharding.put_global(eval_idx, rows), sharding.put_global(eval_mask, rows)
        # Evaluation calls: lengths by call_lengths, each starting batch an int32 scalar placed now.
        num_batches = len(eval_idx)
        self.eval_calls = []
        start = 0
        for n in call_lengths(0, num_batches, min(steps_per_call, num_batches)):
            self.eval_calls.append((n, sharding.put_global(np.asarray(start, np.int32), repl)))
            start += n
        self.idx: Optional[jax.Array] = None
        self.next: Optional[tuple[int, np.ndarray]] = None

    def prefetch(self, epoch: int) -> None:
        """Computes epoch ``epoch``'s index array on the host now (while the device runs the current epoch's calls)."""
        self.next = (epoch, epoch_index_array(self.num_train, self.batch_size, self.seeds, epoch))

    def begin_epoch(self, epoch: int) -> None:
        """Places epoch ``epoch``'s index array on the devices (explicitly; before the epoch's calls)."""
        if self.next is None or self.next[0] != epoch:
            self.prefetch(epoch)
        idx, self.next = self.next[1], None
        self.idx = sharding.put_global(idx, sharding.index_sharding(self.mesh))

    def train(self, state: steps.TrainState, position: int, length: int) -> tuple[steps.TrainState, dict[str, Any]]:
        """``length`` steps from the state's step; metrics ``(length, num_seeds)`` (``position``: unused, the device counts)."""
        del position
        return self.programs.train_call(length)(state, self.x_train, self.y_train, self.idx, self.seeds_arr)

    def evaluate(self, state: steps.TrainState) -> tuple[np.ndarray, np.ndarray]:
        """Test loss and accuracy per replica, float64 ``(num_seeds,)``: the same numbers as :func:`steps.evaluate`."""
        total = None
        for n, start in self.eval_calls:
            out = self.programs.eval_call(n)(state, self.x_test, self.y_test, self.eval_idx, self.eval_mask, start)
            total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)  # on device, in batch order
        n = self.x_test.shape[0]
        total = jax.device_get(total)
        return np.asarray(total["loss_sum"], np.float64) / n, np.asarray(total["correct"], np.float64) / n


class HostEngine:
    """The per-step path: each step's batch gathered on the host and copied to the devices (one step per call)."""

    def __init__(self, programs: steps.Programs, mesh, ds: data_lib.Dataset, seeds, batch_size: int,
                 eval_batch_size: int, seeds_arr: jax.Array):  # fmt: skip
        self.programs, self.mesh, self.ds, self.seeds = programs, mesh, ds, list(seeds)
        self.batch_size, self.eval_batch_size, self.seeds_arr = batch_size, eval_batch_size, seeds_arr
        self.steps_per_call = 1
        self.train_sharding = sharding.batch_sharding(mesh)
        self.idx: Optional[np.ndarray] = None
        self.next: Optional[tuple[int, np.ndarray]] = None

    def prefetch(self, epoch: int) -> None:
        self.next = (epoch, epoch_index_array(len(self.ds.y_train), self.batch_size, self.seeds, epoch))

    def begin_epoch(self, epoch: int) -> None:
        if self.next is None or self.next[0] != epoch:
            self.prefetch(epoch)
        self.idx, self.next = self.next[1], None

    def train(self, state: steps.TrainState, position: int, length: int) -> tuple[steps.TrainState, dict[str, Any]]:
        """One step on batch ``position`` of the epoch, gathered here."""
        assert length == 1, length
        idx = self.idx[:, position]
        images = sharding.put_global(self.ds.x_train[idx], self.train_sharding)
        labels = sharding.put_global(self.ds.y_train[idx], self.train_sharding)
        return self.programs.train_step(state, images, labels, self.seeds_arr)  # metrics (num_seeds,): one step

    def evaluate(self, state: steps.TrainState) -> tuple[np.ndarray, np.ndarray]:
        return steps.evaluate(self.programs.eval_step, state, self.ds, self.eval_batch_size, self.mesh)
