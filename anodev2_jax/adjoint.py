"""Hand-written discrete adjoint of the coupled block (Eq. 2.5, discretized exactly as the forward).

Forward (see :mod:`anodev2_jax.coupled` and :mod:`anodev2_jax.trajectory`), forward Euler with ``h = 1/N``, ``N = steps_z``:

    W_{m+1} = Phi(W_m; p),                 m < M     (Eq. 2.3c; B.4: Phi = sigma . A, A = IFFT2 . diag(exp(dt lam)) . FFT2)
    theta_n = sum_m kappa[n, m] W_m                  (Eq. 2.3d; no kernel: theta_n = W_{idx_n}) / w (static)
    z_{n+1} = z_n + h f(z_n, theta_n)

Backward, with the cotangent convention ``a_bar = dJ/da`` (the paper's multipliers are the
negatives: ``alpha = -z_bar``):

* alpha recursion (Eq. 2.5a, discrete): ``alpha_N = dJ/dz_N``;
  ``alpha_n = alpha_{n+1} + (h df/dz(z_n, theta_n))^T alpha_{n+1}``.
* gamma (Eq. 2.5b): ``gamma_n = (h df/dtheta(z_n, theta_n))^T alpha_{n+1}``, the gradient
  with respect to the weights that step ``n`` used. This and the alpha update are one
  ``jax.vjp`` of ``f`` per step.
* Gamma (the source of Eq. 2.5c, discrete): ``Gamma_m = sum_n kappa[n, m] gamma_n``; without
  a kernel (``K = delta``) ``Gamma_m = sum_{n: idx_n = m} gamma_n``.
* beta recursion (Eq. 2.5c): ``beta_M = Gamma_M``;  ``beta_m = Gamma_m + (dPhi/dW(W_m))^T beta_{m+1}``.
  For ``RDACoeffs`` written out: ``(dPhi/dW)^T b = A^T (sigma'(u_m) * b)``, ``u_m = A W_m``,
  ``A^T = IFFT2 . diag(conj(exp(dt lam))) . FFT2`` (the conjugate Fourier multiplier). For
  any other operator: one ``jax.vjp`` of its ``step`` per weight step (a local derivative,
  like ``f``'s), :func:`operator_adjoint`.
* Eq. 2.5d: ``dJ/dw_0 = beta_0``.
* Eq. 2.5e: ``dJ/dp = sum_m (dPhi/dp(W_m))^T beta_{m+1}``. For ``RDACoeffs``:
  ``<sigma'(u_m) * beta_{m+1}, d(A W_m)/dp>`` with ``d(A W)/dp = IFFT2(dt * dlam/dp * exp(dt lam) * FFT2(W))``
  and ``dlam/dd = -|k|^2``, ``dlam/dv_j = i k_j``, ``dlam/drho = 1``, evaluated bin by bin with
  Parseval's identity; for operators the same ``jax.vjp`` (its cotangent for the operator pytree).
* The kernel's parameters: ``sum_{n, m} <gamma_n, W_m> dkappa[n, m]/dparams``, one ``jax.vjp``
  of ``kernel.weights`` with the cotangent ``C[n, m] = sum_leaves <gamma_n, W_m>``.

``sigma'`` is written out for ``tanh`` (``1 - W_{m+1}^2``), ``jax.nn.sigmoid``,
``jax.nn.relu`` and the identity (``nonlinearity=None``); any other elementwise
``sigma`` is differentiated by one forward-mode product with a ones tangent.

Memory: the forward keeps ``z_0 .. z_{N-1}`` (one activation per step, ANODE's checkpoints)
and the small weight trajectories; each step's internals are recomputed by its ``jax.vjp``,
as are ``u_m`` and the kernel weights.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import ode
from anodev2_jax.rda import RDACoeffs, align, apply_multiplier, compute_dtype, rda_multiplier, wavenumbers
from anodev2_jax.trajectory import (
    BlockSpec,
    is_evolution_leaf,
    kernel_grid,
    make_spec,
    mix_trajectories,
    split_tree,
    time_weights,
    weight_trajectories,
    weights_at_step,
)

__all__ = [
    "ORDERS",
    "AdjointGradients",
    "discrete_adjoint",
    "coupled_block_discrete",
    "rda_adjoint",
    "operator_adjoint",
    "as_arrays",
]

PyTree = Any


def _sigma_prime(nonlinearity, u, w_next):
    """Elementwise derivative of the RDA nonlinearity at ``u`` (``w_next = sigma(u)``)."""
    if nonlinearity is None:
        return jnp.ones_like(u)
    if nonlinearity is jnp.tanh or nonlinearity is jax.numpy.tanh:
        return 1 - w_next * w_next
    if nonlinearity is jax.nn.sigmoid:
        return w_next * (1 - w_next)
    if nonlinearity is jax.nn.relu:
        return (u > 0).astype(u.dtype)
    return jax.jvp(nonlinearity, (u,), (jnp.ones_like(u),))[1]


def _sum_to_shape(x, shape):
    """Sum ``x`` (channel-shaped) down to a broadcast-compatible ``shape`` (reverse broadcasting)."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


