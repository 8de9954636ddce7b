"""Peak temporary memory of the compiled training step against the number of ODE steps, per remat mode.

Compiles (never runs) the training system's step (:func:`anodev2_jax.steps.make_train_step`:
augmentation, forward, backward, SGD update) for ResNet-10 with ``steps_z`` in 1, 2, 5, 10,
20 under every ``remat`` mode ("none", "block", "step", "binomial"), and prints XLA's
``compiled.memory_analysis().temp_size_in_bytes`` (the scratch memory of one step; the
train state, batch and outputs are separate and do not depend on ``steps_z``) with its
ratio to ``steps_z = 1`` of the same mode, then the compile times. Default method:
ANODEV2 configuration 1's schedule with ``steps_w = steps_z`` (``anodev2_conf1``: the
weights evolve, so the RDA trajectory is part of what the backward pass needs);
``--method anode`` gives static weights.

Target: at ``steps_z = 20`` the best mode needs at most 1.5x its memory at ``steps_z = 1``.
The last line says whether it is met, by which modes, and which mode is best (the
lowest ratio).

What the modes keep (see ``anodev2_jax/ode.py``): "none" keeps every intermediate of every
step; "block" keeps each ODE block's input and recomputes the block in the backward pass,
which then holds that block's full step graph (linear in ``steps_z``); "step" also
checkpoints each step, so the backward pass holds one activation per step (still linear,
with a smaller slope) plus one step's internals; "binomial" nests checkpoints over
segments of steps so that it holds only a few activations per block (3 for ``steps_z``
5-21), recomputing each step at most ``floor(log2 steps_z) + 1`` times.

Runtime: compile only; 20 compilations of ResNet-10 (up to 3 blocks x 20 unrolled steps)
took 29 minutes on a 2-core CPU shared with other jobs (1-3.5 minutes each; "binomial" at
``steps_z = 20`` the slowest). ``--quick``: batch 8, ``steps_z`` 1 and 2, ResNet-4.

Run: ``python benchmarks/memory.py [--model resnet10] [--method anodev2_conf1|anode]
[--steps-z 1 2 5 10 20] [--remat none block step binomial] [--batch 256] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from anodev2_jax import ode, optim, sharding, steps  # noqa: E402

MiB = 2**20


def temp_bytes(model: str, method: str, steps_z: int, remat: str, batch: int) -> tuple[int, float]:
    """Compiled temporary memory of one training step, and the compile time in seconds."""
    knobs = dict(steps_z=steps_z, remat=remat)
    if method == "anodev2_conf1":
        knobs["steps_w"] = steps_z
    config = common.make_config(model, method, batch=batch, **knobs)
    net = steps.create_model(config)
    tx, _ = optim.create_optimizer(config, 195)
    mesh = sharding.make_mesh()
    step = steps.make_train_step(net, tx, mesh, 1)
    state = abstract_state(net, tx)  # shapes only: nothing is allocated or initialized
    images = jax.ShapeDtypeStruct((1, batch, 32, 32, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((1, batch), jnp.int32)
    seeds = jax.ShapeDtypeStruct((1,), jnp.int32)
    t = time.perf_counter()
    compiled = step.lower(state, images, labels, seeds).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t


def abstract_state(net, tx):
    """Shapes of a one-replica :class:`~anodev2_jax.steps.TrainState` (leading seed axis of length 1).

    The training system's own per-replica init, traced for shapes only: nothing is allocated.
    """
    init = jax.vmap(functools.partial(steps.init_one, net, tx))
    return jax.eval_shape(init, jax.ShapeDtypeStruct((1,), jnp.int32))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet10", choices=list(common.MODEL_TITLES))
    p.add_argument("--method", default="anodev2_conf1", choices=["anodev2_conf1", "anode"])
    p.add_argument("--steps-z", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    p.add_argument("--remat", nargs="+", default=list(ode.REMAT_MODES), choices=[*ode.REMAT_MODES, "auto"],
                   help="schedules to compile; auto: what remat='auto' picks per block at the default budget")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--target", type=float, default=1.5, help="allowed ratio of the last steps_z to the first")
    p.add_argument("--quick", action="store_true", help="smoke test: ResNet-4, batch 8, steps_z 1 and 2")
    p.add_argument("--out", default=None, help="also append the markdown table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.steps_z = "resnet4", 8, [1, 2]

    first, last = args.steps_z[0], args.steps_z[-1]
    what = "ANODEV2 conf. 1 schedule, steps_w = steps_z" if args.method == "anodev2_conf1" else "ANODE (static weights)"
    header = ["steps_z"] + [h for r in args.remat for h in (f"{r} (MiB)", f"{r} / steps_z={first}")]
    lines = common.markdown_table(header, []).splitlines()
    common.emit(
        f"### Compiled temporary memory of the training step: {common.MODEL_TITLES[args.model]}, {what}, "
        f"batch {args.batch}, float32\n\n{common.machine()}\n\n" + "\n".join(lines),
        args.out,
    )
    mem, secs = {}, {}
    for s in args.steps_z:  # a row as soon as it is known, so a run cut short keeps its rows
        for r in args.remat:
            mem[s, r], secs[s, r] = temp_bytes(args.model, args.method, s, r, args.batch)
            common.log(f"steps_z={s} remat={r}: {mem[s, r] / MiB:.1f} MiB (compiled in {secs[s, r]:.1f} s)")
        cells = [c for r in args.remat for c in (f"{mem[s, r] / MiB:.1f}", f"{mem[s, r] / mem[first, r]:.2f}")]
        common.emit(f"| {s} | " + " | ".join(cells) + " |", args.out)

    rows = [[str(s)] + [f"{secs[s, r]:.1f}" for r in args.remat] for s in args.steps_z]
    ratios = {r: mem[last, r] / mem[first, r] for r in args.remat}
    best = min(args.remat, key=lambda r: (ratios[r], mem[last, r]))
    met = [r for r in args.remat if ratios[r] <= args.target]
    verdict = (
        f"met by {', '.join(repr(r) for r in met)}" if met else f"missed by every mode (best {ratios[best]:.2f}x)"
    )
    common.emit(
        "\nCompile seconds (lower + compile, shared CPU):\n\n"
        + common.markdown_table(["steps_z"] + list(args.remat), rows)
        + f"\n\nRatio steps_z={last} / steps_z={first}: "
        + ", ".join(f"{r} {ratios[r]:.2f}x" for r in args.remat)
        + f".\nBest mode at steps_z={last}: remat={best!r}, {mem[last, best] / MiB:.1f} MiB = {ratios[best]:.2f}x its "
        f"steps_z={first} memory. Target (<= {args.target}x): {verdict}.\n",
        args.out,
    )

if __name__ == "__main__":
    main()
