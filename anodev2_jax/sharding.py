"""Data parallelism with ``jax.sharding``: the device mesh, shardings, global arrays, multi-process start-up.

A 1-D ``Mesh`` over all devices (of all processes) with axis ``"data"``: training batches
``(num_seeds, batch, ...)`` are sharded along the batch axis, the train state is
replicated, and one ``jax.jit`` step lets XLA insert the gradient all-reduce, so BatchNorm
statistics are global over the whole batch, as on one device. Batches are assembled with
``jax.make_array_from_callback`` from the global batch every process computes identically
(each process's devices receive only their rows), so the same code runs on several
processes or hosts (tested with two CPU processes, ``tests/test_distributed.py``).

On-device training (:mod:`anodev2_jax.engine`) places the whole dataset replicated on every
device once per run (:func:`fits_on_devices` says whether it fits) and the epoch's index
array sharded along its batch axis (:func:`index_sharding`): each device then gathers its
own rows of every batch, so the batches are sharded exactly as above, without a host copy.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anodev2_jax.errors import ConfigError

__all__ = [
    "DATA_AXIS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "check_backend",
    "make_mesh",
    "replicated",
    "batch_sharding",
    "index_sharding",
    "put_global",
    "DEVICE_DATA_FRACTION",
    "device_memory_bytes",
    "fits_on_devices",
    "maybe_initialize_distributed",
    "sync_processes",
    "process_0_says",
]

DATA_AXIS = "data"


def check_backend() -> list[jax.Device]:
    """All devices (of all processes); a :class:`ConfigError` if JAX cannot start the platform asked for.

    JAX raises a RuntimeError for an unknown or unloadable platform, and a bare
    ``AssertionError`` when ``JAX_PLATFORMS`` names a known platform whose plugin is not
    installed (``cuda`` on a CPU-only install).
    """
    try:
        return jax.devices()
    except Exception as e:
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        detail = " ".join(str(e).split()).split(" (set JAX_PLATFORMS")[0] or "its jax plugin is not installed"
        raise ConfigError(
            f"JAX cannot start the platform JAX_PLATFORMS={platforms!r} here ({detail[:200]}); set JAX_PLATFORMS=cpu "
            "or unset it, or install the accelerator's jax (e.g. pip install -e '.[cuda12]')"
        ) from None


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes, :func:`check_backend`), axis ``"data"``."""
    devices = check_backend() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the train state: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, seed_axis: bool = True) -> NamedSharding:
    """Batches split along the batch axis: ``(num_seeds, batch, ...)`` or, for eval, ``(batch, ...)``."""
    return NamedSharding(mesh, P(None, DATA_AXIS) if seed_axis else P(DATA_AXIS))


def index_sharding(mesh: Mesh, *, ndim: int = 3) -> NamedSharding:
    """Index arrays split along their last (batch) axis: ``(num_seeds, steps, batch)``, or ``(num_batches, batch)``."""
    return NamedSharding(mesh, P(*([None] * (ndim - 1)), DATA_AXIS))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# Share of each device's memory the replicated dataset may take; the rest is the model's.
# CIFAR-10 (150 MB of training images, 30 MB of test images) is 1% of a 16 GB device.
DEVICE_DATA_FRACTION = 0.25


def device_memory_bytes(mesh: Mesh) -> Optional[int]:
    """The smallest memory limit of this process's devices in the mesh; None where JAX does not say (CPU)."""
    limits = []
    for d in mesh.devices.flat:
        if d.process_index == jax.process_index():
            stats = d.memory_stats() if hasattr(d, "memory_stats") else None
            if stats and stats.get("bytes_limit"):
                limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def fits_on_devices(nbytes: int, mesh: Mesh) -> bool:
    """Whether ``nbytes`` replicated on every device stays within :data:`DEVICE_DATA_FRACTION` of its memory.

    On CPU (no memory limit reported) the "device" memory is the host's, which already holds
    the data: it fits unless the fraction is set to 0 (which forces the host-gather path).
    """
    limit = device_memory_bytes(mesh)
    if limit is None:
        return DEVICE_DATA_FRACTION > 0
    return nbytes <= DEVICE_DATA_FRACTION * limit


ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def maybe_initialize_distributed(config) -> None:
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
    env = {k: os.environ.get(k) for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
    kwargs = {}
    if any(v is not None for v in env.values()):
        try:
            num, pid = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except (TypeError, ValueError):
            num = pid = -1
        if not 0 <= pid < num:
            raise ConfigError(
                f"config.distributed=True with {ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r}, "
                f"{ENV_PROCESS_ID}={env[ENV_PROCESS_ID]!r}: set both, as integers with 0 <= "
                f"{ENV_PROCESS_ID} < {ENV_NUM_PROCESSES} (or neither, to auto-detect on a cluster)"
            )
        if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ConfigError(
                f"config.distributed=True with {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} set needs "
                "JAX_COORDINATOR_ADDRESS=host:port of process 0 too"
            )
        kwargs = {"num_processes": num, "process_id": pid}
    jax.distributed.initialize(**kwargs)


def sync_processes(name: str) -> None:
    """A barrier over all processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_0_says(values: Sequence[int]) -> list[int]:
    """Process 0's ``values`` (small integers) on every process: a decision only process 0 can make (its lock)."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    return [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32))]