def rda_adjoint(traj, coeffs: RDACoeffs, gammas, *, dt, nonlinearity):
    """Backward beta recursion of Eq. 2.5c-e for one evolved kernel.

    Args:
      traj: forward trajectory ``[W_0, ..., W_M]`` of the kernel.
      coeffs: its ``RDACoeffs``.
      gammas: list of length ``M + 1``; ``gammas[m]`` is the total gradient with respect
        to ``W_m`` from the activation steps that used it (``None`` if unused).
      dt: RDA step length; nonlinearity: ``sigma``.

    Returns:
      ``(w0_bar, coeffs_bar)``: Eq. 2.5d and Eq. 2.5e.
    """
    kernel_dtype = traj[0].dtype
    dtype = compute_dtype(kernel_dtype)  # float32 for half-precision kernels (as the forward), else a no-op
    traj = [w.astype(dtype) for w in traj]
    gammas = [None if g is None else g.astype(dtype) for g in gammas]
    w0 = traj[0]
    shape = w0.shape
    m_count = len(traj) - 1
    mult = rda_multiplier(shape[:2], coeffs, dt, dtype)
    mult_b = align(mult, w0.ndim)
    kh, kw = shape[:2]
    k0, k0_adv = wavenumbers(kh, dtype)
    k1, k1_adv = wavenumbers(kw, dtype)
    pad = (1,) * (w0.ndim - 2)
    ksq = (k0[:, None] ** 2 + k1[None, :] ** 2).reshape((kh, kw) + pad)
    k0_adv = k0_adv.reshape((kh, 1) + pad)
    k1_adv = k1_adv.reshape((1, kw) + pad)

    zero = jnp.zeros(shape, dtype)
    beta = zero if gammas[m_count] is None else gammas[m_count]
    g_re = jnp.zeros(shape, dtype)  # sum over m of Re(per-bin weight), for d and rho
    g_v0 = jnp.zeros(shape, dtype)
    g_v1 = jnp.zeros(shape, dtype)
    for m in range(m_count - 1, -1, -1):
        u = apply_multiplier(traj[m], mult)
        s = _sigma_prime(nonlinearity, u, traj[m + 1]) * beta  # cotangent of u_m
        s_hat = jnp.fft.fft2(s, axes=(0, 1))
        a_t_s = jnp.real(jnp.fft.ifft2(jnp.conj(mult_b) * s_hat, axes=(0, 1))).astype(dtype)
        beta = a_t_s if gammas[m] is None else gammas[m] + a_t_s
        # Parseval: <s, IFFT(X)> = sum_k conj(S(k)) X(k) / K, X = dt * dlam/dp * mult * FFT(W_m)
        per_bin = jnp.conj(s_hat) * mult_b * jnp.fft.fft2(traj[m], axes=(0, 1)) * (dt / (kh * kw))
        g_re = g_re + jnp.real(per_bin).astype(dtype)
        im = jnp.imag(per_bin).astype(dtype)
        g_v0 = g_v0 - im * k0_adv  # Re(per_bin * i k) = -Im(per_bin) k
        g_v1 = g_v1 - im * k1_adv

    c_shape = jnp.shape(coeffs.d)
    reduce = lambda x: _sum_to_shape(x.sum(axis=(0, 1)), c_shape)
    d_bar = reduce(-g_re * ksq)
    rho_bar = reduce(g_re)
    v_bar = jnp.stack([reduce(g_v0), reduce(g_v1)], axis=-1)
    coeffs_bar = RDACoeffs(
        d_bar.astype(jnp.result_type(coeffs.d)),
        v_bar.astype(jnp.result_type(coeffs.v)),
        rho_bar.astype(jnp.result_type(coeffs.rho)),
    )
    return beta.astype(kernel_dtype), coeffs_bar


