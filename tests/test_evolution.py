"""Evolution operators of Eq. 2.3c against exact facts: RDA Eq. 2.6 itself, linear (expm), user q, MLP; bad input."""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from anodev2_jax import (
    LinearEvolution,
    ODEEvolution,
    RDACoeffs,
    RDAEquation,
    coupled_block,
    evolve_weights,
    linear_step,
    mlp_evolution,
)
from anodev2_jax.evolution import check_operator, evolve, is_operator
from anodev2_jax.rda import align, generator_matrix, propagator_matrix, spectral_symbol, use_matrix
from anodev2_jax.trajectory import is_evolution_leaf
from flax import nnx

from helpers import (
    OPERATOR_KINDS,
    NamedTupleOp,
    make_operator_kind,
    max_rel_err,
    small_conv_f,
    small_problem,
    tiny_f,
    tiny_problem,
    user_q,
)

F64 = jnp.float64


def kernel(key, shape, dtype=F64):
    return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


def rda_eq(d=0.0, v=(0.0, 0.0), rho=0.0, **kw):
    return RDAEquation(jnp.asarray(d, F64), jnp.asarray(v, F64), jnp.asarray(rho, F64), **kw)


def slope(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


# ---- RDAEquation: Eq. 2.6 with sigma inside the right-hand side --------------------------


def test_zero_coefficients_keep_the_kernel_while_b4_shrinks_it():
    # Eq. 2.6 with d = v = rho = 0 is dw/dt = sigma(0) = 0; Eq. B.4 applies tanh every step
    w = 0.5 * kernel(0, (3, 3, 2, 2))
    np.testing.assert_array_equal(evolve(rda_eq(), w, num_steps=5, dt=0.2), w)
    b4 = evolve_weights(w, RDACoeffs(0.0, (0.0, 0.0), 0.0), num_steps=5, dt=0.2)
    assert float(jnp.max(jnp.abs(b4 - w))) > 0.05


def test_generator_matrix_exponentiates_to_the_exact_propagator():
    c = RDACoeffs(jnp.asarray(0.25, F64), jnp.asarray([0.6, -0.4], F64), jnp.asarray(-0.1, F64))
    for shape in ((3, 3), (4, 5)):
        g = np.asarray(generator_matrix(shape, c, F64))
        np.testing.assert_allclose(scipy.linalg.expm(0.45 * g), propagator_matrix(shape, c, 0.45, F64), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n", [3, 6])
def test_linear_equation_is_fourth_order_towards_the_exact_step(n):
    # sigma=None: RK4 sub-steps of dw/dt = L w converge to Eq. B.3's exact step at order 4
    c = dict(d=0.3, v=(0.7, -0.4), rho=0.1)
    w = kernel(1, (n, n, 2, 2))
    exact = linear_step(w, RDACoeffs(*(jnp.asarray(x, F64) for x in c.values())), 0.5)
    steps = [4, 8, 16, 32]  # h |lam| <= 1 (|lam| up to ~8 on the 6x6 grid): the asymptotic regime
    errs = [float(jnp.max(jnp.abs(rda_eq(**c, sigma=None, substeps=s).step(w, 0.5) - exact))) for s in steps]
    assert abs(slope(steps, errs) - 4) < 0.3, errs


def test_nonlinear_substeps_converge_at_fourth_order():
    w = kernel(2, (5, 5, 2, 3))
    op = lambda s: rda_eq(d=0.3, v=(0.8, 0.2), rho=0.5, substeps=s)
    ref = op(64).step(w, 1.0)
    steps = [1, 2, 4]
    errs = [float(jnp.max(jnp.abs(op(s).step(w, 1.0) - ref))) for s in steps]
    assert abs(slope(steps, errs) - 4) < 0.4, errs


def test_rhs_is_sigma_of_the_spectral_operator_on_matrix_and_fft_paths():
    w = kernel(3, (4, 4, 3, 5))
    r = np.random.default_rng(0)
    for shape, matrix in (((), True), ((3, 5), False)):  # scalar coefficients: generator matrix; (cin, cout): FFT
        assert use_matrix(w.shape, shape) == matrix
        d, v, rho = r.uniform(0, 0.5, shape), r.normal(size=shape + (2,)), r.normal(size=shape)
        op = RDAEquation(d, v, rho)
        c = RDACoeffs(*(jnp.asarray(x) for x in (d, v, rho)))
        sym = np.asarray(align(spectral_symbol((4, 4), c, F64), 4))
        expect = np.tanh(np.real(np.fft.ifft2(sym * np.fft.fft2(np.asarray(w), axes=(0, 1)), axes=(0, 1))))
        np.testing.assert_allclose(op.rhs(w), expect, rtol=1e-12, atol=1e-13)


def test_float32_kernels_stay_float32():
    w = kernel(4, (3, 3, 2, 2), jnp.float32)
    op = RDAEquation(jnp.asarray(0.1, jnp.float32), jnp.zeros(2, jnp.float32), jnp.asarray(0.0, jnp.float32), substeps=2)
    assert op.step(w, 0.2).dtype == jnp.float32


# ---- LinearEvolution: dw/dt = G w, exact expm step -----------------------------------------


@pytest.mark.parametrize("per_filter", [False, True])
def test_linear_step_is_the_matrix_exponential(per_filter):
    w = kernel(5, (3, 3, 2, 4))
    g = 0.5 * kernel(6, ((4,) if per_filter else ()) + (9, 9))
    op = LinearEvolution(g)
    x = np.asarray(w).reshape(9, 2, 4)
    gs = np.asarray(g) if per_filter else np.broadcast_to(np.asarray(g), (4, 9, 9))
    per = lambda mats: np.stack([mats[j] @ x[:, :, j] for j in range(4)], axis=-1).reshape(w.shape)
    np.testing.assert_allclose(op.step(w, 0.3), per([scipy.linalg.expm(0.3 * m) for m in gs]), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(op.rhs(w), per(gs), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(evolve(op, w, num_steps=2, dt=0.15), op.step(w, 0.3), rtol=1e-12, atol=1e-13)  # semigroup


def test_zero_generator_is_no_evolution_and_rda_generator_is_the_linear_rda_step():
    w = kernel(7, (3, 3, 2, 2))
    np.testing.assert_array_equal(LinearEvolution.zeros(w.shape, dtype=F64).step(w, 0.5), w)
    c = RDACoeffs(jnp.asarray(0.2, F64), jnp.asarray([0.5, -0.3], F64), jnp.asarray(0.1, F64))
    op = LinearEvolution(generator_matrix((3, 3), c, F64))
    np.testing.assert_allclose(op.step(w, 0.4), linear_step(w, c, 0.4), rtol=1e-12, atol=1e-13)


# ---- ODEEvolution and mlp_evolution ---------------------------------------------------------


def test_ode_evolution_steps_follow_their_formulas():
    q = lambda w, p: p["a"] * w
    a = jnp.asarray(-0.7, F64)
    w = kernel(8, (3, 3))
    np.testing.assert_allclose(ODEEvolution(q, {"a": a}, solver="euler").step(w, 0.1), w + 0.1 * a * w, rtol=1e-15)
    two_half = ODEEvolution(q, {"a": a}, solver="euler")
    two_half = two_half.step(two_half.step(w, 0.05), 0.05)
    np.testing.assert_allclose(ODEEvolution(q, {"a": a}, solver="euler", substeps=2).step(w, 0.1), two_half, rtol=1e-15)
    np.testing.assert_array_equal(ODEEvolution(q, {"a": a}).rhs(w), a * w)
    for solver, order in (("euler", 1), ("rk2", 2), ("rk4", 4)):
        steps = [4, 8, 16]
        errs = [float(jnp.max(jnp.abs(ODEEvolution(q, {"a": a}, solver=solver, substeps=s).step(w, 1.0) - jnp.exp(a) * w))) for s in steps]
        assert abs(slope(steps, errs) - order) < 0.15, (solver, errs)


def test_mlp_evolution_is_zero_at_init_and_acts_on_each_slice():
    op = mlp_evolution(jax.random.PRNGKey(0), (3, 3, 2, 4), 5, dtype=F64)
    assert {k: v.shape for k, v in op.params.items()} == {"w1": (9, 5), "b1": (5,), "w2": (5, 9), "b2": (9,)}
    w = kernel(9, (3, 3, 2, 4))
    np.testing.assert_array_equal(op.step(w, 0.2), w)  # last layer zero: q = 0
    moved = eqx.tree_at(lambda o: o.params["w2"], op, 0.3 * kernel(10, (5, 9)))
    out = moved.step(w, 0.2)
    assert not np.allclose(out, w)
    for i, j in ((0, 0), (1, 3)):  # the same MLP on every (cin, cout) slice
        np.testing.assert_allclose(out[:, :, i, j], moved.step(w[:, :, i : i + 1, j : j + 1], 0.2)[:, :, 0, 0], rtol=1e-14)


# ---- bad input: each raises at construction or at coupled_block, before f runs ------------


class ShapeChanging(eqx.Module):
    def step(self, w, dt):
        return w[:-1]


class DtypeChanging(eqx.Module):
    def step(self, w, dt):
        return w.astype(jnp.float32)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: rda_eq(d=-0.1), ValueError, r"RDAEquation.d = -0.1 is negative"),
        (lambda: rda_eq(substeps=0), ValueError, r"RDAEquation: substeps=0 must be a Python int >= 1"),
        (lambda: rda_eq(substeps=1.5), ValueError, r"substeps=1.5"),
        (lambda: rda_eq(substeps=True), ValueError, r"substeps=True"),
        (lambda: rda_eq(sigma="tanh"), TypeError, r"sigma='tanh' must be callable"),
        (lambda: RDAEquation(jnp.zeros(2), jnp.zeros((2, 2)), jnp.zeros(3)), ValueError, r"rho has shape \(3,\)"),
        (lambda: LinearEvolution(jnp.zeros((9, 8))), ValueError, r"generator has shape \(9, 8\).*\(K, K\) or \(cout, K, K\)"),
        (lambda: LinearEvolution(jnp.zeros(9)), ValueError, r"generator has shape \(9,\)"),
        (lambda: LinearEvolution(jnp.zeros((9, 9), jnp.int32)), TypeError, r"generator must be real floating point"),
        (lambda: ODEEvolution("sin", {}), TypeError, r"q='sin' is not callable"),
        (lambda: ODEEvolution(jnp.sin, {}, solver="dopri5"), ValueError, r"solver='dopri5' is not supported"),
        (lambda: ODEEvolution(jnp.sin, {}, substeps=-1), ValueError, r"substeps=-1"),
        (lambda: mlp_evolution(jax.random.PRNGKey(0), (3, 3, 2, 2), 0), ValueError, r"hidden=0 must be a Python int >= 1"),
        (lambda: mlp_evolution(jax.random.PRNGKey(0), (9,), 4), ValueError, r"kernel_shape=\(9,\) must have rank 2-4"),
    ],
)
def test_bad_operator_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def _block_with(evolution_w1, evolution_b=None, **kw):
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(8))
    calls = []

    def f(z, th):
        calls.append(1)
        return small_conv_f(z, th)

    try:
        coupled_block(f, z0, theta, {"w1": evolution_w1, "w2": coeffs["w2"], "b": evolution_b}, steps_z=2, steps_w=4, **kw)
    finally:
        assert not calls, "f was called before the bad input was rejected"


