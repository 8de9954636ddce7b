"""AlexNet, ResNet-4 and ResNet-10 with ODE blocks (Tables 3, 5, 6 of the paper); the only Flax file.

``get_model(name, method, **overrides)`` returns a linen Module; ``model.init(key, x)`` with
``x`` of shape ``(N, 32, 32, 3)`` gives ``{"params", "batch_stats"}``;
``model.apply(vars, x, train=True, mutable=["batch_stats"])`` returns ``(logits, updates)``
and ``model.apply(vars, x, train=False)`` returns logits ``(N, 10)`` in the model dtype.

Architectures (Appendix C; batch norm and ReLU after every convolution, as the paper says)

* ResNet-4 / ResNet-10 (Table 6). Stem: conv 3x3 3->16 (no bias) + BN + ReLU. Every
  shape-preserving residual block is an ODE block (``layer1_1`` for ResNet-4;
  ``layer1_1, layer1_2, layer2_2`` for ResNet-10) with the ANODE ODE function
  ``f(z) = relu(bn2(conv2(relu(bn1(conv1(z))))))``, 3x3 convs without bias, SAME padding;
  the solver supplies the residual, so one Euler step is the ResNet block ``z + f(z)``.
  ResNet-10's downsampling block ``layer2_1`` (16->32, stride 2) stays ordinary:
  ``shortcut(z) + relu(bn2(conv2(relu(bn1(conv1(z))))))`` with ``conv1`` 3x3 stride 2,
  padding 1 on each side (PyTorch's ``padding=1``, not Flax's asymmetric SAME) and
  ``shortcut = BN(conv 1x1 stride 2)``. Head: max pool 8x8 stride 8 (32x32x16 -> 256
  features for ResNet-4, 16x16x32 -> 128 for ResNet-10), flatten, Dense -> 10.
* AlexNet (Table 5). conv1 5x5 3->64 (bias) + BN + ReLU at 32x32, max pool to 16x16,
  conv2 5x5 64->64 (bias) as the ODE block with ``f(z) = relu(bn(conv2(z)))``, max pool
  to 8x8, flatten 4096 -> Dense 384 -> ReLU -> Dense 192 -> ReLU -> Dense 10. **The pool
  window is not in the paper**: we use 3x3, stride 2, SAME padding (the classic CIFAR
  AlexNet), which gives the 16x16 and 8x8 of Table 5.

Baseline parameter counts (BN scale and shift counted, running statistics not) are the
paper's Table 3 exactly: ResNet-4 7,706; ResNet-10 44,186; AlexNet 1,756,682
(``python -m anodev2_jax.models`` prints the whole table beside the paper's).

Methods (``method_defaults``; every knob may be overridden):

* ``baseline``: one Euler step, no evolution (the plain residual network).
* ``neural_ode``: ``steps_z=2`` (Table 4's ``N_t = 2``), static weights, gradient by
  diffrax's ``BacksolveAdjoint`` (``adjoint="backsolve"``: the continuous adjoint of Chen
  et al. [8], optimize-then-discretize, so the gradient is only *approximate*).
* ``anode``: ``steps_z=2``, static weights, DTO (exact) gradients through
  :func:`anodev2_jax.coupled_block` with ``coeffs=None`` and ANODE's block checkpointing.
* ``anodev2_conf1``: ``steps_z = steps_w = 5``, ``schedule="aligned"``, RDA evolution.
* ``anodev2_conf2``: ``steps_z = 2, steps_w = 10``, ``schedule="endpoints"``, RDA evolution.

Knobs (module attributes; ``None`` means "the method's default"): ``steps_z``,
``steps_w``, ``schedule``, ``solver`` (``"euler"``, ``"rk2"``, ``"rk4"``), ``remat``
(``"none"``, ``"block"``, ``"step"``, ``"binomial"``; see :mod:`anodev2_jax.ode`),
``adjoint`` (``"autodiff"``, ``"discrete"`` = the hand-written Eq. 2.5 adjoint, Euler
only, or ``"backsolve"`` = diffrax continuous adjoint, static weights only),
``coeff_granularity`` (``"kernel"``: one ``(d, v, rho)`` per kernel;
``"filter"``: one per output filter, shape ``(cout,)``), ``nonlinearity`` (``sigma`` of
Eq. 2.6: ``"tanh"``, ``"sigmoid"``, ``"none"``), ``norm`` (``"per_step"``, ``"shared"``),
``bn_momentum`` (0.9) and ``dtype`` (``"float32"``; ``"float64"`` for gradient tests).
Without evolution (``baseline``, ``neural_ode``, ``anode``) ``steps_w``, ``schedule``,
``nonlinearity`` and ``coeff_granularity`` are validated but unused; ``remat`` is unused by
``adjoint="backsolve"`` (diffrax's backsolve keeps O(1) activations by construction).

Decisions (where the paper is silent):

* **The ODE function is pure.** Inside an ODE block, ``f`` is a function of explicit
  arrays (:func:`ode_function`: ``lax.conv_general_dilated`` and a written-out batch
  norm), not of Flax submodules, because the solver wraps it in remat and ``jax.custom_vjp``
  transforms and ``adjoint="discrete"`` needs an ``f`` that closes over no traced
  value. The block declares its parameters (``self.param``) and running statistics
  (``self.variable("batch_stats", ...)``) and passes them in: conv kernels as ``theta``
  (evolved), BN parameters and (in eval mode) running statistics as per-step
  ``step_args``.
* **Batch norm across time steps.** ``norm="per_step"`` (default): activation step ``n``
  has its own BN scale/shift (params of shape ``(steps_z, C)``) and its own running mean
  and variance; in train mode each step normalizes with its batch statistics and, after
  the block, step ``n``'s running statistics move towards step ``n``'s batch statistics.
  ``norm="shared"``: one BN (params and running statistics of shape ``(C,)``) reused by
  every step, as ANODE's code does; in train mode its running statistics are updated once
  per step, in step order (exactly like calling one PyTorch/Flax BN module ``steps_z``
  times), so they end up a mixture of all steps' statistics, weighted towards the last:
  eval-mode outputs then differ from train-mode ones (see DESIGN.md for why per-step is the
  default). Update rule (Flax's): ``ra = momentum * ra + (1 - momentum) * batch_stat``,
  with the *biased* batch variance (PyTorch would store the unbiased one); ``eps = 1e-5``.
  Statistics are updated only when ``train=True``, the ``batch_stats`` collection is
  mutable and the model is not initializing. With ``rk2``/``rk4`` every stage normalizes
  with its own batch statistics but the running statistics record each step's first
  stage (the one evaluated at the step's start point).
* **RDA coefficients** are learnable params ``rda_d_raw``, ``rda_v``, ``rda_rho`` next to
  each evolved kernel, with ``d = softplus(rda_d_raw) >= 0`` by construction (backward
  diffusion is ill-posed). They start near the identity evolution: ``v = rho = 0``,
  ``d = 1e-3`` (``d_raw = log(expm1(1e-3))``; softplus has no exact zero). With ``tanh`` as
  ``sigma`` this is not exactly the identity: measured on He-initialized 3x3x16x16 kernels
  (std ~0.12), the first step changes them by about 2% RMS (6% at the largest entry),
  almost all of it from ``tanh`` itself (the linear part: 0.13%); 5x5x64x64 kernels
  (std ~0.035) change far less.
* **Initialization.** Convolutions: He/Kaiming normal, ``fan_out`` mode, untruncated
  (PyTorch ResNets' ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``); conv
  biases zero; Dense layers Flax defaults (LeCun normal kernel, zero bias); BN scale 1,
  shift 0, running mean 0, variance 1.
* **neural_ode in train mode** solves once with ``odeint_diffrax`` (whose gradient is the
  continuous adjoint) and, when the running statistics are to be updated, once more with
  ``odeint_fixed(..., has_aux=True)`` under ``stop_gradient`` to read each step's batch
  moments (diffrax cannot return them): one extra forward solve per block, no backward.
* **dtype.** Params are created in ``dtype`` (float32 by default) and inputs are cast to it
  explicitly, so the model runs under strict dtype promotion with x64 enabled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtyping import Array, Float

from anodev2_jax import ode
from anodev2_jax.coupled import coupled_block
from anodev2_jax.trajectory import SCHEDULES, trajectory_indices
from anodev2_jax.rda import RDACoeffs

__all__ = [
    "MODELS",
    "METHODS",
    "KNOBS",
    "ODEConfig",
    "ODEBlock",
    "ResNet4",
    "ResNet10",
    "AlexNet",
    "method_defaults",
    "resolve_config",
    "get_model",
    "count_params",
    "ode_function",
    "rda_coeffs",
    "main",
]

MODELS = ("alexnet", "resnet4", "resnet10")
METHODS = ("baseline", "neural_ode", "anode", "anodev2_conf1", "anodev2_conf2")
EVOLVING_METHODS = ("anodev2_conf1", "anodev2_conf2")
ADJOINTS = ("autodiff", "discrete", "backsolve")
COEFF_GRANULARITIES = ("kernel", "filter")
NONLINEARITIES: dict[str, Optional[Callable]] = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "none": None}
NORMS = ("per_step", "shared")
DTYPES = ("float32", "float64")

BN_EPS = 1e-5
D_INIT = 1e-3  # initial diffusion: near-identity evolution (see module docstring)
D_RAW_INIT = math.log(math.expm1(D_INIT))

# Table 3 of the paper (thousands of parameters), for the printed comparison.
PAPER_TABLE3 = {
    "baseline": {"alexnet": "1756.68K", "resnet4": "7.71K", "resnet10": "44.19K"},
    "neural_ode": {"alexnet": "1757.13K", "resnet4": "7.96K", "resnet10": "44.95K"},
    "anode": {"alexnet": "1757.13K", "resnet4": "7.96K", "resnet10": "44.95K"},
    "anodev2_conf1": {"alexnet": "1757.51K", "resnet4": "8.23K", "resnet10": "45.77K"},
    "anodev2_conf2": {"alexnet": "1757.13K", "resnet4": "7.99K", "resnet10": "45.05K"},
}

_COMMON_DEFAULTS: dict[str, Any] = dict(
    steps_z=1,
    steps_w=None,
    schedule="aligned",
    solver="euler",
    remat="none",
    adjoint="autodiff",
    coeff_granularity="kernel",
    nonlinearity="tanh",
    norm="per_step",
    bn_momentum=0.9,
    dtype="float32",
)
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "neural_ode": dict(steps_z=2, adjoint="backsolve"),
    "anode": dict(steps_z=2, remat="block"),
    "anodev2_conf1": dict(steps_z=5, steps_w=5, schedule="aligned", remat="block"),
    "anodev2_conf2": dict(steps_z=2, steps_w=10, schedule="endpoints", remat="block"),
}
KNOBS = tuple(_COMMON_DEFAULTS)


# ----------------------------------------------------------------------------- configuration


def method_defaults(method: str) -> dict[str, Any]:
    """All knob values of ``method`` (a fresh dict; ``steps_w`` is None without evolution)."""
    ode.check_choice("method", method, METHODS)
    return {**_COMMON_DEFAULTS, **_METHOD_DEFAULTS[method]}


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    """The resolved, validated knobs of a model's ODE blocks (hashable; see module docstring)."""

    method: str
    evolve: bool
    steps_z: int
    steps_w: Optional[int]
    schedule: str
    solver: str
    remat: str
    adjoint: str
    coeff_granularity: str
    nonlinearity: str
    norm: str
    bn_momentum: float
    dtype: str

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def sigma(self) -> Optional[Callable]:
        return NONLINEARITIES[self.nonlinearity]


