"""Shared test helpers: one tolerance helper with per-dtype defaults (STYLE.md 8) and small models."""

import jax
import jax.numpy as jnp
import numpy as np

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