@pytest.mark.parametrize(
    "w1, b, match",
    [
        (ShapeChanging(), None, r"evolution\['w1'\].step\(w, dt\) returns shape \(2, 3, 3, 3\).*must return one array of the kernel's shape"),
        (DtypeChanging(), None, r"evolution\['w1'\].step\(w, dt\) returns .*dtype float32 for a kernel of shape \(3, 3, 3, 3\) dtype float64"),
        (LinearEvolution(jnp.zeros((16, 16))), None, r"evolution\['w1'\]: generator has shape \(16, 16\) but the kernel .* K = kh \* kw = 9"),
        (LinearEvolution(jnp.zeros((5, 9, 9))), None, r"per-filter generator of shape \(5, 9, 9\) needs a kernel with 5 output filters"),
        (rda_eq(d=jnp.zeros(5), v=jnp.zeros((5, 2)), rho=jnp.zeros(5)), None, r"evolution\['w1'\]: coefficient shape \(5,\) does not broadcast"),
        (None, rda_eq(), r"evolution\['b'\]: an evolution operator needs a kernel of rank 2-4"),
    ],
)
def test_bad_operator_at_call_time(w1, b, match):
    with pytest.raises(ValueError, match=match):
        _block_with(w1, b)


def test_bad_evolution_leaf_and_argument_names():
    with pytest.raises(TypeError, match=r"evolution\['w1'\] = 'rda' is not an evolution: use None"):
        _block_with("rda")
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(9))
    with pytest.raises(TypeError, match="got both evolution and coeffs"):
        coupled_block(small_conv_f, z0, theta, coeffs, coeffs=coeffs, steps_z=1)
    with pytest.raises(TypeError, match="missing the evolution argument"):
        coupled_block(small_conv_f, z0, theta, steps_z=1)
    # the old keyword still works and is the same block
    np.testing.assert_array_equal(
        coupled_block(small_conv_f, z0, theta, coeffs=coeffs, steps_z=2), coupled_block(small_conv_f, z0, theta, coeffs, steps_z=2)
    )