def _normalize_dtype(value) -> str:
    try:
        name = np.dtype(value).name
    except TypeError:
        name = repr(value)
    if name not in DTYPES:
        raise ValueError(f"dtype={value!r} is not supported; use one of {', '.join(map(repr, DTYPES))}")
    return name


def resolve_config(method: str, **overrides) -> ODEConfig:
    """Validate ``overrides`` against ``method``'s defaults; raise ValueError naming the bad field.

    ``None`` values mean "the method's default". Runs no JAX computation.
    """
    defaults = method_defaults(method)
    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise ValueError(
            f"unknown knob(s) {', '.join(map(repr, unknown))} for method={method!r}; "
            f"allowed knobs: {', '.join(KNOBS)}"
        )
    k = {**defaults, **{name: v for name, v in overrides.items() if v is not None}}
    evolve = method in EVOLVING_METHODS

    ode.check_num_steps("steps_z", k["steps_z"])
    if k["steps_w"] is not None:
        ode.check_num_steps("steps_w", k["steps_w"])
    ode.check_choice("schedule", k["schedule"], SCHEDULES)
    ode.check_choice("solver", k["solver"], ode.SOLVERS)
    ode.check_choice("remat", k["remat"], ode.REMAT_MODES)
    ode.check_choice("adjoint", k["adjoint"], ADJOINTS)
    ode.check_choice("coeff_granularity", k["coeff_granularity"], COEFF_GRANULARITIES)
    ode.check_choice("nonlinearity", k["nonlinearity"], tuple(NONLINEARITIES))
    ode.check_choice("norm", k["norm"], NORMS)
    m = k["bn_momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float, np.floating)) or not 0.0 <= m <= 1.0:
        raise ValueError(f"bn_momentum={m!r} must be a float in [0, 1] (Flax convention: 0.9 keeps 90% of the old value)")
    k["bn_momentum"] = float(m)
    k["dtype"] = _normalize_dtype(k["dtype"])

    if evolve:
        k["steps_w"] = k["steps_z"] if k["steps_w"] is None else k["steps_w"]
        trajectory_indices(k["steps_z"], k["steps_w"], k["schedule"])  # e.g. 'aligned' divisibility
    if k["adjoint"] == "discrete" and k["solver"] != "euler":
        raise ValueError(
            f"adjoint='discrete' implements Eq. 2.5 for forward Euler only, got solver={k['solver']!r}; "
            "use solver='euler' or adjoint='autodiff'"
        )
    if k["adjoint"] == "backsolve" and evolve:
        raise ValueError(
            f"adjoint='backsolve' (diffrax continuous adjoint) needs static weights, but method={method!r} "
            "evolves them; use adjoint='autodiff' or 'discrete', or method='neural_ode'"
        )
    if k["adjoint"] == "backsolve" and k["solver"] != "euler" and k["norm"] == "per_step":
        # odeint_diffrax picks step n's args from the stage time alone, round(t * N): rk2/rk4
        # stages at t_n + h/2 (round half to even) and t_n + h get step n+1's BatchNorm.
        raise ValueError(
            f"adjoint='backsolve' with solver={k['solver']!r} and norm='per_step' would give the inner "
            "Runge-Kutta stages the wrong step's BatchNorm; use solver='euler', norm='shared' or "
            "adjoint='autodiff'"
        )
    return ODEConfig(method=method, evolve=evolve, **k)


# ----------------------------------------------------------------------------- fast kernels
#
# Reverse-mode rules written out for the three operations whose autodiff lowering is slow on
# XLA:CPU (measured with jax 0.10.2; see ``benchmarks/`` and the module docstring). Each
# forward pass is the plain computation, so values are unchanged; each backward pass
# computes the same derivative (float32 round-off apart, summation order differs).

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


_CHUNK_BYTES = 2 << 20  # per-chunk working set of _kernel_grad: stays in the CPU caches


def _kernel_grad(x, g, kernel_shape, strides, padding, pre=None):
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
            m = jax.lax.dot_general(xs.reshape((-1, kw * cin)), gs.reshape((-1, kh * cout)), contract_rows)
            return m.reshape((kw, cin, kh, cout)).transpose((2, 0, 1, 3))
        cols = [xp[:, i: i + hspan: sh, j: j + wspan: sw, :] for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(cols, axis=-1).reshape((-1, kh * kw * cin))
        m = jax.lax.dot_general(patches, g.reshape((-1, cout)), contract_rows)
        return m.reshape((kh, kw, cin, cout))

    per_image = (cols_size if use_cols else patches_size) * x.dtype.itemsize
    chunk = max([c for c in range(1, n + 1) if n % c == 0 and c * per_image <= _CHUNK_BYTES] or [1])
    if chunk == n:
        return chunk_grad(x, g)

    def body(acc, xg):
        return acc + chunk_grad(*xg), None

    split = lambda a: a.reshape((n // chunk, chunk) + a.shape[1:])  # noqa: E731
    init = jnp.zeros((kh, kw, cin, cout), jnp.result_type(x, g))
    return jax.lax.scan(body, init, (split(x), split(g)))[0]


def _matmul_kernel_grad(kernel_shape, strides) -> bool:
    """Whether :func:`_kernel_grad` beats autodiff's convolution (measured per layer shape).

    Strided 3x3 layers (ResNet-10's downsampling ``conv1``) are as fast or faster with XLA's
    own kernel gradient; every other layer of the three models is faster as a matrix product
    (16-channel 3x3 at 32x32: ~2x; 1x1 stride 2, AlexNet's 5x5 layers: 2-3x).
    """
    return max(strides) == 1 or max(kernel_shape) == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1))):
    """``lax.conv_general_dilated`` in NHWC/HWIO with explicit ``padding`` pairs; fast kernel gradient.

    Same values as the lax call; reverse mode only (a ``jax.custom_vjp``): the kernel
    gradient is :func:`_kernel_grad`, the input gradient autodiff's transposed convolution.
    """
    return _lax_conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding), (x, kernel)  # saved: the inputs


