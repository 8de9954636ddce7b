"""Where an epoch runs: the data resident on the devices and ``steps_per_call`` steps per jitted call.

:class:`DeviceEngine` (whenever the data fits) places the training and test splits on every
device once per run and each epoch's index array once per epoch; a call then runs
``steps_per_call`` optimizer steps (:func:`anodev2_jax.steps.make_train_call`, one
``lax.scan`` whose steps gather their batches on the device) with no host work and no
host-device transfer in between; evaluation likewise. "The per-epoch permutation on the
device" is realised as the host's numpy permutation placed on the device once per epoch
(:func:`epoch_index_array` says why). :class:`HostEngine` is the per-step path of before
(batches gathered on the host), used when the data does not fit. Every ``steps_per_call``
gives every step the same batch, augmentation key and learning rate; the numbers agree to
float32 round-off, bitwise only within one compiled program on one machine
(:class:`DeviceEngine`'s docstring says why).
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

    Why 1 on CPU: a convolution inside a loop runs several times slower than unrolled on
    XLA:CPU (jax-ml/jax#12868): a ResNet-4 step inside the scan measured 3.5x slower for
    configuration 1 at batch 256, 4.0x for the baseline at 256 and 4.9x at batch 32
    (``benchmarks/host_overhead.py``). Larger values are capped at the epoch: a stop signal
    waits for the running call, so at most one epoch (well under a second for ResNet-4 on
    an H100 if the targets hold; minutes on a CPU). Data that does not fit (its replicated
    bytes above :data:`~anodev2_jax.sharding.DEVICE_DATA_FRACTION` of a device's memory;
    CIFAR-10 takes 180 MB) takes the host path: automatically for 0, and ``requested > 1``
    raises :class:`ConfigError` before any work.
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
    """The lengths of an epoch's calls from in-epoch position ``first``: ending at multiples of ``steps_per_call`` and at the epoch's end.

    So a run compiles at most two lengths per epoch length (three after a resume with
    another ``steps_per_call``). Calls do not stop at ``log_every_steps`` boundaries: a
    call returns its per-step metrics and ``training.Trainer.fold`` writes the records in
    step order, so records, sums and checkpoints are those of one step per call (calls
    ending at log boundaries would need up to ~40 program lengths at CIFAR-10's 195 steps
    per epoch and ``log_every_steps=100``).
    """
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
    """All of :func:`epoch_indices` as one int32 array ``(num_seeds, steps_per_epoch, batch)``: row ``[:, i]`` is batch ``i``.

    This is how the engine's "per-epoch permutation on the device" is realised: the data
    order of every existing run is numpy's ``default_rng([seed, epoch]).permutation``,
    which the committed pre-layout run (``tests/test_checkpoints.py``) and every user's
    resumed run depend on and no JAX PRNG reproduces. So the host computes this array once
    per epoch (9 ms and 1 MB for CIFAR-10 x 5 seeds, while the device runs the previous
    epoch's last call) and places it on the devices explicitly, sharded along its batch
    axis; inside a call each step reads its row from the state's step counter. Nothing
    per step crosses the host-device boundary (the augmentation keys already came from
    (seed, step) on the device), and every process computes the same array, as before.
    """
    return np.stack(list(epoch_indices(num_train, batch_size, seeds, epoch)), axis=1).astype(np.int32)


class DeviceEngine:
    """The splits resident on the devices; ``steps_per_call`` optimizer steps per jitted call.

    Created once per run; places both splits (replicated) and the evaluation index and
    mask arrays (sharded along the batch axis), then :meth:`begin_epoch` places each
    epoch's index array. :meth:`train` and :meth:`evaluate` transfer nothing.

    What ``steps_per_call`` changes: one step per call and a ``lax.scan`` over several
    steps are different compiled programs of the same steps. Every value gives every step
    exactly the same batch, augmentation key and learning rate (``tests/test_engine.py``
    records them from inside the calls and compares them exactly), and the runs agree to
    float32 round-off, not bitwise: XLA:CPU may compile the loop's transposed
    (input-gradient) convolution differently (it does at the test suite's
    ``--xla_backend_optimization_level=0``), and it generates code for the CPU it runs on,
    which rounds differently on another CPU (``python benchmarks/round_off.py`` measures
    both). So ``steps_per_call`` may change on resume, and the run continues to round-off.
    Bits hold within one program on one machine: a run stopped and resumed with the same
    ``steps_per_call`` ends bitwise equal to the uninterrupted one (stops and checkpoints
    fall on call boundaries, so the resumed calls are the same).
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
