"""The Flax (linen) building blocks of the models: parameter and BatchNorm holders, ODE blocks.

An :class:`ODEBlock` is a shape-preserving residual block solved as an ODE (Eq. 2.3b): it
declares the conv kernels (``theta``, evolved by Eq. 2.6 / B.4 for ``anodev2_*``), their
evolution's and time kernel's params and the per-step BatchNorm parameters and statistics,
and hands them to the pure :func:`anodev2_jax.nn.core.ode_block` (the same function the
public linen, NNX and Equinox blocks of :mod:`anodev2_jax.nn` run), which solves it with
:func:`anodev2_jax.coupled_block` (or :func:`anodev2_jax.odeint_diffrax` for the Neural ODE)
and the pure :func:`ode_function` ``f(z) = relu(bn2(conv2(relu(bn1(conv1(z))))))``. The pure
pieces live in :mod:`anodev2_jax.nn.core` and are re-exported here under their old names.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anodev2_jax import kernels
from anodev2_jax.methods import EVOLUTION_PARAM_PREFIXES, ODEConfig
from anodev2_jax.nn import core
from anodev2_jax.nn.core import D_INIT as D_INIT
from anodev2_jax.nn.core import D_RAW_INIT as D_RAW_INIT
from anodev2_jax.nn.core import EXP_RATE_INIT as EXP_RATE_INIT
from anodev2_jax.nn.core import MLP_HIDDEN as MLP_HIDDEN
from anodev2_jax.nn.core import batch_norm as batch_norm
from anodev2_jax.nn.core import block_remat as block_remat
from anodev2_jax.nn.core import conv_evolution as conv_evolution
from anodev2_jax.nn.core import he_normal as he_normal
from anodev2_jax.nn.core import layer_names as layer_names
from anodev2_jax.nn.core import ode_function as ode_function
from anodev2_jax.nn.core import rda_diffusion as rda_diffusion
from anodev2_jax.rda import RDACoeffs

__all__ = [
    "D_INIT",
    "D_RAW_INIT",
    "he_normal",
    "batch_norm",
    "layer_names",
    "ode_function",
    "block_remat",
    "rda_coeffs",
    "rda_diffusion",
    "EVOLUTION_PARAM_PREFIXES",
    "MLP_HIDDEN",
    "EXP_RATE_INIT",
    "conv_evolution",
    "declare_evolution",
    "declare_time_kernel",
    "run_ode_block",
    "Conv",
    "ConvParams",
    "StepBatchNorm",
    "ODEBlock",
    "DownsampleBlock",
    "flax_batch_norm",
]


def rda_coeffs(d_raw, v, rho) -> RDACoeffs:
    """RDA coefficients from the ``softplus`` params: ``d = softplus(d_raw) >= 0`` (by construction).

    The parameterization of runs written before ``rda_parameterization`` existed (see
    :func:`rda_diffusion`).
    """
    return RDACoeffs(jax.nn.softplus(d_raw), v, rho)


def declare_evolution(module: nn.Module, cfg: ODEConfig, kernel_shape: tuple[int, ...]) -> dict:
    """Declare, on ``module``, the learnable params of the evolution of a kernel of ``kernel_shape``.

    Names, shapes and initializations: :func:`anodev2_jax.nn.core.evolution_param_specs`.
    Returns the declared params as a dict (what :func:`conv_evolution` reads).
    """
    specs = core.evolution_param_specs(cfg, kernel_shape)
    return {name: module.param(name, init, shape, cfg.jnp_dtype) for name, (init, shape) in specs.items()}


def declare_time_kernel(module: nn.Module, cfg: ODEConfig) -> dict:
    """Declare the ODE block's time-kernel params on ``module`` (:func:`anodev2_jax.nn.core.time_kernel_param_specs`; ``{}`` for the Dirac delta)."""
    specs = core.time_kernel_param_specs(cfg)
    return {name: module.param(name, init, shape, cfg.jnp_dtype) for name, (init, shape) in specs.items()}


class Conv(nn.Module):
    """``nn.Conv`` (NHWC, HWIO kernel, same parameter names, shapes and initializers) computed by :func:`conv2d`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"  # "SAME", "VALID" or ((lo, hi), (lo, hi))
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """``dtype`` is the params'; the convolution runs in ``x``'s dtype (the kernel is cast to it)."""
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param("kernel", he_normal, shape, self.dtype)
        padding = self.padding
        if isinstance(padding, str):
            padding = jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size, self.strides, padding)
        y = kernels.conv2d(x, kernel.astype(x.dtype), tuple(self.strides), tuple(tuple(p) for p in padding))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
            y = y + bias.astype(y.dtype).reshape((1, 1, 1, -1))
        return y


class ConvParams(nn.Module):
    """Declares one ODE-block conv kernel (HWIO), its optional bias and its evolution's params (:func:`anodev2_jax.nn.core.conv_param_specs`)."""

    features: int
    kernel_size: int
    use_bias: bool
    config: ODEConfig

    @nn.compact
    def __call__(self, features_in: int) -> dict:
        """The declared params: ``{"kernel"[, "bias"], <evolution params>}``."""
        cfg, k = self.config, self.kernel_size
        specs = core.conv_param_specs(cfg, (k, k, features_in, self.features), self.use_bias)
        return {name: self.param(name, init, shape, cfg.jnp_dtype) for name, (init, shape) in specs.items()}