def _conv_kernel_grad(x, g, kernel, strides, padding, pre=None):
    """Kernel gradient of :func:`conv2d` with input ``pre(x)``: :func:`_kernel_grad` on CPU, autodiff's elsewhere."""

    def autodiff(x, g):
        x = x if pre is None else pre(x)
        _, vjp_w = jax.vjp(lambda w_: _lax_conv(x, w_, strides, padding), kernel)
        return vjp_w(g)[0]

    if not _matmul_kernel_grad(kernel.shape[:2], strides):
        return autodiff(x, g).astype(kernel.dtype)
    # CPU only: GPU/TPU convolution libraries compute the kernel gradient well, and a scan
    # of small products would serialize them there.
    dw = jax.lax.platform_dependent(
        x, g, cpu=lambda x, g: _kernel_grad(x, g, kernel.shape[:2], strides, padding, pre), default=autodiff
    )
    return dw.astype(kernel.dtype)


def _conv_input_grad(g, kernel, strides, padding, x_shape):
    zeros = jnp.zeros(x_shape, g.dtype)  # only its shape matters: the map is linear in x
    _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, strides, padding), zeros)
    return vjp_x(g)[0]


def _conv2d_bwd(strides, padding, res, g):
    x, kernel = res
    dx = _conv_input_grad(g, kernel, strides, padding, x.shape)
    return dx, _conv_kernel_grad(x, g, kernel, strides, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _same_padding(kernel_shape) -> tuple:
    """Flax/lax ``"SAME"`` padding of a stride-1 convolution: ``(k - 1) // 2`` before, the rest after."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_shape)


def _bcast(v):
    return v.reshape((1, 1, 1, -1))


def _bn_relu_forward(x, scale, bias):
    """``(relu(BatchNorm(x)), mean, var)`` with batch moments over all but the channel axis.

    Exactly :func:`_batch_norm` (train mode) followed by ReLU.
    """
    rows = x.reshape((-1, x.shape[-1]))  # same sums; XLA:CPU reduces a 2-D array faster (~20% per BN)
    mean = jnp.mean(rows, axis=0)
    var = jnp.mean(jnp.square(rows - mean.reshape((1, -1))), axis=0)
    return _bn_relu_apply(x, scale, bias, mean, var), mean, var


def _bn_relu_apply(x, scale, bias, mean, var):
    inv = jax.lax.rsqrt(var + BN_EPS) * scale
    return jax.nn.relu((x - _bcast(mean)) * _bcast(inv) + _bcast(bias))


def _bn_relu_bwd(x, scale, bias, mean, var, g, g_mean, g_var):
    """Closed-form gradient of :func:`_bn_relu_forward`: ``(dx, dscale, dbias)`` (two passes over ``x``)."""
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
    gradient and :func:`_conv_kernel_grad` for the kernel. It keeps only ``z`` and each
    convolution's output (autodiff also kept every ReLU output, the next convolution's
    input); those inputs are recomputed chunk by chunk inside the kernel-gradient scan.
    The cotangents of the returned moments are honoured.
    """
    return _chain_fwd(z, layers, paddings)[0]


def _chain_fwd(z, layers, paddings):
    h, ys, moments = z, [], []
    for layer, padding in zip(layers, paddings):
        y = _lax_conv(h, layer["kernel"], (1, 1), padding)
        if "bias" in layer:
            y = y + _bcast(layer["bias"])
        h, mean, var = _bn_relu_forward(y, layer["scale"], layer["shift"])
        ys.append(y)
        moments.append((mean, var))
    return (h, tuple(moments)), (z, layers, tuple(ys), tuple(moments))  # saved: z and the conv outputs


def _chain_bwd(paddings, res, cts):
    z, layers, ys, moments = res
    g, g_moments = cts
    grads = [None] * len(layers)
    for k in reversed(range(len(layers))):
        layer, (mean, var), (g_mean, g_var) = layers[k], moments[k], g_moments[k]
        dy, g_scale, g_shift = _bn_relu_bwd(ys[k], layer["scale"], layer["shift"], mean, var, g, g_mean, g_var)
        grad = {"scale": g_scale, "shift": g_shift}
        if "bias" in layer:
            grad["bias"] = jnp.sum(dy, axis=(0, 1, 2))
        if k == 0:
            x, pre = z, None
        else:  # this layer's input, relu(bn(y_{k-1})), recomputed where it is needed
            prev, (p_mean, p_var) = layers[k - 1], moments[k - 1]
            x = ys[k - 1]
            pre = functools.partial(_bn_relu_apply, scale=prev["scale"], bias=prev["shift"], mean=p_mean, var=p_var)
        grad["kernel"] = _conv_kernel_grad(x, dy, layer["kernel"], (1, 1), paddings[k], pre)
        g = _conv_input_grad(dy, layer["kernel"], (1, 1), paddings[k], x.shape[:3] + (layer["kernel"].shape[2],))
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


# ----------------------------------------------------------------------------- pure ODE function


def _conv(x, kernel, bias=None):
    """Stride-1 "SAME" convolution of the ODE function (:func:`conv2d`), plus an optional bias."""
    y = conv2d(x, kernel, (1, 1), _same_padding(kernel.shape[:2]))
    if bias is not None:
        y = y + bias.reshape((1, 1, 1, -1))
    return y


def _batch_norm(x, p, train: bool):
    """BatchNorm over axes (0, 1, 2): batch moments (biased variance) in train mode, ``p``'s running ones otherwise."""
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean.reshape((1, 1, 1, -1))), axis=(0, 1, 2))
    else:
        mean, var = p["mean"], p["var"]
    inv = jax.lax.rsqrt(var + BN_EPS) * p["scale"]
    y = (x - mean.reshape((1, 1, 1, -1))) * inv.reshape((1, 1, 1, -1)) + p["bias"].reshape((1, 1, 1, -1))
    return y, {"mean": mean, "var": var}


