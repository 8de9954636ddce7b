"""Time kernels K of Eq. 2.3d, ``theta(t) = int_0^t K(t - tau) w(tau) dtau``, as quadrature weights on the weight grid.

A time kernel is a JAX pytree (learnable array leaves) with ``weights(t, tau) -> kappa``,
shape ``(len(t), len(tau))``: activation step ``n`` uses ``theta_n = sum_m kappa[n, m] w_m``
(see :meth:`AbstractTimeKernel.weights` for the grids). Kernels act on evolved leaves
only; leaves held static stay ``w0``.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "AbstractTimeKernel",
    "DiracKernel",
    "ExponentialKernel",
    "DiscreteKernel",
    "is_time_kernel",
    "check_time_kernel",
]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _real_dtype(x, name: str):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be real floating point, got dtype {dtype}")
    return dtype


def _check_scalar(x, name: str) -> None:
    if x.ndim != 0:
        raise ValueError(f"{name} has shape {x.shape}; it must be a scalar, shape ()")
    _real_dtype(x, name)


def is_time_kernel(x) -> bool:
    """Whether ``x`` is a time kernel (K of Eq. 2.3d; duck-typed: a callable ``weights``, any pytree kind).

    Examples:
      >>> is_time_kernel(DiracKernel()), is_time_kernel(None), is_time_kernel("exponential")
      (True, False, False)
    """
    return x is not None and callable(getattr(x, "weights", None))


class AbstractTimeKernel(eqx.Module):
    """Base class of the provided kernels (optional for user kernels: see :func:`is_time_kernel`)."""

    @abc.abstractmethod
    def weights(self, t, tau) -> Float[Array, "n m"]:
        """Quadrature weights ``kappa[n, m]`` of Eq. 2.3d, shape ``(len(t), len(tau))``.

        Args:
          t: concrete NumPy float64 array, ``t_n = idx_n * dt``: the time of activation
            step ``n`` on the weight grid (``idx_n`` its trajectory index, see
            :func:`anodev2_jax.trajectory.kernel_grid`).
          tau: concrete NumPy float64 array, the weight grid ``tau_m = m * dt``,
            ``m = 0..M``; ``t`` is a subset of it, so ``tau_m <= t_n`` compares exactly.

        A kernel must be causal: ``kappa[n, m] = 0`` where ``tau_m > t_n`` (i.e. ``m > idx_n``).
        The Dirac delta is ``kappa[n, idx_n] = 1``.
        """


class DiracKernel(AbstractTimeKernel):
    """``K = delta`` in Eq. 2.3d: ``theta(t_n) = w(t_n)`` (configurations 1 and 2 of the paper).

    ``coupled_block(..., time_kernel=None)`` selects the trajectory entries directly (bit
    for bit the behaviour without kernels); ``DiracKernel()`` goes through the weighted
    sum with one-hot weights and equals it to round-off. No parameters.

    Examples:
      >>> DiracKernel().weights(np.array([0.0, 0.5]), np.array([0.0, 0.25, 0.5])).tolist()
      [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """

    def weights(self, t, tau):
        t, tau = np.asarray(t), np.asarray(tau)
        return jnp.asarray(t[:, None] == tau[None, :], dtype=float)


class ExponentialKernel(AbstractTimeKernel):
    """Eq. 2.3d's normalized exponentially weighted average of the weights so far: ``dtheta/dt = rate (w - theta)``, ``theta(0) = w0``.

    Continuous form: ``K(s) = rate e^{-rate s}`` plus the mass ``e^{-rate t}`` on ``w0``
    (so the weights sum to 1: ``theta`` is an average, not a decaying integral).

    Discrete form (our choice, exact for that ODE when ``w`` is held piecewise constant at
    the *right* end of each grid interval, i.e. ``w(tau) = w_m`` on ``(tau_{m-1}, tau_m]``):
    the exponential moving average

        theta_0 = w_0,   theta_m = e^{-rate (tau_m - tau_{m-1})} theta_{m-1} + (1 - e^{-rate (tau_m - tau_{m-1})}) w_m,

    read at ``theta_n = theta_{idx_n}``, i.e.

        kappa[n, 0] = e^{-rate t_n},
        kappa[n, m] = (1 - e^{-rate (tau_m - tau_{m-1})}) e^{-rate (t_n - tau_m)},   1 <= m <= idx_n,

    and 0 for ``m > idx_n`` (causal). Each row sums to 1 (the sum telescopes); ``rate ->
    inf`` is the Dirac kernel and ``rate -> 0`` holds ``theta = w0``. Why right ends: then
    the current weight ``w(t_n)`` always enters (with weight ``1 - e^{-rate dt}``), and the
    kernel is causal on the grid; the left-end (or trapezoidal) rule would make
    ``theta_n`` ignore ``w_{idx_n}``. ``1 - e^{-x}`` is computed as ``-expm1(-x)``
    (accurate for small ``rate dt``).

    Parameterization: the learnable leaf is ``log_rate`` and ``rate = exp(log_rate)`` (a
    property), so every value a gradient step can produce is a valid kernel: a raw
    ``rate`` leaf trained under ``jit`` (where nothing can check it) could step to
    ``rate <= 0``, a kernel that amplifies old weights without bound. ``ExponentialKernel(rate)``
    keeps its meaning (it stores ``log(rate)``; a concrete ``rate`` must be finite and > 0);
    :meth:`from_log_rate` takes the log directly (the models' ``time_log_rate`` parameter,
    bit for bit). Gradients come back as an ``ExponentialKernel`` whose ``log_rate`` holds
    ``dJ/dlog_rate = rate * dJ/drate``: read ``grad.log_rate``; ``grad.rate`` (the
    exponential of a gradient) means nothing.

    Attributes:
      log_rate: learnable scalar, shape ``()``, real floating point (``rate``'s dtype).

    Examples:
      >>> kernel = ExponentialKernel(2.0)
      >>> kappa = kernel.weights(np.array([0.0, 0.5]), np.array([0.0, 0.25, 0.5]))
      >>> kappa.shape, bool(jnp.allclose(kappa.sum(axis=1), 1.0)), bool(jnp.isclose(kernel.rate, 2.0))
      ((2, 3), True, True)
    """

    log_rate: Array

    def __init__(self, rate=None, *, log_rate=None):
        """``ExponentialKernel(rate)`` with a scalar ``rate > 0``, or ``ExponentialKernel(log_rate=x)`` (see :meth:`from_log_rate`).

        Concrete values are checked (``rate`` finite and > 0, ``log_rate`` finite); traced
        ones cannot be, and need not be for ``log_rate``.
        """
        if (rate is None) == (log_rate is None):
            raise TypeError("ExponentialKernel: pass exactly one of rate (> 0) or log_rate=... (rate = exp(log_rate))")
        if log_rate is not None:
            log_rate = jnp.asarray(log_rate)
            _check_scalar(log_rate, "ExponentialKernel: log_rate")
            if _is_concrete(log_rate) and not np.isfinite(float(log_rate)):
                raise ValueError(
                    f"ExponentialKernel: log_rate={float(log_rate)} must be finite (rate = exp(log_rate) in (0, inf))"
                )
            self.log_rate = log_rate
            return
        rate = jnp.asarray(float(rate) if isinstance(rate, int) and not isinstance(rate, bool) else rate)
        _check_scalar(rate, "ExponentialKernel: rate")
        if _is_concrete(rate) and not 0.0 < float(rate) < np.inf:  # also catches NaN
            raise ValueError(
                f"ExponentialKernel: rate={float(rate)} must be finite and > 0 (rate -> 0 holds theta = w0, "
                "rate -> inf is DiracKernel()); learn it as ExponentialKernel.from_log_rate(log_rate)"
            )
        self.log_rate = jnp.log(rate)

    @classmethod
    def from_log_rate(cls, log_rate) -> "ExponentialKernel":
        """The kernel with ``rate = exp(log_rate)``, ``log_rate`` a scalar (stored as given: no ``log(exp(x))`` round trip).

        Examples:
          >>> bool(jnp.isclose(ExponentialKernel.from_log_rate(jnp.log(3.0)).rate, 3.0))
          True
        """
        return cls(log_rate=log_rate)

    @property
    def rate(self) -> Array:
        """``exp(log_rate)``, shape ``()`` (> 0 for every finite ``log_rate``)."""
        return jnp.exp(self.log_rate)

    def weights(self, t, tau):
        t, tau = np.asarray(t, np.float64), np.asarray(tau, np.float64)
        dtype = jnp.result_type(self.log_rate)
        r = self.rate
        causal = tau[None, :] <= t[:, None]
        lag = jnp.asarray(np.maximum(t[:, None] - tau[None, :], 0.0), dtype)  # clipped: no exp overflow off the support
        width = jnp.asarray(np.diff(tau), dtype)
        first = jnp.exp(-r * lag[:, :1])
        rest = -jnp.expm1(-r * width)[None, :] * jnp.exp(-r * lag[:, 1:])
        return jnp.where(causal, jnp.concatenate([first, rest], axis=1), 0)


class DiscreteKernel(AbstractTimeKernel):
    """Eq. 2.3d with one learnable weight per lag on the grid: ``kappa[n, m] = values[idx_n - m]`` for ``0 <= idx_n - m < len(values)``.

    Entries with other lags are 0 (causal by construction). ``values = (1, 0, ...)`` is the
    Dirac kernel; ``(1/L, ..., 1/L)`` a moving average of the last ``L`` weights. The
    weights are not normalized (the values are free parameters).

    Attributes:
      values: learnable, shape ``(L,)``, ``L >= 1``; ``values[k]`` weights the weight ``k``
        grid steps back. Concrete values must be finite.

    Examples:
      >>> moving_average = DiscreteKernel(jnp.asarray([0.5, 0.5]))  # theta_n = (w_{idx_n} + w_{idx_n - 1}) / 2
      >>> moving_average.weights(np.array([0.0, 0.5]), np.array([0.0, 0.25, 0.5])).tolist()
      [[0.5, 0.0, 0.0], [0.0, 0.5, 0.5]]
    """

    values: Array

    def __init__(self, values):
        values = jnp.asarray(values)
        if values.ndim != 1 or values.shape[0] < 1:
            raise ValueError(
                f"DiscreteKernel: values has shape {values.shape}; it must be rank 1, shape (L,) with L >= 1 "
                "(values[k] weights the weight k grid steps back)"
            )
        _real_dtype(values, "DiscreteKernel: values")
        if _is_concrete(values) and not np.all(np.isfinite(np.asarray(values))):
            k = int(np.argmin(np.isfinite(np.asarray(values))))
            raise ValueError(f"DiscreteKernel: values[{k}] = {float(values[k])}; every lag weight must be finite")
        self.values = values

    def weights(self, t, tau):
        t, tau = np.asarray(t, np.float64), np.asarray(tau, np.float64)
        dt = tau[1] - tau[0] if len(tau) > 1 else 1.0
        lag = np.rint((t[:, None] - tau[None, :]) / dt).astype(np.int64)
        size = self.values.shape[0]
        index = np.where((lag >= 0) & (lag < size), lag, size)  # index `size` is the padding zero
        padded = jnp.concatenate([self.values, jnp.zeros((1,), self.values.dtype)])
        return padded[index]


def check_time_kernel(kernel, t, tau, *, name: str = "time_kernel") -> None:
    """Validate a time kernel on the grid ``(t, tau)`` before any compute; raise naming the fix.

    Checks that ``kernel.weights(t, tau)`` is one real array of shape ``(len(t), len(tau))``
    (from shapes, ``jax.eval_shape``) and that it is causal. Causality is checked on values:
    the kernel's own when its leaves are concrete, otherwise (leaves traced, e.g. under
    ``jit``) on a probe with every traced leaf replaced by ones of its shape and dtype, which
    checks the kernel's zero pattern (a kernel whose support depends on its parameter
    values cannot be checked under ``jit``). With concrete leaves the weights must also be
    finite (a NaN or inf parameter is refused here, not returned as a NaN block output);
    traced leaves cost nothing here (no value is read).

    Args:
      kernel: the time kernel (any pytree with ``weights``).
      t, tau: the grids of :func:`anodev2_jax.trajectory.kernel_grid` (concrete, float64).
      name: how the error names the kernel.

    Returns:
      None; raises TypeError (not a time kernel) or ValueError (shape, dtype, causality, finiteness).

    Examples:
      >>> check_time_kernel(DiscreteKernel(jnp.asarray([0.5, 0.5])), np.array([0.0, 0.5]), np.array([0.0, 0.5]))
    """
    if not is_time_kernel(kernel):
        raise TypeError(
            f"{name}={kernel!r} is not a time kernel: use None, DiracKernel(), ExponentialKernel(rate), "
            "DiscreteKernel(values) or a pytree with weights(t, tau) -> (len(t), len(tau))"
        )
    t, tau = np.asarray(t, np.float64), np.asarray(tau, np.float64)
    want = (len(t), len(tau))
    out = jax.eval_shape(lambda k: k.weights(t, tau), kernel)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != want:
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(
            f"{name}.weights(t, tau) has shape {got}; it must be (len(t), len(tau)) = {want} "
            "(one row per activation step, one column per weight-grid point)"
        )
    _real_dtype(out, f"{name}.weights(t, tau)")
    traced = any(not _is_concrete(x) for x in jax.tree_util.tree_leaves(kernel))
    with jax.ensure_compile_time_eval():
        probe = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype) if not _is_concrete(x) else x, kernel)
        kappa = np.asarray(probe.weights(t, tau))
    if not traced and not np.all(np.isfinite(kappa)):
        n, m = np.argwhere(~np.isfinite(kappa))[0]
        raise ValueError(
            f"{name}.weights(t, tau) has kappa[{n}, {m}] = {kappa[n, m]}: its parameters are NaN or inf "
            f"(a {type(kernel).__name__}); every quadrature weight of Eq. 2.3d must be finite"
        )
    bad = np.argwhere((tau[None, :] > t[:, None]) & (kappa != 0))
    if len(bad):
        n, m = bad[0]
        raise ValueError(
            f"{name}.weights is not causal: kappa[{n}, {m}] = {kappa[n, m]} but tau_{m} = {tau[m]:g} > "
            f"t_{n} = {t[n]:g} (Eq. 2.3d integrates w over [0, t] only); make the weights 0 where tau > t"
        )