def operator_adjoint(traj, op, gammas, *, dt):
    """Backward beta recursion of Eq. 2.5c-e for a kernel evolved by an operator's ``step``.

    One ``jax.vjp`` of ``(op, W) -> op.step(W, dt)`` per weight step (recomputing the step
    forward from the saved ``W_m``): its ``W`` cotangent is ``(dPhi/dW)^T beta_{m+1}``, its
    operator cotangent the Eq. 2.5e term, summed over ``m``.

    Args:
      traj: forward trajectory ``[W_0, ..., W_M]`` of the kernel.
      op: its evolution operator (a pytree).
      gammas: list of length ``M + 1``, ``gammas[m]`` = ``Gamma_m`` (``None`` if zero).
      dt: weight step length.

    Returns:
      ``(w0_bar, op_bar)``: Eq. 2.5d and Eq. 2.5e (``op_bar`` has ``op``'s structure).
    """
    m_count = len(traj) - 1
    beta = jnp.zeros_like(traj[0]) if gammas[m_count] is None else gammas[m_count]
    op_bar = jax.tree_util.tree_map(jnp.zeros_like, op)
    for m in range(m_count - 1, -1, -1):
        _, vjp = jax.vjp(lambda o, w: o.step(w, dt), op, traj[m])
        o_bar, w_bar = vjp(beta)
        beta = w_bar if gammas[m] is None else gammas[m] + w_bar
        op_bar = jax.tree_util.tree_map(jnp.add, op_bar, o_bar)
    return beta, op_bar


def _leaf_as_array(x):
    return jnp.asarray(x) if isinstance(x, (float, np.floating, np.ndarray)) else x


def as_arrays(evolution):
    """Turn Python-number coefficients / operator parameters into arrays so cotangents have a dtype to match."""
    if evolution is None:
        return None

    def convert(c):
        if c is None:
            return None
        if isinstance(c, RDACoeffs):
            return RDACoeffs(*(jnp.asarray(x) for x in c))
        return jax.tree_util.tree_map(_leaf_as_array, c)

    return jax.tree_util.tree_map(convert, evolution, is_leaf=is_evolution_leaf)


def _kappa(kernel, spec: BlockSpec):
    return None if kernel is None else time_weights(kernel, spec)


def _fwd_impl(f, spec: BlockSpec, z0, theta0, evolution, kernel, step_args):
    """Forward Euler solve keeping the per-step checkpoints ``z_0..z_{N-1}`` and trajectories."""
    flat_theta, flat_evo, treedef = split_tree(theta0, evolution, dt=1.0 / spec.steps_w)
    trajs = weight_trajectories(flat_theta, flat_evo, spec)
    kappa = _kappa(kernel, spec)
    mixed = None if kappa is None else mix_trajectories(trajs, kappa)
    h = 1.0 / spec.steps_z
    zs, auxs, z = [], [], z0
    for n in range(spec.steps_z):
        zs.append(z)
        theta_n = weights_at_step(flat_theta, trajs, treedef, spec, n, mixed)
        args_n = None if step_args is None else ode.tree_slice(step_args, n)
        dz, aux = ode.apply_f(f, z, theta_n, args_n, spec.has_aux)
        z = ode.axpy(h, dz, z)
        auxs.append(aux)
    out = (z, ode.stack_aux(auxs)) if spec.has_aux else z
    return out, (zs, trajs)


