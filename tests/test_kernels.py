"""The models' hand-written reverse-mode rules against autodiff of the plain computation (float64).

``kernels.conv2d``, ``kernels.conv_bn_relu_chain`` and ``kernels.max_pool_blocks`` replace
autodiff's backward pass with faster ones on XLA:CPU (see ``anodev2_jax/kernels.py``). Their
forward passes are the plain lax computations; here each backward pass is compared with
``jax.vjp`` of the plain computation on random inputs and cotangents. Both compute the same
derivative with a different summation order, so in float64 they agree to round-off: the
bound ``rtol = 1e-12`` is ~1e4 ulps of the largest entry, far below any real mistake (a
wrong shift or a missing term changes entries at O(1) relative size).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import kernels
from helpers import max_rel_err

RTOL = 1e-12


def _plain_conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _vjps(fast, plain, args, seed=0):
    """``(fast(*args), plain(*args), fast vjp, plain vjp)`` for one random cotangent."""
    out_fast, vjp_fast = jax.vjp(fast, *args)
    out_plain, vjp_plain = jax.vjp(plain, *args)
    leaves, treedef = jax.tree_util.tree_flatten(out_plain)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    ct = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    return out_fast, out_plain, vjp_fast(ct), vjp_plain(ct)


# (input HWC, kernel HW, strides, padding): every layer shape of the three models, small batch.
CONV_CASES = {
    "3x3_s1_16ch": ((8, 8, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),  # ResNet ODE/stem convs ("cols" layout)
    "3x3_s1_3ch": ((8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),  # stem on RGB ("patches" layout)
    "3x3_s2": ((8, 8, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet-10 downsampling (autodiff's kernel grad)
    "1x1_s2": ((8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0))),  # ResNet-10 shortcut projection
    "5x5_s1": ((9, 9, 4), (5, 5), (1, 1), ((2, 2), (2, 2))),  # AlexNet-style
    "4x4_s1_asym": ((7, 7, 3), (4, 4), (1, 1), ((1, 2), (1, 2))),  # even kernel, "SAME" padding split
}


@pytest.mark.exact
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("chunked", [False, True])
def test_conv2d_matches_autodiff(case, chunked, monkeypatch):
    hwc, kernel_hw, strides, padding = CONV_CASES[case]
    if chunked:  # force the lax.scan over image chunks in the kernel gradient
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (4,) + hwc, jnp.float64)
    w = jax.random.normal(kw, kernel_hw + (hwc[-1], 5), jnp.float64)
    fast = lambda x, w: kernels.conv2d(x, w, strides, padding)  # noqa: E731
    plain = lambda x, w: _plain_conv(x, w, strides, padding)  # noqa: E731
    out_fast, out_plain, (dx, dw), (dx_ref, dw_ref) = _vjps(jax.jit(fast), plain, (x, w))
    np.testing.assert_array_equal(out_fast, out_plain)  # the forward pass is the same lax call
    kernel_grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(fast(x, w)), argnums=1))(x, w)
    assert ("scan" in str(kernel_grad)) == (chunked and (max(strides) == 1 or max(kernel_hw) == 1))  # chunked path taken
    assert max_rel_err(dx, dx_ref) < RTOL
    assert max_rel_err(dw, dw_ref) < RTOL


def test_conv2d_under_vmap_and_float32():
    """Training vmaps the step over seeds and runs in float32: same rule, per-replica gradients."""
    kx, kw = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(kx, (3, 2, 8, 8, 16), jnp.float32)
    w = jax.random.normal(kw, (3, 3, 3, 16, 16), jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), pad)))

    g_fast = jax.vmap(jax.grad(functools.partial(loss, kernels.conv2d), argnums=1))(x, w)
    g_ref = jax.vmap(jax.grad(functools.partial(loss, _plain_conv), argnums=1))(x, w)
    assert g_fast.dtype == jnp.float32
    assert max_rel_err(g_fast, g_ref) < 1e-5  # float32: summation order alone moves ~1e-6


def _plain_chain(z, layers, paddings):
    h, moments = z, []
    for layer, padding in zip(layers, paddings):
        y = _plain_conv(h, layer["kernel"], (1, 1), padding)
        if "bias" in layer:
            y = y + layer["bias"].reshape(1, 1, 1, -1)
        mean = jnp.mean(y, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(y - mean.reshape(1, 1, 1, -1)), axis=(0, 1, 2))
        yhat = (y - mean.reshape(1, 1, 1, -1)) * jax.lax.rsqrt(var + kernels.BN_EPS).reshape(1, 1, 1, -1)
        h = jax.nn.relu(yhat * layer["scale"].reshape(1, 1, 1, -1) + layer["shift"].reshape(1, 1, 1, -1))
        moments.append((mean, var))
    return h, tuple(moments)


@pytest.mark.exact
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_conv_bn_relu_chain_matches_autodiff(with_bias, chunked, monkeypatch):
    """Values, moments and every gradient (input, kernels, biases, BN scale/shift), moment cotangents included."""
    if chunked:
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    c = 6
    z = jax.random.normal(keys[0], (4, 6, 6, c), jnp.float64)
    layers = []
    for i, k in enumerate((3, 1)):
        layer = {
            "kernel": 0.5 * jax.random.normal(keys[1 + i], (k, k, c, c), jnp.float64),
            "scale": 1.0 + 0.3 * jax.random.normal(keys[3 + i], (c,), jnp.float64),
            "shift": 0.2 * jax.random.normal(keys[5 + i], (c,), jnp.float64),
        }
        if with_bias:
            layer["bias"] = jnp.linspace(-0.3, 0.3, c, dtype=jnp.float64)
        layers.append(layer)
    layers = tuple(layers) if chunked else layers  # a list or a tuple: the gradient comes back in the same container
    paddings = (((1, 1), (1, 1)), ((0, 0), (0, 0)))
    fast = lambda z, layers: kernels.conv_bn_relu_chain(z, layers, paddings)  # noqa: E731
    plain = lambda z, layers: _plain_chain(z, layers, paddings)  # noqa: E731
    backward = jax.make_jaxpr(jax.grad(lambda z, layers: jnp.sum(fast(z, layers)[0])))(z, layers)
    assert ("scan" in str(backward)) == chunked  # the chunked kernel gradient takes the lax.scan path
    out_fast, out_plain, g_fast, g_ref = _vjps(jax.jit(fast), plain, (z, layers), seed=4)
    assert max_rel_err(out_fast, out_plain) < RTOL
    assert jax.tree_util.tree_structure(g_fast) == jax.tree_util.tree_structure(g_ref)
    for path, a, b in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g_ref)[0]],
        jax.tree_util.tree_leaves(g_fast),
        jax.tree_util.tree_leaves(g_ref),
    ):
        assert max_rel_err(a, b) < RTOL, path


def _flax_pool(x, window):
    return nn.max_pool(x, (window, window), strides=(window, window))


@pytest.mark.exact
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_blocks_matches_flax(ties):
    """Values and gradient of flax's max_pool, including where a block's maximum is tied
    (small-integer inputs): the whole cotangent goes to the first maximum, as autodiff's."""
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 3), jnp.float64)
    if ties:
        x = jnp.round(2 * x).clip(-1, 1)  # values in {-1, 0, 1}: most 4x4 blocks tie
    out_fast, out_plain, (dx,), (dx_ref,) = _vjps(
        lambda x: kernels.max_pool_blocks(x, 4), lambda x: _flax_pool(x, 4), (x,), seed=6
    )
    np.testing.assert_array_equal(out_fast, out_plain)
    np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_blocks_rejects_ragged_input():
    with pytest.raises(ValueError, match="not a multiple of window=8"):
        kernels.max_pool_blocks(jnp.zeros((1, 12, 12, 2)), 8)
