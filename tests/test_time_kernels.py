"""Time kernels of Eq. 2.3d on the weight grid: exact weights, limits, both schedules, the coupled block; bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import DiracKernel, DiscreteKernel, ExponentialKernel, coupled_block, evolve_weights, trajectory_indices
from anodev2_jax.trajectory import kernel_grid, make_spec

from helpers import small_conv_f, small_problem

F64 = jnp.float64
CONFIGS = [(5, 5, "aligned"), (2, 10, "endpoints"), (3, 6, "aligned"), (4, 10, "endpoints")]


def grid(steps_z, steps_w, schedule):
    return kernel_grid(make_spec(steps_z, steps_w, schedule, jnp.tanh, "euler", False))


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS)
def test_grid_is_the_schedule_rounded_onto_the_weight_grid(steps_z, steps_w, schedule):
    t, tau = grid(steps_z, steps_w, schedule)
    idx = trajectory_indices(steps_z, steps_w, schedule)
    np.testing.assert_array_equal(tau, np.arange(max(idx) + 1) / steps_w)
    np.testing.assert_array_equal(t, np.asarray(idx) / steps_w)
    kappa = np.asarray(DiracKernel().weights(t, tau))
    np.testing.assert_array_equal(kappa, np.eye(len(tau))[list(idx)])  # kappa[n, idx_n] = 1


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS)
def test_exponential_kernel_is_the_exponential_moving_average(steps_z, steps_w, schedule):
    t, tau = grid(steps_z, steps_w, schedule)
    idx = trajectory_indices(steps_z, steps_w, schedule)
    rate, dt = 2.5, 1.0 / steps_w
    kappa = np.asarray(ExponentialKernel(jnp.asarray(rate, F64)).weights(t, tau))
    np.testing.assert_allclose(kappa.sum(axis=1), 1.0, rtol=1e-14)
    for n, i in enumerate(idx):  # the closed form of the issue
        np.testing.assert_allclose(kappa[n, 0], np.exp(-rate * t[n]), rtol=1e-14)
        m = np.arange(1, i + 1)
        np.testing.assert_allclose(kappa[n, 1 : i + 1], (1 - np.exp(-rate * dt)) * np.exp(-rate * (t[n] - tau[m])), rtol=1e-13)
        assert np.all(kappa[n, i + 1 :] == 0)
    # the recursion theta_{m+1} = e^{-rate dt} theta_m + (1 - e^{-rate dt}) w_{m+1}, theta_0 = w_0
    ws = np.random.default_rng(0).standard_normal((len(tau), 3))
    theta, thetas = ws[0], [ws[0]]
    for m in range(1, len(tau)):
        theta = np.exp(-rate * dt) * theta + (1 - np.exp(-rate * dt)) * ws[m]
        thetas.append(theta)
    np.testing.assert_allclose(kappa @ ws, np.asarray(thetas)[list(idx)], rtol=1e-12, atol=1e-14)


def test_exponential_kernel_limits():
    t, tau = grid(5, 10, "aligned")
    dirac = np.asarray(DiracKernel().weights(t, tau))
    np.testing.assert_allclose(ExponentialKernel(1e6).weights(t, tau), dirac, rtol=0, atol=1e-12)  # rate -> inf
    hold = np.zeros_like(dirac)
    hold[:, 0] = 1  # rate -> 0: theta = w0
    np.testing.assert_allclose(ExponentialKernel(1e-9).weights(t, tau), hold, rtol=0, atol=1e-8)


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS)
def test_discrete_kernel_weights_lags_on_the_grid(steps_z, steps_w, schedule):
    t, tau = grid(steps_z, steps_w, schedule)
    idx = trajectory_indices(steps_z, steps_w, schedule)
    values = np.asarray([0.5, 0.3, 0.15, -0.05])
    kappa = np.asarray(DiscreteKernel(values).weights(t, tau))
    for n, i in enumerate(idx):
        for m in range(len(tau)):
            lag = i - m
            assert kappa[n, m] == (values[lag] if 0 <= lag < len(values) else 0.0)
    np.testing.assert_array_equal(DiscreteKernel(jnp.asarray([1.0, 0.0, 0.0])).weights(t, tau), DiracKernel().weights(t, tau))


@pytest.mark.parametrize("steps_z, steps_w, schedule", CONFIGS[:2])
def test_kernels_in_the_coupled_block(steps_z, steps_w, schedule):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(0))
    kw = dict(steps_z=steps_z, steps_w=steps_w, schedule=schedule)
    none = coupled_block(small_conv_f, z0, theta, coeffs, **kw)
    for dirac in (DiracKernel(), DiscreteKernel(jnp.asarray([1.0, 0.0]))):  # the weighted-sum path
        np.testing.assert_allclose(coupled_block(small_conv_f, z0, theta, coeffs, time_kernel=dirac, **kw), none, rtol=1e-14, atol=1e-14)
    # the exponential kernel is a direct loop over its weights; static leaves stay w0
    kernel = ExponentialKernel(jnp.asarray(3.0, F64))
    t, tau = grid(steps_z, steps_w, schedule)
    kappa = np.asarray(kernel.weights(t, tau))
    trajs = {k: evolve_weights(theta[k], coeffs[k], num_steps=len(tau) - 1, dt=1.0 / steps_w, trajectory=True) for k in ("w1", "w2")}
    seen, z = [], z0
    for n in range(steps_z):
        th = {k: jnp.tensordot(jnp.asarray(kappa[n]), trajs[k], axes=1) for k in ("w1", "w2")}
        z = z + (1.0 / steps_z) * small_conv_f(z, dict(th, b=theta["b"]))

    def spy(z, th):
        seen.append(th["b"])
        return small_conv_f(z, th)

    out = coupled_block(spy, z0, theta, coeffs, time_kernel=kernel, **kw)
    np.testing.assert_allclose(out, z, rtol=1e-13, atol=1e-13)
    for b in seen:
        np.testing.assert_array_equal(b, theta["b"])


# ---- bad input ------------------------------------------------------------------------------


class WrongShape(eqx.Module):
    def weights(self, t, tau):
        return jnp.ones((len(t), len(tau) + 1))


class Anticausal(eqx.Module):
    """Looks one grid step ahead: kappa[n, idx_n + 1] = scale."""

    scale: jax.Array

    def weights(self, t, tau):
        nxt = np.asarray(np.isclose(tau[None, :], t[:, None] + (tau[1] - tau[0])), float)
        cur = np.asarray(tau[None, :] == t[:, None], float)
        return self.scale * jnp.asarray(nxt + cur)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ExponentialKernel(-1.0), ValueError, r"rate=-1.0 must be finite and > 0"),
        (lambda: ExponentialKernel(0.0), ValueError, r"rate=0.0 must be finite and > 0"),
        (lambda: ExponentialKernel(np.nan), ValueError, r"rate=nan must be finite and > 0"),
        (lambda: ExponentialKernel(np.inf), ValueError, r"rate=inf must be finite and > 0"),
        (lambda: ExponentialKernel(jnp.ones(2)), ValueError, r"rate has shape \(2,\); it must be a scalar"),
        (lambda: ExponentialKernel(True), TypeError, r"rate must be real floating point, got dtype bool"),
        (lambda: ExponentialKernel(), TypeError, r"pass exactly one of rate \(> 0\) or log_rate"),
        (lambda: ExponentialKernel(1.0, log_rate=0.0), TypeError, r"pass exactly one of rate"),
        (lambda: ExponentialKernel.from_log_rate(np.inf), ValueError, r"log_rate=inf must be finite"),
        (lambda: ExponentialKernel.from_log_rate(jnp.zeros(1)), ValueError, r"log_rate has shape \(1,\)"),
        (lambda: DiscreteKernel(jnp.asarray([0.5, np.nan, 0.1])), ValueError, r"values\[1\] = nan; every lag weight must be finite"),
        (lambda: DiscreteKernel(1.0), ValueError, r"values has shape \(\); it must be rank 1"),
        (lambda: DiscreteKernel(jnp.ones((2, 2))), ValueError, r"values has shape \(2, 2\)"),
        (lambda: DiscreteKernel(jnp.ones(0)), ValueError, r"values has shape \(0,\)"),
        (lambda: DiscreteKernel(jnp.ones(2, jnp.int32)), TypeError, r"values must be real floating point"),
    ],
)
def test_bad_kernel_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "kernel, exc, match",
    [
        (WrongShape(), ValueError, r"time_kernel.weights\(t, tau\) has shape \(2, 6\); it must be \(len\(t\), len\(tau\)\) = \(2, 5\)"),
        (Anticausal(jnp.asarray(0.5, F64)), ValueError, r"time_kernel.weights is not causal: kappa\[0, 1\] = 0.5 but tau_1 = 0.25 > t_0 = 0"),
        ("exponential", TypeError, r"time_kernel='exponential' is not a time kernel"),
    ],
)
def test_bad_kernel_at_call_time(kernel, exc, match):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(1))
    calls = []

    def f(z, th):
        calls.append(1)
        return small_conv_f(z, th)

    with pytest.raises(exc, match=match):
        coupled_block(f, z0, theta, coeffs, steps_z=2, steps_w=4, schedule="endpoints", time_kernel=kernel)
    assert not calls


def test_non_causal_kernel_is_caught_under_jit_too():
    # traced leaves: causality is checked on a probe with the leaves replaced by ones
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(2))
    block = jax.jit(lambda k: coupled_block(small_conv_f, z0, theta, coeffs, steps_z=2, steps_w=4, time_kernel=k))
    with pytest.raises(ValueError, match="is not causal"):
        block(Anticausal(jnp.asarray(0.5, F64)))


# ---- the exponential kernel's parameterization: any gradient step leaves a valid kernel ----


@pytest.mark.exact
def test_log_rate_is_the_leaf_and_rate_keeps_its_meaning():
    kernel = ExponentialKernel(2.5)
    assert [k.name for k in jax.tree_util.tree_flatten_with_path(kernel)[0][0][0]] == ["log_rate"]
    np.testing.assert_allclose(kernel.rate, 2.5, rtol=1e-15)
    log_rate = jnp.asarray(np.log(2.5), F64)
    same = ExponentialKernel.from_log_rate(log_rate)
    assert same.log_rate is log_rate  # stored as given: the models' time_log_rate, no log(exp(x)) round trip
    t, tau = grid(5, 5, "aligned")
    np.testing.assert_allclose(same.weights(t, tau), kernel.weights(t, tau), rtol=1e-14)


def test_exponential_kernel_stays_valid_under_any_gradient_step():
    # under jit nothing can check a learned value; with log_rate every step gives rate > 0:
    # weights in [0, 1] summing to 1 (a raw rate stepped below 0 gives kappa[n, 0] = e^{-rate t} > 1)
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(3))
    kw = dict(steps_z=2, steps_w=4, schedule="endpoints")
    loss = lambda k: jnp.sum(coupled_block(small_conv_f, z0, theta, coeffs, time_kernel=k, **kw) ** 2)
    kernel = ExponentialKernel(jnp.asarray(0.5, F64))
    g = jax.jit(jax.grad(loss))(kernel)
    assert float(g.log_rate) != 0
    t, tau = grid(2, 4, "endpoints")

    @jax.jit
    def sgd(kernel, lr):
        new = jax.tree_util.tree_map(lambda p, d: p - lr * d, kernel, g)
        return new, new.weights(t, tau), loss(new)

    for move in (-30.0, 30.0):  # log_rate moved by -30 and +30: rate 5e-14 and 5e12
        new, kappa, value = sgd(kernel, move / float(g.log_rate))
        np.testing.assert_allclose(new.log_rate, np.log(0.5) - move, rtol=1e-12)
        assert float(new.rate) > 0 and np.all(np.asarray(kappa) >= 0) and np.all(np.asarray(kappa) <= 1)
        np.testing.assert_allclose(np.asarray(kappa).sum(axis=1), 1.0, rtol=1e-12)
        assert np.isfinite(float(value))


def test_optax_adam_under_strict_promotion_with_the_scoped_workaround():
    # optax.adam's bias correction computes 1 - b1 ** count, a Python float to the power of
    # its int32 step count, which strict dtype promotion refuses (optax's code, any leaf dtype).
    # The workaround the docs give: the optimizer update (only) under standard promotion.
    import optax

    z0, theta, coeffs = small_problem(jax.random.PRNGKey(4))
    kw = dict(steps_z=2, steps_w=4, schedule="endpoints")
    block = lambda k: coupled_block(small_conv_f, z0, theta, coeffs, time_kernel=k, **kw)
    target = block(ExponentialKernel(jnp.asarray(0.5, F64)))
    loss = lambda k: jnp.mean((block(k) - target) ** 2)
    opt = optax.adam(0.1)

    @jax.jit
    def train_step(kernel, state):
        value, grads = jax.value_and_grad(loss)(kernel)  # our code: strict promotion
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state)
        return optax.apply_updates(kernel, updates), state, value

    kernel = ExponentialKernel(jnp.asarray(4.0, F64))
    state = opt.init(kernel)
    values = []
    for _ in range(30):
        kernel, state, value = train_step(kernel, state)
        values.append(float(value))
    assert min(values) < 1e-2 * values[0], values  # Adam overshoots and comes back: judge its best step
    assert np.all(np.isfinite(values)) and 0.25 < float(kernel.rate) < 1.0, float(kernel.rate)  # from 4 towards 0.5


def test_non_finite_kernel_parameters_are_refused_at_call_time():
    # a trained kernel (built by tree_map, not __init__) is checked where its leaves are concrete
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(5))
    block = lambda k: coupled_block(small_conv_f, z0, theta, coeffs, steps_z=2, steps_w=4, time_kernel=k)
    for kernel in (eqx.tree_at(lambda k: k.values, DiscreteKernel(jnp.ones(2, F64)), jnp.asarray([0.5, np.nan], F64)),
                   eqx.tree_at(lambda k: k.log_rate, ExponentialKernel(jnp.asarray(1.0, F64)), jnp.asarray(np.inf, F64))):  # fmt: skip
        with pytest.raises(ValueError, match=r"time_kernel.weights\(t, tau\) has kappa\[\d, \d\] = nan: its parameters are NaN or inf"):
            block(kernel)
    out = jax.jit(block)(eqx.tree_at(lambda k: k.values, DiscreteKernel(jnp.ones(2, F64)), jnp.asarray([0.5, np.nan], F64)))
    assert out.shape == z0.shape  # traced leaves: not read, no check (no cost in a jitted step)
