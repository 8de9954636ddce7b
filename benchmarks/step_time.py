"""Training-step time, images/s and FLOPs of every model under every method, in one process.

For each model (ResNet-4, ResNet-10, AlexNet) and method row (``baseline``, ``neural_ode``,
``anode`` with ``steps_z`` 2 and 5, ``anodev2`` configurations 1 and 2) this times the
training system's own jitted step (:func:`anodev2_jax.steps.make_train_step`: on-device
augmentation, forward, backward, SGD with momentum and weight decay, BatchNorm statistics;
float32, one replica) and prints a markdown table: median and fastest step time over
``--steps`` timed steps after ``--warmup`` untimed ones, images/s, FLOPs per step, achieved
FLOP/s and the compiled program's temporary memory; the "remat" column is the schedule the
ODE blocks run (the models' default ``remat="auto"`` picks one per block to fit
``remat_budget_mb``; at batch 256 on one device that is "none" for every row of the paper;
the optional ``*_none`` / ``*_block`` rows fix it). Then the two ratios the paper talks
about, per model: configuration 1 / ANODE at the same ``steps_z = 5`` (the cost of evolving
the weights, "negligible" in the paper) and configuration 2 / baseline (the paper: about
2x the baseline FLOPs), in time and in FLOPs.

The methods of one model are timed in interleaved rounds (each round runs every method's
step once), so their ratios hold even on a machine whose load drifts.

FLOPs come from XLA's HLO cost analysis (``Lowered.cost_analysis()``) of the same step.
XLA counts the body of a while loop once, whatever its trip count, and on CPU the models
compute convolution kernel gradients in a ``lax.scan`` over image chunks
(``anodev2_jax/kernels.py``); the count is therefore taken from the step lowered with that
scan replaced by one matrix product (same arithmetic, no loop). The compiled program's own
count (``compiled.cost_analysis()``) is printed to stderr for reference.

Runtime: compiling takes 5-30 s per program on a 2-core CPU and a ResNet-10/AlexNet step
at batch 256 several seconds, so the full default run (3 models x 6 methods x 20 steps)
takes roughly 30-40 minutes there (ResNet-4 alone: ~5 minutes); on a GPU about 2-3 minutes. Use
``--models resnet4`` or ``--steps`` for shorter runs; ``--quick`` is a smoke test (batch 8,
2 steps, ResNet-4).

Run: ``python benchmarks/step_time.py [--models resnet4 ...] [--methods baseline conf1 ...]
[--batch 256] [--steps 20] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402
from anodev2_jax import kernels  # noqa: E402
from anodev2_jax import models, optim, sharding, steps  # noqa: E402

METHOD_LABELS = {
    "baseline": "baseline",
    "neural_ode": "Neural ODE (steps_z=2, backsolve)",
    "anode_z2": "ANODE steps_z=2",
    "anode_z5": "ANODE steps_z=5",
    "conf1": "ANODEV2 conf. 1 (steps_z=steps_w=5)",
    "conf2": "ANODEV2 conf. 2 (steps_z=2, steps_w=10)",
    "conf1_none": "ANODEV2 conf. 1, remat=none",
    "conf2_none": "ANODEV2 conf. 2, remat=none",
    "anode_z5_none": "ANODE steps_z=5, remat=none",
    "conf1_block": "ANODEV2 conf. 1, remat=block",
    "conf2_block": "ANODEV2 conf. 2, remat=block",
    "anode_z5_block": "ANODE steps_z=5, remat=block",
    "conf1_rda_equation": "conf. 1, q = RDA Eq. 2.6 (RK4)",
    "conf1_linear": "conf. 1, q = linear (expm)",
    "conf1_mlp": "conf. 1, q = MLP (RK4)",
    "conf1_exponential": "conf. 1, K = exponential",
    "conf1_discrete_kernel": "conf. 1, K = discrete",
    "conf1_adjoint": "conf. 1, adjoint=discrete",
    "conf1_mlp_exponential": "conf. 1, q = MLP, K = exponential",
    "conf1_mlp_exponential_adjoint": "conf. 1, q = MLP, K = exponential, adjoint=discrete",
}
# The evolution rows' ratios: each operator / kernel to ANODE at the same steps_z = 5 (issue
# 12's bound: <= 1.10, as RDA's conf. 1), and the hand-written adjoint to autodiff (<= 1.2).
EVOLUTION_RATIOS = (
    *((row, "anode_z5", f"{METHOD_LABELS[row]} / ANODE steps_z=5") for row in (
        "conf1", "conf1_rda_equation", "conf1_linear", "conf1_mlp", "conf1_exponential", "conf1_discrete_kernel",
        "conf1_mlp_exponential",
    )),
    ("conf1_adjoint", "conf1", "conf. 1: adjoint=discrete / autodiff"),
    ("conf1_mlp_exponential_adjoint", "conf1_mlp_exponential", "conf. 1, q = MLP, K = exponential: adjoint=discrete / autodiff"),
)


def lowered_flops(config, state, batch) -> float | None:
    """FLOPs of one step by XLA's cost analysis of the lowered step, kernel-gradient scans unrolled."""
    old = kernels.CHUNK_BYTES
    kernels.CHUNK_BYTES = 1 << 62  # one chunk: no while loop for the cost model to undercount
    try:
        model = steps.create_model(config)
        tx, _ = optim.create_optimizer(config, 195)
        step = steps.make_train_step(model, tx, sharding.make_mesh(), 1)
        cost = step.lower(state, *batch).cost_analysis()
    finally:
        kernels.CHUNK_BYTES = old
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure_model(model: str, rows: list[str], args) -> list[dict]:
    """Compile every method's step for ``model``, then time them in interleaved rounds."""
    programs = {}
    for row in rows:
        method, knobs = common.ALL_ROWS[row]
        config = common.make_config(model, method, batch=args.batch, **knobs)
        t0 = time.perf_counter()
        step, state, batch = common.train_step_program(config)
        compiled = step.lower(state, *batch).compile()
        compile_s = time.perf_counter() - t0
        flops = lowered_flops(config, state, batch)
        temp = compiled.memory_analysis().temp_size_in_bytes
        plan = models.remat_plan(steps.create_model(config), (args.batch, 32, 32, 3))
        remat = ", ".join(sorted(set(plan.values()))) or "-"  # "-": no remat (diffrax's backsolve)
        common.log(
            f"{model} {row}: compiled in {compile_s:.1f} s, {flops / 1e9 if flops else float('nan'):.2f} GFLOP/step "
            f"(compiled cost analysis, loops counted once: {(common.cost_flops(compiled) or 0) / 1e9:.2f}), "
            f"temp {temp / 2**20:.0f} MiB"
        )
        holder = {"state": state}

        def run(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], *batch)
            jax.block_until_ready(metrics)

        for _ in range(args.warmup):
            run()
        programs[row] = dict(run=run, flops=flops, temp=temp, compile_s=compile_s, config=config, remat=remat)

    times = common.interleaved_times({r: p["run"] for r, p in programs.items()}, args.steps, progress=model)
    results = []
    for row, p in programs.items():
        med = common.median(times[row])
        results.append(
            dict(model=model, row=row, median_s=med, min_s=min(times[row]), flops=p["flops"], temp=p["temp"],
                 compile_s=p["compile_s"], images_per_s=args.batch / med, remat=p["remat"])
        )
    return results


