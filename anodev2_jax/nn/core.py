"""The pure core every ODE block runs, in the models and in the public shells (no Flax, no Equinox modules).

Two blocks, both :func:`anodev2_jax.coupled_block` underneath:

* :func:`ode_block`, the models' block (``layers.ODEBlock`` in ResNet-4/10 and AlexNet, and
  the ``ODEBlock`` of :mod:`anodev2_jax.nn.linen`, :mod:`~anodev2_jax.nn.nnx` and
  :mod:`~anodev2_jax.nn.equinox`): ANODE's vector field :func:`ode_function`
  ``f(z) = relu(bn2(conv2(relu(bn1(conv1(z))))))`` with per-step or shared BatchNorm, as a
  pure function of the block's variables, the same two trees in every module system::

      params = {"conv1": {"kernel": (k, k, C, C)[, "bias": (C,)], <evolution params>},
                "bn1": {"scale": S + (C,), "bias": S + (C,)}, ..., [<time-kernel params>]}
      stats  = {"bn1": {"mean": S + (C,), "var": S + (C,)}, ...}

  with ``S = (steps_z,)`` for ``norm="per_step"`` and ``S = ()`` for ``"shared"``
  (``"conv"``/``"bn"`` when ``num_convs=1``). :func:`conv_param_specs`,
  :func:`norm_param_specs` and :func:`time_kernel_param_specs` are the one table of their
  names, shapes and initializers that every shell declares from.
* :func:`field_block`, for a user's vector field (a module of any of the three systems):
  the shell flattens the field into a list of parameters and a list of state arrays
  (BatchNorm statistics); this function runs the solve and returns the new state.

Per-step and shared state (:func:`per_step_mask`): a layer that holds state (a BatchNorm:
linen's ``batch_stats``, ``nnx.BatchStat``, an ``eqx.nn.StateIndex``) is a *stateful
layer*. With ``norm="per_step"`` (the default) every activation step has its own copy of
each stateful layer, parameters and state: their arrays carry a leading axis ``steps_z``,
step ``n`` uses copy ``n`` and its state is updated by the layer's own rule from step
``n``'s batch. With ``norm="shared"`` the field is used as it is by every step; the steps
of one solve cannot hand state to each other (its inputs are fixed before it starts), so
each step reads the state the block was given and the block keeps the state the *last*
step returned (for a Flax BatchNorm: one update per block call, from the last step's batch
statistics). The models' block (:func:`ode_block`) instead applies a shared BatchNorm's
``steps_z`` updates in step order (:func:`update_running_stats`), as ANODE's code does,
because it computes its own batch moments.

Which kernels evolve (:func:`default_evolve`): by default every rank-4 floating parameter
not in a stateful layer (a 2-D convolution kernel); the shells take a predicate
``evolve(path, leaf) -> bool`` for others. The evolution of each (``evolution=``):
None (no evolution: ANODE / Neural ODE), a name of :data:`anodev2_jax.methods.EVOLUTIONS`
(the models' parameterization, :func:`conv_evolution`), an evolution operator or
``RDACoeffs`` (each evolved kernel gets its own copy, whose array leaves are trained), or a
factory ``evolution(key, kernel) -> operator`` called once per kernel. Time kernels
(``time_kernel=``): None / ``"dirac"``, ``"exponential"``, ``"discrete"`` (the models'), or
a time-kernel pytree (its array leaves are trained).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from anodev2_jax import kernels, ode
from anodev2_jax.coupled import coupled_block
from anodev2_jax.evolution import LinearEvolution, MLPField, ODEEvolution, RDAEquation, check_operator, is_operator
from anodev2_jax.methods import DEFAULT_REMAT_BUDGET_MB, ODEConfig, resolve_config
from anodev2_jax.rda import RDACoeffs, check_coeffs
from anodev2_jax.time_kernels import DiscreteKernel, ExponentialKernel, is_time_kernel

__all__ = [
    "D_INIT",
    "D_RAW_INIT",
    "MLP_HIDDEN",
    "EXP_RATE_INIT",
    "he_normal",
    "layer_names",
    "batch_norm",
    "ode_function",
    "block_remat",
    "block_config",
    "rda_diffusion",
    "evolution_param_specs",
    "conv_param_specs",
    "conv_evolution",
    "time_kernel_param_specs",
    "time_kernel_from_params",
    "norm_param_specs",
    "norm_stats_init",
    "step_norm_args",
    "update_running_stats",
    "ode_block",
    "field_config",
    "default_evolve",
    "per_step_mask",
    "stack_per_step",
    "init_evolution",
    "evolution_operator",
    "init_time_kernel",
    "time_kernel_operator",
    "field_block",
]

PyTree = Any

# RDA coefficients start near the identity evolution: v = rho = 0, d = 1e-3 (softplus has no
# exact zero). With tanh as sigma this is not exactly the identity: measured on He-initialized
# 3x3x16x16 kernels (std ~0.12), the first step changes them by about 2% RMS (6% at the largest
# entry), almost all of it from tanh itself (the linear part: 0.13%); 5x5x64x64 kernels (std
# ~0.035) change far less.
D_INIT = 1e-3
D_RAW_INIT = math.log(math.expm1(D_INIT))

# evolution="mlp": hidden units of the MLP on each kernel slice's kh*kw values (16 for 3x3 and
# 5x5 kernels: q has 2*16*K + 16 + K parameters per conv, 313 for K = 9).
MLP_HIDDEN = 16

# time_kernel="exponential": the rate at init (learned as exp(time_log_rate)); 5 per unit
# time, so theta follows w with a time constant of 0.2 (one weight step of configuration 1:
# the current weight enters with weight 1 - e^{-1} = 0.63).
EXP_RATE_INIT = 5.0

# Convolutions: He/Kaiming normal, fan_out mode, untruncated (PyTorch ResNets'
# kaiming_normal_(mode="fan_out", nonlinearity="relu")); conv biases zero; BN scale 1, shift
# 0, running mean 0, variance 1. (jax.nn.initializers are the functions flax.linen re-exports.)
he_normal = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_Spec = tuple[Callable, tuple[int, ...]]  # (initializer(key, shape, dtype), shape)


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
    """``[(conv name, bn name), ...]`` of an ODE function with ``num_convs`` convs: ``conv1, bn1, ...`` (``conv, bn`` for one)."""
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
    Flax submodules. :func:`ode_block` passes the conv kernels as ``theta`` (evolved) and
    the BN parameters and (in eval mode) running statistics as per-step ``step_args``.

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


def block_config(
    *,
    evolution,
    time_kernel,
    steps_z: int,
    steps_w: Optional[int],
    schedule: str,
    solver: str,
    remat: str,
    remat_budget_mb: float,
    adjoint: str,
    norm: str,
    bn_momentum: float,
    nonlinearity: str,
    coeff_granularity: str,
    rda_parameterization: str,
    dtype,
) -> ODEConfig:
    """The validated :class:`~anodev2_jax.methods.ODEConfig` of a public block's knobs (one-line errors, no compute).

    The knobs are the models' (:data:`anodev2_jax.methods.KNOBS`); ``evolution=None`` is no
    evolution (the ``anode`` method, or ``neural_ode`` with ``adjoint="backsolve"``),
    anything else evolves (``anodev2_*``). A non-string evolution or time kernel (an
    operator, a factory, a kernel pytree) is validated by :func:`init_evolution` /
    :func:`init_time_kernel`; the config then carries the defaults ``"rda"`` / ``"dirac"``,
    which such blocks never read.
    """
    if evolution is None:
        method = "neural_ode" if adjoint == "backsolve" else "anode"
    else:
        method = "anodev2_conf1"
    if time_kernel is not None and not isinstance(time_kernel, str) and evolution is None:
        raise ValueError("time_kernel: a time kernel weights the evolved kernels (Eq. 2.3d); with evolution=None there are none")
    return resolve_config(
        method,
        steps_z=steps_z,
        steps_w=steps_z if steps_w is None and evolution is not None else steps_w,  # None: the method's default otherwise
        schedule=schedule,
        solver=solver,
        remat=remat,
        remat_budget_mb=remat_budget_mb,
        adjoint=adjoint,
        coeff_granularity=coeff_granularity,
        nonlinearity=nonlinearity,
        norm=norm,
        bn_momentum=bn_momentum,
        dtype=dtype,
        evolution=evolution if isinstance(evolution, str) else None,
        time_kernel=time_kernel if isinstance(time_kernel, str) else None,
        rda_parameterization=rda_parameterization,
    )


# ----------------------------------------------------------------------------- the models' variables


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


def evolution_param_specs(cfg: ODEConfig, kernel_shape: tuple[int, ...]) -> dict[str, _Spec]:
    """Names, initializers and shapes of the learnable params of the evolution of a kernel of ``kernel_shape``, in declaration order.

    Every one starts at or near "no evolution":

    * ``rda`` / ``rda_equation``: ``rda_d`` = 1e-3 (``d = |rda_d|``; ``rda_d_raw`` =
      softplus^-1(1e-3) with ``rda_parameterization="softplus"``), ``rda_v`` = 0 (shape
      ``S + (2,)``), ``rda_rho`` = 0; ``S = ()`` per kernel or ``(cout,)`` per filter.
    * ``linear``: ``evo_generator`` = 0, ``(K, K)`` or ``(cout, K, K)``, ``K = kh * kw``
      (``G = 0`` is no evolution; its gradient at 0 is not 0: expm's derivative there is the identity).
    * ``mlp``: ``evo_w1`` ``(K, MLP_HIDDEN)`` LeCun normal, ``evo_b1`` = 0, ``evo_w2``
      ``(MLP_HIDDEN, K)`` = 0, ``evo_b2`` = 0 (the last layer is zero, so ``q = 0`` at init;
      ``evo_w1`` gets its first gradient after ``evo_w2`` has moved).
    """
    init = jax.nn.initializers
    per_filter = () if cfg.coeff_granularity == "kernel" else (kernel_shape[-1],)
    k = kernel_shape[0] * kernel_shape[1]
    if cfg.evolution in ("rda", "rda_equation"):
        if cfg.rda_parameterization == "abs":
            d = {"rda_d": (init.constant(D_INIT), per_filter)}
        else:
            d = {"rda_d_raw": (init.constant(D_RAW_INIT), per_filter)}
        return {**d, "rda_v": (init.zeros, per_filter + (2,)), "rda_rho": (init.zeros, per_filter)}
    if cfg.evolution == "linear":
        return {"evo_generator": (init.zeros, per_filter + (k, k))}
    return {  # mlp
        "evo_w1": (init.variance_scaling(1.0, "fan_in", "normal"), (k, MLP_HIDDEN)),
        "evo_b1": (init.zeros, (MLP_HIDDEN,)),
        "evo_w2": (init.zeros, (MLP_HIDDEN, k)),
        "evo_b2": (init.zeros, (k,)),
    }


def conv_param_specs(cfg: ODEConfig, kernel_shape: tuple[int, ...], use_bias: bool) -> dict[str, _Spec]:
    """One ODE-block conv's params in declaration order: ``kernel`` (HWIO, He normal), ``bias`` (zeros), its evolution's (when evolving)."""
    specs = {"kernel": (he_normal, tuple(kernel_shape))}
    if use_bias:
        specs["bias"] = (jax.nn.initializers.zeros, (kernel_shape[-1],))
    if cfg.evolve:
        specs.update(evolution_param_specs(cfg, kernel_shape))
    return specs


def conv_evolution(params, cfg: ODEConfig):
    """The evolution of one conv kernel from its params (:func:`evolution_param_specs`' names).

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


def time_kernel_param_specs(cfg: ODEConfig) -> dict[str, _Spec]:
    """The time kernel's params of one ODE block (one kernel per block, shared by its convs); empty for the Dirac delta.

    ``exponential``: ``time_log_rate`` (scalar), ``rate = exp(time_log_rate)`` initialized at
    :data:`EXP_RATE_INIT`. Log scale because the rate's own gradient is small: at init the
    weight trajectory is mostly a rescaling of ``w0`` (B.4's tanh), which the BatchNorm after
    each conv undoes, so averaging it over time barely changes the loss
    (``benchmarks/evolution_updates.py`` measured a first-step relative change of the rate of
    4.9e-6 under softplus and 1.2e-4 on the log scale, whose gradient is ``rate`` times the
    rate's: 25x at rate 5). ``discrete``: ``time_values`` ``(steps_w + 1,)``, one weight per
    lag, initialized ``(1, 0, ..., 0)`` (the Dirac delta, so the model starts as
    configuration 1 / 2 and learns how far back to look).
    """
    if not cfg.evolve:
        return {}
    if cfg.time_kernel == "exponential":
        return {"time_log_rate": (jax.nn.initializers.constant(math.log(EXP_RATE_INIT)), ())}
    if cfg.time_kernel == "discrete":
        return {"time_values": (lambda key, shape, dtype: jnp.zeros(shape, dtype).at[0].set(1), (cfg.steps_w + 1,))}
    return {}


def time_kernel_from_params(params, cfg: ODEConfig):
    """K of an ODE block from its params (:func:`time_kernel_param_specs`' names); None (the Dirac delta) without evolution or for ``"dirac"``."""
    if not cfg.evolve:
        return None
    if cfg.time_kernel == "exponential":
        return ExponentialKernel.from_log_rate(params["time_log_rate"])
    if cfg.time_kernel == "discrete":
        return DiscreteKernel(params["time_values"])
    return None


def norm_param_specs(cfg: ODEConfig, features: int) -> dict[str, _Spec]:
    """One BatchNorm's params: ``scale`` (ones) and ``bias`` (zeros), shape ``(steps_z, C)`` per step or ``(C,)`` shared."""
    shape = (features,) if cfg.norm == "shared" else (cfg.steps_z, features)
    return {"scale": (jax.nn.initializers.ones, shape), "bias": (jax.nn.initializers.zeros, shape)}


def norm_stats_init(cfg: ODEConfig, features: int) -> dict[str, Array]:
    """One BatchNorm's running statistics at init: ``mean`` 0 and ``var`` 1, the shapes of :func:`norm_param_specs`."""
    shape = (features,) if cfg.norm == "shared" else (cfg.steps_z, features)
    return {"mean": jnp.zeros(shape, cfg.jnp_dtype), "var": jnp.ones(shape, cfg.jnp_dtype)}


def step_norm_args(params, stats, *, steps: int, shared: bool, train: bool) -> dict:
    """One BatchNorm's ``step_args``: ``{"scale", "bias"[, "mean", "var"]}`` with leading axis ``steps``.

    The running statistics go in only in eval mode (train mode normalizes with the batch's),
    under ``stop_gradient``. A shared BatchNorm is broadcast to every step: broadcasting sums
    the per-step gradients back to the one shared set.
    """
    p = {"scale": params["scale"], "bias": params["bias"]}
    if not train:
        p["mean"] = jax.lax.stop_gradient(stats["mean"])
        p["var"] = jax.lax.stop_gradient(stats["var"])
    if shared:
        p = {name: jnp.broadcast_to(a, (steps,) + a.shape) for name, a in p.items()}
    return p


def update_running_stats(stats, moments, *, momentum: float, shared: bool, steps: int) -> dict:
    """One BatchNorm's running statistics moved towards the per-step batch moments ``(steps, C)``.

    Per step (``shared=False``): step ``n``'s statistics move towards step ``n``'s batch
    moments. Shared: one update per step, in step order, exactly like calling one
    PyTorch/Flax BN module ``steps`` times, so the statistics end up a mixture of all
    steps', weighted towards the last (eval-mode outputs then differ from train-mode ones;
    DESIGN.md says why per-step is the default). Rule (Flax's): ``ra = momentum * ra +
    (1 - momentum) * batch_stat`` with the *biased* batch variance (PyTorch would store the
    unbiased one). With ``rk2``/``rk4`` every stage normalizes with its own batch
    statistics but the running statistics record each step's first stage.
    """
    m = momentum
    batch_mean, batch_var = jax.lax.stop_gradient(moments["mean"]), jax.lax.stop_gradient(moments["var"])
    mean, var = stats["mean"], stats["var"]
    if shared:
        for n in range(steps):
            mean = m * mean + (1.0 - m) * batch_mean[n]
            var = m * var + (1.0 - m) * batch_var[n]
    else:
        mean = m * mean + (1.0 - m) * batch_mean
        var = m * var + (1.0 - m) * batch_var
    return {"mean": mean, "var": var}


def ode_block(
    cfg: ODEConfig, z: Float[Array, "n h w c"], params: dict, stats: dict, *, train: bool, num_convs: int, update_stats: bool
) -> tuple[Float[Array, "n h w c"], Optional[dict]]:
    """The models' ODE block as a pure function of its variables: ``z(1)`` of ``dz/dt = f(z, theta(t))`` (Eq. 2.3).

    ``f`` is :func:`ode_function` with ``num_convs`` convs. ``cfg``'s method picks the solve:
    :func:`anodev2_jax.coupled_block` (kernels evolved by :func:`conv_evolution` and weighted
    by :func:`time_kernel_from_params` when ``cfg.evolve``, static otherwise; DTO gradients,
    hand-written Eq. 2.5 adjoint with ``adjoint="discrete"``) or
    :func:`anodev2_jax.odeint_diffrax` with the continuous adjoint (``adjoint="backsolve"``).

    Args:
      cfg: the block's knobs.
      z: block input, NHWC (its dtype is the compute dtype; see :func:`ode_function`).
      params: the block's params (module docstring): ``conv1``... with ``kernel`` HWIO
        ``(k, k, C, C)``, optional ``bias`` and evolution params; ``bn1``... with ``scale``,
        ``bias``; the time kernel's.
      stats: ``{"bn1": {"mean", "var"}, ...}``, the running statistics.
      train: normalize with batch statistics; False uses ``stats``.
      num_convs: 2 (ResNet) or 1 (AlexNet).
      update_stats: return the updated running statistics (train mode only).

    Returns:
      ``(z1, new_stats)``: ``z(1)`` (``z``'s shape and dtype) and, with ``update_stats``,
      the running statistics after this batch (:func:`update_running_stats`), else None.

    The Neural ODE in train mode solves once with ``odeint_diffrax`` (whose gradient is the
    continuous adjoint) and, when the running statistics are to be updated, once more with
    ``odeint_fixed(..., has_aux=True)`` under ``stop_gradient`` to read each step's batch
    moments (diffrax cannot return them): one extra forward solve per block, no backward.

    Example: ``z1, stats = ode_block(cfg, z, params, stats, train=True, num_convs=2, update_stats=True)``.
    """
    shared = cfg.norm == "shared"
    theta, coeffs, args = {}, {}, {}
    for conv_name, bn_name in layer_names(num_convs):
        p = params[conv_name]
        theta[conv_name] = {name: p[name] for name in ("kernel", "bias") if name in p}
        coeffs[conv_name] = {"kernel": conv_evolution(p, cfg), **({"bias": None} if "bias" in p else {})} if cfg.evolve else None
        args[bn_name] = step_norm_args(params[bn_name], stats[bn_name], steps=cfg.steps_z, shared=shared, train=train)
    f = functools.partial(ode_function, num_convs=num_convs, train=train)

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
            functools.partial(f, with_aux=train), z, theta, coeffs if cfg.evolve else None,
            steps_z=cfg.steps_z,
            steps_w=cfg.steps_w if cfg.evolve else None,
            schedule=cfg.schedule if cfg.evolve else "aligned",
            nonlinearity=cfg.sigma,
            remat=block_remat(cfg, z.shape, z.dtype, num_convs),
            adjoint=cfg.adjoint,
            solver=cfg.solver,
            step_args=args,
            has_aux=train,
            time_kernel=time_kernel_from_params(params, cfg),
        )
        z1, aux = out if train else (out, None)
    if not update_stats:
        return z1, None
    new_stats = {
        bn: update_running_stats(stats[bn], aux[bn], momentum=cfg.bn_momentum, shared=shared, steps=cfg.steps_z)
        for _, bn in layer_names(num_convs)
    }
    return z1, new_stats


# ----------------------------------------------------------------------------- a user's vector field


def field_config(
    *, evolution, time_kernel, steps_z, steps_w, schedule, solver, remat, adjoint, norm, nonlinearity, coeff_granularity,
    rda_parameterization, dtype,
) -> ODEConfig:
    """:func:`block_config` for a block around a user's vector field (``CoupledBlock``): explicit remat, no backsolve.

    ``remat="auto"`` is refused (it needs the field's activations per evaluation, which only
    the models' own field knows) and so is ``adjoint="backsolve"`` (the field's state cannot
    be read out of diffrax's solve).
    """
    if remat == "auto":
        raise ValueError(
            "CoupledBlock: remat='auto' needs the number of activations the field keeps, which only ODEBlock's own "
            "field knows; use remat='none', 'block', 'step' or 'binomial'"
        )
    if adjoint == "backsolve":
        raise ValueError("CoupledBlock: adjoint='backsolve' is not supported around a user's field; use 'autodiff' or 'discrete'")
    return block_config(
        evolution=evolution, time_kernel=time_kernel, steps_z=steps_z, steps_w=steps_w, schedule=schedule, solver=solver,
        remat=remat, remat_budget_mb=DEFAULT_REMAT_BUDGET_MB, adjoint=adjoint, norm=norm, bn_momentum=0.9,
        nonlinearity=nonlinearity, coeff_granularity=coeff_granularity, rda_parameterization=rda_parameterization,
        dtype=dtype,
    )


def default_evolve(path: tuple, leaf) -> bool:
    """The default ``evolve`` predicate: every rank-4 floating parameter (a 2-D convolution kernel) evolves."""
    del path
    return len(leaf.shape) == 4 and jnp.issubdtype(leaf.dtype, jnp.floating)


def per_step_mask(param_paths: Sequence[tuple], state_paths: Sequence[tuple]) -> tuple[bool, ...]:
    """For each parameter path, whether it belongs to a stateful layer: its module path (all but the last key) holds state.

    Paths are tuples of keys, the same kind for parameters and state (e.g.
    ``("bn1", "scale")`` and ``("bn1", "mean")``: ``bn1`` is a stateful layer).
    """
    layers = {tuple(p[:-1]) for p in state_paths}
    return tuple(tuple(p[:-1]) in layers for p in param_paths)


def stack_per_step(x, steps: int):
    """``steps`` copies of ``x`` on a new leading axis (one per activation step)."""
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (steps,) + x.shape)


