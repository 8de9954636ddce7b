"""Compile time of the training step against ``steps_z``: where ``run_config.MAX_ODE_STEPS`` comes from.

Every Euler step of an ODE block is unrolled into the compiled program (DESIGN.md: on
XLA:CPU a convolution inside a loop trains ~19x slower), so the program, and the time XLA
takes to compile it, grows with ``steps_z`` (and ``steps_w``, which configuration 1 ties to
``steps_z``). This compiles the training system's own jitted step
(:func:`anodev2_jax.steps.make_train_step`, as ``train.py`` runs it: augmentation, forward,
backward, SGD) for ResNet-4 in ANODEV2 configuration 1 at several ``steps_z`` (with
``steps_w = steps_z``: one weight step per activation step) and prints a
markdown table: seconds to trace and lower, seconds to compile (wall clock, and the
process's CPU seconds, which a machine others load inflates less), and the compile CPU
seconds per ODE step added (the slope between consecutive rows). The step of ``train.py`` compiles at XLA's
default optimization level; ``XLA_FLAGS=--xla_backend_optimization_level=0`` (what the test
suite sets) shows the cheaper end.

Run: ``python benchmarks/compile_time.py`` (``--steps-z 5 20 50``, ``--batch 8``; the batch
barely matters for compile time). Each row is one compile in a fresh jit (no cache); on a
machine others share, the numbers carry their load.
"""

from __future__ import annotations

import argparse
import time

import jax

import common


def measure(steps_z: int, batch: int, method: str) -> dict:
    """Seconds to lower and to compile the train step at ``steps_z`` (a fresh program each time)."""
    knobs = {"steps_z": steps_z}
    if method.startswith("anodev2"):  # the weights' steps too (configuration 1 needs steps_w = k * steps_z)
        knobs["steps_w"] = steps_z
    config = common.make_config("resnet4", method, batch=batch, **knobs)
    step, state, data = common.train_step_program(config)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(state, *data)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    jax.clear_caches()  # the next row compiles from scratch
    return {"steps_z": steps_z, "lower_s": t1 - t0, "compile_s": t2 - t1, "lower_cpu_s": c1 - c0, "compile_cpu_s": c2 - c1}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-z", type=int, nargs="+", default=[5, 20, 50])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--method", default="anodev2_conf1")
    p.add_argument("--out", default=None, help="also append the markdown table to this file")
    args = p.parse_args(argv)
    rows, previous = [], None
    for s in args.steps_z:
        r = measure(s, args.batch, args.method)
        common.log(f"steps_z={s}: lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s "
                   f"({r['compile_cpu_s']:.1f} s of CPU)")
        slope = "" if previous is None else f"{(r['compile_cpu_s'] - previous['compile_cpu_s']) / (s - previous['steps_z']):.2f}"
        rows.append([str(s), f"{r['lower_s']:.1f}", f"{r['lower_cpu_s']:.1f}", f"{r['compile_s']:.1f}",
                     f"{r['compile_cpu_s']:.1f}", slope])
        previous = r
    header = ["steps_z", "lower s", "lower CPU s", "compile s", "compile CPU s", "compile CPU s per added step"]
    table = common.markdown_table(header, rows)
    common.emit(f"ResNet-4 {args.method} train step, batch {args.batch}; {common.machine()}\n\n{table}\n", args.out)


if __name__ == "__main__":
    main()