def test_negative_diffusion_is_not_checked_when_traced():
    w = kernel(11, (3, 3))
    out = jax.jit(lambda d: RDAEquation(d, jnp.zeros(2), jnp.asarray(0.0)).step(w, 0.1))(jnp.asarray(-0.1, F64))
    assert np.all(np.isfinite(out))


# ---- what counts as an operator: a callable step on the object itself ---------------------


class Weights(NamedTuple):
    """A user container (no step): its fields are leaves of theta0 and of the evolution tree."""

    w1: jax.Array
    w2: jax.Array
    b: jax.Array


def test_is_operator_is_a_callable_step_on_the_object_not_its_container_type():
    for kind in OPERATOR_KINDS:
        assert is_operator(make_operator_kind(kind)), kind
    assert is_operator(mlp_evolution(jax.random.PRNGKey(0), (3, 3), 2))
    containers = [(1.0, 2.0), [NamedTupleOp(1.0, 2.0)], {"step": lambda w, dt: w}, Weights(None, None, None)]
    for x in [None, RDACoeffs(0.1, (0.0, 0.0), 0.0), jnp.zeros(3)] + containers:
        assert not is_operator(x), x
    for x in containers:  # flattening the evolution tree goes into them
        assert not is_evolution_leaf(x), x
    assert is_evolution_leaf(None) and is_evolution_leaf(RDACoeffs(0.1, (0.0, 0.0), 0.0))