def _is_evolution_instance(x) -> bool:
    return isinstance(x, RDACoeffs) or is_operator(x)


def init_evolution(evolution, key, kernel, cfg: ODEConfig, *, name: str):
    """The learnable pytree of one evolved kernel's evolution (``kernel``: HWIO array or ``ShapeDtypeStruct``).

    ``evolution``: a name of ``EVOLUTIONS`` (the params dict of :func:`evolution_param_specs`,
    initialized with ``key``), an operator / ``RDACoeffs`` (returned as is: the initial value),
    or a factory ``evolution(key, kernel) -> operator``. Validated against the kernel from
    shapes (one-line errors naming ``name``).
    """
    if isinstance(evolution, str):
        specs = evolution_param_specs(cfg, kernel.shape)
        keys = jax.random.split(key, len(specs))
        return {n: init(k, shape, kernel.dtype) for (n, (init, shape)), k in zip(specs.items(), keys)}
    if _is_evolution_instance(evolution):
        op = evolution
    elif callable(evolution):
        op = evolution(key, kernel)
    else:
        raise TypeError(
            f"evolution={evolution!r} is not an evolution: use None, one of 'rda', 'rda_equation', 'linear', 'mlp', "
            "an operator (e.g. RDACoeffs(d, v, rho), RDAEquation(...)) or a factory evolution(key, kernel) -> operator"
        )
    if isinstance(op, RDACoeffs):
        check_coeffs(op, kernel.shape, name=name)
    elif is_operator(op):
        check_operator(op, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype), 1.0 / cfg.steps_w, name=name)
    else:
        raise TypeError(f"{name}: the evolution factory returned {op!r}, not an operator (an object with step(w, dt)) or RDACoeffs")
    return op


