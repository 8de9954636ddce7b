"""Shared test helpers: one tolerance helper with per-dtype defaults (STYLE.md 8), small models, tiny runs."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from configs import default

# Defaults per dtype: float64 results of the same computation differ only by round-off.
_RTOL = {np.dtype("float64"): 1e-10, np.dtype("float32"): 1e-5}
_ATOL = {np.dtype("float64"): 1e-12, np.dtype("float32"): 1e-6}


def tree_allclose(x, y, *, rtol=None, atol=None) -> bool:
    """True when two pytrees have the same structure and allclose leaves."""
    lx, tx = jax.tree_util.tree_flatten(x)
    ly, ty = jax.tree_util.tree_flatten(y)
    if tx != ty:
        return False
    for a, b in zip(lx, ly):
        a, b = np.asarray(a), np.asarray(b)
        dt = np.result_type(a.dtype, b.dtype)
        r = _RTOL.get(dt, 1e-5) if rtol is None else rtol
        t = _ATOL.get(dt, 1e-6) if atol is None else atol
        if a.shape != b.shape or not np.allclose(a, b, rtol=r, atol=t):
            return False
    return True


def max_rel_err(x, y) -> float:
    """Largest leafwise ``max|x - y| / max|y|`` over two pytrees of the same structure."""
    errs = []
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.max(np.abs(b)), 1e-300)
        errs.append(np.max(np.abs(a - b)) / scale)
    return float(max(errs))


def conv(z, w, stride=1):
    return jax.lax.conv_general_dilated(z, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def small_conv_f(z, theta):
    """A small two-conv ODE function (tanh keeps every derivative smooth for finite differences)."""
    y = jnp.tanh(conv(z, theta["w1"]) + theta["b"].reshape(1, 1, 1, -1))
    return jnp.tanh(conv(y, theta["w2"]))


def small_problem(key, dtype=jnp.float64, batch=2, hw=6, c=3, sizes=(3, 4)):
    """Inputs of a small coupled block: odd and even kernel sizes, scalar and per-filter coeffs."""
    from anodev2_jax import RDACoeffs

    k1, k2, k3, k4 = jax.random.split(key, 4)
    theta = {
        "w1": 0.4 * jax.random.normal(k1, (sizes[0], sizes[0], c, c), dtype),
        "w2": 0.4 * jax.random.normal(k2, (sizes[1], sizes[1], c, c), dtype),
        "b": 0.1 * jax.random.normal(k4, (c,), dtype),
    }
    coeffs = {
        "w1": RDACoeffs(jnp.asarray(0.15, dtype), jnp.asarray([0.3, -0.2], dtype), jnp.asarray(0.05, dtype)),
        "w2": RDACoeffs(
            jnp.linspace(0.05, 0.3, c, dtype=dtype),
            jnp.stack([jnp.linspace(-0.4, 0.4, c, dtype=dtype), jnp.linspace(0.2, -0.1, c, dtype=dtype)], -1),
            jnp.linspace(-0.2, 0.1, c, dtype=dtype),
        ),
        "b": None,
    }
    z0 = jax.random.normal(k3, (batch, hw, hw, c), dtype)
    return z0, theta, coeffs


# ----------------------------------------------------------------------------- tiny training runs


def tiny_config(model="resnet4", method="baseline", **overrides):
    """A config of a two-step run: 16 synthetic training images, batch 8, one epoch.

    The tests share it (only seeds, epochs and logging vary; the learning rate drops
    after epoch 1), so they share compiled programs.
    """
    config = default.get_config(method)
    config.model = model
    config.dataset = "synthetic"
    config.num_train = 16
    config.num_test = 16
    config.batch_size = 8
    config.num_epochs = 1
    config.lr_boundaries_epochs = (1,)
    config.learning_rate = 0.01
    config.log_every_steps = 0
    for name, value in overrides.items():
        config[name] = value
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def restore_state(workdir, step):
    """The raw checkpoint of global step ``step`` (nested dicts of arrays, no target needed)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute()) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore())


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in records]
