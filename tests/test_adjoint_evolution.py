"""Gradients of Eq. 2.3 in full (every evolution operator x time kernel x schedule), triangulated in float64.

Three ways (STYLE.md 9): ``jax.grad`` through the unrolled solve, the hand-written discrete
adjoint (``discrete_adjoint``: Eq. 2.5 with ``Gamma_m = sum_n kappa[n, m] gamma_n``, one
``jax.vjp`` of the operator's step per weight step, one of the kernel's weights), and
central finite differences along random directions in every argument group (``z0``,
``theta0``, the evolution pytree, the kernel).

Tolerances: autodiff and the adjoint sum the same terms in a different order: <= 1e-8
relative is the issue's bound (we see ~1e-15). Central differences with ``eps = 1e-5``:
truncation ``eps^2 |J'''| / 6 ~ 1e-11`` for these O(1) smooth losses, round-off
``1e-16 |J| / eps ~ 1e-11``, so <= 1e-6 relative is safe with margin.

Cost: tiny shapes (batch 1, 4x4, 2 channels, one 3x3 kernel evolved, 2 activation steps,
1-2 weight steps) and one ``jit`` per combination (its finite differences are one ``vmap``
of the loss). The remat/vmap subset uses a tree with a second kernel evolved by
``RDACoeffs`` next to the operator (two evolved leaves under one kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import ODEEvolution, coupled_block, discrete_adjoint

from helpers import KERNELS, OPERATOR_KINDS, OPERATORS, make_kernel, make_operator_kind, max_rel_err, tiny_f, tiny_problem, user_q

SCHEDULES = {"aligned": (2, 2), "endpoints": (2, 2)}  # (steps_z, steps_w): indices (0, 1) and (0, 2)
EPS = 1e-5


def objective(z1):
    w = jnp.linspace(-1.0, 1.0, z1.size, dtype=z1.dtype).reshape(z1.shape)
    return jnp.sum(jnp.sin(z1) * w) + 0.5 * jnp.sum(z1**2)


def make_loss(schedule, adjoint="autodiff", remat="none"):
    block = make_block(schedule, adjoint, remat)
    return lambda *args: objective(block(*args))


def make_block(schedule, adjoint="autodiff", remat="none"):
    steps_z, steps_w = SCHEDULES[schedule]

    def block(z0, theta, evolution, kernel):
        return coupled_block(tiny_f, z0, theta, evolution, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
                             time_kernel=kernel, adjoint=adjoint, remat=remat)

    return block


def hand_grads(z0, theta, evolution, kernel, schedule, z1_bar):
    """The hand-written adjoint's gradients for the output cotangent ``z1_bar``."""
    steps_z, steps_w = SCHEDULES[schedule]
    kw = dict(steps_z=steps_z, steps_w=steps_w, schedule=schedule, time_kernel=kernel)
    _, grads = discrete_adjoint(tiny_f, z0, theta, evolution, z1_bar, order="inputs", **kw)
    return grads[:4]  # (z0, theta0, evolution, time_kernel): the order of the block's inputs


def random_like(tree, rng):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x)), tree)


def shifted_batch(args, directions):
    """All ``args`` with group ``i`` moved by ``+-EPS * u_i``, stacked for one vmap: rows 2k, 2k+1 = direction k."""
    rows = []
    for i, u in directions:
        for s in (EPS, -EPS):
            row = list(args)
            row[i] = jax.tree_util.tree_map(lambda x, d: x + s * d, args[i], u)
            rows.append(row)
    return [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(r[i] for r in rows)) for i in range(len(args))]


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kernel_name", KERNELS)
@pytest.mark.parametrize("operator", OPERATORS)
def test_autodiff_equals_adjoint_equals_finite_differences(operator, kernel_name, schedule):
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(0), operator)
    kernel = make_kernel(kernel_name)
    args = (z0, theta, evolution, kernel)
    rng = np.random.default_rng(1)
    directions = [(i, random_like(a, rng)) for i, a in enumerate(args) if jax.tree_util.tree_leaves(a)]
    loss = make_loss(schedule)

    @jax.jit
    def run(args, batch):
        z1, block_vjp = jax.vjp(make_block(schedule), *args)
        z1_bar = jax.grad(objective)(z1)  # dJ/dz(1): the terminal condition of Eq. 2.5a
        return block_vjp(z1_bar), hand_grads(*args, schedule, z1_bar), jax.vmap(loss)(*batch)

    auto, hand, values = run(args, shifted_batch(args, directions))
    assert jax.tree_util.tree_structure(hand) == jax.tree_util.tree_structure(auto)
    assert max_rel_err(hand, auto) <= 1e-8
    # every parameter group gets a gradient by plain jax.grad (the operator's and the kernel's too)
    for group in auto:
        for leaf in jax.tree_util.tree_leaves(group):
            assert np.any(np.asarray(leaf) != 0)
    for k, (i, u) in enumerate(directions):
        fd = (values[2 * k] - values[2 * k + 1]) / (2 * EPS)
        exact = tree_vdot(auto[i], u)
        assert abs(fd - exact) <= 1e-6 * abs(exact), (i, float(fd), float(exact))


# remat and vmap on a subset that still touches every operator, every kernel and both schedules
SUBSET = [
    ("rda_coeffs", "exponential", "endpoints"),
    ("rda_equation", "discrete", "aligned"),
    ("linear", "dirac", "aligned"),
    ("ode_user_q", "none", "aligned"),
    ("mlp", "exponential", "endpoints"),
]


