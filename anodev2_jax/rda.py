"""Reaction-diffusion-advection (RDA) evolution of convolution kernels (Eq. 2.6, 2.7, B.3, B.4).

A kernel ``w`` of Flax layout HWIO ``(kh, kw, cin, cout)`` is a field on a periodic,
unit-spaced ``kh x kw`` grid (one field per ``(cin, cout)`` slice). It evolves by

    dw/dt = sigma(d * Laplacian(w) + v . grad(w) + rho * w)          (Eq. 2.6)

With constant coefficients the linear part has the exact Fourier-space solution (Eq. B.3)

    w(t0 + dt) = IFFT2( exp(dt * lam(k)) * FFT2(w(t0)) ),
    lam(k) = -d |k|^2 + i (k . v) + rho,          k = 2 pi fftfreq(n) on each spatial axis,

and one step with the nonlinearity applies ``sigma`` after the exact linear step (Eq. B.4).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float

__all__ = [
    "RDACoeffs",
    "wavenumbers",
    "spectral_symbol",
    "rda_multiplier",
    "propagator_matrix",
    "generator_matrix",
    "use_matrix",
    "apply_multiplier",
    "apply_matrix",
    "align",
    "linear_step",
    "evolve_weights",
    "check_coeffs",
    "check_kernel",
    "check_step_length",
    "compute_dtype",
]

Nonlinearity = Optional[Callable[[Array], Array]]


class RDACoeffs(NamedTuple):
    """Coefficients of the RDA operator of Eq. 2.6 for one kernel (a pytree).

    Attributes:
      d: diffusion, must be ``>= 0``. Shape ``()`` (one scalar per kernel) or any shape
        ``S`` broadcastable to the kernel's channel axes ``(cin, cout)`` (per-filter
        coefficients, e.g. ``(cout,)`` or ``(cin, cout)``).
      v: advection velocity, shape ``S + (2,)``; ``v[..., 0]`` pairs with kernel axis 0
        (``kh``) and ``v[..., 1]`` with axis 1 (``kw``).
      rho: reaction (exponential growth/decay rate), shape ``S``.

    Every concrete coefficient must be finite (and ``d >= 0``): :func:`check_coeffs` refuses
    NaN and inf where it can read the values; under ``jit`` they are traced and not read.
    ``RDACoeffs`` is a leaf of ``coupled_block``'s evolution tree (Eq. B.4 with the block's
    ``nonlinearity``), not an evolution operator (it has no ``step``).

    Examples:
      >>> c = RDACoeffs(d=0.1, v=jnp.asarray([0.5, -0.2]), rho=0.0)  # one scalar set per kernel
      >>> per_filter = RDACoeffs(jnp.full(4, 0.1), jnp.zeros((4, 2)), jnp.zeros(4))  # one per output filter
      >>> evolve_weights(jnp.ones((3, 3, 2, 4)), per_filter, num_steps=2, dt=0.5).shape
      (3, 3, 2, 4)
    """

    d: ArrayLike
    v: ArrayLike
    rho: ArrayLike

    @classmethod
    def zeros(cls, shape: tuple[int, ...] = (), dtype=jnp.float32) -> "RDACoeffs":
        """Coefficients of the identity evolution (``d = v = rho = 0``) of batch shape ``shape``.

        Examples:
          >>> RDACoeffs.zeros((4,)).v.shape
          (4, 2)
        """
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape + (2,), dtype), jnp.zeros(shape, dtype))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_coeffs(coeffs: RDACoeffs, kernel_shape: tuple[int, ...], *, name: str = "coeffs") -> None:
    """Validate RDA coefficients against a kernel shape; raise a ValueError/TypeError naming the fix.

    Checks that ``coeffs`` is an ``RDACoeffs``, that ``d`` and ``rho`` share one batch shape
    ``S`` broadcastable to the channel axes ``kernel_shape[2:]``, that ``v`` has shape
    ``S + (2,)``, and that a concrete (non-traced) ``d`` is non-negative.
    """
    if not isinstance(coeffs, RDACoeffs):
        raise TypeError(f"{name} must be an RDACoeffs(d, v, rho), got {type(coeffs).__name__}")
    d, v, rho = (np.shape(c) for c in coeffs)
    channel_shape = tuple(kernel_shape[2:])
    if d != rho:
        raise ValueError(f"{name}: d has shape {d} but rho has shape {rho}; they must match")
    if v != d + (2,):
        raise ValueError(
            f"{name}: v has shape {v}; it must be d.shape + (2,) = {d + (2,)} "
            "(one velocity per spatial axis)"
        )
    try:
        fits = len(d) <= len(channel_shape) and np.broadcast_shapes(d, channel_shape) == channel_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name}: coefficient shape {d} does not broadcast to the kernel's channel axes "
            f"{channel_shape}; use scalars or a shape like (cout,) or (cin, cout)"
        )
    for field in ("d", "v", "rho"):
        value = getattr(coeffs, field)
        dt = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)):
            raise TypeError(f"{name}.{field} must be real (floating point), got dtype {dt}")
    if _is_concrete(coeffs.d):
        d_min = float(np.min(np.asarray(coeffs.d)))
        if not d_min >= 0.0:  # also catches NaN
            raise ValueError(
                f"{name}.d = {d_min} is negative (or NaN): diffusion must be >= 0 "
                "(backward diffusion is ill-posed); parameterize d with softplus when learning it"
            )
    for field in ("d", "v", "rho"):
        value = getattr(coeffs, field)
        if _is_concrete(value):
            bad = _first_non_finite(value)
            if bad is not None:
                raise ValueError(
                    f"{name}.{field} = {bad} is not finite: every RDA coefficient must be a finite real number "
                    "(the exact step exp(dt * lam) would be NaN or inf)"
                )


def _first_non_finite(x) -> Optional[float]:
    """The first NaN/inf entry of a concrete array-like, or None when every entry is finite."""
    a = np.asarray(x)
    if a.dtype.kind not in "fc" or np.all(np.isfinite(a)):
        return None
    return a[~np.isfinite(a)].flat[0].item()


def check_step_length(dt, *, name: str = "dt") -> None:
    """Refuse a concrete step length that is negative or not finite (traced ``dt`` is not checked).

    ``dt < 0`` runs the RDA step backwards in time, ``exp(-dt d |k|^2)``: backward
    diffusion, which amplifies the highest frequencies without bound (refused for the same
    reason as ``d < 0``). ``dt = 0`` is the identity.

    Args:
      dt: the step length (Python number or array).
      name: how the error names it.

    Returns:
      None; raises ValueError naming the value and the fix.

    Examples:
      >>> check_step_length(0.25)
      >>> check_step_length(-0.25)
      Traceback (most recent call last):
      ValueError: dt = -0.25 is negative: a step runs forward in time (dt >= 0; dt < 0 is backward diffusion, ill-posed); use dt = 1 / num_steps
    """
    if isinstance(dt, jax.core.Tracer):
        return
    a = np.asarray(dt)
    if a.dtype.kind not in "iuf" or a.ndim != 0:
        raise TypeError(f"{name} = {dt!r} must be a real scalar (a step length), got {a.dtype} of shape {a.shape}")
    value = a.item()
    if not np.isfinite(value):
        raise ValueError(f"{name} = {value} is not finite; use a finite step length such as dt = 1 / num_steps")
    if value < 0:
        raise ValueError(
            f"{name} = {value} is negative: a step runs forward in time (dt >= 0; dt < 0 is backward diffusion, "
            "ill-posed); use dt = 1 / num_steps"
        )


def compute_dtype(dtype):
    """The real dtype the FFT and the exact step run in for a kernel of ``dtype``: float32 for float16 / bfloat16.

    There is no half-precision complex type (``jnp.fft`` and ``lax.complex`` accept float32
    and float64 only), so a half-precision kernel is evolved in float32 and each step's
    result is rounded back to the kernel's dtype: each step then adds one rounding to half
    precision (relative ``2^-11`` for float16, ``2^-8`` for bfloat16) on top of the float32
    step. float32 and float64 kernels run in their own dtype, unchanged.

    Examples:
      >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.float32)
      (dtype('float32'), dtype('float32'))
    """
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)) else dtype


def wavenumbers(n: int, dtype=jnp.float32) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """Angular wavenumbers ``k = 2 pi fftfreq(n)`` of a periodic unit grid of ``n`` points.

    Returns ``(k, k_adv)`` where ``k_adv`` equals ``k`` except that the Nyquist bin of an
    even ``n`` is 0.

    Why (the paper is silent): on an even grid the Nyquist wavenumber ``k = -pi`` has no
    sign: a real field's Nyquist coefficient is real, and ``exp(i k v dt)`` would give it an
    imaginary part that the inverse FFT cannot represent as a real kernel. We use the usual
    spectral convention for odd derivatives and set the *advection* wavenumber of the
    Nyquist bin to 0 (diffusion and reaction keep it). The discrete generator is then a
    real matrix, the exact step is real for every size and the semigroup property
    ``step(dt)^2 == step(2 dt)`` holds exactly. The one consequence: on even sizes the
    Nyquist component is not transported (a pure one-pixel shift is exact for odd sizes,
    and for even sizes on fields without Nyquist content).
    """
    k = 2.0 * np.pi * np.fft.fftfreq(n)
    k_adv = k.copy()
    if n % 2 == 0:
        k_adv[n // 2] = 0.0
    return jnp.asarray(k, dtype), jnp.asarray(k_adv, dtype)


def spectral_symbol(spatial_shape: tuple[int, int], coeffs: RDACoeffs, dtype=jnp.float32) -> Complex[Array, "kh kw ..."]:
    """The symbol ``lam(k) = -d |k|^2 + i (k . v) + rho`` of the linear RDA operator (Eq. B.2).

    Args:
      spatial_shape: ``(kh, kw)``.
      coeffs: ``RDACoeffs`` with batch shape ``S``.
      dtype: real dtype of the kernel (float32 -> complex64, float64 -> complex128; float16
        and bfloat16 -> complex64, see :func:`compute_dtype`).

    Returns:
      Complex array of shape ``(kh, kw) + S``.

    Examples:
      >>> lam = spectral_symbol((3, 3), RDACoeffs(0.1, jnp.zeros(2), 0.0))
      >>> lam.shape, lam.dtype, float(lam[0, 0].real)  # k = 0: no diffusion, no advection
      ((3, 3), dtype('complex64'), 0.0)

    Sign of advection: ``+ v . grad(w)`` transports the field towards *negative* indices:
    with ``v = (1, 0)`` and ``t = 1`` the exact step is ``roll(w, -1, axis=0)``. The
    coefficients are cast to the kernel's real ``dtype``, so a float32 kernel evolves in
    complex64 and a float64 kernel in complex128.
    """
    kh, kw = spatial_shape
    dtype = compute_dtype(dtype)
    k0, k0_adv = wavenumbers(kh, dtype)
    k1, k1_adv = wavenumbers(kw, dtype)
    d = jnp.asarray(coeffs.d, dtype)
    v = jnp.asarray(coeffs.v, dtype)
    rho = jnp.asarray(coeffs.rho, dtype)
    extra = (1,) * d.ndim
    ksq = (k0[:, None] ** 2 + k1[None, :] ** 2).reshape((kh, kw) + extra)
    k0_adv = k0_adv.reshape((kh, 1) + extra)
    k1_adv = k1_adv.reshape((1, kw) + extra)
    lift = lambda c: c.reshape((1, 1) + c.shape)  # explicit ranks: no implicit rank promotion
    real = -lift(d) * ksq + lift(rho)
    imag = k0_adv * lift(v[..., 0]) + k1_adv * lift(v[..., 1])
    real, imag = jnp.broadcast_arrays(real, imag)
    return jax.lax.complex(real, imag)


def rda_multiplier(spatial_shape: tuple[int, int], coeffs: RDACoeffs, dt, dtype=jnp.float32) -> Complex[Array, "kh kw ..."]:
    """The exact propagator ``exp(dt * lam(k))`` of one linear RDA step (Eq. B.3).

    Args:
      spatial_shape: ``(kh, kw)``. coeffs: ``RDACoeffs`` of batch shape ``S``. dt: step length.
      dtype: the kernel's real dtype (half precision computes in float32: :func:`compute_dtype`).

    Returns:
      Complex array of shape ``(kh, kw) + S``.

    Examples:
      >>> rda_multiplier((4, 4), RDACoeffs(0.1, jnp.zeros(2), 0.0), 0.5).shape
      (4, 4)
    """
    lam = spectral_symbol(spatial_shape, coeffs, dtype)
    return jnp.exp(lam * jnp.asarray(dt, compute_dtype(dtype)).astype(lam.dtype))


def align(m: Array, ndim: int) -> Array:
    """Reshape a ``(kh, kw) + S`` multiplier to broadcast against a kernel of rank ``ndim``."""
    s = m.shape[2:]
    return m.reshape(m.shape[:2] + (1,) * (ndim - 2 - len(s)) + s)


def apply_multiplier(w: Float[Array, "kh kw ..."], m: Complex[Array, "kh kw ..."]) -> Float[Array, "kh kw ..."]:
    """``Re IFFT2(m * FFT2(w))`` over the two leading (spatial) axes (the Fourier-space step of Eq. B.3).

    For a Hermitian-symmetric ``m`` (every symbol built by :func:`spectral_symbol`) the
    imaginary part is round-off and taking the real part is exact. A float16 / bfloat16
    ``w`` is transformed in float32 and the result rounded back (:func:`compute_dtype`).

    Args:
      w: kernel, shape ``(kh, kw, ...)``. m: multiplier, shape ``(kh, kw) + S`` (:func:`align` places ``S``).

    Returns:
      Array of ``w``'s shape and dtype.

    Examples:
      >>> w = jnp.arange(9.0).reshape(3, 3)
      >>> m = rda_multiplier((3, 3), RDACoeffs.zeros(), 0.5, w.dtype)  # lam = 0: m = 1, the identity
      >>> bool(jnp.allclose(apply_multiplier(w, m), w))
      True
    """
    w_hat = jnp.fft.fft2(w.astype(compute_dtype(w.dtype)), axes=(0, 1))
    return jnp.real(jnp.fft.ifft2(align(m, w.ndim) * w_hat, axes=(0, 1))).astype(w.dtype)


def _dft_matrix(n: int) -> np.ndarray:
    m = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(m, m) / n)


def propagator_matrix(spatial_shape: tuple[int, int], coeffs: RDACoeffs, dt, dtype=jnp.float32) -> Float[Array, "... K K"]:
    """The exact linear RDA step as a real ``(kh*kw) x (kh*kw)`` matrix (Eq. B.3 in matrix form).

    ``P = Re(F^-1 diag(exp(dt lam)) F)`` with ``F`` the 2-D DFT matrix on the row-major
    flattened ``kh x kw`` grid, so ``P @ w.reshape(kh*kw, ...)`` equals
    ``IFFT2(exp(dt lam) FFT2(w))``. Returns shape ``S + (K, K)`` for coefficients of batch
    shape ``S``.
    """
    kh, kw = spatial_shape
    f = np.kron(_dft_matrix(kh), _dft_matrix(kw))
    m = rda_multiplier(spatial_shape, coeffs, dt, dtype)
    s = m.shape[2:]
    m = m.reshape((kh * kw,) + s)
    p = jnp.einsum("pk,k...,kq->...pq", jnp.asarray(np.conj(f) / (kh * kw), m.dtype), m, jnp.asarray(f, m.dtype))
    return jnp.real(p).astype(dtype)


def generator_matrix(spatial_shape: tuple[int, int], coeffs: RDACoeffs, dtype=jnp.float32) -> Float[Array, "... K K"]:
    """The linear RDA operator ``d Lap + v . grad + rho`` itself as a real ``(kh*kw) x (kh*kw)`` matrix (Eq. B.2).

    ``L = Re(F^-1 diag(lam) F)`` on the row-major flattened ``kh x kw`` grid (as
    :func:`propagator_matrix`), so ``L @ w.reshape(kh*kw, ...)`` equals
    ``Re IFFT2(lam FFT2(w))`` and ``expm(dt L)`` is :func:`propagator_matrix`. Returns shape
    ``S + (K, K)`` for coefficients of batch shape ``S``.
    """
    kh, kw = spatial_shape
    f = np.kron(_dft_matrix(kh), _dft_matrix(kw))
    lam = spectral_symbol(spatial_shape, coeffs, dtype)
    s = lam.shape[2:]
    lam = lam.reshape((kh * kw,) + s)
    g = jnp.einsum("pk,k...,kq->...pq", jnp.asarray(np.conj(f) / (kh * kw), lam.dtype), lam, jnp.asarray(f, lam.dtype))
    return jnp.real(g).astype(dtype)


def use_matrix(kernel_shape: tuple[int, ...], coeff_shape: tuple[int, ...]) -> bool:
    """Whether :func:`evolve_weights` applies the exact step as the matrix ``P`` or by FFT.

    (Also used by :class:`anodev2_jax.evolution.RDAEquation` for its generator.)

    Both are the same exact solution (the tests check one against the other). For 3x3 and
    5x5 kernels one small matrix product per step is about 10x faster than XLA's FFT on CPU
    (64x64x5x5, 5 steps: 13.5 ms -> 1.3 ms here, ``benchmarks/core.py``); coefficient arrays
    as large as ``(cin, cout)`` use the FFT.
    """
    # Building P costs K^3 per coefficient set and applying it K^2 per channel slice, against
    # O(K log K) for the FFT: worth it for kernel-sized grids (K <= 64, up to 8x8) unless there
    # are more coefficient sets than channel slices / K (e.g. (cin, cout) arrays).
    k = kernel_shape[0] * kernel_shape[1]
    return k <= 64 and int(np.prod(coeff_shape)) * k <= max(k, int(np.prod(kernel_shape[2:])))


def apply_matrix(w: Float[Array, "kh kw ..."], p: Float[Array, "... K K"]) -> Float[Array, "kh kw ..."]:
    """``P @ w`` over the flattened spatial axes (Eq. B.3 in matrix form), ``P`` of batch shape ``S`` aligned to the channels."""
    kh, kw = w.shape[:2]
    nc = w.ndim - 2
    s = p.shape[:-2]
    letters = "abcd"[:nc]
    aligned = (1,) * (nc - len(s)) + s
    keep = [i for i in range(nc) if aligned[i] != 1]
    p = p.reshape(tuple(aligned[i] for i in keep) + p.shape[-2:])
    sub_p = "".join(letters[i] for i in keep) + "pq"
    x = w.reshape((kh * kw,) + w.shape[2:])
    out = jnp.einsum(f"{sub_p},q{letters}->p{letters}", p, x)
    return out.reshape(w.shape).astype(w.dtype)


def linear_step(w: Float[Array, "kh kw ..."], coeffs: RDACoeffs, dt) -> Float[Array, "kh kw ..."]:
    """One exact linear RDA step of length ``dt`` (Eq. B.3): ``IFFT2(exp(dt lam) FFT2(w))``.

    Args:
      w: kernel ``(kh, kw[, cin, cout])``, real floating point (half precision runs in float32).
      coeffs: ``RDACoeffs`` (finite; ``d >= 0``). dt: step length (a concrete one must be finite, ``>= 0``).

    Returns:
      The kernel after the step, ``w``'s shape and dtype.

    Examples:
      >>> w = jnp.zeros((3, 3)).at[1, 1].set(1.0)
      >>> round(float(linear_step(w, RDACoeffs(0.0, jnp.zeros(2), 1.0), 0.5)[1, 1]), 6)  # pure reaction: e^{rho dt}
      1.648721
    """
    check_kernel(w)
    check_coeffs(coeffs, w.shape)
    check_step_length(dt)
    return apply_multiplier(w, rda_multiplier(w.shape[:2], coeffs, dt, w.dtype))


def check_kernel(w, *, name: str = "kernel") -> None:
    """Validate a kernel that evolves: rank 2-4 with the two spatial axes first (HWIO), non-empty, real floating point.

    Args:
      w: the kernel, shape ``(kh, kw)``, ``(kh, kw, c)`` or ``(kh, kw, cin, cout)``.
      name: how the error names it.

    Returns:
      None; raises ValueError (shape) or TypeError (dtype) naming the fix.

    Examples:
      >>> check_kernel(jnp.zeros((3, 3, 2, 4)))
      >>> check_kernel(jnp.zeros((0, 3)))
      Traceback (most recent call last):
      ValueError: kernel has shape (0, 3): a spatial axis of size 0 has nothing to evolve; both spatial axes (kh, kw) must have size >= 1
    """
    if not hasattr(w, "ndim") or not 2 <= w.ndim <= 4:
        shape = getattr(w, "shape", type(w).__name__)
        raise ValueError(
            f"{name} has shape {shape}: expected rank 2 (kh, kw), 3 or 4 (kh, kw, cin, cout) "
            "with the two spatial axes first (Flax HWIO layout)"
        )
    if min(w.shape[:2]) < 1:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}: a spatial axis of size 0 has nothing to evolve; "
            "both spatial axes (kh, kw) must have size >= 1"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} dtype must be real floating point, got {w.dtype}")


def evolve_weights(
    w0: Float[Array, "kh kw ..."],
    coeffs: RDACoeffs,
    *,
    num_steps: int,
    dt,
    nonlinearity: Nonlinearity = jnp.tanh,
    trajectory: bool = False,
) -> Float[Array, "kh kw ..."] | Float[Array, "steps+1 kh kw ..."]:
    """Evolve a kernel by ``num_steps`` RDA steps (Eq. 2.7 / B.4).

    Each step is ``w <- nonlinearity(IFFT2(exp(dt * lam) * FFT2(w)))`` over the two spatial
    axes, ``lam = -d |k|^2 + i (k . v) + rho``. With ``nonlinearity=None`` this is the exact
    solution of the linear PDE (Eq. B.3), a semigroup in ``dt``.

    Args:
      w0: kernel, shape ``(kh, kw)`` or HWIO ``(kh, kw, cin, cout)`` (both spatial sizes
        ``>= 1``); real floating dtype. float16 / bfloat16 kernels are evolved in float32
        and every step's result is rounded back to ``w0``'s dtype (:func:`compute_dtype`).
      coeffs: ``RDACoeffs``; scalars per kernel or arrays broadcastable to ``(cin, cout)``.
        Concrete coefficients must be finite and ``d >= 0`` (``ValueError``); traced ones
        (under ``jit``) are not checked.
      num_steps: number of steps (static int, ``>= 0``).
      dt: step length (the paper uses ``1 / num_steps``); a concrete ``dt`` must be finite
        and ``>= 0`` (``dt < 0`` is backward diffusion).
      nonlinearity: elementwise ``sigma`` applied after each linear step, or None.
      trajectory: if True return all ``num_steps + 1`` kernels stacked on a new leading
        axis; index 0 is ``w0`` itself, untouched.

    Returns:
      The final kernel (same shape and dtype as ``w0``), or the stacked trajectory, shape
      ``(num_steps + 1,) + w0.shape``.

    Examples:
      >>> w0 = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
      >>> c = RDACoeffs(d=0.1, v=jnp.asarray([0.5, 0.0]), rho=0.0)
      >>> evolve_weights(w0, c, num_steps=5, dt=0.2, trajectory=True).shape
      (6, 3, 3, 2, 4)
    """
    check_kernel(w0)
    check_coeffs(coeffs, w0.shape)
    check_step_length(dt)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be a non-negative Python int")
    if nonlinearity is not None and not callable(nonlinearity):
        raise TypeError(f"nonlinearity={nonlinearity!r} must be callable or None")
    # The propagator is built once and reused by every step, in the compute dtype (float32
    # for half-precision kernels, else the kernel's own: then the casts below are no-ops).
    cdt = compute_dtype(w0.dtype)
    if use_matrix(w0.shape, np.shape(coeffs.d)):
        p = propagator_matrix(w0.shape[:2], coeffs, dt, cdt)
        step = lambda w: apply_matrix(w, p)
    else:
        m = rda_multiplier(w0.shape[:2], coeffs, dt, cdt)
        step = lambda w: apply_multiplier(w, m)
    ws = [w0]
    w = w0
    for _ in range(num_steps):
        u = step(w.astype(cdt))
        if nonlinearity is not None:
            u = nonlinearity(u)
        w = u.astype(w0.dtype)
        ws.append(w)
    return jnp.stack(ws) if trajectory else w