def _layer_names(num_convs: int) -> list[tuple[str, str]]:
    if num_convs == 1:
        return [("conv", "bn")]
    return [(f"conv{i}", f"bn{i}") for i in range(1, num_convs + 1)]


def ode_function(
    z: Float[Array, "n h w c"], theta: dict, args: dict, *, num_convs: int, train: bool, with_aux: bool
) -> Float[Array, "n h w c"] | tuple[Float[Array, "n h w c"], dict]:
    """The ODE function of a block: ``relu(bn_k(conv_k(... relu(bn_1(conv_1(z))))))``.

    ANODE's residual-block function for ``num_convs=2`` (ResNets) and AlexNet's
    ``relu(bn(conv(z) + b))`` for ``num_convs=1``. Pure: everything comes in as arrays.

    Args:
      z: activations, NHWC.
      theta: ``{"conv1": {"kernel": (kh, kw, C, C)[, "bias": (C,)]}, ...}`` (names
        ``"conv"``/``"bn"`` when ``num_convs=1``); the weights of this step.
      args: ``{"bn1": {"scale", "bias"[, "mean", "var"]}, ...}``, each ``(C,)``: this step's
        BN parameters (and running statistics, used when ``train`` is False).
      train: normalize with batch statistics (True) or ``args``'s running ones.
      with_aux: also return ``{"bn1": {"mean", "var"}, ...}``, the moments used.

    Returns:
      ``dz`` (the shape and dtype of ``z``), or ``(dz, aux)``.
    """
    names = _layer_names(num_convs)
    if train:  # one custom-VJP chain (fast backward pass on CPU, fewer saved activations)
        layers = tuple(
            {**theta[conv], "scale": args[bn]["scale"], "shift": args[bn]["bias"]} for conv, bn in names
        )
        paddings = tuple(_same_padding(theta[conv]["kernel"].shape[:2]) for conv, _ in names)
        h, moments = conv_bn_relu_chain(z, layers, paddings)
        aux = {bn: {"mean": m, "var": v} for (_, bn), (m, v) in zip(names, moments)}
        return (h, aux) if with_aux else h
    h, aux = z, {}
    for conv_name, bn_name in names:
        h = _conv(h, theta[conv_name]["kernel"], theta[conv_name].get("bias"))
        h, aux[bn_name] = _batch_norm(h, args[bn_name], train)
        h = jax.nn.relu(h)
    return (h, aux) if with_aux else h