def _kernel_sources(kernel, spec: BlockSpec, trajs, step_gammas):
    """With a time kernel: ``Gamma_m = sum_n kappa[n, m] gamma_n`` per evolved leaf, and the kernel's gradient."""
    t, tau = kernel_grid(spec)
    kappa, kappa_vjp = jax.vjp(lambda k: k.weights(t, tau), kernel)
    gammas = []
    c = jnp.zeros(kappa.shape, kappa.dtype)  # C[n, m] = sum over leaves of <gamma_n, W_m>
    for traj, per_step in zip(trajs, step_gammas):
        if traj is None:
            gammas.append(None)
            continue
        g = jnp.stack(per_step)  # (N, ...)
        w = jnp.stack(traj)  # (M + 1, ...)
        sources = jnp.tensordot(kappa.T.astype(g.dtype), g, axes=1)  # (M + 1, ...)
        gammas.append([sources[m] for m in range(len(traj))])
        c = c + jnp.tensordot(g, w, axes=(tuple(range(1, g.ndim)), tuple(range(1, w.ndim)))).astype(kappa.dtype)
    (kernel_bar,) = kappa_vjp(c)
    return gammas, kernel_bar


def _bwd_impl(f, spec: BlockSpec, theta0, evolution, kernel, step_args, zs, trajs, z1_bar):
    flat_theta, flat_evo, treedef = split_tree(theta0, evolution, dt=1.0 / spec.steps_w)
    kappa = _kappa(kernel, spec)
    mixed = None if kappa is None else mix_trajectories(trajs, kappa)
    h = 1.0 / spec.steps_z
    gammas = [None if t is None else [None] * len(t) for t in trajs]  # Gamma_m (no kernel)
    step_gammas = [None if t is None else [None] * spec.steps_z for t in trajs]  # gamma_n (kernel)
    static_bar = [None] * len(flat_theta)
    args_bar = [None] * spec.steps_z
    alpha = z1_bar
    for n in range(spec.steps_z - 1, -1, -1):
        theta_n = weights_at_step(flat_theta, trajs, treedef, spec, n, mixed)
        args_n = None if step_args is None else ode.tree_slice(step_args, n)

        def f_n(z, theta, args):
            return ode.apply_f(f, z, theta, args, spec.has_aux)[0]

        _, vjp = jax.vjp(f_n, zs[n], theta_n, args_n)
        z_bar, theta_bar, a_bar = vjp(jax.tree_util.tree_map(lambda a: (h * a).astype(a.dtype), alpha))
        alpha = alpha + z_bar  # Eq. 2.5a, one Euler step backwards
        args_bar[n] = a_bar
        m = spec.indices[n]
        for i, g in enumerate(treedef.flatten_up_to(theta_bar)):  # Eq. 2.5b
            if trajs[i] is None:
                static_bar[i] = g if static_bar[i] is None else static_bar[i] + g
            elif kappa is not None:
                step_gammas[i][n] = g
            else:
                gammas[i][m] = g if gammas[i][m] is None else gammas[i][m] + g

    kernel_bar = None
    if kernel is not None:
        gammas, kernel_bar = _kernel_sources(kernel, spec, trajs, step_gammas)

    dt = 1.0 / spec.steps_w
    leaves_bar, evo_bar = [], []
    for i, (w, c) in enumerate(zip(flat_theta, flat_evo)):
        if c is None:
            leaves_bar.append(jnp.zeros_like(w) if static_bar[i] is None else static_bar[i])
            evo_bar.append(None)
        else:
            if isinstance(c, RDACoeffs):
                w_bar, c_bar = rda_adjoint(trajs[i], c, gammas[i], dt=dt, nonlinearity=spec.nonlinearity)
            else:
                w_bar, c_bar = operator_adjoint(trajs[i], c, gammas[i], dt=dt)
            leaves_bar.append(w_bar)
            evo_bar.append(c_bar)
    theta0_bar = jax.tree_util.tree_unflatten(treedef, leaves_bar)
    if evolution is None:
        evo_bar_tree = None
    else:
        e_treedef = jax.tree_util.tree_structure(evolution, is_leaf=is_evolution_leaf)
        evo_bar_tree = jax.tree_util.tree_unflatten(e_treedef, evo_bar)
    step_args_bar = None if step_args is None else ode.stack_aux(args_bar)
    return alpha, theta0_bar, evo_bar_tree, kernel_bar, step_args_bar


