"""Hand-written reverse-mode rules for the three operations whose autodiff is slow on XLA:CPU.

:func:`conv2d` (fast convolution kernel gradient), :func:`conv_bn_relu_chain` (closed-form
conv -> BatchNorm -> ReLU backward pass, fewer saved activations) and
:func:`max_pool_blocks` (direct first-argmax rule). Each forward pass is the plain
computation, so values are unchanged; each backward pass computes the same derivative
(float32 round-off apart, summation order differs; checked against autodiff in float64 by
``tests/test_kernels.py``). Measured with jax 0.10.2: ``benchmarks/conv_kernels.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "BN_EPS",
    "CHUNK_BYTES",
    "DIMENSION_NUMBERS",
    "lax_conv",
    "kernel_grad",
    "conv2d",
    "conv_kernel_grad",
    "conv_input_grad",
    "same_padding",
    "bn_relu_forward",
    "bn_relu_apply",
    "bn_relu_bwd",
    "conv_bn_relu_chain",
    "max_pool_blocks",
]

BN_EPS = 1e-5  # BatchNorm epsilon of every model (PyTorch's and Flax's default)

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, kernel, strides, padding):
    """XLA's convolution in this module's layout (NHWC input, HWIO kernel): the reference :func:`conv2d` computes."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS)


CHUNK_BYTES = 2 << 20  # per-chunk working set of kernel_grad: stays in the CPU caches


def kernel_grad(x, g, kernel_shape, strides, padding, pre=None):
    """``dL/dkernel`` of :func:`conv2d` as matrix products, a few images at a time.

    ``pre``, if given, is an elementwise function whose value on ``x`` is the convolution's
    input (evaluated chunk by chunk, so that input is never materialized whole).

    ``dw[i, j, ci, co] = sum_{n, h, w} xp[n, s0*h + i, s1*w + j, ci] * g[n, h, w, co]`` with
    ``xp`` the padded input. XLA:CPU lowers autodiff's version to a convolution with a 3x3
    output and a 32x32 window that ran at ~3 GFLOP/s (10x slower than the forward
    convolution). Here the shifted copies of the input are built for a chunk of images at a
    time inside a ``lax.scan`` (a few MB that stay in cache: 2-3x faster than materializing
    them for the whole batch) and multiplied; chunk results are summed. Two layouts of the
    same product; the one that materializes less is used:

    * ``"cols"``: the ``kw`` column shifts of ``xp`` side by side, ``(n, hp, wo, kw*cin)``, times
      the ``kh`` row placements of ``g`` in ``xp``'s row frame, ``(n, hp, wo, kh*cout)``:
      one ``(kw*cin, kh*cout)`` product holds every ``(i, j)`` block (a 16-channel 3x3 layer
      materializes 6 activation-sized arrays instead of im2col's 9).
    * ``"patches"``: im2col of ``xp``, ``(n, ho, wo, kh*kw*cin)``, times ``g`` (few input channels).
    """
    kh, kw = kernel_shape
    sh, sw = strides
    n, ho, wo, cout = g.shape
    cin = x.shape[-1]
    hp = x.shape[1] + padding[0][0] + padding[0][1]
    hspan, wspan = sh * (ho - 1) + 1, sw * (wo - 1) + 1
    contract_rows = (((0,), (0,)), ((), ()))
    acc = jnp.result_type(x, g)
    acc = jnp.float32 if jnp.finfo(acc).bits < 32 else acc  # bfloat16 inputs: float32 sums
    cols_size = hp * wo * (kw * cin + kh * cout)  # floats per image
    patches_size = ho * wo * kh * kw * cin
    use_cols = cols_size < patches_size

    def chunk_grad(x, g):
        x = x if pre is None else pre(x)
        xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
        if use_cols:
            xs = jnp.concatenate([xp[:, :, j: j + wspan: sw, :] for j in range(kw)], axis=-1)
            zero = jnp.zeros((), g.dtype)
            gs = jnp.concatenate(
                [jax.lax.pad(g, zero, ((0, 0, 0), (i, hp - i - hspan, sh - 1), (0, 0, 0), (0, 0, 0))) for i in range(kh)],
                axis=-1,
            )
            m = jax.lax.dot_general(xs.reshape((-1, kw * cin)), gs.reshape((-1, kh * cout)), contract_rows, preferred_element_type=acc)
            return m.reshape((kw, cin, kh, cout)).transpose((2, 0, 1, 3))
        cols = [xp[:, i: i + hspan: sh, j: j + wspan: sw, :] for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(cols, axis=-1).reshape((-1, kh * kw * cin))
        m = jax.lax.dot_general(patches, g.reshape((-1, cout)), contract_rows, preferred_element_type=acc)
        return m.reshape((kh, kw, cin, cout))

    per_image = (cols_size if use_cols else patches_size) * x.dtype.itemsize
    chunk = max([c for c in range(1, n + 1) if n % c == 0 and c * per_image <= CHUNK_BYTES] or [1])
    if chunk == n:
        return chunk_grad(x, g)

    def body(acc, xg):
        return acc + chunk_grad(*xg), None

    split = lambda a: a.reshape((n // chunk, chunk) + a.shape[1:])  # noqa: E731
    init = jnp.zeros((kh, kw, cin, cout), acc)
    return jax.lax.scan(body, init, (split(x), split(g)))[0]


def _matmul_kernel_grad(kernel_shape, strides) -> bool:
    """Whether :func:`kernel_grad` beats autodiff's convolution (measured per layer shape).

    Strided 3x3 layers (ResNet-10's downsampling ``conv1``) are as fast or faster with XLA's
    own kernel gradient; every other layer of the three models is faster as a matrix product
    (16-channel 3x3 at 32x32: ~2x; 1x1 stride 2, AlexNet's 5x5 layers: 2-3x).
    """
    return max(strides) == 1 or max(kernel_shape) == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1))):
    """``lax.conv_general_dilated`` in NHWC/HWIO with explicit ``padding`` pairs; fast kernel gradient.

    Same values as the lax call; reverse mode only (a ``jax.custom_vjp``): the kernel
    gradient is :func:`kernel_grad`, the input gradient autodiff's transposed convolution.
    """
    return lax_conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return lax_conv(x, kernel, strides, padding), (x, kernel)  # saved: the inputs


