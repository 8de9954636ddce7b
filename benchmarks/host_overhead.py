"""Host overhead of the training loop: the per-step host path against the on-device engine (``steps_per_call``).

Two tables.

1. **Host work per optimizer step, microseconds**, piece by piece, at CIFAR-10's shapes
   (50,000 training images, batch 256, 1 and 5 vmapped seeds): the host gather of the
   batch (``x_train[idx]``), its copy to the device (``put_global`` of images and labels),
   JAX's dispatch of one call with the step's arguments (the train state donated; measured
   on a program that computes nothing, so it is JAX's own cost, not the backend's), the old
   loop's four device-side metric additions, its finite-flag and stop bookkeeping, and the
   new loop's fold of the per-step metrics (numpy, at call boundaries), for: the loop
   before the engine ("old", one call per step), the host path (``engine.HostEngine``,
   used when the data does not fit), the engine with one step per call, and the engine with
   the whole 195-step epoch in one call (dispatch, stop check and the epoch's index array
   shared by its 195 steps). On a GPU a ResNet-4 step is ~0.5-1 ms of kernels, so this host
   work is what the old loop adds there (kernel launches are XLA's and come on top).
2. **images/s of train.py's whole loop against the bare jitted step**: ``train_and_evaluate``
   on a short synthetic epoch, 2 epochs, the second timed (its record's ``images_per_s``),
   for the three paths, against the bare jitted step and the bare call of the whole epoch
   on device-resident data (no host work at all) and a replica of the old loop, in
   interleaved rounds (ratios against the bare step of the same round). The default is a
   short step (ResNet-4 baseline, batch 32) so the loop's own cost shows; on XLA:CPU the
   bare call of several steps shows the cost of a convolution inside a loop
   (jax-ml/jax#12868), the reason ``steps_per_call=0`` means 1 on CPU.

Runtime on the 2-core CPU: ~2-3 minutes; ``--quick`` is a smoke test (batch 8, seconds).

Run: ``python benchmarks/host_overhead.py [--model resnet4] [--method baseline] [--batch 32]
[--steps 16] [--rounds 5] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from anodev2_jax import data as data_lib  # noqa: E402
from anodev2_jax import engine, optim, sharding, steps, stopping, training  # noqa: E402

CIFAR_TRAIN, CIFAR_BATCH, CIFAR_STEPS = 50_000, 256, 195


def median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * common.median(times)


def fold_us(num_seeds: int, steps: int, reps: int) -> float:
    """Per-step cost of ``training.Trainer.fold``'s loop (its numpy body, replicated here) on ``steps`` steps."""
    rng = np.random.default_rng(0)
    fetched = {"loss": rng.random((steps, num_seeds), np.float32), "accuracy": rng.random((steps, num_seeds), np.float32),
               "finite": np.ones((steps, num_seeds), bool)}  # fmt: skip
    flags = stopping.FiniteFlags("stop", list(range(num_seeds)), steps)

    def fold():
        tally = training.zero_loop(num_seeds)
        rows = {k: np.reshape(fetched[k], (steps, num_seeds)) for k in fetched}
        for j in range(steps):
            flags.add(j + 1, rows["finite"][j])
            for k in ("loss", "accuracy"):
                tally[f"epoch_{k}"] = tally[f"epoch_{k}"] + rows[k][j]
                tally[f"window_{k}"] = tally[f"window_{k}"] + rows[k][j]
        flags.pending = []

    return median_us(fold, reps) / steps


