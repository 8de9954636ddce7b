"""coupled_odeint_diffrax: the coupled system (z, w[, theta]) in continuous time against coupled_block and exact solutions."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from anodev2_jax import (
    DiracKernel,
    DiscreteKernel,
    ExponentialKernel,
    LinearEvolution,
    ODEEvolution,
    RDACoeffs,
    coupled_block,
    coupled_odeint_diffrax,
)

from helpers import max_rel_err, tiny_f, tiny_problem

F64 = jnp.float64


def objective(z1):
    return jnp.sum(jnp.sin(z1)) + 0.5 * jnp.sum(z1**2)


def test_euler_on_the_matching_grid_is_coupled_block():
    # diffrax Euler on (z, w) with dt0 = 1/N is coupled_block with N aligned Euler steps for z,
    # the Euler-stepped operator for w and the Dirac kernel: values and DTO gradients agree
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(0), "ode_user_q")
    op = evolution["w1"]
    evolution = dict(evolution, w1=ODEEvolution(op.q, op.params, solver="euler"))
    n = 4

    def fixed(z0, theta, evolution):
        return objective(coupled_block(tiny_f, z0, theta, evolution, steps_z=n, steps_w=n, time_kernel=DiracKernel()))

    def continuous(z0, theta, evolution):
        return objective(coupled_odeint_diffrax(tiny_f, z0, theta, evolution, solver=diffrax.Euler(), dt0=1.0 / n))

    @jax.jit
    def run(args):
        return jax.value_and_grad(fixed, argnums=(0, 1, 2))(*args), jax.value_and_grad(continuous, argnums=(0, 1, 2))(*args)

    (v_fixed, g_fixed), (v_cont, g_cont) = run((z0, theta, evolution))
    np.testing.assert_allclose(v_cont, v_fixed, rtol=1e-13)
    assert max_rel_err(g_cont, g_fixed) < 1e-12


def linear_problem(exponential):
    """dz/dt = B z + C theta + b, dw/dt = G w (LinearEvolution), theta = w or dtheta/dt = r (w - theta)."""
    r = np.random.default_rng(0)
    b_mat, c_mat = -0.5 * np.eye(3) + 0.3 * r.standard_normal((3, 3)), 0.4 * r.standard_normal((3, 9))
    g, rate = 0.6 * r.standard_normal((9, 9)), 3.0
    z0, w0, bias = r.standard_normal(3), r.standard_normal((3, 3)), r.standard_normal(3)

    def f(z, th):
        return jnp.asarray(b_mat) @ z + jnp.asarray(c_mat) @ th["w"].reshape(-1) + th["b"]

    # the joint linear system on x = (z, w, theta, 1): x(1) = expm(A) x(0)
    a = np.zeros((22, 22))
    a[:3, :3], a[:3, 21] = b_mat, bias
    a[3:12, 3:12] = g
    if exponential:
        a[:3, 12:21] = c_mat
        a[12:21, 3:12], a[12:21, 12:21] = rate * np.eye(9), -rate * np.eye(9)
    else:
        a[:3, 3:12] = c_mat
    x0 = np.concatenate([z0, w0.reshape(-1), w0.reshape(-1), [1.0]])
    exact = (scipy.linalg.expm(a) @ x0)[:3]
    args = (jnp.asarray(z0), {"w": jnp.asarray(w0), "b": jnp.asarray(bias)}, {"w": LinearEvolution(jnp.asarray(g)), "b": None})
    kernel = ExponentialKernel(jnp.asarray(rate, F64)) if exponential else DiracKernel()
    return f, args, kernel, exact


@pytest.mark.parametrize("exponential", [False, True], ids=["dirac", "exponential"])
def test_adaptive_solve_converges_to_the_exact_joint_solution(exponential):
    f, (z0, theta, evolution), kernel, exact = linear_problem(exponential)

    @jax.jit  # the tolerance is traced: one compilation for all of them
    def solve(tol):
        return coupled_odeint_diffrax(f, z0, theta, evolution, solver=diffrax.Tsit5(), dt0=0.1,
                                      stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), time_kernel=kernel)

    errs = [float(np.max(np.abs(solve(tol) - exact)) / np.max(np.abs(exact))) for tol in (1e-4, 1e-6, 1e-8)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-7, errs


def test_backsolve_gradient_is_close_to_but_not_the_dto_gradient():
    # BacksolveAdjoint (the continuous adjoint, Eq. 2.5 then discretized) approximates the exact
    # DTO gradient of the discrete solve; the gap is the solver's error, so it shrinks with dt0
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(1), "ode_user_q")
    kernel = ExponentialKernel(jnp.asarray(2.0, F64))

    def loss(args, dt0, adjoint):
        z1 = coupled_odeint_diffrax(tiny_f, *args, solver=diffrax.Midpoint(), dt0=dt0, adjoint=adjoint, time_kernel=kernel)
        return objective(z1)

    @jax.jit  # dt0 is traced: one compilation for both grids
    def gap(args, dt0):
        dto = jax.grad(loss)(args, dt0, diffrax.RecursiveCheckpointAdjoint())
        backsolve = jax.grad(loss)(args, dt0, diffrax.BacksolveAdjoint())
        return dto, backsolve

    errs = [max_rel_err(*reversed(gap((z0, theta, evolution), dt0))) for dt0 in (0.125, 0.0625)]
    assert errs[1] < errs[0] / 3, errs  # Midpoint is 2nd order: the gap falls about 4x per halving
    assert 1e-12 < errs[1] < 1e-2, errs


class StepOnly(eqx.Module):
    def step(self, w, dt):
        return w


@pytest.mark.parametrize(
    "w1, kw, exc, match",
    [
        (RDACoeffs(0.1, (0.0, 0.0), 0.0), {}, ValueError, r"RDACoeffs leaf is Eq. B.4, a discrete map .* use RDAEquation"),
        (StepOnly(), {}, ValueError, r"StepOnly has no rhs\(w\)"),
        (None, dict(time_kernel=DiscreteKernel(jnp.ones(2))), ValueError, r"DiscreteKernel has no continuous form.*coupled_block"),
        (None, dict(solver="tsit5"), TypeError, r"solver='tsit5' must be a diffrax solver instance"),
        (None, dict(dt0=None), ValueError, r"dt0=None with a constant step size"),
    ],
)
def test_bad_input(w1, kw, exc, match):
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(2), "rda_equation")
    evolution = dict(evolution, w1=w1 if w1 is not None else evolution["w1"])
    args = dict(solver=diffrax.Euler(), dt0=0.5)
    args.update(kw)
    with pytest.raises(exc, match=match):
        coupled_odeint_diffrax(tiny_f, z0, theta, evolution, **args)