def conv_kernel_grad(x, g, kernel, strides, padding, pre=None):
    """Kernel gradient of :func:`conv2d` with input ``pre(x)``: :func:`kernel_grad` on CPU, autodiff's elsewhere."""

    def autodiff(x, g):
        x = x if pre is None else pre(x)
        _, vjp_w = jax.vjp(lambda w_: lax_conv(x, w_, strides, padding), kernel)
        return vjp_w(g)[0]

    if not _matmul_kernel_grad(kernel.shape[:2], strides):
        return autodiff(x, g).astype(kernel.dtype)
    # CPU only: GPU/TPU convolution libraries compute the kernel gradient well, and a scan
    # of small products would serialize them there.
    dw = jax.lax.platform_dependent(
        x, g, cpu=lambda x, g: kernel_grad(x, g, kernel.shape[:2], strides, padding, pre).astype(kernel.dtype), default=autodiff
    )
    return dw.astype(kernel.dtype)


def conv_input_grad(g, kernel, strides, padding, x_shape):
    """``dL/dx`` of a convolution for the output cotangent ``g``: XLA's transposed convolution (one ``jax.vjp``)."""
    zeros = jnp.zeros(x_shape, g.dtype)  # only its shape matters: the map is linear in x
    _, vjp_x = jax.vjp(lambda x_: lax_conv(x_, kernel, strides, padding), zeros)
    return vjp_x(g)[0]


