"""Core numerics benchmark: cost of the RDA weight evolution, and block memory vs. steps and remat.

Prints two markdown tables:

1. Time of ``evolve_weights`` for a 64x64x5x5 kernel (AlexNet's conv2; 5 RDA steps, as in
   configuration 1) against one ODE-function evaluation of the same layer,
   ``relu(bn(conv(z)))`` on a batch of 128 16x16x64 activations; forward and
   forward+backward. The paper (Appendix B) calls the evolution's cost negligible; the
   target here is a ratio <= 0.02.
2. Compiled temporary memory (XLA ``memory_analysis``) of one coupled block's
   value-and-grad (ResNet-4's ``layer1_1`` shape: batch 128, 32x32x16, two 3x3 convs,
   weights evolved with ``steps_w = steps_z``) for ``steps_z`` in 1, 2, 5, 10, 20 under
   each remat mode, with the ratio to ``steps_z = 1``.

Run: ``python benchmarks/core.py`` (``--repeats N`` for the timing, ``--quick`` for a
smaller memory sweep). Timings are medians over repeats after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from anodev2_jax import RDACoeffs, coupled_block, evolve_weights


def conv(z, w):
    return jax.lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def bn_relu(y):
    mean = y.mean(axis=(0, 1, 2))
    var = y.var(axis=(0, 1, 2))
    return jax.nn.relu((y - mean.reshape(1, 1, 1, -1)) * jax.lax.rsqrt(var.reshape(1, 1, 1, -1) + 1e-5))


def median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def evolution_table(repeats: int) -> str:
    key = jax.random.PRNGKey(0)
    kw, kz = jax.random.split(key)
    w = 0.03 * jax.random.normal(kw, (5, 5, 64, 64), jnp.float32)
    z = jax.random.normal(kz, (128, 16, 16, 64), jnp.float32)
    c = RDACoeffs(jnp.float32(1e-3), jnp.zeros(2, jnp.float32), jnp.float32(0.0))

    evolve = jax.jit(lambda w, c: evolve_weights(w, c, num_steps=5, dt=0.2, trajectory=True))
    block = jax.jit(lambda z, w: bn_relu(conv(z, w)))
    evolve_vg = jax.jit(jax.value_and_grad(lambda w, c: jnp.sum(evolve_weights(w, c, num_steps=5, dt=0.2, trajectory=True) ** 2), argnums=(0, 1)))
    block_vg = jax.jit(jax.value_and_grad(lambda z, w: jnp.sum(bn_relu(conv(z, w)) ** 2), argnums=(0, 1)))

    rows = []
    for name, a, b in [
        ("forward", median_time(evolve, w, c, repeats=repeats), median_time(block, z, w, repeats=repeats)),
        ("forward + backward", median_time(evolve_vg, w, c, repeats=repeats), median_time(block_vg, z, w, repeats=repeats)),
    ]:
        rows.append(f"| {name} | {a * 1e3:.3f} | {b * 1e3:.2f} | {a / b:.4f} |")
    head = (
        "| pass | evolve_weights 64x64x5x5, 5 steps (ms) | relu(bn(conv)) batch 128x16x16x64 (ms) | ratio |\n"
        "|---|---:|---:|---:|"
    )
    return head + "\n" + "\n".join(rows)


def block_f(z, th):
    y = jax.nn.relu(conv(z, th["w1"]))
    return jax.nn.relu(conv(y, th["w2"]))


def temp_bytes(steps_z: int, remat: str) -> int:
    z = jax.ShapeDtypeStruct((128, 32, 32, 16), jnp.float32)
    th = {k: jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32) for k in ("w1", "w2")}
    c = RDACoeffs(jnp.float32(1e-3), jnp.zeros(2, jnp.float32), jnp.float32(0.0))
    coeffs = {"w1": c, "w2": c}

    def loss(z, th):
        out = coupled_block(block_f, z, th, coeffs, steps_z=steps_z, steps_w=steps_z, remat=remat)
        return jnp.sum(out**2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(z, th).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(steps_list) -> str:
    modes = ("none", "block", "step")
    mem = {(s, m): temp_bytes(s, m) for s in steps_list for m in modes}
    head = "| steps_z | " + " | ".join(f"{m} (MB) | {m} / steps 1" for m in modes) + " |\n"
    head += "|---:|" + "---:|---:|" * len(modes)
    rows = []
    for s in steps_list:
        cells = " | ".join(f"{mem[s, m] / 1e6:.1f} | {mem[s, m] / mem[steps_list[0], m]:.2f}" for m in modes)
        rows.append(f"| {s} | {cells} |")
    return head + "\n" + "\n".join(rows)


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, {dev.platform}:{dev.device_kind}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="memory sweep over steps_z 1, 2, 5 only")
    args = p.parse_args()
    print(f"Machine: {machine()}\n")
    print("### RDA evolution vs. one conv block (float32)\n")
    print(evolution_table(args.repeats))
    print("\n### One coupled block's value-and-grad: compiled temporary memory (float32)\n")
    print(memory_table([1, 2, 5] if args.quick else [1, 2, 5, 10, 20]))


if __name__ == "__main__":
    main()