def rda_coeffs(d_raw, v, rho) -> RDACoeffs:
    """RDA coefficients from the learnable params: ``d = softplus(d_raw) >= 0`` (always, by construction)."""
    return RDACoeffs(jax.nn.softplus(d_raw), v, rho)


# ----------------------------------------------------------------------------- parameter holders

_he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Conv(nn.Module):
    """``nn.Conv`` (NHWC, HWIO kernel, same parameter names, shapes and initializers) computed by :func:`conv2d`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"  # "SAME", "VALID" or ((lo, hi), (lo, hi))
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param("kernel", _he_normal, shape, self.dtype)
        padding = self.padding
        if isinstance(padding, str):
            padding = jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size, self.strides, padding)
        y = conv2d(x, kernel, tuple(self.strides), tuple(tuple(p) for p in padding))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype).reshape((1, 1, 1, -1))
        return y


class _ConvParams(nn.Module):
    """Declares one ODE-block conv kernel (HWIO), its optional bias and its RDA coefficients."""

    features: int
    kernel_size: int
    use_bias: bool
    config: ODEConfig

    @nn.compact
    def __call__(self, features_in: int):
        cfg, dtype = self.config, self.config.jnp_dtype
        k = self.kernel_size
        params = {"kernel": self.param("kernel", _he_normal, (k, k, features_in, self.features), dtype)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), dtype)
        coeffs = None
        if cfg.evolve:
            shape = () if cfg.coeff_granularity == "kernel" else (self.features,)
            d_raw = self.param("rda_d_raw", nn.initializers.constant(D_RAW_INIT), shape, dtype)
            v = self.param("rda_v", nn.initializers.zeros, shape + (2,), dtype)
            rho = self.param("rda_rho", nn.initializers.zeros, shape, dtype)
            coeffs = {"kernel": rda_coeffs(d_raw, v, rho), **({"bias": None} if self.use_bias else {})}
        return params, coeffs


class _StepBatchNorm(nn.Module):
    """BN parameters and running statistics of an ODE block: per step ``(steps, C)`` or shared ``(C,)``."""

    features: int
    steps: int
    shared: bool
    momentum: float
    dtype: Any

    def setup(self):
        shape = (self.features,) if self.shared else (self.steps, self.features)
        self.scale = self.param("scale", nn.initializers.ones, shape, self.dtype)
        self.bias = self.param("bias", nn.initializers.zeros, shape, self.dtype)
        self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, self.dtype))
        self.var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, self.dtype))

    def __call__(self, train: bool):
        """This BN's ``step_args``: ``{"scale", "bias"[, "mean", "var"]}``, leading axis ``steps``."""
        p = {"scale": self.scale, "bias": self.bias}
        if not train:
            p["mean"] = jax.lax.stop_gradient(self.mean.value)
            p["var"] = jax.lax.stop_gradient(self.var.value)
        if self.shared:  # broadcasting sums the per-step gradients back to the one shared set
            p = {name: jnp.broadcast_to(a, (self.steps,) + a.shape) for name, a in p.items()}
        return p

    def update(self, batch_mean, batch_var):
        """Move the running statistics towards the per-step batch moments ``(steps, C)``."""
        m = self.momentum
        batch_mean, batch_var = jax.lax.stop_gradient(batch_mean), jax.lax.stop_gradient(batch_var)
        mean, var = self.mean.value, self.var.value
        if self.shared:  # one update per step, in step order (one BN called steps times)
            for n in range(self.steps):
                mean = m * mean + (1.0 - m) * batch_mean[n]
                var = m * var + (1.0 - m) * batch_var[n]
        else:
            mean = m * mean + (1.0 - m) * batch_mean
            var = m * var + (1.0 - m) * batch_var
        self.mean.value, self.var.value = mean, var