def evolution_operator(learned, cfg: ODEConfig, *, named: bool):
    """The operator of one evolved kernel from its learnable pytree (:func:`init_evolution`'s): via :func:`conv_evolution` when ``named``, else the pytree itself."""
    return conv_evolution(learned, cfg) if named else learned


def init_time_kernel(time_kernel, key, cfg: ODEConfig):
    """The learnable pytree of a block's time kernel: the params dict of a named kernel (``{}`` for the Dirac delta) or the kernel itself."""
    if time_kernel is None or isinstance(time_kernel, str):
        return {n: init(key, shape, cfg.jnp_dtype) for n, (init, shape) in time_kernel_param_specs(cfg).items()}
    if not is_time_kernel(time_kernel):
        raise TypeError(
            f"time_kernel={time_kernel!r} is not a time kernel: use None, 'dirac', 'exponential', 'discrete' or a "
            "pytree with weights(t, tau) (DiracKernel(), ExponentialKernel(rate), DiscreteKernel(values))"
        )
    return time_kernel


def time_kernel_operator(learned, cfg: ODEConfig, *, named: bool):
    """K from the learnable pytree of :func:`init_time_kernel`: via :func:`time_kernel_from_params` when ``named`` (None: the Dirac delta), else the pytree itself."""
    return time_kernel_from_params(learned, cfg) if named else learned


