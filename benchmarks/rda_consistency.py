"""How far Eq. B.4 (the paper's RDA step) is from Eq. 2.6 (the equation it is said to solve), and RK4's sub-step error.

Eq. 2.6 is ``dw/dt = sigma(d Lap w + v . grad w + rho w)``: sigma *inside* the right-hand
side. Eq. B.4 takes the exact linear step and applies sigma after it,
``w <- sigma(exp(dt L) w)``, which is not a consistent discretization of Eq. 2.6: with
``d = v = rho = 0`` Eq. 2.6 keeps ``w`` constant while B.4 applies tanh at every step and
shrinks ``w``, however small ``dt`` is. This script measures the gap on the paper's step
counts (configuration 1: 5 steps of 1/5; configuration 2: 10 steps of 1/10), for
He-initialized kernels of ResNet-4 (3x3x16x16, std ``sqrt(2/(9*16))``) and AlexNet's conv2
(5x5x64x64, std ``sqrt(2/(25*64))``), at the models' init coefficients and at a few
trained-like values. All errors are ``max over the trajectory t_m = m dt of max|a(t_m) -
b(t_m)| / max|w0|`` (float64).

Table 1 columns: B.4 vs Eq. 2.6 (sigma = tanh; Eq. 2.6 by ``RDAEquation`` with 64 RK4
sub-steps per step, a reference converged to ~1e-12); the linear parts, B.3 (the exact
step, B.4 without sigma) vs Eq. 2.6 with sigma = identity (the same equation: this only
shows the two solvers agree, so the whole gap is where sigma sits); and how far each
trajectory moves from ``w0`` (the scale the gap is to be read against).
Table 2: ``RDAEquation``'s RK4 with ``substeps`` 1, 2, 4 against the 64-sub-step reference.

Run: ``python benchmarks/rda_consistency.py`` (``--quick``: ResNet-4 kernel, init
coefficients, 5 steps; ``--out FILE`` appends the tables to FILE).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # errors down to 1e-12 must be visible

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from anodev2_jax import RDACoeffs, RDAEquation, evolve_weights  # noqa: E402

KERNELS = {
    "ResNet-4 3x3x16x16": ((3, 3, 16, 16), np.sqrt(2.0 / (9 * 16))),
    "AlexNet 5x5x64x64": ((5, 5, 64, 64), np.sqrt(2.0 / (25 * 64))),
}
COEFFS = {
    "init: d=1e-3, v=0, rho=0": (1e-3, (0.0, 0.0), 0.0),
    "trained-like: d=0.05, v=(0.5, 0), rho=0.1": (0.05, (0.5, 0.0), 0.1),
    "strong: d=0.2, v=(1, -0.5), rho=0.3": (0.2, (1.0, -0.5), 0.3),
}
STEPS = {"conf. 1 (5 x 1/5)": 5, "conf. 2 (10 x 1/10)": 10}
REFERENCE_SUBSTEPS = 64


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def rda_equation_trajectory(w0, coeffs, num_steps, sigma, substeps):
    """``[w(0), ..., w(1)]`` of Eq. 2.6 by ``RDAEquation`` (one ``lax.scan`` over the weight steps)."""
    op = RDAEquation(*coeffs, sigma=sigma, substeps=substeps)
    dt = 1.0 / num_steps

    def body(w, _):
        w = op.step(w, dt)
        return w, w

    _, ws = jax.lax.scan(body, w0, None, length=num_steps)
    return jnp.concatenate([w0[None], ws])


_trajectory = jax.jit(rda_equation_trajectory, static_argnums=(2, 3, 4))


def b4_trajectory(w0, coeffs, num_steps, sigma):
    return evolve_weights(w0, coeffs, num_steps=num_steps, dt=1.0 / num_steps, nonlinearity=sigma, trajectory=True)


def gap(a, b, w0) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(w0)))


def tables(kernels, coeffs, steps) -> str:
    rows1, rows2 = [], []
    for k_name, (shape, std) in kernels.items():
        w0 = std * jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64)
        for c_name, (d, v, rho) in coeffs.items():
            c = RDACoeffs(jnp.asarray(d), jnp.asarray(v), jnp.asarray(rho))
            for s_name, n in steps.items():
                ref = _trajectory(w0, c, n, jnp.tanh, REFERENCE_SUBSTEPS)
                b4 = b4_trajectory(w0, c, n, jnp.tanh)
                lin_exact = b4_trajectory(w0, c, n, None)
                lin_rk4 = _trajectory(w0, c, n, None, REFERENCE_SUBSTEPS)
                row = [k_name, c_name, s_name]
                rows1.append(row + [f"{gap(b4, ref, w0):.3g}", f"{gap(lin_exact, lin_rk4, w0):.1e}",
                                    f"{gap(b4, w0[None], w0):.3g}", f"{gap(ref, w0[None], w0):.3g}"])
                rows2.append(row + [f"{gap(_trajectory(w0, c, n, jnp.tanh, s), ref, w0):.1e}" for s in (1, 2, 4)])
    head = ["kernel", "coefficients", "steps"]
    t1 = markdown_table(
        head + ["B.4 vs Eq. 2.6 (tanh)", "linear: B.3 vs Eq. 2.6 (sigma = id)", "B.4 moves w0 by", "Eq. 2.6 moves w0 by"], rows1
    )
    t2 = markdown_table(head + [f"RK4 x{s} vs x{REFERENCE_SUBSTEPS}" for s in (1, 2, 4)], rows2)
    return (
        "### Eq. B.4 against Eq. 2.6 (max over the trajectory of max|difference| / max|w0|)\n\n" + t1
        + f"\n\n### RDAEquation: RK4 sub-steps against {REFERENCE_SUBSTEPS} sub-steps (sigma = tanh)\n\n" + t2
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-4 kernel, init coefficients, 5 steps only")
    p.add_argument("--out", default=None, help="also append the tables to this file")
    a = p.parse_args()
    if a.quick:
        text = tables(dict(list(KERNELS.items())[:1]), dict(list(COEFFS.items())[:1]), dict(list(STEPS.items())[:1]))
    else:
        text = tables(KERNELS, COEFFS, STEPS)
    dev = jax.devices()[0]
    text += f"\n\n{dev.platform}, jax {jax.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores; float64\n"
    print(text, flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