@pytest.mark.exact
def test_operators_inside_a_user_namedtuple_container():
    # theta0 and the evolution tree are one NamedTuple container type; the operator inside is
    # itself a NamedTuple (with step) and RDACoeffs (without): flattening stops at both
    z0, theta, coeffs = small_problem(jax.random.PRNGKey(3))
    op = make_operator_kind("namedtuple")
    as_dict = coupled_block(small_conv_f, z0, theta, {"w1": op, "w2": coeffs["w2"], "b": None}, steps_z=2, steps_w=2)
    theta_nt = Weights(theta["w1"], theta["w2"], theta["b"])
    f = lambda z, th: small_conv_f(z, th._asdict())
    block = lambda th, evo: coupled_block(f, z0, th, evo, steps_z=2, steps_w=2, adjoint="discrete")
    out = block(theta_nt, Weights(op, coeffs["w2"], None))
    np.testing.assert_allclose(out, as_dict, rtol=1e-13, atol=1e-13)
    g = jax.grad(lambda evo: jnp.sum(block(theta_nt, evo) ** 2))(Weights(op, coeffs["w2"], None))
    assert isinstance(g, Weights) and isinstance(g.w1, NamedTupleOp) and isinstance(g.w2, RDACoeffs) and g.b is None


def test_an_operator_held_by_an_nnx_module_trains_with_nnx_grad():
    # NNX-compatible: an nnx.Module with step is a JAX pytree (Flax >= 0.11), so it can also
    # live inside a model's nnx.Module and be differentiated by nnx.grad, through both adjoints
    z0, theta, _ = tiny_problem(jax.random.PRNGKey(4), "rda_coeffs")

    class Block(nnx.Module):
        def __init__(self):
            self.op = make_operator_kind("nnx")
            self.w1, self.b = nnx.Param(theta["w1"]), nnx.Param(theta["b"])

        def __call__(self, z, adjoint):
            th = {"w1": self.w1[...], "b": self.b[...]}
            return coupled_block(tiny_f, z, th, {"w1": self.op, "b": None}, steps_z=2, steps_w=2, adjoint=adjoint)

    model = Block()
    grads = {adj: nnx.grad(lambda m: jnp.sum(m(z0, adj) ** 2))(model) for adj in ("autodiff", "discrete")}
    ga, gd = (nnx.state(grads[adj]) for adj in ("autodiff", "discrete"))
    assert max_rel_err(gd, ga) <= 1e-8
    assert float(jnp.abs(ga["op"]["a"][...])) > 0 and float(jnp.abs(ga["op"]["b"][...])) > 0