# ----------------------------------------------------------------------------- blocks


class ODEBlock(nn.Module):
    """A shape-preserving residual block solved as an ODE: ``z(1)`` of ``dz/dt = f(z, theta(t))``.

    ``f`` is :func:`ode_function` with ``num_convs`` convs (2: ResNet, 1: AlexNet). The
    method in ``config`` picks the solve: :func:`anodev2_jax.coupled_block` (RDA-evolved
    kernels for ``anodev2_*``, static ones otherwise; DTO gradients, hand-written Eq. 2.5
    adjoint with ``adjoint="discrete"``) or :func:`anodev2_jax.odeint_diffrax` with the
    continuous adjoint (``adjoint="backsolve"``).

    Params: ``conv1/kernel`` ``(k, k, C, C)`` (``conv/kernel`` and ``conv/bias`` for
    AlexNet), RDA ``conv1/rda_d_raw, rda_v, rda_rho`` when evolving, ``bn1/scale, bias`` of
    shape ``(steps_z, C)`` (per-step) or ``(C,)`` (shared); batch_stats ``bn1/mean, var``
    of the same shapes.
    """

    features: int
    config: ODEConfig
    kernel_size: int = 3
    num_convs: int = 2
    use_bias: bool = False

    @nn.compact
    def __call__(self, z, train: bool = False):
        cfg = self.config
        if z.shape[-1] != self.features:
            raise ValueError(f"ODEBlock with features={self.features} got input with {z.shape[-1]} channels")
        theta, coeffs, args, bns = {}, {}, {}, {}
        for conv_name, bn_name in _layer_names(self.num_convs):
            theta[conv_name], coeffs[conv_name] = _ConvParams(
                self.features, self.kernel_size, self.use_bias, cfg, name=conv_name
            )(self.features)
            bns[bn_name] = _StepBatchNorm(
                self.features, cfg.steps_z, cfg.norm == "shared", cfg.bn_momentum, cfg.jnp_dtype, name=bn_name
            )
            args[bn_name] = bns[bn_name](train)
        coeffs = coeffs if cfg.evolve else None
        update_stats = train and self.is_mutable_collection("batch_stats") and not self.is_initializing()
        f = functools.partial(ode_function, num_convs=self.num_convs, train=train)

        aux = None
        if cfg.adjoint == "backsolve":
            z1 = ode.odeint_diffrax(
                functools.partial(f, with_aux=False), z, theta,
                num_steps=cfg.steps_z, solver=cfg.solver, adjoint="backsolve", step_args=args,
            )
            if update_stats:  # diffrax cannot return aux: one extra forward solve, no gradient
                sg = jax.lax.stop_gradient
                _, aux = ode.odeint_fixed(
                    functools.partial(f, with_aux=True), sg(z), sg(theta),
                    num_steps=cfg.steps_z, solver=cfg.solver, step_args=sg(args), has_aux=True,
                )
        else:
            out = coupled_block(
                functools.partial(f, with_aux=train), z, theta, coeffs,
                steps_z=cfg.steps_z,
                steps_w=cfg.steps_w if cfg.evolve else None,
                schedule=cfg.schedule if cfg.evolve else "aligned",
                nonlinearity=cfg.sigma,
                remat=cfg.remat,
                adjoint=cfg.adjoint,
                solver=cfg.solver,
                step_args=args,
                has_aux=train,
            )
            z1, aux = out if train else (out, None)
        if update_stats:
            for bn_name, bn in bns.items():
                bn.update(aux[bn_name]["mean"], aux[bn_name]["var"])
        return z1