class AdjointGradients(NamedTuple):
    """The gradients :func:`discrete_adjoint` returns, in the order of the block's inputs (Eq. 2.3, then ``step_args``).

    The order is ``coupled_block``'s: ``z0, theta0, evolution`` (its positional inputs),
    then ``time_kernel`` and ``step_args`` (its keyword inputs, in signature order), the
    same as ``jax.grad(loss, argnums=...)`` over a ``loss(z0, theta0, evolution,
    time_kernel, step_args)``. Always five fields (``None`` for an input not given), so the
    layout never depends on an argument's value.

    Attributes:
      z0: ``dJ/dz0 = alpha_0`` (Eq. 2.5a), ``z0``'s shape and dtype.
      theta0: ``dJ/dtheta0``, ``theta0``'s structure: ``beta_0`` (Eq. 2.5d) for evolved
        leaves, the sum of the per-step ``gamma_n`` (Eq. 2.5b) for static ones.
      evolution: ``dJ/dp`` (Eq. 2.5e), the evolution pytree's structure: per evolved leaf an
        ``RDACoeffs`` of gradients or the operator's own pytree of gradients; None without evolution.
      time_kernel: the kernel's gradient (a pytree like the kernel, e.g. an
        ``ExponentialKernel`` holding ``dJ/dlog_rate``), None without a kernel.
      step_args: ``dJ/dstep_args`` (leading axis ``steps_z``), None without ``step_args``.

    Examples:
      >>> g = AdjointGradients(z0=jnp.ones(2), theta0={}, evolution=None, time_kernel=None, step_args=None)
      >>> g._fields, g.z0.shape
      (('z0', 'theta0', 'evolution', 'time_kernel', 'step_args'), (2,))
    """

    z0: Any
    theta0: PyTree
    evolution: PyTree
    time_kernel: PyTree
    step_args: PyTree


ORDERS = ("inputs", "legacy")