def test_non_finite_operator_parameters_are_refused_naming_the_leaf():
    with pytest.raises(ValueError, match=r"LinearEvolution: generator has NaN or inf entries"):
        LinearEvolution(jnp.full((9, 9), jnp.nan))
    trained = eqx.tree_at(lambda op: op.generator, LinearEvolution.zeros((3, 3, 3, 3), dtype=F64), jnp.full((9, 9), jnp.inf))
    with pytest.raises(ValueError, match=r"evolution\['w1'\].generator has a non-finite entry \(inf\)"):
        _block_with(trained)
    with pytest.raises(ValueError, match=r"evolution\['w1'\].a has a non-finite entry \(nan\)"):
        _block_with(make_operator_kind("namedtuple", a=np.nan))
    with pytest.raises(ValueError, match=r"evolution\['w1'\].params\['b'\] has a non-finite entry \(inf\)"):
        _block_with(ODEEvolution(user_q, {"a": jnp.asarray(0.1), "b": jnp.asarray(np.inf)}))
    with pytest.raises(ValueError, match=r"RDAEquation.v = inf is not finite"):
        rda_eq(v=(np.inf, 0.0))
    # traced parameters are not read (no check, no cost under jit)
    w = kernel(12, (3, 3, 3, 3))
    out = jax.jit(lambda g: LinearEvolution(g).step(w, 0.1))(jnp.zeros((9, 9), F64))
    np.testing.assert_allclose(out, w, rtol=1e-14)


def test_empty_kernel_is_refused():
    with pytest.raises(ValueError, match=r"the kernel has shape \(0, 3\): a spatial axis of size 0"):
        check_operator(LinearEvolution.zeros((3, 3)), jnp.zeros((0, 3)), 0.5, name="evolution['w']")


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_kernels_evolve_in_float32(dtype):
    # no half-precision complex or expm: the step runs in float32 and is rounded back once
    w = kernel(13, (3, 3, 2, 2), jnp.float32)
    ops = [RDAEquation(jnp.asarray(0.2, jnp.float32), jnp.asarray([0.3, -0.1], jnp.float32), jnp.asarray(0.1, jnp.float32)),
           LinearEvolution(0.3 * kernel(14, (9, 9), jnp.float32))]  # fmt: skip
    eps = float(jnp.finfo(dtype).eps)
    for op in ops:
        w_half = w.astype(dtype)
        out = op.step(w_half, 0.25)
        ref = op.step(w_half.astype(jnp.float32), 0.25)  # the same input, in float32
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), ref.astype(dtype).astype(jnp.float32), rtol=0, atol=0)  # one rounding
        assert float(jnp.max(jnp.abs(op.rhs(w_half).astype(jnp.float32) - op.rhs(w_half.astype(jnp.float32))))) <= 4 * eps