def host_overhead_table(args) -> str:
    """Table 1: host microseconds per step, piece by piece, old loop vs the new paths."""
    config = common.make_config(args.model, args.method, batch=8)
    model = steps.create_model(config)
    mesh = sharding.make_mesh()
    n_train = 2048 if args.quick else CIFAR_TRAIN
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, (n_train,), dtype=np.int32)
    reps = 5 if args.quick else args.reps
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    tx, _ = optim.create_optimizer(config, CIFAR_STEPS)

    # JAX's dispatch of a program with the train state's arguments (donated) and nothing to compute.
    def empty_call(num_seeds, *extra):
        state = steps.init_train_state(model, tx, list(range(num_seeds)), mesh)
        fn = jax.jit(lambda state, *rest: state, donate_argnums=0)
        state = fn(state, *extra)
        times = []
        for _ in range(reps * 4):
            jax.block_until_ready(state)
            t = time.perf_counter()
            state = fn(state, *extra)
            times.append(time.perf_counter() - t)
        return 1e6 * common.median(times)

    tally = {k: jax.device_put(np.zeros(1, np.float32)) for k in ("a", "b", "c", "d")}
    metric = jax.device_put(np.ones(1, np.float32))
    adds = median_us(lambda: jax.block_until_ready([tally[k] + metric for k in tally]), reps * 4)
    flags = stopping.FiniteFlags("stop", [0], 4)
    with stopping.StopSignals() as stop:
        book = median_us(lambda: (flags.add(1, metric), stop.requested(1)), reps * 20)

    header = ["path (per step)", "seeds", "host gather", "copy to device", "dispatch", "metric sums", "flags + stop",
              "epoch indices", "total (us)"]  # fmt: skip
    rows = []
    for num_seeds in (1, 5):
        seeds = list(range(num_seeds))
        idx = engine.epoch_index_array(n_train, CIFAR_BATCH, seeds, 0)  # (seeds, steps, 256)
        gather = median_us(lambda: (x_train[idx[:, 0]], y_train[idx[:, 0]]), reps * 4)
        images, labels = x_train[idx[:, 0]], y_train[idx[:, 0]]
        put = lambda: jax.block_until_ready((sharding.put_global(images, batch), sharding.put_global(labels, batch)))  # noqa: E731
        copy = median_us(put, reps * 4)
        place = median_us(lambda: jax.block_until_ready(sharding.put_global(
            engine.epoch_index_array(n_train, CIFAR_BATCH, seeds, 1), sharding.index_sharding(mesh))), reps)  # fmt: skip
        fold = fold_us(num_seeds, CIFAR_STEPS, reps)
        seeds_arr = sharding.put_global(np.asarray(seeds, np.int32), repl)
        d_step = empty_call(num_seeds, sharding.put_global(images, batch), sharding.put_global(labels, batch), seeds_arr)
        x, y = sharding.put_global(x_train, repl), sharding.put_global(y_train, repl)
        d_call = empty_call(num_seeds, x, y, sharding.put_global(idx, sharding.index_sharding(mesh)), seeds_arr)
        common.log(f"{num_seeds} seed(s): gather {gather:.0f}, copy {copy:.0f}, epoch indices {place:.0f}, fold "
                   f"{fold:.1f}, dispatch {d_step:.0f} / {d_call:.0f} us; 4 adds {adds:.0f}, flags+stop {book:.1f} us")
        paths = [
            ("old loop (one call per step, host gather)", gather, copy, d_step, adds, book, 0.0),
            ("host path, engine.HostEngine", gather, copy, d_step, fold, book, 0.0),
            ("engine, steps_per_call=1", 0.0, 0.0, d_call, fold, book, place / CIFAR_STEPS),
            (f"engine, whole epoch ({CIFAR_STEPS} steps per call)", 0.0, 0.0, d_call / CIFAR_STEPS, fold,
             book / CIFAR_STEPS, place / CIFAR_STEPS),
        ]  # fmt: skip
        for name, *parts in paths:
            rows.append([name, num_seeds, *(f"{p:.1f}" for p in parts), f"{sum(parts):.1f}"])
    return "\n".join([
        f"### Host work per optimizer step (microseconds): CIFAR-10 shapes ({n_train:,} training images, batch "
        f"{CIFAR_BATCH}, {CIFAR_STEPS} steps per epoch), {args.model} {args.method}'s train state\n",
        common.machine() + "\n",
        common.markdown_table(header, rows, "lr" + "r" * 7),
        "\ndispatch: JAX's handling of one call with the step's (or the call's) arguments, the train state "
        "donated, measured on a program that computes nothing (what the real program's launch adds is the "
        "backend's: on XLA:CPU the call returns once the calling thread has started the work, table 2). "
        "metric sums: the old loop's four device-side additions per step; the new paths' fold of the per-step "
        f"metrics into the same float32 sums (numpy, at call boundaries). Medians of {reps}-{reps * 20} "
        "repetitions.\n",
    ])  # fmt: skip


