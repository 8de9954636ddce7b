"""The Flax (linen) building blocks of the models: the ODE function, BatchNorm holders, ODE blocks.

An :class:`ODEBlock` is a shape-preserving residual block solved as an ODE (Eq. 2.3b): it
declares the conv kernels (``theta``, evolved by Eq. 2.6 / B.4 for ``anodev2_*``), their RDA
coefficients and the per-step BatchNorm parameters, and hands them to
:func:`anodev2_jax.coupled_block` (or :func:`anodev2_jax.odeint_diffrax` for the Neural ODE)
with the pure :func:`ode_function` ``f(z) = relu(bn2(conv2(relu(bn1(conv1(z))))))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from anodev2_jax import kernels, ode
from anodev2_jax.coupled import coupled_block
from anodev2_jax.evolution import LinearEvolution, MLPField, ODEEvolution, RDAEquation
from anodev2_jax.methods import EVOLUTION_PARAM_PREFIXES, ODEConfig
from anodev2_jax.rda import RDACoeffs
from anodev2_jax.time_kernels import DiscreteKernel, ExponentialKernel

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
    "block_time_kernel",
    "Conv",
    "ConvParams",
    "StepBatchNorm",
    "ODEBlock",
    "DownsampleBlock",
    "flax_batch_norm",
]

# RDA coefficients start near the identity evolution: v = rho = 0, d = 1e-3 (softplus has no
# exact zero). With tanh as sigma this is not exactly the identity: measured on He-initialized
# 3x3x16x16 kernels (std ~0.12), the first step changes them by about 2% RMS (6% at the largest
# entry), almost all of it from tanh itself (the linear part: 0.13%); 5x5x64x64 kernels (std
# ~0.035) change far less.
D_INIT = 1e-3
D_RAW_INIT = math.log(math.expm1(D_INIT))

def _conv(x, kernel, bias=None):
    """Stride-1 "SAME" convolution of the ODE function (:func:`conv2d`), plus an optional bias."""
    y = kernels.conv2d(x, kernel, (1, 1), kernels.same_padding(kernel.shape[:2]))
    if bias is not None:
        y = y + bias.reshape((1, 1, 1, -1))
    return y


def batch_norm(x, p, train: bool):
    """BatchNorm over axes (0, 1, 2): batch moments (biased variance) in train mode, ``p``'s running ones otherwise.

    Computed in the dtype of ``p`` (the params'): bfloat16 activations are normalized in
    float32 and the result cast back; the moments returned are in the params' dtype.
    """
    dtype = x.dtype
    x = x.astype(p["scale"].dtype)
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean.reshape((1, 1, 1, -1))), axis=(0, 1, 2))
    else:
        mean, var = p["mean"], p["var"]
    inv = jax.lax.rsqrt(var + kernels.BN_EPS) * p["scale"]
    y = (x - mean.reshape((1, 1, 1, -1))) * inv.reshape((1, 1, 1, -1)) + p["bias"].reshape((1, 1, 1, -1))
    return y.astype(dtype), {"mean": mean, "var": var}


def layer_names(num_convs: int) -> list[tuple[str, str]]:
    """The ``(conv, batch norm)`` parameter names of an ODE function of ``num_convs`` convolutions (AlexNet: one)."""
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

    Why pure: the solver wraps ``f`` in remat and ``jax.custom_vjp`` transforms, and
    ``adjoint="discrete"`` needs an ``f`` that closes over no traced value, so ``f`` is a
    function of explicit arrays (``lax`` convolutions and a written-out batch norm), not of
    Flax submodules. :class:`ODEBlock` declares the parameters and running statistics and
    passes them in: conv kernels as ``theta`` (evolved), BN parameters and (in eval mode)
    running statistics as per-step ``step_args``.

    Precision: ``theta`` (evolved in the params' dtype) is cast to ``z``'s dtype, so with
    bfloat16 activations the convolutions run in bfloat16; BatchNorm runs in the params'
    dtype (:func:`batch_norm`). The conv -> BatchNorm -> ReLU chain's hand-written backward
    pass (:func:`anodev2_jax.kernels.conv_bn_relu_chain`, a CPU speed-up) is written for one
    dtype; bfloat16 activations take the plain path, differentiated by autodiff.
    """
    names = layer_names(num_convs)
    theta = jax.tree.map(lambda w: w.astype(z.dtype), theta)
    if train and z.dtype == args[names[0][1]]["scale"].dtype:  # one custom-VJP chain (fast backward pass on CPU)
        layers = tuple(
            {**theta[conv], "scale": args[bn]["scale"], "shift": args[bn]["bias"]} for conv, bn in names
        )
        paddings = tuple(kernels.same_padding(theta[conv]["kernel"].shape[:2]) for conv, _ in names)
        h, moments = kernels.conv_bn_relu_chain(z, layers, paddings)
        aux = {bn: {"mean": m, "var": v} for (_, bn), (m, v) in zip(names, moments)}
        return (h, aux) if with_aux else h
    h, aux = z, {}
    for conv_name, bn_name in names:
        h = _conv(h, theta[conv_name]["kernel"], theta[conv_name].get("bias"))
        h, aux[bn_name] = batch_norm(h, args[bn_name], train)
        h = jax.nn.relu(h)
    return (h, aux) if with_aux else h


def block_remat(cfg: ODEConfig, shape: tuple[int, ...], dtype, num_convs: int) -> str:
    """The remat schedule of an ODE block whose activation has ``shape`` and ``dtype`` (as the model sees it).

    ``cfg.remat`` itself unless it is ``"auto"``; then :func:`anodev2_jax.ode.choose_remat`
    with ``cfg.remat_budget_mb`` and ``2 * num_convs + 1`` activations per evaluation of
    :func:`ode_function` (measured: its conv -> BN -> ReLU chain keeps its input and the
    convolution outputs; see the comment above ``ode.remat_activations``).
    """
    if cfg.remat != "auto":
        return cfg.remat
    activation_bytes = math.prod(shape) * jnp.dtype(dtype).itemsize
    return ode.choose_remat(
        cfg.steps_z, activation_bytes, cfg.remat_budget_mb * 2**20,
        solver=cfg.solver, f_activations=2 * num_convs + 1, adjoint=cfg.adjoint,
    )


def rda_coeffs(d_raw, v, rho) -> RDACoeffs:
    """RDA coefficients from the ``softplus`` params: ``d = softplus(d_raw) >= 0`` (by construction).

    The parameterization of runs written before ``rda_parameterization`` existed (see
    :func:`rda_diffusion`).
    """
    return RDACoeffs(jax.nn.softplus(d_raw), v, rho)


def rda_diffusion(params, parameterization: str):
    """The diffusion ``d >= 0`` of a conv's RDA params (backward diffusion is ill-posed).

    ``"abs"``: ``d = |rda_d|``, initialized at ``D_INIT``: d's gradient reaches ``rda_d``
    unscaled (its sign flipped where ``rda_d < 0``). ``"softplus"``: ``d = softplus(rda_d_raw)``
    (the earlier parameterization): at ``d = 1e-3`` softplus' slope is ``sigmoid(d_raw) ~ 1e-3``,
    so d's gradient arrives a thousand times smaller; measured on a 15-epoch real-data run,
    ``d_raw`` moved by 1e-4 and d stayed at 1e-3 (``benchmarks/evolution_updates.py`` compares
    the relative update sizes of the two).
    """
    if parameterization == "abs":
        return jnp.abs(params["rda_d"])
    return jax.nn.softplus(params["rda_d_raw"])


# evolution="mlp": hidden units of the MLP on each kernel slice's kh*kw values (16 for 3x3 and
# 5x5 kernels: q has 2*16*K + 16 + K parameters per conv, 313 for K = 9).
MLP_HIDDEN = 16

# time_kernel="exponential": the rate at init (learned as exp(time_log_rate)); 5 per unit
# time, so theta follows w with a time constant of 0.2 (one weight step of configuration 1:
# the current weight enters with weight 1 - e^{-1} = 0.63).
EXP_RATE_INIT = 5.0


def declare_evolution(module: nn.Module, cfg: ODEConfig, kernel_shape: tuple[int, ...]) -> dict:
    """Declare, on ``module``, the learnable params of the evolution of a kernel of ``kernel_shape``.

    Names and initializations (every one starts at or near "no evolution"):

    * ``rda`` / ``rda_equation``: ``rda_d`` = 1e-3 (``d = |rda_d|``; ``rda_d_raw`` =
      softplus^-1(1e-3) with ``rda_parameterization="softplus"``), ``rda_v`` = 0 (shape
      ``S + (2,)``), ``rda_rho`` = 0; ``S = ()`` per kernel or ``(cout,)`` per filter.
    * ``linear``: ``evo_generator`` = 0, ``(K, K)`` or ``(cout, K, K)``, ``K = kh * kw``
      (``G = 0`` is no evolution; its gradient at 0 is not 0: expm's derivative there is the identity).
    * ``mlp``: ``evo_w1`` ``(K, MLP_HIDDEN)`` LeCun normal, ``evo_b1`` = 0, ``evo_w2``
      ``(MLP_HIDDEN, K)`` = 0, ``evo_b2`` = 0 (the last layer is zero, so ``q = 0`` at init;
      ``evo_w1`` gets its first gradient after ``evo_w2`` has moved).

    Returns the declared params as a dict (what :func:`conv_evolution` reads).
    """
    dtype = cfg.jnp_dtype
    per_filter = () if cfg.coeff_granularity == "kernel" else (kernel_shape[-1],)
    k = kernel_shape[0] * kernel_shape[1]
    p = {}
    if cfg.evolution in ("rda", "rda_equation"):
        if cfg.rda_parameterization == "abs":
            p["rda_d"] = module.param("rda_d", nn.initializers.constant(D_INIT), per_filter, dtype)
        else:
            p["rda_d_raw"] = module.param("rda_d_raw", nn.initializers.constant(D_RAW_INIT), per_filter, dtype)
        p["rda_v"] = module.param("rda_v", nn.initializers.zeros, per_filter + (2,), dtype)
        p["rda_rho"] = module.param("rda_rho", nn.initializers.zeros, per_filter, dtype)
    elif cfg.evolution == "linear":
        p["evo_generator"] = module.param("evo_generator", nn.initializers.zeros, per_filter + (k, k), dtype)
    else:  # mlp
        lecun = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        p["evo_w1"] = module.param("evo_w1", lecun, (k, MLP_HIDDEN), dtype)
        p["evo_b1"] = module.param("evo_b1", nn.initializers.zeros, (MLP_HIDDEN,), dtype)
        p["evo_w2"] = module.param("evo_w2", nn.initializers.zeros, (MLP_HIDDEN, k), dtype)
        p["evo_b2"] = module.param("evo_b2", nn.initializers.zeros, (k,), dtype)
    return p


def conv_evolution(params, cfg: ODEConfig):
    """The evolution of one conv kernel from its params (:func:`declare_evolution`'s names).

    ``rda``: an ``RDACoeffs`` (Eq. B.4 with ``cfg.nonlinearity``, the paper's); ``rda_equation``:
    ``RDAEquation(d, v, rho, sigma)`` (Eq. 2.6 itself, one RK4 step per weight step);
    ``linear``: ``LinearEvolution(G)``; ``mlp``: an ``ODEEvolution`` of :class:`MLPField`
    (tanh hidden layer, one RK4 step per weight step). Also used by :mod:`anodev2_jax.viz`
    to replay a trained kernel's evolution.
    """
    if cfg.evolution in ("rda", "rda_equation"):
        d = rda_diffusion(params, cfg.rda_parameterization)
        if cfg.evolution == "rda":
            return RDACoeffs(d, params["rda_v"], params["rda_rho"])
        return RDAEquation(d, params["rda_v"], params["rda_rho"], sigma=cfg.sigma, substeps=1)
    if cfg.evolution == "linear":
        return LinearEvolution(params["evo_generator"])
    q = {name[len("evo_"):]: params[name] for name in ("evo_w1", "evo_b1", "evo_w2", "evo_b2")}
    return ODEEvolution(MLPField(jnp.tanh), q, solver="rk4", substeps=1)


def block_time_kernel(module: nn.Module, cfg: ODEConfig):
    """Declare the ODE block's time-kernel params on ``module`` and return K (None: the Dirac delta).

    One kernel per block, shared by its convs. ``exponential``: ``time_log_rate`` (scalar),
    ``rate = exp(time_log_rate)`` initialized at :data:`EXP_RATE_INIT`. Log scale because the
    rate's own gradient is small: at init the weight trajectory is mostly a rescaling of
    ``w0`` (B.4's tanh), which the BatchNorm after each conv undoes, so averaging it over
    time barely changes the loss (``benchmarks/evolution_updates.py`` measured a first-step
    relative change of the rate of 4.9e-6 under softplus and 1.2e-4 on the log scale,
    whose gradient is ``rate`` times the rate's: 25x at rate 5). ``discrete``:
    ``time_values`` ``(steps_w + 1,)``, one weight per lag, initialized ``(1, 0, ..., 0)``
    (the Dirac delta, so the model starts as configuration 1 / 2 and learns how far back to look).
    """
    dtype = cfg.jnp_dtype
    if cfg.time_kernel == "exponential":
        log_rate = module.param("time_log_rate", nn.initializers.constant(math.log(EXP_RATE_INIT)), (), dtype)
        return ExponentialKernel.from_log_rate(log_rate)
    if cfg.time_kernel == "discrete":
        init = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[0].set(1)
        return DiscreteKernel(module.param("time_values", init, (cfg.steps_w + 1,), dtype))
    return None


# Convolutions: He/Kaiming normal, fan_out mode, untruncated (PyTorch ResNets'
# kaiming_normal_(mode="fan_out", nonlinearity="relu")); conv biases zero; Dense layers Flax
# defaults (LeCun normal kernel, zero bias); BN scale 1, shift 0, running mean 0, variance 1.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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
    """Declares one ODE-block conv kernel (HWIO), its optional bias and its evolution's params (:func:`declare_evolution`)."""

    features: int
    kernel_size: int
    use_bias: bool
    config: ODEConfig

    @nn.compact
    def __call__(self, features_in: int):
        cfg, dtype = self.config, self.config.jnp_dtype
        k = self.kernel_size
        params = {"kernel": self.param("kernel", he_normal, (k, k, features_in, self.features), dtype)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), dtype)
        coeffs = None
        if cfg.evolve:
            evo = declare_evolution(self, cfg, params["kernel"].shape)
            coeffs = {"kernel": conv_evolution(evo, cfg), **({"bias": None} if self.use_bias else {})}
        return params, coeffs


