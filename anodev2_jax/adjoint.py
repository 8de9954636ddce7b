"""Hand-written discrete adjoint of the coupled block (Eq. 2.5, discretized exactly as the forward).

Forward (see :mod:`anodev2_jax.coupled` and :mod:`anodev2_jax.trajectory`), forward Euler with ``h = 1/N``, ``N = steps_z``:

    W_{m+1} = sigma(u_m),   u_m = A W_m,   A = IFFT2 . diag(exp(dt lam)) . FFT2,   m < M
    z_{n+1} = z_n + h f(z_n, theta_n),     theta_n = W_{idx_n} (evolved) / w (static)

Backward, with the cotangent convention ``a_bar = dJ/da`` (the paper's multipliers are the
negatives: ``alpha = -z_bar``):

* alpha recursion (Eq. 2.5a, discrete): ``alpha_N = dJ/dz_N``;
  ``alpha_n = alpha_{n+1} + (h df/dz(z_n, theta_n))^T alpha_{n+1}``.
* gamma (Eq. 2.5b): ``gamma_n = (h df/dtheta(z_n, theta_n))^T alpha_{n+1}``, the gradient
  with respect to the weights that step ``n`` used. This and the alpha update are the only
  autodiff in this module: one ``jax.vjp`` of ``f`` per step.
* beta recursion (Eq. 2.5c with ``K = delta``: ``gamma`` enters as a source at the
  trajectory index each step used, ``Gamma_m = sum_{n: idx_n = m} gamma_n``):
  ``beta_M = Gamma_M``;  ``beta_m = Gamma_m + A^T (sigma'(u_m) * beta_{m+1})``, where
  ``A^T = IFFT2 . diag(conj(exp(dt lam))) . FFT2`` (the conjugate Fourier multiplier).
* Eq. 2.5d: ``dJ/dw_0 = beta_0``.
* Eq. 2.5e: ``dJ/dp = sum_m <sigma'(u_m) * beta_{m+1}, d(A W_m)/dp>`` with
  ``d(A W)/dp = IFFT2(dt * dlam/dp * exp(dt lam) * FFT2(W))`` and ``dlam/dd = -|k|^2``,
  ``dlam/dv_j = i k_j``, ``dlam/drho = 1``; evaluated bin by bin with Parseval's identity.

``sigma'`` is written out for ``tanh`` (``1 - W_{m+1}^2``), ``jax.nn.sigmoid``,
``jax.nn.relu`` and the identity (``nonlinearity=None``); any other elementwise
``sigma`` is differentiated by one forward-mode product with a ones tangent.

Memory: the forward keeps ``z_0 .. z_{N-1}`` (one activation per step, ANODE's checkpoints)
and the small weight trajectories; each step's internals are recomputed by its ``jax.vjp``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from anodev2_jax import ode
from anodev2_jax.trajectory import BlockSpec, is_evolution_leaf, make_spec, split_tree, weight_trajectories, weights_at_step
from anodev2_jax.rda import RDACoeffs, align, apply_multiplier, rda_multiplier, wavenumbers

__all__ = ["discrete_adjoint", "coupled_block_discrete", "rda_adjoint"]

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
    w0 = traj[0]
    dtype, shape = w0.dtype, w0.shape
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
    return beta, coeffs_bar


def _as_arrays(coeffs):
    """Turn Python-number coefficients into arrays so cotangents have a dtype to match."""
    if coeffs is None:
        return None
    return jax.tree_util.tree_map(
        lambda c: None if c is None else RDACoeffs(*(jnp.asarray(x) for x in c)),
        coeffs,
        is_leaf=is_evolution_leaf,
    )


def _fwd_impl(f, spec: BlockSpec, z0, theta0, coeffs, step_args):
    """Forward Euler solve keeping the per-step checkpoints ``z_0..z_{N-1}`` and trajectories."""
    flat_theta, flat_coeffs, treedef = split_tree(theta0, coeffs)
    trajs = weight_trajectories(flat_theta, flat_coeffs, spec)
    h = 1.0 / spec.steps_z
    zs, auxs, z = [], [], z0
    for n in range(spec.steps_z):
        zs.append(z)
        theta_n = weights_at_step(flat_theta, trajs, treedef, spec, n)
        args_n = None if step_args is None else ode.tree_slice(step_args, n)
        dz, aux = ode.apply_f(f, z, theta_n, args_n, spec.has_aux)
        z = ode.axpy(h, dz, z)
        auxs.append(aux)
    out = (z, ode.stack_aux(auxs)) if spec.has_aux else z
    return out, (zs, trajs)


def _bwd_impl(f, spec: BlockSpec, theta0, coeffs, step_args, zs, trajs, z1_bar):
    flat_theta, flat_coeffs, treedef = split_tree(theta0, coeffs)
    h = 1.0 / spec.steps_z
    gammas = [None if t is None else [None] * len(t) for t in trajs]
    static_bar = [None] * len(flat_theta)
    args_bar = [None] * spec.steps_z
    alpha = z1_bar
    for n in range(spec.steps_z - 1, -1, -1):
        theta_n = weights_at_step(flat_theta, trajs, treedef, spec, n)
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
            else:
                gammas[i][m] = g if gammas[i][m] is None else gammas[i][m] + g

    leaves_bar, coeffs_bar = [], []
    for i, (w, c) in enumerate(zip(flat_theta, flat_coeffs)):
        if c is None:
            leaves_bar.append(jnp.zeros_like(w) if static_bar[i] is None else static_bar[i])
            coeffs_bar.append(None)
        else:
            w_bar, c_bar = rda_adjoint(trajs[i], c, gammas[i], dt=1.0 / spec.steps_w, nonlinearity=spec.nonlinearity)
            leaves_bar.append(w_bar)
            coeffs_bar.append(c_bar)
    theta0_bar = jax.tree_util.tree_unflatten(treedef, leaves_bar)
    if coeffs is None:
        coeffs_bar_tree = None
    else:
        c_treedef = jax.tree_util.tree_structure(coeffs, is_leaf=is_evolution_leaf)
        coeffs_bar_tree = jax.tree_util.tree_unflatten(c_treedef, coeffs_bar)
    step_args_bar = None if step_args is None else ode.stack_aux(args_bar)
    return alpha, theta0_bar, coeffs_bar_tree, step_args_bar


def discrete_adjoint(
    f,
    z0,
    theta0: PyTree,
    coeffs: PyTree,
    z1_bar,
    *,
    steps_z: int,
    steps_w: Optional[int] = None,
    schedule: str = "aligned",
    nonlinearity=jnp.tanh,
    step_args: Optional[PyTree] = None,
):
    """Value and gradients of the coupled block by the hand-written discrete adjoint (Eq. 2.5).

    Same arguments and semantics as :func:`anodev2_jax.coupled_block` (forward Euler),
    plus ``z1_bar = dJ/dz(1)``, the cotangent of the block output.

    Returns:
      ``(z1, (z0_bar, theta0_bar, coeffs_bar, step_args_bar))``: the block output and the
      gradients of ``J`` with respect to ``z0`` (alpha_0, Eq. 2.5a), ``theta0`` (beta_0,
      Eq. 2.5d, for evolved leaves; the sum of the per-step gammas for static ones),
      ``coeffs`` (Eq. 2.5e; an ``RDACoeffs`` of gradients per evolved leaf) and ``step_args``.
    """
    spec = make_spec(steps_z, steps_w, schedule, nonlinearity, "euler", False)
    coeffs = _as_arrays(coeffs)
    z1, (zs, trajs) = _fwd_impl(f, spec, z0, theta0, coeffs, step_args)
    return z1, _bwd_impl(f, spec, theta0, coeffs, step_args, zs, trajs, z1_bar)


def _primal(f, spec, z0, theta0, coeffs, step_args):
    return _fwd_impl(f, spec, z0, theta0, coeffs, step_args)[0]


def _primal_fwd(f, spec, z0, theta0, coeffs, step_args):
    # Saved: the step checkpoints z_0..z_{N-1}, the weight trajectories and the inputs.
    # Recomputed in _bwd: each step's internals (inside its jax.vjp) and u_m = A W_m.
    out, (zs, trajs) = _fwd_impl(f, spec, z0, theta0, coeffs, step_args)
    return out, (zs, trajs, theta0, coeffs, step_args)


def _primal_bwd(f, spec, res, out_bar):
    zs, trajs, theta0, coeffs, step_args = res
    z1_bar = out_bar[0] if spec.has_aux else out_bar  # aux is not differentiated
    return _bwd_impl(f, spec, theta0, coeffs, step_args, zs, trajs, z1_bar)


_coupled_discrete = jax.custom_vjp(_primal, nondiff_argnums=(0, 1))
_coupled_discrete.defvjp(_primal_fwd, _primal_bwd)


def coupled_block_discrete(f, spec: BlockSpec, z0, theta0, coeffs, step_args):
    """``coupled_block`` whose VJP is the hand-written Eq. 2.5 adjoint (used by ``adjoint="discrete"``)."""
    return _coupled_discrete(f, spec, z0, theta0, _as_arrays(coeffs), step_args)
