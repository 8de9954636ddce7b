"""The coupled block uses exactly the weights DESIGN.md names, for both paper configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import RDACoeffs, coupled_block, evolve_weights, odeint_fixed, trajectory_indices

from helpers import max_rel_err, small_conv_f, small_problem, tree_allclose

F64 = jnp.float64


def test_trajectory_indices_of_the_paper_configurations():
    assert trajectory_indices(5, 5, "aligned") == (0, 1, 2, 3, 4)  # Eq. 2.7, t0 in {0, 1/5, ..., 4/5}
    assert trajectory_indices(2, 10, "endpoints") == (0, 10)  # Appendix B: theta_0 then theta_1
    assert trajectory_indices(3, 12, "aligned") == (0, 4, 8)
    assert trajectory_indices(3, 10, "endpoints") == (0, 5, 10)
    assert trajectory_indices(4, 10, "endpoints") == (0, 3, 7, 10)  # round(10/3)=3, round(20/3)=7
    assert trajectory_indices(1, 7, "endpoints") == (0,)


@pytest.mark.exact
def test_one_step_without_evolution_is_a_resnet_block():
    z0, theta, _ = small_problem(jax.random.PRNGKey(0))
    out = coupled_block(small_conv_f, z0, theta, None, steps_z=1, steps_w=1)
    np.testing.assert_array_equal(out, z0 + small_conv_f(z0, theta))


def test_no_evolution_equals_static_weight_ode():
    z0, theta, _ = small_problem(jax.random.PRNGKey(1))
    out = coupled_block(small_conv_f, z0, theta, None, steps_z=3, steps_w=3)
    np.testing.assert_allclose(out, odeint_fixed(small_conv_f, z0, theta, num_steps=3), rtol=1e-15)


def _unrolled(z0, theta, coeffs, steps_z, steps_w, used):
    """Direct loop: step n uses the trajectory entry used[n] of each evolved kernel."""
    trajs = {k: evolve_weights(theta[k], coeffs[k], num_steps=steps_w, dt=1.0 / steps_w, trajectory=True) for k in ("w1", "w2")}
    z = z0
    for n in range(steps_z):
        th = {"w1": trajs["w1"][used[n]], "w2": trajs["w2"][used[n]], "b": theta["b"]}
        z = z + (1.0 / steps_z) * small_conv_f(z, th)
    return z


def test_configuration_1_uses_w_at_n_over_5():
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(2))
    out = coupled_block(small_conv_f, z0, theta, coeffs, steps_z=5, steps_w=5, schedule="aligned")
    np.testing.assert_allclose(out, _unrolled(z0, theta, coeffs, 5, 5, [0, 1, 2, 3, 4]), rtol=1e-14, atol=1e-14)


def test_configuration_2_uses_w0_then_w1_after_ten_rda_steps():
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(3))
    out = coupled_block(small_conv_f, z0, theta, coeffs, steps_z=2, steps_w=10, schedule="endpoints")
    np.testing.assert_allclose(out, _unrolled(z0, theta, coeffs, 2, 10, [0, 10]), rtol=1e-14, atol=1e-14)
    # and it is not the same as using w(1/2): the schedule matters
    wrong = _unrolled(z0, theta, coeffs, 2, 10, [0, 5])
    assert np.max(np.abs(np.asarray(out - wrong))) > 1e-3


def test_static_leaves_are_held_and_evolved_leaves_move():
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(4))
    seen = []

    def spy(z, th):
        seen.append(th)
        return small_conv_f(z, th)

    coupled_block(spy, z0, theta, coeffs, steps_z=3, steps_w=3)
    assert len(seen) == 3
    for th in seen:
        np.testing.assert_array_equal(th["b"], theta["b"])
    np.testing.assert_array_equal(seen[0]["w1"], theta["w1"])
    assert not np.allclose(seen[1]["w1"], theta["w1"])


@pytest.mark.exact
@pytest.mark.parametrize("solver", ["euler", "rk2", "rk4"])
@pytest.mark.parametrize("remat", ["none", "block", "step", "binomial"])
def test_solvers_and_remat_give_the_same_forward(solver, remat):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(5))
    kw = dict(steps_z=2, steps_w=4, schedule="aligned", solver=solver)
    ref = coupled_block(small_conv_f, z0, theta, coeffs, **kw)
    np.testing.assert_allclose(coupled_block(small_conv_f, z0, theta, coeffs, remat=remat, **kw), ref, rtol=1e-14)


@pytest.mark.parametrize(
    "steps_z, steps_w, schedule, solver",
    [(5, 5, "aligned", "euler"), (2, 10, "endpoints", "rk4")],
    ids=["conf1", "conf2"],
)
@pytest.mark.exact
def test_binomial_remat_gradients_equal_none(steps_z, steps_w, schedule, solver):
    # the RDA trajectory is computed inside the block checkpoint and handed to the nested
    # segments as inputs: its gradient must flow back through them exactly
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(11))
    scales = jnp.linspace(0.5, 1.5, steps_z, dtype=F64)

    def f(z, th, s):
        dz = s * small_conv_f(z, th)
        return dz, jnp.mean(dz)

    def loss(z0, theta, coeffs, scales, remat):
        z1, aux = coupled_block(f, z0, theta, coeffs, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
                                solver=solver, remat=remat, step_args=scales, has_aux=True)
        return jnp.sum(jnp.sin(z1)) + jnp.sum(aux**2), aux

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
    (v_ref, aux_ref), g_ref = grad(z0, theta, coeffs, scales, "none")
    (v, aux), g = grad(z0, theta, coeffs, scales, "binomial")
    np.testing.assert_allclose(v, v_ref, rtol=1e-14)
    assert tree_allclose(aux, aux_ref, rtol=1e-14, atol=0)
    assert max_rel_err(g, g_ref) < 1e-13


def test_steps_w_defaults_to_steps_z():
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(6))
    a = coupled_block(small_conv_f, z0, theta, coeffs, steps_z=3)
    b = coupled_block(small_conv_f, z0, theta, coeffs, steps_z=3, steps_w=3)
    np.testing.assert_array_equal(a, b)


def test_any_pytree_of_weights():
    # weights in a tuple with a nested dict; coefficients mirror the structure
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(7))
    th = (theta["w1"], {"w2": theta["w2"], "b": theta["b"]})
    co = (coeffs["w1"], {"w2": coeffs["w2"], "b": None})
    f = lambda z, t: small_conv_f(z, {"w1": t[0], "w2": t[1]["w2"], "b": t[1]["b"]})
    out = coupled_block(f, z0, th, co, steps_z=5, steps_w=5)
    np.testing.assert_allclose(out, coupled_block(small_conv_f, z0, theta, coeffs, steps_z=5, steps_w=5), rtol=1e-15)


# ---- bad input: each raises before any computation, naming argument, value and fix -------


def _bad(**kw):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(8))
    args = dict(f=small_conv_f, z0=z0, theta0=theta, coeffs=coeffs)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    calls = []

    def f(z, th):
        calls.append(1)
        return args["f"](z, th)

    kwargs = dict(steps_z=2, steps_w=4)
    kwargs.update(kw)
    try:
        coupled_block(f, args["z0"], args["theta0"], args["coeffs"], **kwargs)
    finally:
        assert not calls, "f was called before the bad input was rejected"


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(steps_z=2, steps_w=5, schedule="aligned"), ValueError, "steps_w=5 is not a multiple of steps_z=2"),
        (dict(steps_z=0), ValueError, "steps_z=0"),
        (dict(steps_z=-3), ValueError, "steps_z=-3"),
        (dict(steps_w=0), ValueError, "steps_w=0"),
        (dict(schedule="middle"), ValueError, "schedule='middle'.*'aligned', 'endpoints'"),
        (dict(remat="some"), ValueError, "remat='some'"),
        (dict(solver="dopri5"), ValueError, "solver='dopri5'"),
        (dict(adjoint="continuous"), ValueError, "adjoint='continuous'"),
        (dict(adjoint="discrete", solver="rk4"), ValueError, "Euler only.*solver='rk4'"),
        (dict(nonlinearity="tanh"), TypeError, "nonlinearity='tanh'"),
        (dict(coeffs={"w1": None}), ValueError, "coeffs must have the structure of theta0"),
        (dict(coeffs={"w1": None, "w2": None, "b": RDACoeffs(0.0, (0.0, 0.0), 0.0)}), ValueError, r"theta0\['b'\] has RDACoeffs.*only kernels of rank 2-4"),
        (dict(coeffs={"w1": RDACoeffs(-1.0, (0.0, 0.0), 0.0), "w2": None, "b": None}), ValueError, r"coeffs\['w1'\].d = -1.0 is negative"),
        (dict(coeffs={"w1": RDACoeffs(jnp.zeros(5), jnp.zeros((5, 2)), jnp.zeros(5)), "w2": None, "b": None}), ValueError, r"\(5,\) does not broadcast"),
        (dict(step_args=jnp.zeros(3)), ValueError, "step_args.*num_steps=2"),
        (dict(z0=jnp.ones((2, 6, 6, 3), jnp.int32)), TypeError, r"z0 has dtype int32: the ODE state must be floating point"),
        (dict(coeffs={"w1": RDACoeffs(0.1, (np.inf, 0.0), 0.0), "w2": None, "b": None}), ValueError, r"coeffs\['w1'\].v = inf is not finite"),
        (dict(coeffs={"w1": RDACoeffs(0.1, (0.0, 0.0), np.nan), "w2": None, "b": None}), ValueError, r"coeffs\['w1'\].rho = nan is not finite"),
    ],
)
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kw)


@pytest.mark.exact
@pytest.mark.parametrize("adjoint", ["autodiff", "discrete"])
def test_f_output_must_match_has_aux(adjoint):
    # batch 2: with has_aux=True a plain array used to unpack as (dz, aux) = (z[0], z[1]), a wrong output
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(9), batch=2)
    block = lambda f, has_aux: coupled_block(f, z0, theta, coeffs, steps_z=2, steps_w=2, has_aux=has_aux, adjoint=adjoint)
    with pytest.raises(TypeError, match=r"has_aux=True but f returned an array of shape \(2, 6, 6, 3\), not a pair"):
        block(small_conv_f, True)
    with pytest.raises(TypeError, match=r"f returned a tuple of length 2, not one array dz; .* pass has_aux=True"):
        block(lambda z, th: (small_conv_f(z, th), jnp.mean(z)), False)
    z1, aux = block(lambda z, th: (small_conv_f(z, th), jnp.mean(z)), True)
    np.testing.assert_allclose(z1, block(small_conv_f, False), rtol=1e-14, atol=1e-14)
    assert aux.shape == (2,)