class _DownsampleBlock(nn.Module):
    """ResNet-10's ordinary ``layer2_1``: ``BN(conv1x1/2(z)) + relu(bn2(conv2(relu(bn1(conv3x3/2(z))))))``."""

    features: int
    config: ODEConfig

    @nn.compact
    def __call__(self, z, train: bool = False):
        conv = functools.partial(_Conv, use_bias=False, dtype=self.config.jnp_dtype)
        bn = functools.partial(_flax_bn, self.config, train)
        h = jax.nn.relu(bn("bn1")(conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv1")(z)))
        h = jax.nn.relu(bn("bn2")(conv(self.features, (3, 3), padding="SAME", name="conv2")(h)))
        shortcut = bn("shortcut_bn")(conv(self.features, (1, 1), strides=(2, 2), padding="VALID", name="shortcut_conv")(z))
        return shortcut + h


def _flax_bn(cfg: ODEConfig, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=cfg.bn_momentum, epsilon=BN_EPS,
        dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name,
        # Same arithmetic as the ODE blocks' batch norm: two-pass variance, statistics kept
        # in the model dtype (float32 or float64; no half precision here to protect).
        use_fast_variance=False, force_float32_reductions=False,
    )


# ----------------------------------------------------------------------------- models


class _ODEModel(nn.Module):
    """Knobs shared by the models; ``None`` means the method's default (:func:`method_defaults`)."""

    method: str = "baseline"
    steps_z: Optional[int] = None
    steps_w: Optional[int] = None
    schedule: Optional[str] = None
    solver: Optional[str] = None
    remat: Optional[str] = None
    adjoint: Optional[str] = None
    coeff_granularity: Optional[str] = None
    nonlinearity: Optional[str] = None
    norm: Optional[str] = None
    bn_momentum: Optional[float] = None
    dtype: Any = None

    @property
    def config(self) -> ODEConfig:
        return resolve_config(self.method, **{name: getattr(self, name) for name in KNOBS})

    def _prepare(self, x):
        cfg = self.config
        if jnp.ndim(x) != 4 or jnp.shape(x)[-1] != 3:
            raise ValueError(
                f"expected NHWC images (N, H, W, 3), e.g. CIFAR-10's (N, 32, 32, 3), got shape {jnp.shape(x)}"
            )
        return cfg, jnp.asarray(x).astype(cfg.jnp_dtype)

    def _stem(self, cfg: ODEConfig, x, train: bool, features: int, kernel: int, use_bias: bool):
        dtype = cfg.jnp_dtype
        x = _Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias, dtype=dtype, name="conv1")(x)
        return jax.nn.relu(_flax_bn(cfg, train, "bn1")(x))

    def _resnet_head(self, cfg: ODEConfig, z):
        z = max_pool_blocks(z, 8)
        z = z.reshape((z.shape[0], -1))
        return nn.Dense(10, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name="fc")(z)


class ResNet4(_ODEModel):
    """ResNet-4 (Table 6): stem, one ODE block ``layer1_1`` (16 channels, 32x32), pool, fc."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        z = self._stem(cfg, x, train, 16, 3, False)
        z = ODEBlock(16, cfg, name="layer1_1")(z, train)
        return self._resnet_head(cfg, z)


class ResNet10(_ODEModel):
    """ResNet-10 (Table 6): stem, ODE blocks ``layer1_1, layer1_2`` (16), downsample ``layer2_1``, ODE ``layer2_2`` (32)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        z = self._stem(cfg, x, train, 16, 3, False)
        z = ODEBlock(16, cfg, name="layer1_1")(z, train)
        z = ODEBlock(16, cfg, name="layer1_2")(z, train)
        z = _DownsampleBlock(32, cfg, name="layer2_1")(z, train)
        z = ODEBlock(32, cfg, name="layer2_2")(z, train)
        return self._resnet_head(cfg, z)


class AlexNet(_ODEModel):
    """AlexNet (Table 5): conv1 5x5 + BN + ReLU, pool, ODE block conv2 5x5, pool, fc 4096-384-192-10.

    The pool window (3x3, stride 2, SAME) is our choice: the paper gives only the output sizes.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        dtype = cfg.jnp_dtype
        z = self._stem(cfg, x, train, 64, 5, True)
        z = nn.max_pool(z, (3, 3), strides=(2, 2), padding="SAME")
        z = ODEBlock(64, cfg, kernel_size=5, num_convs=1, use_bias=True, name="conv2")(z, train)
        z = nn.max_pool(z, (3, 3), strides=(2, 2), padding="SAME")
        z = z.reshape((z.shape[0], -1))
        z = jax.nn.relu(nn.Dense(384, dtype=dtype, param_dtype=dtype, name="fc1")(z))
        z = jax.nn.relu(nn.Dense(192, dtype=dtype, param_dtype=dtype, name="fc2")(z))
        return nn.Dense(10, dtype=dtype, param_dtype=dtype, name="fc3")(z)


_MODEL_CLASSES = {"alexnet": AlexNet, "resnet4": ResNet4, "resnet10": ResNet10}


def get_model(name: str, method: str, **overrides) -> nn.Module:
    """The linen Module for model ``name`` trained by ``method``, with knob ``overrides``.

    Args:
      name: ``"alexnet"``, ``"resnet4"`` or ``"resnet10"``.
      method: ``"baseline"``, ``"neural_ode"``, ``"anode"``, ``"anodev2_conf1"`` or
        ``"anodev2_conf2"``.
      **overrides: knobs (see the module docstring; :data:`KNOBS`), e.g. ``steps_z=3``.

    Raises:
      ValueError: unknown name, method or knob, or a bad knob value (before any compute).
    """
    ode.check_choice("name", name, MODELS)
    cfg = resolve_config(method, **overrides)
    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "evolve"}
    return _MODEL_CLASSES[name](**knobs)


def count_params(params) -> int:
    """Number of scalars in a params pytree (arrays or ``ShapeDtypeStruct``s).

    A full variables dict ``{"params": ..., "batch_stats": ...}`` counts only ``"params"``
    (running statistics are not parameters, as in Table 3).
    """
    if isinstance(params, dict) or hasattr(params, "keys"):
        if "params" in params:
            params = params["params"]
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- Table 3


def param_table(**overrides) -> dict[str, dict[str, int]]:
    """Parameter counts ``{method: {model: count}}`` (shapes only, via ``jax.eval_shape``)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    key = jax.random.key(0)
    table = {}
    for method in METHODS:
        table[method] = {}
        for name in MODELS:
            shapes = jax.eval_shape(get_model(name, method, **overrides).init, key, x)
            table[method][name] = count_params(shapes["params"])
    return table


def format_table(table: dict[str, dict[str, int]]) -> str:
    """Markdown: rows = methods, columns = models, ``ours (paper)``; ours exact, paper's Table 3 rounded."""
    titles = {"alexnet": "AlexNet", "resnet4": "ResNet-4", "resnet10": "ResNet-10"}
    lines = ["| method | " + " | ".join(titles[m] for m in MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    for method, row in table.items():
        cells = [f"{row[m]:,} ({PAPER_TABLE3[method][m]})" for m in MODELS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Print the Table 3 analogue: our parameter counts with the paper's in parentheses."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--coeff-granularity", default="kernel", choices=COEFF_GRANULARITIES)
    parser.add_argument("--norm", default="per_step", choices=NORMS)
    args = parser.parse_args(argv)
    table = param_table(coeff_granularity=args.coeff_granularity, norm=args.norm)
    print(f"Parameters (BN scale+shift counted, running stats not; norm={args.norm!r}, "
          f"coeff_granularity={args.coeff_granularity!r}); paper's Table 3 in parentheses\n")
    print(format_table(table))


if __name__ == "__main__":
    main()
