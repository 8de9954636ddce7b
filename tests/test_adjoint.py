"""Gradients triangulated three ways in float64 (STYLE.md 9): autodiff, the Eq. 2.5 adjoint, finite differences.

Tolerances: autodiff and the hand-written adjoint compute the same sums in a different
order, so they agree to round-off; we require <= 1e-8 relative (the issue's bound) and see
~1e-15. Central differences with eps = 1e-5 have truncation error ~eps^2 |J'''| ~ 1e-10 and
round-off ~1e-16 |J| / eps ~ 1e-11, so <= 1e-6 relative is a tight but safe bound.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import DiscreteKernel, RDACoeffs, coupled_block, discrete_adjoint
from anodev2_jax.adjoint import AdjointGradients

from helpers import max_rel_err, small_conv_f, small_problem

F64 = jnp.float64
CONFIGS = [(5, 5, "aligned"), (2, 10, "endpoints"), (3, 6, "aligned")]
IS_COEFF = lambda x: x is None or isinstance(x, RDACoeffs)


def objective(z1):
    w = jnp.linspace(-1.0, 1.0, z1.size, dtype=z1.dtype).reshape(z1.shape)
    return jnp.sum(jnp.sin(z1) * w) + 0.5 * jnp.sum(z1**2)


def make_loss(steps_z, steps_w, schedule, nonlinearity=jnp.tanh, remat="none", adjoint="autodiff"):
    def loss(z0, theta, coeffs):
        z1 = coupled_block(
            small_conv_f, z0, theta, coeffs, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
            nonlinearity=nonlinearity, remat=remat, adjoint=adjoint,
        )
        return objective(z1)

    return loss


def adjoint_grads(z0, theta, coeffs, steps_z, steps_w, schedule, nonlinearity=jnp.tanh):
    kw = dict(steps_z=steps_z, steps_w=steps_w, schedule=schedule, nonlinearity=nonlinearity)
    z1 = coupled_block(small_conv_f, z0, theta, coeffs, **kw)
    z1_bar = jax.grad(objective)(z1)  # dJ/dz(1): the terminal condition of Eq. 2.5a
    _, g = discrete_adjoint(small_conv_f, z0, theta, coeffs, z1_bar, order="inputs", **kw)
    z0_bar, theta_bar, coeffs_bar = g.z0, g.theta0, g.evolution
    return z0_bar, theta_bar, coeffs_bar


def softsign(x):  # not special-cased in the adjoint: exercises the generic sigma' path
    return x / (1 + jnp.abs(x))


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS)
def test_adjoint_equals_autodiff_for_every_remat_mode(steps_z, steps_w, schedule):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(0))
    ours = jax.jit(adjoint_grads, static_argnums=(3, 4, 5))(z0, theta, coeffs, steps_z, steps_w, schedule)
    for remat in ("none", "block", "step", "binomial"):
        loss = make_loss(steps_z, steps_w, schedule, remat=remat)
        auto = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(z0, theta, coeffs)
        assert max_rel_err(ours, auto) <= 1e-8, remat


@pytest.mark.parametrize("nonlinearity", [None, jax.nn.sigmoid, softsign], ids=["linear", "sigmoid", "softsign"])
def test_adjoint_of_other_nonlinearities(nonlinearity):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(5))
    steps = (2, 10, "endpoints")
    ours = jax.jit(adjoint_grads, static_argnums=(3, 4, 5, 6))(z0, theta, coeffs, *steps, nonlinearity)
    auto = jax.jit(jax.grad(make_loss(*steps, nonlinearity), argnums=(0, 1, 2)))(z0, theta, coeffs)
    assert max_rel_err(ours, auto) <= 1e-8


@pytest.mark.parametrize(
    "steps_z, steps_w, schedule, remat",
    [(5, 5, "aligned", "none"), (2, 10, "endpoints", "block"), (5, 5, "aligned", "binomial")],
)
def test_custom_vjp_path_equals_autodiff(steps_z, steps_w, schedule, remat):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(1))
    auto = jax.jit(jax.grad(make_loss(steps_z, steps_w, schedule), argnums=(0, 1, 2)))(z0, theta, coeffs)
    disc_loss = make_loss(steps_z, steps_w, schedule, remat=remat, adjoint="discrete")
    v, disc = jax.jit(jax.value_and_grad(disc_loss, argnums=(0, 1, 2)))(z0, theta, coeffs)
    np.testing.assert_allclose(v, make_loss(steps_z, steps_w, schedule)(z0, theta, coeffs), rtol=1e-14)
    assert max_rel_err(disc, auto) <= 1e-8


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS[:2])
def test_adjoint_equals_central_finite_differences(steps_z, steps_w, schedule):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(2))
    z0_bar, theta_bar, coeffs_bar = jax.jit(adjoint_grads, static_argnums=(3, 4, 5))(z0, theta, coeffs, steps_z, steps_w, schedule)
    loss = jax.jit(make_loss(steps_z, steps_w, schedule))
    eps = 1e-5
    rng = np.random.default_rng(0)

    def fd_directional(which, direction):
        def shifted(s):
            args = [z0, theta, coeffs]
            args[which] = jax.tree_util.tree_map(lambda x, u: x + s * u, args[which], direction)
            return loss(*args)

        return (shifted(eps) - shifted(-eps)) / (2 * eps)

    # z0 and every kernel/bias: directional derivatives along random directions
    directions = [(0, jnp.asarray(rng.standard_normal(z0.shape)), z0_bar)]
    for name in theta:
        u = {k: jnp.asarray(rng.standard_normal(v.shape)) if k == name else jnp.zeros_like(v) for k, v in theta.items()}
        directions.append((1, u, theta_bar))
    for which, u, grad in directions:
        expect = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(u)))
        got = fd_directional(which, u)
        assert abs(got - expect) <= 1e-6 * abs(expect), (which, got, expect)

    # every single RDA coefficient (scalar and per-filter d, v, rho): elementwise
    c_leaves, c_def = jax.tree_util.tree_flatten(coeffs)
    g_leaves = jax.tree_util.tree_leaves(coeffs_bar)
    for i, (c, g) in enumerate(zip(c_leaves, g_leaves)):
        for j in range(c.size):
            e = jnp.zeros(c.size, F64).at[j].set(1.0).reshape(c.shape)
            u = jax.tree_util.tree_unflatten(c_def, [e if k == i else jnp.zeros_like(x) for k, x in enumerate(c_leaves)])
            got = fd_directional(2, u)
            expect = g.reshape(-1)[j]
            assert abs(got - expect) <= 1e-6 * max(abs(expect), 1e-3), (i, j, got, expect)


def test_gradients_agree_under_vmap():
    # a batch of independent problems (different inputs and coefficients)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    probs = [small_problem(k) for k in keys]
    scale = jnp.asarray([0.5, 1.0, 2.0], F64)
    z0s = jnp.stack([p[0] for p in probs])
    theta = probs[0][1]
    coeffs = probs[0][2]
    coeffs_b = jax.tree_util.tree_map(
        lambda c: None if c is None else RDACoeffs(*(jnp.stack([x * s for s in scale]) for x in c)), coeffs, is_leaf=IS_COEFF
    )
    steps = (2, 10, "endpoints")
    auto = jax.jit(jax.vmap(jax.grad(make_loss(*steps), argnums=(0, 2)), in_axes=(0, None, 0)))(z0s, theta, coeffs_b)
    disc_grad = jax.grad(make_loss(*steps, adjoint="discrete", remat="block"), argnums=(0, 2))
    disc = jax.jit(jax.vmap(disc_grad, in_axes=(0, None, 0)))(z0s, theta, coeffs_b)
    hand = jax.jit(jax.vmap(lambda z, c: adjoint_grads(z, theta, c, *steps), in_axes=(0, 0)))(z0s, coeffs_b)
    hand = (hand[0], hand[2])
    assert max_rel_err(disc, auto) <= 1e-8
    assert max_rel_err(hand, auto) <= 1e-8
    single_grad = jax.jit(jax.grad(make_loss(*steps), argnums=(0, 2)))
    for i in range(3):
        ci = jax.tree_util.tree_map(lambda x: x[i], coeffs_b)
        single = single_grad(z0s[i], theta, ci)
        assert max_rel_err(jax.tree_util.tree_map(lambda x: x[i], auto), single) <= 1e-12


def test_discrete_path_with_step_args_and_aux():
    # per-step parameters (e.g. per-step BatchNorm) get gradients; aux comes out stacked
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(4))
    scales = jnp.asarray([0.5, 1.5], F64)

    def f(z, th, s):
        dz = s * small_conv_f(z, th)
        return dz, jnp.mean(dz)

    def loss(z0, theta, coeffs, scales, adjoint):
        z1, aux = coupled_block(f, z0, theta, coeffs, steps_z=2, steps_w=10, schedule="endpoints",
                                adjoint=adjoint, step_args=scales, has_aux=True)
        assert aux.shape == (2,)
        return objective(z1)

    auto = jax.grad(loss, argnums=(0, 1, 2, 3))(z0, theta, coeffs, scales, "autodiff")
    disc = jax.grad(loss, argnums=(0, 1, 2, 3))(z0, theta, coeffs, scales, "discrete")
    assert max_rel_err(disc, auto) <= 1e-8


@pytest.mark.exact
def test_discrete_adjoint_returns_gradients_in_coupled_blocks_input_order():
    # order="inputs": (z0, theta0, evolution, time_kernel, step_args), always five entries;
    # the old layout (kernel after step_args, four entries without a kernel) stays for one
    # release under order="legacy", and is the default with a FutureWarning
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(6))
    kernel = DiscreteKernel(jnp.asarray([0.6, 0.4], F64))
    scales = jnp.asarray([0.5, 1.5], F64)
    f = lambda z, th, s: s * small_conv_f(z, th)
    kw = dict(steps_z=2, steps_w=4, schedule="endpoints", step_args=scales)
    z1 = coupled_block(f, z0, theta, coeffs, time_kernel=kernel, **kw)
    z1_bar = jax.grad(objective)(z1)
    loss = lambda *a: objective(coupled_block(f, a[0], a[1], a[2], time_kernel=a[3], steps_z=2, steps_w=4, schedule="endpoints", step_args=a[4]))
    auto = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(z0, theta, coeffs, kernel, scales)

    _, new = discrete_adjoint(f, z0, theta, coeffs, z1_bar, time_kernel=kernel, order="inputs", **kw)
    assert isinstance(new, AdjointGradients) and new._fields == ("z0", "theta0", "evolution", "time_kernel", "step_args")
    assert max_rel_err(tuple(new), auto) <= 1e-8
    assert isinstance(new.time_kernel, DiscreteKernel) and new.step_args.shape == (2,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit order warns nothing
        _, legacy = discrete_adjoint(f, z0, theta, coeffs, z1_bar, time_kernel=kernel, order="legacy", **kw)
    assert len(legacy) == 5 and max_rel_err(legacy, (new.z0, new.theta0, new.evolution, new.step_args, new.time_kernel)) == 0
    with pytest.warns(FutureWarning, match=r"pass order='inputs' to get it now"):
        _, default = discrete_adjoint(f, z0, theta, coeffs, z1_bar, **kw)
    assert len(default) == 4  # legacy without a kernel: (z0, theta0, evolution, step_args)
    _, no_kernel = discrete_adjoint(f, z0, theta, coeffs, z1_bar, order="inputs", **kw)
    assert no_kernel.time_kernel is None and max_rel_err(default, (no_kernel.z0, no_kernel.theta0, no_kernel.evolution, no_kernel.step_args)) == 0
    with pytest.raises(ValueError, match=r"order='kernel_last' is not supported; use one of 'inputs', 'legacy'"):
        discrete_adjoint(f, z0, theta, coeffs, z1_bar, order="kernel_last", **kw)