class StepBatchNorm(nn.Module):
    """BN parameters and running statistics of an ODE block: per step ``(steps, C)`` or shared ``(C,)``.

    ``shared=False`` (``norm="per_step"``, the default): activation step ``n`` has its own
    scale/shift and running mean and variance; in train mode each step normalizes with its
    batch statistics and, after the block, step ``n``'s running statistics move towards step
    ``n``'s batch statistics. ``shared=True`` (``norm="shared"``): one BN reused by every
    step, as ANODE's code does; in train mode its running statistics are updated once per
    step, in step order (exactly like calling one PyTorch/Flax BN module ``steps`` times), so
    they end up a mixture of all steps' statistics, weighted towards the last: eval-mode
    outputs then differ from train-mode ones (DESIGN.md says why per-step is the default).
    Update rule (Flax's): ``ra = momentum * ra + (1 - momentum) * batch_stat``, with the
    *biased* batch variance (PyTorch would store the unbiased one); ``eps = 1e-5``. With
    ``rk2``/``rk4`` every stage normalizes with its own batch statistics but the running
    statistics record each step's first stage (the one evaluated at the step's start).
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
    of the same shapes. Running statistics are updated only when ``train=True``, the
    ``batch_stats`` collection is mutable and the model is not initializing.

    The Neural ODE in train mode solves once with ``odeint_diffrax`` (whose gradient is the
    continuous adjoint) and, when the running statistics are to be updated, once more with
    ``odeint_fixed(..., has_aux=True)`` under ``stop_gradient`` to read each step's batch
    moments (diffrax cannot return them): one extra forward solve per block, no backward.
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
        for conv_name, bn_name in layer_names(self.num_convs):
            theta[conv_name], coeffs[conv_name] = ConvParams(
                self.features, self.kernel_size, self.use_bias, cfg, name=conv_name
            )(self.features)
            bns[bn_name] = StepBatchNorm(
                self.features, cfg.steps_z, cfg.norm == "shared", cfg.bn_momentum, cfg.jnp_dtype, name=bn_name
            )
            args[bn_name] = bns[bn_name](train)
        coeffs = coeffs if cfg.evolve else None
        time_kernel = block_time_kernel(self, cfg) if cfg.evolve else None
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
                remat=block_remat(cfg, z.shape, z.dtype, self.num_convs),
                adjoint=cfg.adjoint,
                solver=cfg.solver,
                step_args=args,
                has_aux=train,
                time_kernel=time_kernel,
            )
            z1, aux = out if train else (out, None)
        if update_stats:
            for bn_name, bn in bns.items():
                bn.update(aux[bn_name]["mean"], aux[bn_name]["var"])
        return z1


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