@pytest.mark.parametrize("operator, kernel_name, schedule", SUBSET)
def test_every_remat_mode_and_vmap(operator, kernel_name, schedule):
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(2), operator)
    kernel = make_kernel(kernel_name)
    args = (z0, theta, evolution, kernel)
    # a batch of two problems: this one and one with every input and parameter moved
    other = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.01, args)
    batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), args, other)
    grad = lambda adjoint, remat: jax.grad(make_loss(schedule, adjoint, remat), argnums=(0, 1, 2, 3))

    @jax.jit
    def run(args, batch):
        ref = grad("autodiff", "none")(*args)
        grads = {mode: grad(*mode)(*args) for mode in (("autodiff", "block"), ("autodiff", "binomial"), ("discrete", "none"))}
        # the vmapped gradients are the two remaining modes: autodiff "step" and discrete
        # "binomial" (adjoint="discrete" with "block", "step" or "binomial" is one program:
        # coupled_block adds only the block checkpoint around the custom_vjp)
        vmapped = {"autodiff": jax.vmap(grad("autodiff", "step"))(*batch), "discrete": jax.vmap(grad("discrete", "binomial"))(*batch)}
        return ref, grads, vmapped

    ref, grads, vmapped = run(args, batch)
    for (adjoint, remat), g in grads.items():
        assert max_rel_err(g, ref) <= (1e-12 if adjoint == "autodiff" else 1e-8), (adjoint, remat)
    assert max_rel_err(jax.tree_util.tree_map(lambda x: x[0], vmapped["autodiff"]), ref) <= 1e-12
    assert max_rel_err(vmapped["discrete"], vmapped["autodiff"]) <= 1e-8


def test_two_evolved_leaves_under_one_kernel():
    # an operator next to Eq. B.4 in one tree: the kernel's gradient sums <gamma_n, W_m> over both leaves
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(4), "mlp", mixed=True)
    args = (z0, theta, evolution, make_kernel("discrete"))

    @jax.jit
    def run(args):
        z1, block_vjp = jax.vjp(make_block("endpoints"), *args)
        z1_bar = jax.grad(objective)(z1)
        disc = jax.grad(make_loss("endpoints", "discrete"), argnums=(0, 1, 2, 3))(*args)
        return block_vjp(z1_bar), disc, hand_grads(*args, "endpoints", z1_bar)

    auto, disc, hand = run(args)
    assert max_rel_err(disc, auto) <= 1e-8
    assert max_rel_err(hand, auto) <= 1e-8


def test_forward_under_jit_and_vmap_matches_eager():
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(3), "mlp", batch=2)
    kernel = make_kernel("exponential")
    block = lambda z, th, evo, k: coupled_block(tiny_f, z, th, evo, steps_z=2, steps_w=4, time_kernel=k, remat="step")
    eager = block(z0, theta, evolution, kernel)
    jitted = jax.jit(block)(z0, theta, evolution, kernel)
    per_example = jax.jit(jax.vmap(block, in_axes=(0, None, None, None)))(z0[:, None], theta, evolution, kernel)[:, 0]
    np.testing.assert_allclose(jitted, eager, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(per_example, eager, rtol=1e-13, atol=1e-13)


# ---- every pytree kind is an operator (DESIGN.md: any pytree with a callable step) ----------


@pytest.mark.exact
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_every_pytree_kind_is_an_operator_with_gradients_three_ways(kind):
    # the same q (one Euler step of helpers.user_q) as a NamedTuple, a register_dataclass
    # dataclass, an eqx.Module, a flax.struct.dataclass and an nnx.Module; under the
    # exponential kernel, so the kernel's log_rate is differentiated next to the operator's leaves
    z0, theta, evolution = tiny_problem(jax.random.PRNGKey(5), "rda_coeffs")
    evolution = dict(evolution, w1=make_operator_kind(kind))
    kernel = make_kernel("exponential")
    args = (z0, theta, evolution, kernel)
    rng = np.random.default_rng(6)
    directions = [(i, random_like(a, rng)) for i, a in enumerate(args)]
    loss = make_loss("endpoints")

    @jax.jit
    def run(args, batch):
        z1, block_vjp = jax.vjp(make_block("endpoints"), *args)
        z1_bar = jax.grad(objective)(z1)
        disc = jax.grad(make_loss("endpoints", "discrete"), argnums=(0, 1, 2, 3))(*args)
        return z1, block_vjp(z1_bar), disc, hand_grads(*args, "endpoints", z1_bar), jax.vmap(loss)(*batch)

    z1, auto, disc, hand, values = run(args, shifted_batch(args, directions))
    # the forward is the same q for every kind: compare with ODEEvolution(user_q, solver="euler")
    ref = make_block("endpoints")(z0, theta, dict(evolution, w1=ODEEvolution(user_q, {"a": 0.7, "b": 0.4}, solver="euler")), kernel)
    np.testing.assert_allclose(z1, ref, rtol=1e-13, atol=1e-13)
    assert type(auto[2]["w1"]) is type(evolution["w1"])  # the operator's gradient is a pytree of its own kind
    assert all(np.all(np.asarray(leaf) != 0) for leaf in jax.tree_util.tree_leaves(auto[2]["w1"]))
    assert max_rel_err(disc, auto) <= 1e-8
    assert max_rel_err(hand, auto) <= 1e-8
    for k, (i, u) in enumerate(directions):
        fd = (values[2 * k] - values[2 * k + 1]) / (2 * EPS)
        exact = tree_vdot(auto[i], u)
        assert abs(fd - exact) <= 1e-6 * abs(exact), (i, float(fd), float(exact))