def loop_table(args) -> str:
    """Table 2: images/s of train.py's loop (three paths) against the bare jitted step and call, interleaved."""
    spe, b = args.steps, args.batch
    config = common.make_config(args.model, args.method, batch=b)
    config.dataset, config.num_train, config.num_test = "synthetic", spe * b, b
    config.num_epochs, config.log_every_steps, config.eval_every_epochs = 2, 0, 2
    config.lr_boundaries_epochs, config.checkpoint_every_epochs = (), 2

    model = steps.create_model(config)
    mesh = sharding.make_mesh()
    progs = steps.programs(model, optim.OptimizerSpec.from_config(config, spe), mesh, 1, config.augment)  # train_and_evaluate's
    ds = data_lib.load_dataset("synthetic", num_train=spe * b, num_test=b)
    seeds_arr = sharding.put_global(np.zeros((1,), np.int32), sharding.replicated(mesh))
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    x, y = sharding.put_global(ds.x_train, repl), sharding.put_global(ds.y_train, repl)
    idx_dev = sharding.put_global(engine.epoch_index_array(spe * b, b, [0], 0), sharding.index_sharding(mesh))
    images = sharding.put_global(ds.x_train[None, :b], batch)
    labels = sharding.put_global(ds.y_train[None, :b], batch)
    holder = {"state": progs.init(seeds_arr)}
    returns = {"step": [], "call": []}

    def bare(fn, fn_args, calls, kind):
        def run():
            t0 = time.perf_counter()
            for _ in range(calls):
                t = time.perf_counter()
                holder["state"], m = fn(holder["state"], *fn_args)
                returns[kind].append(time.perf_counter() - t)
            jax.block_until_ready(m)
            return spe * b / (time.perf_counter() - t0)
        return run

    def old_loop():  # the loop before the engine: host gather + copy, one call per step, four device-side sums
        state, tally, pending = progs.init(seeds_arr), {k: np.zeros(1, np.float32) for k in ("el", "ea", "wl", "wa")}, []
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for rows in engine.epoch_indices(spe * b, b, [0], 1):
            state, m = progs.train_step(state, sharding.put_global(ds.x_train[rows], batch),
                                        sharding.put_global(ds.y_train[rows], batch), seeds_arr)  # fmt: skip
            pending.append(m["finite"])
            tally = {k: v + m["loss" if k.endswith("l") else "accuracy"] for k, v in tally.items()}
        jax.device_get((pending, tally))
        return spe * b / (time.perf_counter() - t0)

    def train_py(k, fraction):  # train_and_evaluate, 2 epochs: the second epoch's images/s
        def run():
            old = sharding.DEVICE_DATA_FRACTION
            sharding.DEVICE_DATA_FRACTION, config.steps_per_call = fraction, k
            try:
                with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as quiet:
                    with contextlib.redirect_stdout(quiet):
                        training.train_and_evaluate(config, workdir)
                    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
            finally:
                sharding.DEVICE_DATA_FRACTION = old
            return [r["images_per_s"] for r in records if r["kind"] == "epoch"][-1]
        return run

    on = sharding.DEVICE_DATA_FRACTION
    loops = {
        "bare jitted step (batch on the device)": bare(progs.train_step, (images, labels, seeds_arr), spe, "step"),
        f"bare call of {spe} steps (lax.scan, data on the device)": bare(progs.train_call(spe), (x, y, idx_dev, seeds_arr), 1, "call"),
        "old loop replica (host gather, one call per step)": old_loop,
        "train.py loop, host path (engine.HostEngine)": train_py(1, 0.0),
        "train.py loop, engine, steps_per_call=1": train_py(1, on),
        f"train.py loop, engine, whole epoch ({spe} steps per call)": train_py(spe, on),
    }  # fmt: skip
    for fn in loops.values():  # compile everything first
        fn()
    returns = {"step": [], "call": []}
    ips = {name: [] for name in loops}
    for r in range(args.rounds):  # interleaved: every round sees the same machine for every loop
        for name, fn in loops.items():
            ips[name].append(fn())
        common.log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1]:.1f}" for v in ips.values()))
    base = ips["bare jitted step (batch on the device)"]
    rows = []
    for name, values in ips.items():
        ratio = common.median([v / s for v, s in zip(values, base)])
        rows.append([name, f"{common.median(values):.1f}", f"{ratio:.3f}"])
    factor = 1.0 / common.median([c / s for c, s in zip(ips[list(loops)[1]], base)])
    return "\n".join([
        f"### images/s of the whole loop against the bare jitted step: {args.model} {args.method}, batch {b}, "
        f"{spe} steps per epoch (train.py: the second epoch of two); medians of {args.rounds} interleaved rounds\n",
        common.machine() + "\n",
        common.markdown_table(["loop", "images/s", "/ bare step (same round)"], rows, "lrr"),
        f"\nOn this backend a step inside the {spe}-step scan takes {factor:.2f}x the standalone step's time "
        "(XLA:CPU: a convolution inside a loop, jax-ml/jax#12868), hence steps_per_call=1 on CPU. The real "
        f"programs' calls returned after {1e6 * common.median(returns['step']):.0f} us (step) and "
        f"{1e6 * common.median(returns['call']):.0f} us (call): XLA:CPU starts the work on the calling thread.\n",
    ])  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet4", choices=list(common.MODEL_TITLES))
    p.add_argument("--method", default="baseline", help="a short step, so that the loop's own cost shows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="steps per epoch of the timed loops")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the loops (medians reported)")
    p.add_argument("--reps", type=int, default=20, help="repetitions of each host-side piece")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 steps per epoch, 1 round")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds = 8, 2, 1
    common.emit(host_overhead_table(args), args.out)
    common.emit(loop_table(args), args.out)


if __name__ == "__main__":
    main()
