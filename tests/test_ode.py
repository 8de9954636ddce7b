"""Fixed-step solvers: convergence order, exactness of the discrete solve, remat, diffrax cross-checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from anodev2_jax import odeint_diffrax, odeint_fixed
from anodev2_jax.ode import binomial_schedule

from helpers import max_rel_err, small_conv_f, small_problem, tree_allclose

F64 = jnp.float64


def linear_f(z, a):
    return a @ z


def linear_problem():
    a = jnp.asarray([[-0.5, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.1, 0.0, -0.8]], F64)
    z0 = jnp.asarray([1.0, -0.5, 0.25], F64)
    return a, z0, scipy.linalg.expm(np.asarray(a)) @ np.asarray(z0)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("rk2", 2), ("rk4", 4)])
def test_convergence_order_on_linear_ode(solver, order):
    a, z0, exact = linear_problem()
    steps = np.array([8, 16, 32, 64])
    errs = [float(np.linalg.norm(odeint_fixed(linear_f, z0, a, num_steps=int(n), solver=solver) - exact)) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.1, (solver, slope, errs)


def test_one_euler_step_is_a_resnet_block():
    z0, theta, _ = small_problem(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(odeint_fixed(small_conv_f, z0, theta, num_steps=1), z0 + small_conv_f(z0, theta))


def test_per_step_weights_and_step_args_follow_a_manual_loop():
    a, z0, _ = linear_problem()
    n = 4
    theta = jnp.stack([a * (1.0 + 0.1 * i) for i in range(n)])
    args = jnp.linspace(0.0, 1.0, n, dtype=F64)

    def f(z, a, s):
        return a @ z + s * jnp.sin(z)

    z = z0
    for i in range(n):
        z = z + (1.0 / n) * f(z, theta[i], args[i])
    out = odeint_fixed(f, z0, theta, num_steps=n, per_step=True, step_args=args)
    np.testing.assert_allclose(out, z, rtol=1e-15)


def test_has_aux_returns_first_stage_aux_per_step():
    a, z0, _ = linear_problem()

    def f(z, a):
        return a @ z, {"norm": jnp.linalg.norm(z)}

    for solver in ("euler", "rk4"):
        z1, aux = odeint_fixed(f, z0, a, num_steps=3, solver=solver, has_aux=True)
        assert aux["norm"].shape == (3,)
        np.testing.assert_allclose(aux["norm"][0], jnp.linalg.norm(z0))
        np.testing.assert_allclose(z1, odeint_fixed(lambda z, a: f(z, a)[0], z0, a, num_steps=3, solver=solver))


@pytest.mark.parametrize("solver", ["euler", "rk2", "rk4"])
def test_remat_modes_give_identical_values_and_gradients(solver):
    z0, theta, _ = small_problem(jax.random.PRNGKey(1))

    def loss(z0, theta, remat):
        return jnp.sum(odeint_fixed(small_conv_f, z0, theta, num_steps=3, solver=solver, remat=remat) ** 2)

    ref = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta, "none")
    for remat in ("block", "step", "binomial"):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(z0, theta, remat)
        assert tree_allclose(got, ref, rtol=1e-13, atol=1e-13)


def _tree_counts(tree):
    """(steps, held activations M, recomputed step evaluations T, max recomputations of a step) of a schedule."""
    if tree == 1:
        return 1, 1, 0, 0
    (nl, ml, tl, rl), (nr, mr, tr, rr) = _tree_counts(tree[0]), _tree_counts(tree[1])
    return nl + nr, max(1 + mr, ml), nl + tl + tr, max(rl + 1, rr)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 16, 20, 21, 22, 64])
def test_binomial_schedule_bounds(n):
    s, t, tree = binomial_schedule(n)
    steps, m, t_tree, reps = _tree_counts(tree)
    assert (steps, m, t_tree) == (n, s, t)  # covers every step once; holds s; recomputes T
    assert reps <= n.bit_length()  # each step recomputed at most floor(log2 N) + 1 times
    assert s <= 1 + (n - 1).bit_length()  # at most bisection's 1 + ceil(log2 N): O(log N)
    assert s >= binomial_schedule(max(n - 1, 1))[0]  # memory never shrinks as N grows


def test_binomial_schedule_values():
    assert [binomial_schedule(n)[:2] for n in (1, 2, 5, 10, 20)] == [(1, 0), (2, 1), (3, 6), (3, 20), (3, 65)]


@pytest.mark.parametrize("solver, num_steps", [("euler", 1), ("euler", 7), ("rk2", 5), ("rk4", 3)])
def test_binomial_remat_equals_none_with_step_args_and_aux(solver, num_steps):
    # per-step weights, step_args and has_aux together: every input of f goes through the
    # nested checkpoints, and aux comes back stacked in step order
    z0, theta, _ = small_problem(jax.random.PRNGKey(9))
    thetas = jax.tree_util.tree_map(lambda w: jnp.stack([w * (1.0 + 0.1 * n) for n in range(num_steps)]), theta)
    args = jnp.linspace(0.5, 1.5, num_steps, dtype=F64)

    def f(z, th, s):
        dz = s * small_conv_f(z, th)
        return dz, {"mean": jnp.mean(dz), "s": s}

    def loss(z0, thetas, args, remat):
        z1, aux = odeint_fixed(f, z0, thetas, num_steps=num_steps, solver=solver, per_step=True,
                               step_args=args, has_aux=True, remat=remat)
        return jnp.sum(jnp.sin(z1)) + jnp.sum(aux["mean"] ** 2), aux

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (v_ref, aux_ref), g_ref = grad(z0, thetas, args, "none")
    (v, aux), g = grad(z0, thetas, args, "binomial")
    np.testing.assert_allclose(v, v_ref, rtol=1e-14)
    assert tree_allclose(aux, aux_ref, rtol=1e-14, atol=0)
    assert max_rel_err(g, g_ref) < 1e-13  # the same operations; only the summation order differs


def test_binomial_remat_under_vmap():
    # the training step vmaps over seeds: batched inputs and unbatched weights
    z0, theta, _ = small_problem(jax.random.PRNGKey(10))
    zs = jnp.stack([z0, -0.5 * z0, z0 ** 2])

    def loss(z, theta, remat):
        return jnp.sum(odeint_fixed(small_conv_f, z, theta, num_steps=5, remat=remat) ** 2)

    def grads(remat):
        one = jax.grad(lambda z, th: loss(z, th, remat), argnums=(0, 1))
        return jax.jit(jax.vmap(one, in_axes=(0, None)))(zs, theta)

    assert max_rel_err(grads("binomial"), grads("none")) < 1e-13


@pytest.mark.parametrize("solver", ["euler", "rk2", "rk4"])
def test_diffrax_recursive_checkpoint_cross_checks_odeint_fixed(solver):
    # diffrax's own solvers and RecursiveCheckpointAdjoint are an independent implementation
    # of the same discrete solve: values and (exact, DTO) gradients must agree.
    z0, theta, _ = small_problem(jax.random.PRNGKey(2))

    def loss(z0, theta, fn, **kw):
        return jnp.sum(jnp.sin(fn(small_conv_f, z0, theta, num_steps=4, solver=solver, **kw)))

    ours = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta, odeint_fixed)
    theirs = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta, odeint_diffrax, adjoint="checkpoint")
    assert max_rel_err(theirs, ours) < 1e-12


def test_backsolve_neural_ode_gradient_is_not_the_dto_gradient():
    # The paper's point about [8] (Table 4): the continuous adjoint reconstructs z(t) by a
    # backward solve and integrates the adjoint ODE with its own discretization, so at few
    # steps its gradient differs from the exact gradient of the same forward pass.
    z0, theta, _ = small_problem(jax.random.PRNGKey(3))
    theta = jax.tree_util.tree_map(lambda x: 2.0 * x, theta)  # a clearly nonlinear f

    def loss(z0, theta, fn, n, **kw):
        return jnp.sum(jnp.sin(fn(small_conv_f, z0, theta, num_steps=n, **kw)))

    errs = {}
    for n in (2, 8, 32):
        v_dto, g_dto = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta, odeint_fixed, n)
        v_bs, g_bs = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta, odeint_diffrax, n, adjoint="backsolve")
        np.testing.assert_allclose(v_bs, v_dto, rtol=1e-13)  # same forward pass
        errs[n] = max_rel_err(g_bs, g_dto)
    assert errs[2] > 1e-2, errs  # measurably wrong at the paper's N_t = 2
    assert errs[32] < errs[8] < errs[2], errs  # and it only converges as the grid is refined


def test_jit_and_vmap():
    a, z0, _ = linear_problem()
    zs = jnp.stack([z0, 2 * z0, -z0])
    out = jax.jit(jax.vmap(lambda z: odeint_fixed(linear_f, z, a, num_steps=5, solver="rk4")))(zs)
    for i in range(3):
        np.testing.assert_allclose(out[i], odeint_fixed(linear_f, zs[i], a, num_steps=5, solver="rk4"), rtol=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps=0"),
        (dict(num_steps=2.0), "num_steps=2.0"),
        (dict(num_steps=2, solver="rk45"), "solver='rk45'.*'euler'"),
        (dict(num_steps=2, remat="all"), "remat='all'.*'block'"),
        (dict(num_steps=4, per_step=True), "leading axis of length num_steps=4"),
        (dict(num_steps=2, step_args=jnp.zeros(3)), "step_args.*num_steps=2"),
    ],
)
def test_bad_input(kwargs, match):
    a, z0, _ = linear_problem()
    with pytest.raises(ValueError, match=match):
        odeint_fixed(linear_f, z0, a, **kwargs)


def test_integer_state_is_refused_not_rounded():
    # an int32 z0 used to come back as integers ([1 1 1] where float gives 0.25): every step rounded
    with pytest.raises(TypeError, match=r"z0 has dtype int32: the ODE state must be floating point .* pass z0.astype\(jnp.float32\)"):
        odeint_fixed(lambda z, th: -0.75 * z, jnp.ones(3, jnp.int32), None, num_steps=1)
    with pytest.raises(TypeError, match=r"z0 has dtype bool"):
        odeint_diffrax(lambda z, th: z, jnp.ones(3, bool), None, num_steps=1)
    with pytest.raises(TypeError, match=r"z0 is a list"):
        odeint_fixed(lambda z, th: z, [1.0, 2.0], None, num_steps=1)
    np.testing.assert_allclose(odeint_fixed(lambda z, th: -0.75 * z, jnp.ones(3, F64), None, num_steps=1), 0.25)


def test_the_output_of_f_is_checked_against_has_aux_and_the_state():
    z0 = jnp.ones((2, 3), F64)  # batch 2: a plain array unpacks as a pair (dz, aux) without error
    plain = lambda z, th: -z
    pair = lambda z, th: (-z, jnp.sum(z))
    with pytest.raises(TypeError, match=r"has_aux=True but f returned an array of shape \(2, 3\), not a pair \(dz, aux\)"):
        odeint_fixed(plain, z0, None, num_steps=2, has_aux=True)
    with pytest.raises(TypeError, match=r"f returned a tuple of length 2, not one array dz; if it returns \(dz, aux\) pass has_aux=True"):
        odeint_fixed(pair, z0, None, num_steps=2)
    with pytest.raises(TypeError, match=r"has_aux=True but f returned a tuple of length 3"):
        odeint_fixed(lambda z, th: (-z, 1.0, 2.0), z0, None, num_steps=2, has_aux=True)
    with pytest.raises(ValueError, match=r"f returned dz of shape \(3,\) for a state z of shape \(2, 3\)"):
        jax.jit(lambda z: odeint_fixed(lambda z, th: z[0], z, None, num_steps=2))(z0)  # checked at trace time
    z1, aux = odeint_fixed(pair, z0, None, num_steps=2, has_aux=True)
    np.testing.assert_allclose(z1, 0.25 * z0)
    assert aux.shape == (2,)


def test_bad_diffrax_adjoint():
    a, z0, _ = linear_problem()
    with pytest.raises(ValueError, match="adjoint='exact'"):
        odeint_diffrax(linear_f, z0, a, num_steps=2, adjoint="exact")


@functools.lru_cache(maxsize=None)  # the memory tests share compilations
def _temp_bytes(remat, num_steps=20):
    key = jax.random.PRNGKey(4)
    z0 = jax.random.normal(key, (8, 16, 16, 8), jnp.float32)
    theta = {
        "w1": 0.1 * jax.random.normal(key, (3, 3, 8, 8), jnp.float32),
        "w2": 0.1 * jax.random.normal(key, (3, 3, 8, 8), jnp.float32),
        "b": jnp.zeros((8,), jnp.float32),
    }

    def loss(z0, theta):
        return jnp.sum(odeint_fixed(small_conv_f, z0, theta, num_steps=num_steps, remat=remat) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(z0, theta).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_step_remat_halves_compiled_temporary_memory():
    none, step = _temp_bytes("none"), _temp_bytes("step")
    print(f"temp bytes, 20 steps: none={none} step={step} ratio={step / none:.3f}")
    assert step <= 0.5 * none


def test_binomial_remat_memory_does_not_grow_with_steps():
    # In units of one activation (8x16x16x8 float32 = 64 KiB). Measured (jax 0.10.2, XLA:CPU):
    # 1 step 6.0; 20 steps: binomial 9.2, step 24.1, none 82.0. Bound: binomial_schedule(20)
    # holds s = 3 activations where 1 step holds 1, plus 2 transient (the left segment's
    # recomputed activation and the step being differentiated): at most 4 more than 1 step.
    unit = 8 * 16 * 16 * 8 * 4
    one, binomial, step = _temp_bytes("binomial", 1), _temp_bytes("binomial", 20), _temp_bytes("step", 20)
    print(f"activations held: 1 step {one / unit:.1f}; 20 steps binomial {binomial / unit:.1f}, step {step / unit:.1f}")
    s, _, _ = binomial_schedule(20)
    assert binomial <= one + (s - 1 + 2) * unit
    assert binomial <= 0.5 * step


# ----------------------------------------------------------------------------- remat="auto"'s chooser


def test_remat_cost_and_activation_estimates():
    from anodev2_jax import ode

    assert [ode.remat_cost(m, 5) for m in ode.REMAT_MODES] == [5, 10, 14, 16]
    assert [ode.remat_cost(m, 20) for m in ode.REMAT_MODES] == [20, 40, 59, 105]
    # ResNet's block, 5 activations per Euler step (the measurements in ode.py's comment)
    assert [ode.remat_activations(m, 5) for m in ode.REMAT_MODES] == [25, 25, 10, 8]
    assert [ode.remat_activations(m, 1) for m in ode.REMAT_MODES] == [5, 5, 5, 5]  # one step: nothing to save
    assert ode.remat_activations("none", 2, solver="rk4") == 40
    assert ode.remat_activations("binomial", 5, solver="rk4") == 26
    assert ode.remat_activations("none", 5, f_activations=3) == 15  # AlexNet's one conv
    assert ode.remat_activations("none", 5, adjoint="discrete") == 10  # one activation per step + one step


@pytest.mark.parametrize(
    "num_steps, budget, kw, expected",
    [
        (5, 25, {}, "none"),  # fits exactly
        (5, 24.9, {}, "step"),
        (5, 10, {}, "step"),
        (5, 9, {}, "binomial"),
        (5, 1, {}, "binomial"),  # nothing fits: the smallest estimate
        (1, 1, {}, "none"),  # one step: every mode holds the same, none is cheapest
        (20, 100, {}, "none"),
        (20, 99, {}, "step"),
        (20, 24, {}, "binomial"),
        (2, 39, dict(solver="rk4"), "step"),
        (5, 25, dict(adjoint="discrete"), "none"),
        (5, 10, dict(adjoint="discrete"), "none"),
    ],
)
def test_choose_remat_takes_the_cheapest_schedule_that_fits(num_steps, budget, kw, expected):
    from anodev2_jax import ode

    mib = 2**20  # one activation of 1 MiB; budget in activations
    assert ode.choose_remat(num_steps, mib, budget * mib, **kw) == expected


def test_choose_remat_never_picks_block_and_respects_the_budget_when_it_can():
    """"block" holds at its peak what "none" holds (one block), at twice the cost; every pick fits if any mode does."""
    from anodev2_jax import ode

    for n in range(1, 31):
        for budget in np.linspace(0.5, 6 * n, 40):
            mode = ode.choose_remat(n, 1.0, budget)
            assert mode != "block"
            fitting = [m for m in ode.REMAT_MODES if ode.remat_activations(m, n) <= budget]
            if fitting:
                assert ode.remat_activations(mode, n) <= budget
                assert ode.remat_cost(mode, n) == min(ode.remat_cost(m, n) for m in fitting)