class StepBatchNorm(nn.Module):
    """BN parameters and running statistics of an ODE block: per step ``(steps, C)`` or shared ``(C,)``.

    ``shared=False`` (``norm="per_step"``, the default): activation step ``n`` has its own
    scale/shift and running mean and variance; ``shared=True`` (``norm="shared"``): one BN
    reused by every step, as ANODE's code does. How they normalize and how the running
    statistics are updated: :func:`anodev2_jax.nn.core.step_norm_args` and
    :func:`anodev2_jax.nn.core.update_running_stats` (Flax's rule, ``eps = 1e-5``).
    """

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

    def __call__(self) -> tuple[dict, dict]:
        """``({"scale", "bias"}, {"mean", "var"})``: the params and the running statistics as stored."""
        return {"scale": self.scale, "bias": self.bias}, {"mean": self.mean.value, "var": self.var.value}

    def set_stats(self, stats: dict) -> None:
        """Store new running statistics ``{"mean", "var"}``."""
        self.mean.value, self.var.value = stats["mean"], stats["var"]


def run_ode_block(module: nn.Module, cfg: ODEConfig, z, train: bool, *, features: int, kernel_size: int, num_convs: int, use_bias: bool):
    """Declare an ODE block's variables on ``module`` (inside its compact ``__call__``) and solve it: ``z(1)``.

    The variables are those of :func:`anodev2_jax.nn.core.ode_block`, which solves the block;
    the running statistics are stored only when ``train=True``, the ``batch_stats``
    collection is mutable and the model is not initializing. The body of the models'
    :class:`ODEBlock` and of :class:`anodev2_jax.nn.linen.ODEBlock`, so both declare the same
    variables under the same names and compute the same numbers.
    """
    if z.shape[-1] != features:
        raise ValueError(f"ODEBlock with features={features} got input with {z.shape[-1]} channels")
    params, stats, norms = {}, {}, {}
    for conv_name, bn_name in layer_names(num_convs):
        params[conv_name] = ConvParams(features, kernel_size, use_bias, cfg, name=conv_name)(features)
        norms[bn_name] = StepBatchNorm(features, cfg.steps_z, cfg.norm == "shared", cfg.bn_momentum, cfg.jnp_dtype, name=bn_name)
        params[bn_name], stats[bn_name] = norms[bn_name]()
    params.update(declare_time_kernel(module, cfg))
    update_stats = train and module.is_mutable_collection("batch_stats") and not module.is_initializing()
    z1, new_stats = core.ode_block(cfg, z, params, stats, train=train, num_convs=num_convs, update_stats=update_stats)
    if update_stats:
        for bn_name, norm in norms.items():
            norm.set_stats(new_stats[bn_name])
    return z1


class ODEBlock(nn.Module):
    """A shape-preserving residual block solved as an ODE: ``z(1)`` of ``dz/dt = f(z, theta(t))``.

    ``f`` is :func:`ode_function` with ``num_convs`` convs (2: ResNet, 1: AlexNet); the solve
    is :func:`anodev2_jax.nn.core.ode_block`'s, picked by the method in ``config``.

    Params: ``conv1/kernel`` ``(k, k, C, C)`` (``conv/kernel`` and ``conv/bias`` for
    AlexNet), the evolution's (``conv1/rda_d, rda_v, rda_rho`` for RDA) and the time
    kernel's (``time_log_rate`` / ``time_values``) when evolving, ``bn1/scale, bias`` of
    shape ``(steps_z, C)`` (per-step) or ``(C,)`` (shared); batch_stats ``bn1/mean, var``
    of the same shapes. Running statistics are updated only when ``train=True``, the
    ``batch_stats`` collection is mutable and the model is not initializing.
    """

    features: int
    config: ODEConfig
    kernel_size: int = 3
    num_convs: int = 2
    use_bias: bool = False

    @nn.compact
    def __call__(self, z, train: bool = False):
        return run_ode_block(
            self, self.config, z, train,
            features=self.features, kernel_size=self.kernel_size, num_convs=self.num_convs, use_bias=self.use_bias,
        )


class DownsampleBlock(nn.Module):
    """ResNet-10's ordinary ``layer2_1``: ``BN(conv1x1/2(z)) + relu(bn2(conv2(relu(bn1(conv3x3/2(z))))))``."""

    features: int
    config: ODEConfig

    @nn.compact
    def __call__(self, z, train: bool = False):
        conv = functools.partial(Conv, use_bias=False, dtype=self.config.jnp_dtype)
        bn = functools.partial(flax_batch_norm, self.config, train)
        h = jax.nn.relu(bn("bn1")(conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv1")(z)))
        h = jax.nn.relu(bn("bn2")(conv(self.features, (3, 3), padding="SAME", name="conv2")(h)))
        shortcut = bn("shortcut_bn")(conv(self.features, (1, 1), strides=(2, 2), padding="VALID", name="shortcut_conv")(z))
        return shortcut + h


def flax_batch_norm(cfg: ODEConfig, train: bool, name: str):
    """Flax's BatchNorm in the params' dtype; with bfloat16 activations it normalizes in float32 and casts back."""
    bn = nn.BatchNorm(
        use_running_average=not train, momentum=cfg.bn_momentum, epsilon=kernels.BN_EPS,
        dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name,
        # Same arithmetic as the ODE blocks' batch norm: two-pass variance, statistics kept
        # in the params' dtype (float32 or float64).
        use_fast_variance=False, force_float32_reductions=False,
    )
    if cfg.jnp_compute_dtype == cfg.jnp_dtype:
        return bn
    return lambda x: bn(x.astype(cfg.jnp_dtype)).astype(x.dtype)
