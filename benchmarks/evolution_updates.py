"""How far one SGD step at initialization moves each evolution parameter's effect on the weights (issue 12).

For ResNet-4 configuration 1 with each evolution operator q (and the two RDA
parameterizations, and ``evolution_lr_scale``), this takes the gradient of the training loss
at initialization on one batch (real digits through ``--data``, else synthetic images), forms
the first SGD step's update of every parameter group (``-lr * scale * g``: momentum starts
at zero and the evolution params are not weight-decayed), and measures what each group's
update does to the weights the network uses: the change of the evolved kernel
``w(1)`` of ``layer1_1/conv1`` (a Jacobian-vector product through the weight evolution,
Eq. 2.3c), relative to ``|w(1)|``. The kernel row is the update of ``w0`` itself, so the
last column, the ratio to the kernel's effect, says whether an evolution parameter learns
at a pace comparable to the weights (1 = the same pace; 1e-3 = it will not move).

The time kernel's rate (``time_kernel="exponential"``, learned as ``exp(time_log_rate)``) is
reported as its relative update ``|d rate| / rate``.

Run: ``python benchmarks/evolution_updates.py [--data /tmp/digits32.npz] [--lr 0.01] [--batch 100]``
(``python benchmarks/digits.py`` writes the digits file; ``--quick``: a smoke test). Prints a
markdown table; about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the model stays float32 (its params' dtype); w(1)'s changes in float64
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
from anodev2_jax import data, layers, models, trajectory  # noqa: E402
from anodev2_jax.methods import resolve_config  # noqa: E402

# (label, ODE knobs, learning-rate scale of the evolution params)
CASES = [
    ("rda, d = softplus(rda_d_raw) (before)", dict(rda_parameterization="softplus"), 1.0),
    ("rda, d = abs(rda_d) (default)", dict(rda_parameterization="abs"), 1.0),
    ("rda, abs, evolution_lr_scale=10", dict(rda_parameterization="abs"), 10.0),
    ("rda_equation (Eq. 2.6)", dict(evolution="rda_equation"), 1.0),
    ("linear", dict(evolution="linear"), 1.0),
    ("mlp", dict(evolution="mlp"), 1.0),
    ("rda, K = exponential", dict(time_kernel="exponential"), 1.0),
]


def batch(path: str | None, n: int, seed: int = 0):
    if path:
        ds = data.load_dataset("npz", path)
        x, y = ds.x_train[:n], ds.y_train[:n]
    else:
        ds = data.load_dataset("synthetic", None, num_train=n, num_test=n, seed=seed)
        x, y = ds.x_train, ds.y_train
    return data.preprocess_eval(jnp.asarray(x)), jnp.asarray(y)


def end_kernel(module: dict, cfg) -> jax.Array:
    """``w(1)`` of one conv from its params (differentiable in the kernel and the evolution params)."""
    op = layers.conv_evolution(module, cfg)
    traj = trajectory.leaf_trajectory(module["kernel"], op, num_steps=cfg.steps_w, dt=1.0 / cfg.steps_w, nonlinearity=cfg.sigma)
    return traj[-1]


def measure(label: str, knobs: dict, scale: float, x, y, lr: float) -> list[list[str]]:
    model = models.get_model("resnet4", "anodev2_conf1", **knobs)
    cfg = resolve_config("anodev2_conf1", **knobs)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    module = variables["params"]["layer1_1"]["conv1"]
    g = grads["layer1_1"]["conv1"]
    cfg64 = resolve_config("anodev2_conf1", **knobs, dtype="float64")
    w1 = end_kernel(module, cfg)
    norm_w1 = float(jnp.linalg.norm(w1))
    rows, kernel_effect = [], None
    for name in ["kernel", *sorted(k for k in module if k != "kernel")]:
        step = -lr * (1.0 if name == "kernel" else scale) * g[name]
        # the actual change of w(1) after the update, in float64 (LinearEvolution's expm has a
        # reverse-mode rule only, so no jvp; float64 keeps the difference of tiny changes exact)
        m64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), module)
        moved = {**m64, name: m64[name] + jnp.asarray(step, jnp.float64)}
        effect = float(jnp.linalg.norm(end_kernel(moved, cfg64) - end_kernel(m64, cfg64))) / norm_w1
        kernel_effect = effect if name == "kernel" else kernel_effect
        rows.append([label, f"conv1/{name}", f"{float(jnp.sqrt(jnp.mean(jnp.square(g[name])))):.2e}",
                     f"{float(jnp.max(jnp.abs(step))):.2e}", f"{effect:.2e}", f"{effect / kernel_effect:.3g}"])  # fmt: skip
    block = variables["params"]["layer1_1"]
    if "time_log_rate" in block:
        raw = block["time_log_rate"]
        d_raw = -lr * scale * grads["layer1_1"]["time_log_rate"]
        rate, new_rate = jnp.exp(raw), jnp.exp(raw + d_raw)
        rows.append([label, "time_log_rate (rate)", f"{float(jnp.abs(grads['layer1_1']['time_log_rate'])):.2e}",
                     f"{float(jnp.abs(d_raw)):.2e}", f"rate {float(abs(new_rate - rate) / rate):.2e}", ""])  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="an npz file (benchmarks/digits.py); default: synthetic images")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=None, help="also append the table to this file")
    p.add_argument("--quick", action="store_true", help="smoke test: synthetic batch of 16, the two RDA parameterizations")
    args = p.parse_args(argv)
    cases = CASES
    if args.quick:
        args.data, args.batch, cases = None, 16, CASES[:2]
    x, y = batch(args.data, args.batch)
    rows = []
    for label, knobs, scale in cases:
        common.log(f"measuring {label}")
        rows += measure(label, knobs, scale, x, y, args.lr)
    header = ["case", "param", "RMS gradient", "max abs update", "rel. change of w(1)", "vs the kernel's"]
    text = [
        f"### First SGD step at init: each param's effect on the evolved kernel w(1) (ResNet-4 conf. 1, layer1_1/conv1, "
        f"lr {args.lr}, batch {args.batch}, {'digits' if args.data else 'synthetic'})\n",
        common.machine() + "\n",
        common.markdown_table(header, rows, "llrrrr"),
    ]
    common.emit("\n".join(text) + "\n", args.out)


if __name__ == "__main__":
    main()