def _conv2d_bwd(strides, padding, res, g):
    x, kernel = res
    dx = conv_input_grad(g, kernel, strides, padding, x.shape)
    return dx, conv_kernel_grad(x, g, kernel, strides, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def same_padding(kernel_shape) -> tuple:
    """Flax/lax ``"SAME"`` padding of a stride-1 convolution: ``(k - 1) // 2`` before, the rest after."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_shape)


def _bcast(v):
    return v.reshape((1, 1, 1, -1))


def bn_relu_forward(x, scale, bias):
    """``(relu(BatchNorm(x)), mean, var)`` with batch moments over all but the channel axis.

    Exactly :func:`anodev2_jax.layers.batch_norm` (train mode) followed by ReLU.
    """
    rows = x.reshape((-1, x.shape[-1]))  # same sums; XLA:CPU reduces a 2-D array faster (~20% per BN)
    mean = jnp.mean(rows, axis=0)
    var = jnp.mean(jnp.square(rows - mean.reshape((1, -1))), axis=0)
    return bn_relu_apply(x, scale, bias, mean, var), mean, var


def bn_relu_apply(x, scale, bias, mean, var):
    """``relu((x - mean) * scale / sqrt(var + eps) + bias)`` over the channel axis, with the given moments."""
    inv = jax.lax.rsqrt(var + BN_EPS) * scale
    return jax.nn.relu((x - _bcast(mean)) * _bcast(inv) + _bcast(bias))


def bn_relu_bwd(x, scale, bias, mean, var, g, g_mean, g_var):
    """Closed-form gradient of :func:`bn_relu_forward`: ``(dx, dscale, dbias)`` (two passes over ``x``)."""
    count = x.shape[0] * x.shape[1] * x.shape[2]
    rstd = jax.lax.rsqrt(var + BN_EPS)
    inv = rstd * scale
    d = x - _bcast(mean)
    g = jnp.where(d * _bcast(inv) + _bcast(bias) > 0, g, jnp.zeros((), g.dtype))  # ReLU' (0 at 0, as jax.nn.relu)
    xhat = d * _bcast(rstd)
    g_bias = jnp.sum(g, axis=(0, 1, 2))
    g_scale = jnp.sum(g * xhat, axis=(0, 1, 2))
    dx = _bcast(inv) * (g - _bcast(g_bias / count) - xhat * _bcast(g_scale / count))
    dx = dx + _bcast(g_mean / count) + d * _bcast(2.0 * g_var / count)
    return dx, g_scale, g_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_bn_relu_chain(z, layers, paddings):
    """Train-mode ``relu(bn_k(conv_k(... relu(bn_1(conv_1(z))))))``; returns ``(h, ((mean, var), ...))``.

    ``layers``: a list or tuple of one dict per layer, ``{"kernel": HWIO, ["bias": (C,),] "scale": (C,), "shift": (C,)}``
    (conv kernel and optional bias, BatchNorm scale and shift); ``paddings``: one static
    ``((lo, hi), (lo, hi))`` per layer (stride 1). BatchNorm uses the batch moments (biased
    variance), which are returned per layer.

    The forward pass is the plain computation (the same values as :func:`ode_function`
    written with lax ops). The backward pass is written out: per layer the closed-form
    BatchNorm+ReLU gradient (two passes), autodiff's transposed convolution for the input
    gradient and :func:`conv_kernel_grad` for the kernel. It keeps only ``z`` and each
    convolution's output (autodiff also kept every ReLU output, the next convolution's
    input); those inputs are recomputed chunk by chunk inside the kernel-gradient scan.
    The cotangents of the returned moments are honoured.
    """
    return _chain_fwd(z, layers, paddings)[0]


def _chain_fwd(z, layers, paddings):
    h, ys, moments = z, [], []
    for layer, padding in zip(layers, paddings):
        y = lax_conv(h, layer["kernel"], (1, 1), padding)
        if "bias" in layer:
            y = y + _bcast(layer["bias"])
        h, mean, var = bn_relu_forward(y, layer["scale"], layer["shift"])
        ys.append(y)
        moments.append((mean, var))
    return (h, tuple(moments)), (z, layers, tuple(ys), tuple(moments))  # saved: z and the conv outputs


def _chain_bwd(paddings, res, cts):
    z, layers, ys, moments = res
    g, g_moments = cts
    grads = [None] * len(layers)
    for k in reversed(range(len(layers))):
        layer, (mean, var), (g_mean, g_var) = layers[k], moments[k], g_moments[k]
        dy, g_scale, g_shift = bn_relu_bwd(ys[k], layer["scale"], layer["shift"], mean, var, g, g_mean, g_var)
        grad = {"scale": g_scale, "shift": g_shift}
        if "bias" in layer:
            grad["bias"] = jnp.sum(dy, axis=(0, 1, 2))
        if k == 0:
            x, pre = z, None
        else:  # this layer's input, relu(bn(y_{k-1})), recomputed where it is needed
            prev, (p_mean, p_var) = layers[k - 1], moments[k - 1]
            x = ys[k - 1]
            pre = functools.partial(bn_relu_apply, scale=prev["scale"], bias=prev["shift"], mean=p_mean, var=p_var)
        grad["kernel"] = conv_kernel_grad(x, dy, layer["kernel"], (1, 1), paddings[k], pre)
        g = conv_input_grad(dy, layer["kernel"], (1, 1), paddings[k], x.shape[:3] + (layer["kernel"].shape[2],))
        grads[k] = grad
    return g, type(layers)(grads)  # the container the caller passed (list or tuple)


conv_bn_relu_chain.defvjp(_chain_fwd, _chain_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_blocks(x, window: int):
    """Max pooling over non-overlapping ``window x window`` blocks (stride = window, no padding), NHWC.

    Same values and gradient as ``flax.linen.max_pool(x, (w, w), strides=(w, w))``: the whole
    cotangent of a block goes to its first maximum in row-major order. Written out because
    autodiff's reduce-window gradient tracked argmax positions with four activation-sized
    index arrays (~8% of a ResNet-4 training step on CPU).
    """
    return _pool_blocks(x, window).max(axis=(2, 4))


def _pool_blocks(x, window):
    n, h, w, c = x.shape
    if h % window or w % window:
        raise ValueError(f"max_pool_blocks: spatial shape {(h, w)} is not a multiple of window={window}")
    return x.reshape((n, h // window, window, w // window, window, c))


def _max_pool_fwd(x, window):
    out = max_pool_blocks(x, window)
    return out, (x, out)


def _max_pool_bwd(window, res, g):
    x, out = res
    blocks = _pool_blocks(x, window)
    pos = (
        jax.lax.broadcasted_iota(jnp.int32, (1, 1, window, 1, window, 1), 2) * window
        + jax.lax.broadcasted_iota(jnp.int32, (1, 1, window, 1, window, 1), 4)
    )
    expand = lambda a: a[:, :, None, :, None, :]  # noqa: E731
    candidates = jnp.where(blocks == expand(out), pos, window * window)
    first = jnp.min(candidates, axis=(2, 4))
    dx = jnp.where(pos == expand(first), expand(g), jnp.zeros((), g.dtype))
    return (dx.reshape(x.shape),)


max_pool_blocks.defvjp(_max_pool_fwd, _max_pool_bwd)