def field_block(
    apply: Callable,
    z,
    params: Sequence,
    per_step: Sequence[bool],
    state: Sequence,
    evolution: Sequence,
    cfg: ODEConfig,
    *,
    time_kernel=None,
):
    """A user's vector field solved as an ANODEV2 block: ``z(1)`` and the field's new state.

    Args:
      apply: ``apply(z, params, state) -> (dz, new_state)``: the field evaluated with all
        its parameters (a list, in ``params``' order; per-step ones sliced to this step) and
        this step's state (a list of arrays); the shell's merge of its module system.
      z: block input (any shape the field takes, e.g. NHWC).
      params: the field's parameters, a list of arrays; evolved kernels as HWIO (spatial
        axes first, the evolution's layout).
      per_step: for each parameter, whether it has a leading axis ``steps_z`` (a stateful
        layer's, with ``norm="per_step"``; :func:`per_step_mask`).
      state: the field's state, a list of arrays, with a leading axis ``steps_z`` for
        ``norm="per_step"``, as the layers hold it for ``"shared"``.
      evolution: for each parameter, None (static) or its operator (``RDACoeffs`` or an
        evolution operator); per-step parameters must be None.
      cfg: the block's knobs (steps, schedule, solver, remat, adjoint, norm, sigma).
      time_kernel: None or a time kernel for the evolved parameters.

    Returns:
      ``(z1, new_state)``: ``z(1)`` and the list of state arrays to store (per step: each
      step's own update; shared: the last step's), each in its old dtype.
    """
    sg = jax.lax.stop_gradient
    state = [sg(s) for s in state]  # statistics are not differentiated
    if cfg.norm == "shared":
        state = [stack_per_step(s, cfg.steps_z) for s in state]
    theta = [p for p, stepped in zip(params, per_step) if not stepped]
    stepped = [p for p, s in zip(params, per_step) if s]
    evo = [e for e, s in zip(evolution, per_step) if not s]
    per_step = tuple(per_step)

    def f(z, theta, args):
        it_theta, it_step = iter(theta), iter(args["params"])
        merged = [next(it_step) if s else next(it_theta) for s in per_step]
        dz, new_state = apply(z, merged, list(args["state"]))
        return dz, list(new_state)

    z1, new_state = coupled_block(
        f, z, theta, evo if cfg.evolve else None,
        steps_z=cfg.steps_z,
        steps_w=cfg.steps_w if cfg.evolve else None,
        schedule=cfg.schedule if cfg.evolve else "aligned",
        nonlinearity=cfg.sigma,
        remat=cfg.remat,
        adjoint=cfg.adjoint,
        solver=cfg.solver,
        step_args={"params": stepped, "state": state},
        has_aux=True,
        time_kernel=time_kernel,
    )
    if cfg.norm == "shared":
        new_state = [s[-1] for s in new_state]
    # the layers' own dtypes (a Flax BatchNorm keeps float32 statistics of float64 activations)
    return z1, [new.astype(old.dtype) for new, old in zip(new_state, state)]