def format_results(results: list[dict], args) -> str:
    header = ["model", "method", "remat", "median ms/step", "min ms", "images/s", "GFLOP/step", "GFLOP/s", "temp MiB",
              "compile s"]
    rows = []
    for r in results:
        gflop = r["flops"] / 1e9 if r["flops"] else float("nan")
        rows.append([
            common.MODEL_TITLES[r["model"]], METHOD_LABELS[r["row"]], r["remat"], f"{1e3 * r['median_s']:.1f}",
            f"{1e3 * r['min_s']:.1f}",
            f"{r['images_per_s']:.1f}", f"{gflop:.2f}", f"{gflop / r['median_s']:.1f}", f"{r['temp'] / 2**20:.0f}",
            f"{r['compile_s']:.1f}",
        ])
    text = [
        f"### Training-step time, batch {args.batch}, float32 (median of {args.steps} interleaved steps after {args.warmup} warm-up)\n",
        common.machine() + "\n",
        common.markdown_table(header, rows, "lll" + "r" * 7),
    ]
    ratio_rows = []
    by = {(r["model"], r["row"]): r for r in results}
    for model in dict.fromkeys(r["model"] for r in results):
        for num, den, what in (
            ("conf1", "anode_z5", "conf. 1 / ANODE steps_z=5"),
            ("conf2", "baseline", "conf. 2 / baseline"),
            ("conf1_none", "anode_z5_none", "conf. 1 / ANODE steps_z=5, both remat=none"),
            ("conf2_none", "baseline", "conf. 2 remat=none / baseline"),
            ("conf1_block", "anode_z5_block", "conf. 1 / ANODE steps_z=5, both remat=block"),
            ("conf2_block", "baseline", "conf. 2 remat=block / baseline"),
            *EVOLUTION_RATIOS[1:],
        ):
            a, b = by.get((model, num)), by.get((model, den))
            if a and b:
                fl = f"{a['flops'] / b['flops']:.2f}" if a["flops"] and b["flops"] else "n/a"
                ratio_rows.append([common.MODEL_TITLES[model], what, f"{a['median_s'] / b['median_s']:.2f}",
                                   f"{a['min_s'] / b['min_s']:.2f}", fl])
    if ratio_rows:
        text += ["\nRatios (paper: conf. 1 costs about the same as ANODE; conf. 2 about 2x the baseline FLOPs)\n",
                 common.markdown_table(["model", "ratio", "time (medians)", "time (fastest steps)", "FLOPs"], ratio_rows, "llrrr")]
    return "\n".join(text) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(common.MODEL_TITLES), choices=list(common.MODEL_TITLES))
    p.add_argument("--methods", nargs="+", default=list(common.METHOD_ROWS), choices=list(common.ALL_ROWS),
                   help="rows to time (default: the six of the paper's tables, remat='auto'; also conf1_none, "
                   "conf2_none, anode_z5_none: without checkpointing; conf1_block, conf2_block, anode_z5_block: "
                   "ANODE's block checkpointing, the default before remat='auto'; "
                   + ", ".join(common.EVOLUTION_ROWS) + ": evolution operators, time kernels and the discrete adjoint "
                   "in conf. 1, with their ratios to ANODE steps_z=5 and to autodiff)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 steps, ResNet-4 only")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup, args.models = 8, 2, 1, ["resnet4"]
    for model in args.models:  # one table per model, printed as soon as it is measured
        common.emit(format_results(measure_model(model, args.methods, args), args), args.out)


if __name__ == "__main__":
    main()
