"""RDA weight evolution against exact facts (Eq. 2.6, B.3, B.4; Appendix A)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from anodev2_jax import RDACoeffs, evolve_weights, linear_step, spectral_symbol
from anodev2_jax.rda import apply_matrix, apply_multiplier, propagator_matrix, rda_multiplier


F64 = jnp.float64


def coeffs(d=0.0, v=(0.0, 0.0), rho=0.0, dtype=F64):
    return RDACoeffs(jnp.asarray(d, dtype), jnp.asarray(v, dtype), jnp.asarray(rho, dtype))


def kernel(key, shape, dtype=F64):
    return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


def test_zero_coefficients_give_nonlinearity():
    w = kernel(0, (3, 3, 4, 5))
    out = evolve_weights(w, coeffs(), num_steps=1, dt=0.2)
    np.testing.assert_allclose(out, jnp.tanh(w), rtol=1e-14, atol=1e-14)
    out3 = evolve_weights(w, coeffs(), num_steps=3, dt=0.2)
    np.testing.assert_allclose(out3, jnp.tanh(jnp.tanh(jnp.tanh(w))), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_reaction_alone_scales_by_exp(n):
    w = kernel(1, (n, n, 2, 3))
    for steps, dt in [(1, 0.7), (4, 0.25)]:
        out = evolve_weights(w, coeffs(rho=-0.8), num_steps=steps, dt=dt, nonlinearity=None)
        np.testing.assert_allclose(out, np.exp(-0.8 * steps * dt) * np.asarray(w), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n", [3, 5, 7])
@pytest.mark.parametrize("axis", [0, 1])
def test_advection_unit_velocity_is_one_pixel_shift(n, axis):
    w = kernel(2, (n, n + 2 if axis == 1 else n, 2, 2))  # non-square too
    v = (1.0, 0.0) if axis == 0 else (0.0, 1.0)
    for steps in (1, 4):  # the exact step is a semigroup: 4 x 0.25 is the same shift
        out = evolve_weights(w, coeffs(v=v), num_steps=steps, dt=1.0 / steps, nonlinearity=None)
        # + v . grad(w) transports towards negative indices: w(x, 1) = w0(x + v)
        np.testing.assert_allclose(out, jnp.roll(w, -1, axis=axis), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [4, 6])
def test_advection_shift_on_even_sizes_without_nyquist_content(n):
    # Even sizes: the Nyquist mode has no phase to transport (module docstring); a field
    # without Nyquist content is shifted exactly.
    w = np.asarray(kernel(3, (n, n)))
    w_hat = np.fft.fft2(w)
    w_hat[n // 2, :] = 0
    w_hat[:, n // 2] = 0
    w = jnp.asarray(np.real(np.fft.ifft2(w_hat)))
    out = evolve_weights(w, coeffs(v=(1.0, 0.0)), num_steps=1, dt=1.0, nonlinearity=None)
    np.testing.assert_allclose(out, jnp.roll(w, -1, axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_diffusion_preserves_slice_means_before_nonlinearity(n):
    w = kernel(4, (n, n, 3, 2))
    out = linear_step(w, coeffs(d=0.9), 0.5)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), w.mean(axis=(0, 1)), rtol=1e-13, atol=1e-14)
    assert not np.allclose(out, w)  # it did diffuse
    # and diffusion only smooths: the variance of each slice decreases
    assert np.all(np.asarray(out.var(axis=(0, 1))) < np.asarray(w.var(axis=(0, 1))))


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_linear_step_is_a_semigroup(n):
    w = kernel(5, (n, n, 2, 3))
    c = RDACoeffs(jnp.asarray([0.1, 0.4, 0.0], F64), jnp.asarray([[0.3, -1.2], [0.0, 0.5], [2.0, 1.0]], F64), jnp.asarray([0.2, -0.3, 0.0], F64))
    two = evolve_weights(w, c, num_steps=2, dt=0.3, nonlinearity=None)
    one = evolve_weights(w, c, num_steps=1, dt=0.6, nonlinearity=None)
    np.testing.assert_allclose(two, one, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_output_is_real_for_odd_and_even_sizes(n):
    w = kernel(6, (n, n, 2, 2))
    c = coeffs(d=0.3, v=(0.7, -1.3), rho=0.1)
    # the symbol is Hermitian-symmetric, so the full complex inverse FFT is real to round-off
    m = rda_multiplier((n, n), c, 0.37, F64)
    full = np.fft.ifft2(np.asarray(m)[..., None, None] * np.fft.fft2(np.asarray(w), axes=(0, 1)), axes=(0, 1))
    assert np.max(np.abs(full.imag)) < 1e-13
    out = evolve_weights(w, c, num_steps=3, dt=0.37)
    assert out.dtype == w.dtype and out.shape == w.shape
    np.testing.assert_allclose(apply_multiplier(w, m), full.real, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_linear_step_equals_matrix_exponential_of_the_generator(n):
    # Independent check of Eq. B.3: build the real generator L = F^-1 diag(lam) F as a dense
    # matrix on the n*n grid and compare with scipy's expm(dt * L).
    c = coeffs(d=0.25, v=(0.6, -0.4), rho=-0.1)
    lam = np.asarray(spectral_symbol((n, n), c, F64)).reshape(-1)
    eye = np.eye(n * n).reshape(n * n, n, n)
    fwd = np.fft.fft2(eye, axes=(1, 2)).reshape(n * n, n * n).T  # column j = FFT of unit vector j
    gen = np.real(np.linalg.inv(fwd) @ np.diag(lam) @ fwd)
    w = np.asarray(kernel(7, (n, n)))
    expect = (scipy.linalg.expm(0.45 * gen) @ w.reshape(-1)).reshape(n, n)
    np.testing.assert_allclose(linear_step(jnp.asarray(w), c, 0.45), expect, rtol=1e-11, atol=1e-12)


def test_gaussian_diffuses_to_wider_gaussian():
    # Appendix A: a Gaussian of variance s^2 under d*Laplacian becomes one of s^2 + 2 d t.
    n, s2, d, t = 64, 4.0, 0.5, 3.0
    x = np.arange(n) - n // 2
    r2 = x[:, None] ** 2 + x[None, :] ** 2

    def gauss(var):
        return np.exp(-r2 / (2 * var)) / (2 * np.pi * var)

    out = evolve_weights(jnp.asarray(gauss(s2)), coeffs(d=d), num_steps=6, dt=t / 6, nonlinearity=None)
    expect = gauss(s2 + 2 * d * t)
    # only sampling/aliasing error of a band-limited Gaussian on a 64-point periodic grid
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-12 * expect.max())


@pytest.mark.parametrize("n", [3, 4, 5, 6])
@pytest.mark.parametrize("coeff_shape", [(), (4,), (1, 4), (3, 1), (3, 4)])
def test_matrix_and_fft_paths_agree(n, coeff_shape):
    # evolve_weights uses the propagator matrix for small coefficient batches and the FFT
    # for large ones; both must be the same exact step (and both must stay real).
    w = kernel(13, (n, n, 3, 4))
    r = np.random.default_rng(n)
    c = RDACoeffs(jnp.asarray(r.uniform(0, 0.5, coeff_shape)), jnp.asarray(r.normal(size=coeff_shape + (2,))), jnp.asarray(r.normal(scale=0.3, size=coeff_shape)))
    fft_path = w
    for _ in range(3):
        fft_path = linear_step(fft_path, c, 0.3)
    np.testing.assert_allclose(evolve_weights(w, c, num_steps=3, dt=0.3, nonlinearity=None), fft_path, rtol=1e-12, atol=1e-13)
    p = propagator_matrix((n, n), c, 0.3, F64)
    m = rda_multiplier((n, n), c, 0.3, F64)
    np.testing.assert_allclose(apply_matrix(w, p), apply_multiplier(w, m), rtol=1e-12, atol=1e-13)


def test_trajectory_stacks_all_steps_with_w0_untouched():
    w = kernel(8, (5, 5, 2, 2))
    c = coeffs(d=0.1, v=(0.2, 0.3), rho=0.05)
    traj = evolve_weights(w, c, num_steps=4, dt=0.25, trajectory=True)
    assert traj.shape == (5,) + w.shape
    np.testing.assert_array_equal(traj[0], w)
    for m in range(1, 5):
        np.testing.assert_allclose(traj[m], evolve_weights(w, c, num_steps=m, dt=0.25), rtol=1e-14, atol=1e-14)


def test_per_filter_coefficients_match_per_slice_evolution():
    w = kernel(9, (3, 3, 2, 3))
    c = RDACoeffs(jnp.asarray([0.1, 0.2, 0.3], F64), jnp.asarray([[0.1, 0.0], [0.0, -0.5], [1.0, 1.0]], F64), jnp.asarray([0.0, 0.1, -0.2], F64))
    out = evolve_weights(w, c, num_steps=2, dt=0.5)
    for j in range(3):
        cj = RDACoeffs(c.d[j], c.v[j], c.rho[j])
        np.testing.assert_allclose(out[..., j], evolve_weights(w[..., j], cj, num_steps=2, dt=0.5), rtol=1e-14, atol=1e-14)


def test_float32_kernels_evolve_in_float32():
    w = kernel(10, (3, 3, 2, 2), jnp.float32)
    out = evolve_weights(w, coeffs(d=0.1, dtype=jnp.float32), num_steps=2, dt=0.5)
    assert out.dtype == jnp.float32


def test_jit_vmap_grad_compose():
    w = kernel(11, (3, 3, 2, 2))
    ds = jnp.asarray([0.0, 0.1, 0.5], F64)

    def loss(d):
        return jnp.sum(evolve_weights(w, coeffs(d=d), num_steps=3, dt=1 / 3) ** 2)

    g = jax.jit(jax.vmap(jax.grad(loss)))(ds)
    for i in range(3):
        np.testing.assert_allclose(g[i], jax.grad(loss)(ds[i]), rtol=1e-13)


# ---- bad input: each error names the argument, its value and what is allowed -----------


@pytest.mark.parametrize(
    "w_shape, c, match",
    [
        ((5,), coeffs(), "expected rank 2"),
        ((3, 3, 2, 2, 2), coeffs(), "expected rank 2"),
        ((3, 3, 2, 4), RDACoeffs(jnp.zeros(3), jnp.zeros((3, 2)), jnp.zeros(3)), r"does not broadcast .* \(2, 4\)"),
        ((3, 3, 2, 4), RDACoeffs(jnp.zeros(4), jnp.zeros((4, 3)), jnp.zeros(4)), r"v has shape \(4, 3\)"),
        ((3, 3, 2, 4), RDACoeffs(jnp.zeros(4), jnp.zeros((4, 2)), jnp.zeros(())), "rho has shape"),
        ((3, 3, 2, 4), RDACoeffs(jnp.asarray(-0.1), jnp.zeros(2), jnp.asarray(0.0)), r"d = -0.1 is negative"),
        ((3, 3, 2, 4), RDACoeffs(jnp.asarray(np.nan), jnp.zeros(2), jnp.asarray(0.0)), "NaN"),
        # every coefficient is checked as d is, where it is concrete
        ((3, 3, 2, 4), RDACoeffs(jnp.asarray(np.inf), jnp.zeros(2), jnp.asarray(0.0)), r"coeffs.d = inf is not finite"),
        ((3, 3, 2, 4), RDACoeffs(jnp.asarray(0.1), jnp.asarray([0.0, np.nan]), jnp.asarray(0.0)), r"coeffs.v = nan is not finite"),
        ((3, 3, 2, 4), RDACoeffs(0.1, (0.0, 0.0), -np.inf), r"coeffs.rho = -inf is not finite"),
        ((3, 3, 2, 4), RDACoeffs(jnp.full(4, 0.1), jnp.zeros((4, 2)), jnp.asarray([0.0, 0.0, np.nan, 0.0])), r"coeffs.rho = nan"),
        ((0, 3), coeffs(), r"kernel has shape \(0, 3\): a spatial axis of size 0 has nothing to evolve"),
        ((3, 0, 2, 2), coeffs(), r"kernel has shape \(3, 0, 2, 2\)"),
    ],
)
def test_bad_input_raises_value_error(w_shape, c, match):
    with pytest.raises(ValueError, match=match):
        evolve_weights(jnp.zeros(w_shape), c, num_steps=1, dt=0.1)


@pytest.mark.parametrize(
    "dt, exc, match",
    [
        (-0.1, ValueError, r"dt = -0.1 is negative: a step runs forward in time"),
        (jnp.asarray(-0.5, F64), ValueError, r"dt = -0.5 is negative"),
        (np.inf, ValueError, r"dt = inf is not finite"),
        (np.nan, ValueError, r"dt = nan is not finite"),
        (jnp.ones(2), TypeError, r"dt = .* must be a real scalar"),
        (1j, TypeError, r"must be a real scalar"),
    ],
)
def test_bad_step_length(dt, exc, match):
    w = kernel(20, (3, 3, 1, 1))
    with pytest.raises(exc, match=match):
        evolve_weights(w, coeffs(d=0.1), num_steps=1, dt=dt)
    with pytest.raises(exc, match=match):
        linear_step(w, coeffs(d=0.1), dt)


def test_zero_step_length_is_the_identity_and_traced_values_are_not_checked():
    w = kernel(21, (3, 3, 2, 2))
    np.testing.assert_allclose(evolve_weights(w, coeffs(d=0.2, rho=0.3), num_steps=2, dt=0.0, nonlinearity=None), w, rtol=1e-14, atol=1e-14)
    bad = RDACoeffs(jnp.asarray(0.1, F64), jnp.asarray([np.nan, 0.0], F64), jnp.asarray(0.0, F64))
    out = jax.jit(lambda c, dt: evolve_weights(w, c, num_steps=1, dt=dt))(bad, -0.1)  # under jit: no check, no cost
    assert out.shape == w.shape


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("c_shape", [(), (2, 3)])  # the matrix path and the FFT path (per-(cin, cout) coefficients)
def test_half_precision_kernels_evolve_in_float32(dtype, c_shape):
    # there is no half-precision complex dtype: each step runs in float32 and is rounded back,
    # so after 4 steps the result is within 4 roundings (plus tanh's contraction) of float32's
    w = kernel(22, (3, 3, 2, 3), jnp.float32)
    c = RDACoeffs(jnp.full(c_shape, 0.2, jnp.float32), jnp.full(c_shape + (2,), 0.3, jnp.float32), jnp.full(c_shape, 0.1, jnp.float32))
    ref = evolve_weights(w, c, num_steps=4, dt=0.25, trajectory=True)
    out = evolve_weights(w.astype(dtype), c, num_steps=4, dt=0.25, trajectory=True)
    assert out.dtype == dtype and out.shape == ref.shape
    eps = float(jnp.finfo(dtype).eps)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) <= 5 * eps * scale
    one = linear_step(w.astype(dtype), c, 0.25)
    assert one.dtype == dtype
    assert float(jnp.max(jnp.abs(one.astype(jnp.float32) - linear_step(w, c, 0.25)))) <= 2 * eps * float(jnp.max(jnp.abs(w)))


def test_bad_types_and_steps():
    w = jnp.zeros((3, 3, 1, 1))
    with pytest.raises(TypeError, match="RDACoeffs"):
        evolve_weights(w, (0.0, (0.0, 0.0), 0.0), num_steps=1, dt=0.1)
    with pytest.raises(TypeError, match="kernel dtype"):
        evolve_weights(jnp.zeros((3, 3), jnp.int32), coeffs(), num_steps=1, dt=0.1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            evolve_weights(w, coeffs(), num_steps=bad, dt=0.1)
    with pytest.raises(TypeError, match="nonlinearity"):
        evolve_weights(w, coeffs(), num_steps=1, dt=0.1, nonlinearity="tanh")


def test_negative_d_is_not_checked_when_traced():
    # Under jit the value is unknown at trace time; the model layer guarantees d >= 0 (softplus).
    w = kernel(12, (3, 3))
    out = jax.jit(lambda d: evolve_weights(w, coeffs(d=d), num_steps=1, dt=0.1))(jnp.asarray(-0.1, F64))
    assert np.all(np.isfinite(out))
