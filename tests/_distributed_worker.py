"""One JAX process of ``tests/test_distributed.py`` (a script; pytest does not collect it).

Usage::

    python tests/_distributed_worker.py OUTDIR

The environment says which process this is: with ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` and ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` set, it joins that many
processes through the library's own ``jax.distributed.initialize`` call
(``config.distributed=True``); otherwise it runs alone. The devices per process come
from ``XLA_FLAGS`` (``--xla_force_host_platform_device_count``).

1. ``_STEPS`` train steps of the tiny config on one fixed global batch, each process
   putting only ITS rows of the batch on its devices
   (``jax.make_array_from_process_local_data``); process 0 writes the losses, the initial
   and final params and the BatchNorm statistics to ``OUTDIR/steps.npz``.
2. ``train_and_evaluate`` of the same config (one epoch, 2 steps, both in one call on the
   device-resident data: ``steps_per_call=2``) into ``OUTDIR/run``, as ``python train.py
   --config.distributed=True`` runs it. It reuses step 1's optimizer and init programs
   (``steps.programs`` is cached per setup) and compiles the call and evaluation.
"""

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from anodev2_jax import data as data_lib  # noqa: E402
from anodev2_jax import optim, sharding, steps, training  # noqa: E402
from configs import smoke  # noqa: E402

_STEPS = 3


def tiny_config():
    """The smoke config cut down to seconds: 64 / 64 synthetic images, batch 32, 1 epoch (2 steps)."""
    config = smoke.get_config("anodev2_conf2")
    config.num_train, config.num_test = 64, 64
    config.batch_size = 32
    config.num_epochs = 1
    config.keep_checkpoints = 1
    config.steps_per_call = 2  # the whole epoch in one call: each process gathers its rows on its devices
    config.distributed = "JAX_NUM_PROCESSES" in os.environ
    return config


def flat(tree, prefix):
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_steps(config, out: Path) -> None:
    model = steps.create_model(config)
    mesh = sharding.make_mesh()
    spec = optim.OptimizerSpec.from_config(config, config.num_train // config.batch_size)
    progs = steps.programs(model, spec, mesh, 1, config.augment)  # the programs train_and_evaluate uses (same cache key)
    init, step = progs.init, progs.train_step
    seeds = sharding.put_global(np.asarray([config.seed], np.int32), sharding.replicated(mesh))
    state = init(seeds)

    ds = data_lib.load_dataset(config.dataset, num_train=config.num_train, num_test=config.num_test, seed=config.data_seed)
    b = config.batch_size
    images, labels = ds.x_train[None, :b], ds.y_train[None, :b]  # the global batch (num_seeds=1, B, ...)
    batches = sharding.batch_sharding(mesh)
    n, p = jax.process_count(), jax.process_index()
    rows = slice(p * b // n, (p + 1) * b // n)  # this process's rows (its devices come p-th in the mesh)
    g_images = jax.make_array_from_process_local_data(batches, images[:, rows], images.shape)
    g_labels = jax.make_array_from_process_local_data(batches, labels[:, rows], labels.shape)
    for shard in g_images.addressable_shards:  # each local device holds a slice of this process's rows
        held = range(b)[shard.index[1]]
        assert rows.start <= held.start and held.stop <= rows.stop, (shard.index, rows)
        np.testing.assert_array_equal(np.asarray(shard.data), images[shard.index])

    result = {"num_devices": np.asarray(mesh.devices.size), "num_processes": np.asarray(n)}
    result.update(flat(state.params, "init"))  # before the steps donate the state
    losses = []
    for _ in range(_STEPS):
        state, metrics = step(state, g_images, g_labels, seeds)
        losses.append(np.asarray(metrics["loss"]))
    result["losses"] = np.stack(losses)
    result.update(flat(state.params, "params"))
    result.update(flat(state.batch_stats, "batch_stats"))
    if p == 0:
        np.savez(out, **result)


def log(t0, what):
    print(f"process {jax.process_index()}: {what} at {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    outdir = Path(sys.argv[1])
    config = tiny_config()
    sharding.maybe_initialize_distributed(config)  # before any JAX computation; a no-op alone
    log(t0, f"initialized, {jax.process_count()} process(es), {jax.device_count()} devices")
    run_steps(config, outdir / "steps.npz")
    log(t0, "steps done")
    training.train_and_evaluate(config, outdir / "run")
    log(t0, f"train_and_evaluate done (programs cache {steps.programs.cache_info()})")
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
        log(t0, "shut down")