def discrete_adjoint(
    f,
    z0,
    theta0: PyTree,
    evolution: PyTree,
    z1_bar,
    *,
    steps_z: int,
    steps_w: Optional[int] = None,
    schedule: str = "aligned",
    nonlinearity: Optional[Callable] = jnp.tanh,
    time_kernel: Optional[PyTree] = None,
    step_args: Optional[PyTree] = None,
    order: Optional[str] = None,
):
    """Value and gradients of the coupled block by the hand-written discrete adjoint (Eq. 2.5 with Eq. 2.3c-d).

    Same arguments and semantics as :func:`anodev2_jax.coupled_block` (forward Euler),
    plus ``z1_bar = dJ/dz(1)``, the cotangent of the block output: the alpha, gamma and
    beta recursions of Eq. 2.5 written out, one ``jax.vjp`` of ``f`` per activation step and
    of an operator's ``step`` per weight step, the RDA adjoint as the conjugate Fourier
    multiplier. Agrees with ``jax.vjp`` through ``coupled_block`` to float64 round-off.

    Args:
      f: ``f(z, theta) -> dz`` (``f(z, theta, args_n)`` with ``step_args``).
      z0: block input, any shape, floating point (e.g. ``(N, H, W, C)``).
      theta0: pytree of weights; evolved leaves are kernels ``(kh, kw[, cin, cout])``.
      evolution: None, or a pytree with ``theta0``'s structure whose leaves are None,
        ``RDACoeffs`` or evolution operators (``coupled_block``'s fourth argument).
      z1_bar: ``dJ/dz(1)``, shape and dtype of ``z0``.
      steps_z, steps_w, schedule, nonlinearity: as in ``coupled_block``.
      time_kernel: None (Dirac, selection) or a time kernel (Eq. 2.3d).
      step_args: optional per-step pytree (leading axis ``steps_z``), as in ``coupled_block``.
      order: the layout of the gradients. ``"inputs"``: an :class:`AdjointGradients`,
        ``(z0, theta0, evolution, time_kernel, step_args)``, the order of
        ``coupled_block``'s inputs; the default from the next release on. ``"legacy"``
        (today's default, with a FutureWarning when ``order`` is not given): the old tuple
        ``(z0, theta0, evolution, step_args)``, with the kernel's gradient appended as a
        fifth entry when ``time_kernel`` is not None. Pass ``order="inputs"`` now.

    Returns:
      ``(z1, grads)``: the block output ``z(1)`` (``z0``'s shape and dtype) and the
      gradients of ``J`` in the layout ``order`` selects (see :class:`AdjointGradients`).

    Examples:
      >>> f = lambda z, th: jnp.tanh(z @ th["w"][0, 0])  # a 1x1 kernel as a dense layer
      >>> theta0 = {"w": 0.5 * jnp.ones((3, 3, 4, 4))}
      >>> evolution = {"w": RDACoeffs(0.1, jnp.zeros(2), 0.0)}
      >>> z1, g = discrete_adjoint(f, jnp.ones((2, 4)), theta0, evolution, jnp.ones((2, 4)), steps_z=2, order="inputs")
      >>> z1.shape, g.theta0["w"].shape, g.evolution["w"].d.shape, g.time_kernel
      ((2, 4), (3, 3, 4, 4), (), None)
    """
    if order is None:
        warnings.warn(
            "discrete_adjoint: the gradients' order changes in the next release to coupled_block's input order "
            "(z0, theta0, evolution, time_kernel, step_args), always five entries; pass order='inputs' to get it "
            "now (an AdjointGradients named tuple), or order='legacy' to keep (z0, theta0, evolution, step_args"
            "[, time_kernel]) until then",
            FutureWarning,
            stacklevel=2,
        )
        order = "legacy"
    ode.check_choice("order", order, ORDERS)
    ode.check_state(z0)
    spec = make_spec(steps_z, steps_w, schedule, nonlinearity, "euler", False)
    evolution = as_arrays(evolution)
    time_kernel = None if time_kernel is None else jax.tree_util.tree_map(_leaf_as_array, time_kernel)
    z1, (zs, trajs) = _fwd_impl(f, spec, z0, theta0, evolution, time_kernel, step_args)
    z0_bar, theta0_bar, evo_bar, kernel_bar, args_bar = _bwd_impl(
        f, spec, theta0, evolution, time_kernel, step_args, zs, trajs, z1_bar
    )
    if order == "inputs":
        return z1, AdjointGradients(z0_bar, theta0_bar, evo_bar, kernel_bar, args_bar)
    grads = (z0_bar, theta0_bar, evo_bar, args_bar)
    return z1, grads if time_kernel is None else grads + (kernel_bar,)


def _primal(f, spec, z0, theta0, evolution, kernel, step_args):
    return _fwd_impl(f, spec, z0, theta0, evolution, kernel, step_args)[0]


def _primal_fwd(f, spec, z0, theta0, evolution, kernel, step_args):
    # Saved: the step checkpoints z_0..z_{N-1}, the weight trajectories and the inputs.
    # Recomputed in _bwd: each step's internals (inside its jax.vjp), u_m = A W_m (RDA) or
    # each weight step (inside its jax.vjp), and the kernel weights (inside their jax.vjp).
    out, (zs, trajs) = _fwd_impl(f, spec, z0, theta0, evolution, kernel, step_args)
    return out, (zs, trajs, theta0, evolution, kernel, step_args)


def _primal_bwd(f, spec, res, out_bar):
    zs, trajs, theta0, evolution, kernel, step_args = res
    z1_bar = out_bar[0] if spec.has_aux else out_bar  # aux is not differentiated
    return _bwd_impl(f, spec, theta0, evolution, kernel, step_args, zs, trajs, z1_bar)


# The time kernel is a differentiable input (its gradient is the fourth cotangent), not a nondiff argument.
_coupled_discrete = jax.custom_vjp(_primal, nondiff_argnums=(0, 1))
_coupled_discrete.defvjp(_primal_fwd, _primal_bwd)


def coupled_block_discrete(f, spec: BlockSpec, z0, theta0, evolution, kernel, step_args):
    """``coupled_block`` whose VJP is the hand-written Eq. 2.5 adjoint (used by ``adjoint="discrete"``)."""
    kernel = None if kernel is None else jax.tree_util.tree_map(_leaf_as_array, kernel)
    return _coupled_discrete(f, spec, z0, theta0, as_arrays(evolution), kernel, step_args)
