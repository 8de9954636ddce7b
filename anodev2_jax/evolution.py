"""Evolution operators: the weight network ``dw/dt = q(w; p)`` of Eq. 2.3c (RDA Eq. 2.6, linear, any q, MLP).

The operator contract. An evolution operator is any JAX pytree with a callable
``step(w, dt) -> w_next``: one step on the weight grid, returning one array of ``w``'s
shape and dtype (``dt`` is a Python float, ``1 / steps_w`` in ``coupled_block``) and,
where it has one, ``rhs(w) -> dw/dt`` (for ``coupled_odeint_diffrax``). Its floating-point
leaves are its learnable parameters ``p`` and get gradients through both adjoints
(``jax.grad`` and the hand-written Eq. 2.5 adjoint, which takes one ``jax.vjp`` of
``step`` per weight step); anything that must stay static (a sub-step count, a function)
must not be a leaf: a ``meta_fields`` entry of ``jax.tree_util.register_dataclass``,
``eqx.field(static=True)``, ``flax.struct.field(pytree_node=False)``, a plain attribute of
an ``nnx.Module`` (a NamedTuple has no static fields: every field is a leaf). Optional:
``check(w, *, name)`` to validate the operator against its kernel before any compute.

What counts: an object with a callable ``step``, whatever its pytree kind
(:func:`is_operator`): a ``typing.NamedTuple`` or dataclass with a ``step`` method, an
``eqx.Module``, a ``flax.struct.dataclass``, a Flax NNX ``nnx.Module`` (a JAX pytree since
Flax 0.11, so it also works inside ``nnx.jit`` / ``nnx.grad``). A plain tuple, list or dict
has no ``step``: it is a container of operators, matched against ``theta0``'s structure.
``RDACoeffs`` (Eq. B.4, a discrete map, no ``step``) is not an operator:
:mod:`anodev2_jax.trajectory` handles it and keeps its analytic adjoint.

Example (a NamedTuple operator, ``dw/dt = -a w`` stepped exactly):

    >>> from typing import NamedTuple
    >>> from anodev2_jax import coupled_block
    >>> class Decay(NamedTuple):
    ...     a: jax.Array
    ...     def step(self, w, dt):
    ...         return w * jnp.exp(-self.a * dt).astype(w.dtype)
    >>> f = lambda z, th: jnp.tanh(z @ th["w"][0, 0])
    >>> theta0 = {"w": jnp.ones((3, 3, 4, 4)) / 4, "b": jnp.zeros(4)}
    >>> evolution = {"w": Decay(jnp.asarray(0.5)), "b": None}  # the bias is held static
    >>> loss = lambda evo: jnp.sum(coupled_block(f, jnp.ones((2, 4)), theta0, evo, steps_z=2, adjoint="discrete"))
    >>> type(jax.grad(loss)(evolution)["w"]).__name__  # the gradient is a Decay holding dJ/da
    'Decay'
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from anodev2_jax import ode
from anodev2_jax.rda import (
    RDACoeffs,
    apply_matrix,
    apply_multiplier,
    check_coeffs,
    check_kernel,
    compute_dtype,
    generator_matrix,
    spectral_symbol,
    use_matrix,
)

__all__ = [
    "AbstractEvolution",
    "RDAEquation",
    "LinearEvolution",
    "ODEEvolution",
    "MLPField",
    "mlp_evolution",
    "is_operator",
    "check_operator",
    "check_substeps",
    "evolve",
]

PyTree = Any


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_substeps(value, *, name: str = "substeps") -> None:
    """Raise a ValueError unless ``value`` is a Python int >= 1 (sub-steps per weight step).

    Examples:
      >>> check_substeps(2)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a Python int >= 1 (solver sub-steps per weight step)")


def is_operator(x) -> bool:
    """Whether ``x`` is an evolution operator (the weight network q of Eq. 2.3c): anything with a callable ``step``.

    Duck-typed on purpose: a user operator needs no base class. Any pytree kind qualifies,
    a ``typing.NamedTuple`` or a dataclass (``jax.tree_util.register_dataclass``,
    ``flax.struct.dataclass``) with a ``step`` method, an ``equinox.Module``, a Flax NNX
    ``nnx.Module`` (a JAX pytree since Flax 0.11; its ``nnx.Param`` values are the leaves).
    The test is on the object itself, not on its container type: a plain tuple, list or
    dict has no ``step`` and is a container of operators, while a NamedTuple subclass that
    defines ``step`` is one operator (flattening stops at it, see
    :func:`anodev2_jax.trajectory.is_evolution_leaf`). ``RDACoeffs`` (a NamedTuple without
    ``step``) is not an operator: the trajectory module handles it (Eq. B.4). An optional
    ``check(w, *, name)`` validates the operator against its kernel. The provided
    operators subclass :class:`AbstractEvolution`.

    Args:
      x: any Python object.

    Returns:
      True when ``x`` is not None, not an ``RDACoeffs`` and ``x.step`` is callable.

    Examples:
      >>> from typing import NamedTuple
      >>> class Decay(NamedTuple):  # dw/dt = -a w, stepped exactly
      ...     a: jax.Array
      ...     def step(self, w, dt):
      ...         return w * jnp.exp(-self.a * dt).astype(w.dtype)
      >>> is_operator(Decay(jnp.asarray(0.5))), is_operator((1.0, 2.0)), is_operator({"w": None})
      (True, False, False)
    """
    if x is None or isinstance(x, RDACoeffs):
        return False
    return callable(getattr(x, "step", None))


def check_operator(op, w, dt: float, *, name: str) -> None:
    """Validate operator ``op`` against the kernel ``w`` it evolves, before any compute.

    Checks the kernel (rank 2-4, non-empty spatial axes, floating point), that every
    concrete floating-point leaf of ``op`` is finite (traced leaves, under ``jit``, are not
    read: no cost in a jitted step), runs ``op.check(w, name=name)`` when the operator has
    one, and checks from shapes only (``jax.eval_shape``) that ``op.step(w, dt)`` returns
    one array of ``w``'s shape and dtype.

    Args:
      op: the operator (see :func:`is_operator`). w: its kernel ``(kh, kw[, cin, cout])``.
      dt: the weight step length. name: how errors name the operator (e.g. ``evolution['w1']``).

    Returns:
      None; raises ValueError / TypeError naming ``name`` and the fix.

    Examples:
      >>> check_operator(LinearEvolution.zeros((3, 3)), jnp.zeros((3, 3)), 0.5, name="evolution['w']")
    """
    if not hasattr(w, "ndim") or not 2 <= w.ndim <= 4:
        raise ValueError(
            f"{name}: an evolution operator needs a kernel of rank 2-4 (kh, kw[, cin, cout]), got shape "
            f"{jnp.shape(w)}; give this leaf None to hold it static"
        )
    check_kernel(w, name=f"{name}: the kernel")
    for path, leaf in jax.tree_util.tree_flatten_with_path(op)[0]:
        if _is_concrete(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            a = np.asarray(leaf)
            if not np.all(np.isfinite(a)):
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} has a non-finite entry ({a[~np.isfinite(a)].flat[0]}): "
                    "every parameter of an evolution operator must be finite"
                )
    if callable(getattr(op, "check", None)):
        op.check(w, name=name)
    out = jax.eval_shape(lambda op, w: op.step(w, dt), op, w)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != w.shape or out.dtype != w.dtype:
        got = f"shape {out.shape} dtype {out.dtype}" if isinstance(out, jax.ShapeDtypeStruct) else f"a {type(out).__name__}"
        raise ValueError(
            f"{name}.step(w, dt) returns {got} for a kernel of shape {w.shape} dtype {w.dtype}; an "
            "evolution step must return one array of the kernel's shape and dtype (e.g. cast with .astype(w.dtype))"
        )


def evolve(op, w0: Float[Array, "kh kw ..."], *, num_steps: int, dt: float, trajectory: bool = False):
    """``num_steps`` steps of ``op`` from ``w0`` (Eq. 2.3c on the grid ``tau_m = m dt``).

    Args:
      op: an evolution operator. w0: kernel ``(kh, kw[, cin, cout])``.
      num_steps: Python int >= 0. dt: step length. trajectory: return every step.

    Returns:
      The final kernel (``w0``'s shape and dtype), or with ``trajectory=True`` all
      ``num_steps + 1`` kernels stacked on a new leading axis (index 0 is ``w0`` itself).

    Examples:
      >>> evolve(LinearEvolution.zeros((3, 3)), jnp.ones((3, 3)), num_steps=2, dt=0.5, trajectory=True).shape
      (3, 3, 3)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps={num_steps!r} must be a non-negative Python int")
    ws = [w0]
    for _ in range(num_steps):
        ws.append(op.step(ws[-1], dt))
    return jnp.stack(ws) if trajectory else ws[-1]


def _spatial_matmul(g, w):
    """``g @ w`` over the row-major flattened spatial values (the values of :func:`anodev2_jax.rda.apply_matrix`).

    Written as a 2-D matmul (one ``(K, K)`` generator) or a batched one (``(cout, K, K)``,
    one per output filter) because XLA:CPU runs their gradients much faster than the
    einsum's (measured on a 5x5x64x64 kernel, float32: one RK4 step of ``RDAEquation``,
    forward 4.1 -> 1.4 ms and gradient 12.1 -> 2.1 ms; per filter, four products 2.0 ->
    0.9 ms forward, 4.9 -> 2.9 ms gradient). Other generator shapes use ``apply_matrix``.
    """
    k = w.shape[0] * w.shape[1]
    if g.ndim == 2:
        return (g @ w.reshape(k, -1)).reshape(w.shape)
    if g.ndim == 3 and w.ndim >= 3 and g.shape[0] == w.shape[-1]:
        x = jnp.moveaxis(w.reshape(k, -1, w.shape[-1]), -1, 0)  # (cout, K, rest)
        return jnp.moveaxis(g @ x, 0, -1).reshape(w.shape)
    return apply_matrix(w, g)


def _step_length(dt, substeps: int, dtype):
    h = dt / substeps
    # a Python float keeps ode.axpy's weak typing; an array must be the kernel's dtype (strict promotion)
    return h if isinstance(h, (int, float)) else jnp.asarray(h, dtype)


class AbstractEvolution(eqx.Module):
    """Base class of the provided operators (optional for user operators: see :func:`is_operator`).

    An ``eqx.Module`` with an abstract ``step`` and a default ``check`` that checks nothing.

    Examples:
      >>> class Scale(AbstractEvolution):  # dw/dt = c w, stepped exactly
      ...     c: jax.Array
      ...     def step(self, w, dt):
      ...         return w * jnp.exp(self.c * dt).astype(w.dtype)
      >>> is_operator(Scale(jnp.asarray(0.1)))
      True
    """

    @abc.abstractmethod
    def step(self, w, dt):
        """One step ``w(tau) -> w(tau + dt)`` of the weight ODE (same shape and dtype as ``w``)."""

    def check(self, w, *, name: str) -> None:
        """Validate against the kernel ``w`` before any compute (shapes only); the default checks nothing."""


class RDAEquation(AbstractEvolution):
    """Eq. 2.6 itself: ``dw/dt = sigma(d Lap w + v . grad w + rho w)``, sigma inside the right-hand side.

    Solved by ``substeps`` classical RK4 sub-steps per weight step. The linear operator is
    the one of :mod:`anodev2_jax.rda` (same symbol ``lam``, same periodic unit grid and
    Nyquist convention, real output), applied as its real ``(kh*kw) x (kh*kw)`` generator
    matrix (built once per ``step`` call; one small matmul per RK stage) for kernel-sized
    grids and as a Fourier multiplier otherwise (:func:`anodev2_jax.rda.use_matrix`).

    Unlike Eq. B.4 (``RDACoeffs``: the exact linear step followed by ``sigma``), this is a
    consistent discretization of Eq. 2.6: with ``d = v = rho = 0`` it keeps ``w`` constant
    (``sigma(0) = 0``), while B.4 applies ``sigma`` every step (``benchmarks/rda_consistency.py``).

    Attributes:
      d, v, rho: learnable coefficients as in ``RDACoeffs`` (shapes ``S``, ``S + (2,)``,
        ``S``; ``S`` broadcastable to the kernel's channel axes). A concrete negative ``d``
        is rejected; parameterize a learned ``d`` with softplus.
      sigma: elementwise nonlinearity with ``sigma(0) = 0`` (default tanh), or None for
        the linear equation ``dw/dt = L w``. Static.
      substeps: RK4 sub-steps per weight step (static int >= 1).

    Concrete ``d``, ``v``, ``rho`` must be finite (and ``d >= 0``). float16 / bfloat16
    kernels are stepped in float32 and rounded back once per step.

    Examples:
      >>> op = RDAEquation(d=0.1, v=jnp.asarray([0.5, 0.0]), rho=0.0, substeps=2)
      >>> op.step(jnp.ones((3, 3, 2, 4)), 0.2).shape
      (3, 3, 2, 4)
    """

    d: Array
    v: Array
    rho: Array
    sigma: Optional[Callable] = eqx.field(static=True)
    substeps: int = eqx.field(static=True)

    def __init__(self, d, v, rho, sigma: Optional[Callable] = jnp.tanh, substeps: int = 1):
        if sigma is not None and not callable(sigma):
            raise TypeError(f"RDAEquation: sigma={sigma!r} must be callable or None (linear equation)")
        check_substeps(substeps, name="RDAEquation: substeps")
        self.d, self.v, self.rho = jnp.asarray(d), jnp.asarray(v), jnp.asarray(rho)
        self.sigma = sigma
        self.substeps = int(substeps)
        # shapes of d, v, rho against each other, real dtypes, concrete d >= 0 (the kernel comes in check)
        check_coeffs(self.coeffs, (1, 1) + jnp.shape(self.d), name="RDAEquation")

    @property
    def coeffs(self) -> RDACoeffs:
        """The coefficients as an ``RDACoeffs`` (the same symbol as Eq. B.4's linear part)."""
        return RDACoeffs(self.d, self.v, self.rho)

    def check(self, w, *, name: str) -> None:
        check_coeffs(self.coeffs, w.shape, name=name)

    def _linear(self, w) -> Callable:
        """``x -> L x`` for kernels shaped like ``w``: the generator matrix or the multiplier, built once."""
        if use_matrix(w.shape, jnp.shape(self.d)):
            g = generator_matrix(w.shape[:2], self.coeffs, w.dtype)
            return lambda x: _spatial_matmul(g, x)
        lam = spectral_symbol(w.shape[:2], self.coeffs, w.dtype)
        return lambda x: apply_multiplier(x, lam)

    def _field(self, w) -> Callable:
        linear = self._linear(w)
        sigma = self.sigma
        return (lambda x, _: linear(x)) if sigma is None else (lambda x, _: sigma(linear(x)))

    def rhs(self, w):
        """``sigma(L w)``: the right-hand side of Eq. 2.6 (``w``'s shape and dtype; half precision computes in float32)."""
        x = w.astype(compute_dtype(w.dtype))
        return self._field(x)(x, None).astype(w.dtype)

    def step(self, w, dt):
        """``substeps`` RK4 steps of length ``dt / substeps`` (float16 / bfloat16 kernels in float32, rounded back once)."""
        x = w.astype(compute_dtype(w.dtype))  # a no-op for float32 / float64
        step = ode.make_step(self._field(x), "rk4", _step_length(dt, self.substeps, x.dtype), False)
        for _ in range(self.substeps):
            x, _ = step(x, None, None)
        return x.astype(w.dtype)


@jax.custom_vjp
def _expm(a):
    return jax.scipy.linalg.expm(a)


def _expm_fwd(a):
    return jax.scipy.linalg.expm(a), a  # saved: the argument only


def _expm_bwd(a, c):
    # The VJP of expm at A is the Frechet derivative at A^T applied to the cotangent,
    # L(A^T, C), read off the block-triangular identity expm([[X, E], [0, X]]) = [[e^X, L(X, E)], [0, e^X]]
    # (Higham, Functions of Matrices, Thm. 3.6): one 2K x 2K expm, no autodiff through
    # expm's Pade selection and scan of conditional squarings (measured: half the compile
    # time of a 3-step trajectory's gradient, same values to 2e-16).
    k = a.shape[-1]
    at = jnp.swapaxes(a, -1, -2)
    top = jnp.concatenate([at, c], axis=-1)
    bottom = jnp.concatenate([jnp.zeros_like(a), at], axis=-1)
    return (jax.scipy.linalg.expm(jnp.concatenate([top, bottom], axis=-2))[..., :k, k:],)


_expm.defvjp(_expm_fwd, _expm_bwd)


class LinearEvolution(AbstractEvolution):
    """A learnable linear weight ODE ``dw/dt = G w`` (Eq. 2.3c with a linear q) on each kernel slice's ``kh*kw`` spatial values.

    ``w`` is flattened row-major over its two spatial axes (as
    :func:`anodev2_jax.rda.propagator_matrix`), so ``G`` acts on ``w.reshape(kh*kw, ...)``.
    The step is exact: ``w(tau + dt) = expm(dt G) w`` (``jax.scipy.linalg.expm``). ``G = 0``
    is no evolution. The RDA operator without ``sigma`` is the special case
    ``G = rda.generator_matrix(...)``. The gradient of ``expm`` is its adjoint Frechet
    derivative (one ``2K x 2K`` expm, a ``jax.custom_vjp``), so ``step`` supports reverse
    mode only (no ``jax.jvp``; ``rhs`` has no such limit).

    Attributes:
      generator: ``G``, shape ``(K, K)`` (one generator for every slice) or ``(cout, K, K)``
        (one per output filter), ``K = kh * kw``; real floating point, finite where concrete.

    Examples:
      >>> op = LinearEvolution(0.1 * jnp.eye(9))  # dw/dt = 0.1 w: every value grows by e^{0.1 dt}
      >>> round(float(op.step(jnp.ones((3, 3)), 1.0)[0, 0]), 6)
      1.105171
    """

    generator: Array

    def __init__(self, generator):
        g = jnp.asarray(generator)
        if g.ndim not in (2, 3) or g.shape[-1] != g.shape[-2]:
            raise ValueError(
                f"LinearEvolution: generator has shape {g.shape}; it must be (K, K) or (cout, K, K) "
                "with K = kh * kw (square over the flattened spatial values)"
            )
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"LinearEvolution: generator must be real floating point, got dtype {g.dtype}")
        if _is_concrete(g) and not np.all(np.isfinite(np.asarray(g))):
            raise ValueError("LinearEvolution: generator has NaN or inf entries; every entry of G must be finite")
        self.generator = g

    @classmethod
    def zeros(cls, kernel_shape: tuple[int, ...], *, per_filter: bool = False, dtype=jnp.float32) -> "LinearEvolution":
        """``G = 0`` (no evolution) for kernels of ``kernel_shape``; ``per_filter`` gives one ``G`` per output filter.

        Examples:
          >>> LinearEvolution.zeros((3, 3, 2, 4), per_filter=True).generator.shape
          (4, 9, 9)
        """
        k = int(kernel_shape[0]) * int(kernel_shape[1])
        shape = ((int(kernel_shape[-1]),) if per_filter else ()) + (k, k)
        return cls(jnp.zeros(shape, dtype))

    def check(self, w, *, name: str) -> None:
        k = w.shape[0] * w.shape[1]
        g = self.generator.shape
        if g[-1] != k:
            raise ValueError(
                f"{name}: generator has shape {g} but the kernel {w.shape} has K = kh * kw = {k} spatial "
                f"values; use shape ({k}, {k}) or (cout, {k}, {k})"
            )
        if len(g) == 3 and (w.ndim < 3 or g[0] != w.shape[-1]):
            raise ValueError(
                f"{name}: per-filter generator of shape {g} needs a kernel with {g[0]} output filters "
                f"(last axis), got kernel shape {w.shape}; use shape (cout, {k}, {k}) with cout = w.shape[-1]"
            )

    def rhs(self, w):
        """``G w`` (``w``'s shape and dtype)."""
        return _spatial_matmul(self.generator.astype(w.dtype), w)

    def step(self, w, dt):
        """``expm(dt G) w`` (float16 / bfloat16 kernels: the exponential and product in float32, rounded back)."""
        cdt = compute_dtype(w.dtype)
        p = _expm(jnp.asarray(dt, cdt) * self.generator.astype(cdt))
        return _spatial_matmul(p, w.astype(cdt)).astype(w.dtype)


class ODEEvolution(AbstractEvolution):
    """Any weight ODE ``dw/dt = q(w, params)``, stepped by an explicit Runge-Kutta method.

    ``step`` takes ``substeps`` steps of ``solver`` (``"euler"``, ``"rk2"`` = explicit
    midpoint, ``"rk4"``; the formulas of :func:`anodev2_jax.ode.make_step`) of length
    ``dt / substeps``; ``rhs(w) = q(w, params)``.

    Attributes:
      params: pytree of learnable arrays (the ``p`` of Eq. 2.3c).
      q: ``q(w, params) -> dw/dt`` with ``w``'s shape (static: it must not close over traced
        values; pass everything learnable through ``params``).
      solver, substeps: static.

    Examples:
      >>> q = lambda w, p: p["a"] * jnp.tanh(w)  # a learnable reaction
      >>> op = ODEEvolution(q, {"a": jnp.asarray(-0.5)}, solver="rk4", substeps=2)
      >>> op.step(jnp.ones((3, 3)), 0.25).shape, op.rhs(jnp.ones((3, 3))).shape
      ((3, 3), (3, 3))
    """

    params: PyTree
    q: Callable = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    substeps: int = eqx.field(static=True)

    def __init__(self, q: Callable, params: PyTree, solver: str = "rk4", substeps: int = 1):
        if not callable(q):
            raise TypeError(f"ODEEvolution: q={q!r} is not callable; pass a function q(w, params) -> dw/dt")
        ode.check_choice("ODEEvolution: solver", solver, ode.SOLVERS)
        check_substeps(substeps, name="ODEEvolution: substeps")
        self.params = params
        self.q = q
        self.solver = solver
        self.substeps = int(substeps)

    def rhs(self, w):
        """``q(w, params)``."""
        return self.q(w, self.params)

    def step(self, w, dt):
        step = ode.make_step(self.q, self.solver, _step_length(dt, self.substeps, w.dtype), False)
        for _ in range(self.substeps):
            w, _ = step(w, self.params, None)
        return w


@dataclasses.dataclass(frozen=True)
class MLPField:
    """``q(w, params)`` of :func:`mlp_evolution`: a one-hidden-layer MLP on every kernel slice's ``kh*kw`` values.

    ``x = w.reshape(K, -1)`` (one column per ``(cin, cout)`` slice, ``K = kh * kw``);
    ``q = W2^T activation(W1^T x + b1) + b2``, reshaped back. A frozen dataclass, so equal
    fields compare equal and jit caches hit across calls.

    Examples:
      >>> params = {"w1": jnp.ones((9, 2)), "b1": jnp.zeros(2), "w2": jnp.zeros((2, 9)), "b2": jnp.zeros(9)}
      >>> MLPField()(jnp.ones((3, 3, 2, 4)), params).shape  # zero last layer: q = 0
      (3, 3, 2, 4)
    """

    activation: Callable = jnp.tanh

    def __call__(self, w, params):
        k = w.shape[0] * w.shape[1]
        x = w.reshape((k, -1))
        cast = lambda a: a.astype(w.dtype)
        hidden = self.activation(cast(params["w1"]).T @ x + cast(params["b1"])[:, None])
        out = cast(params["w2"]).T @ hidden + cast(params["b2"])[:, None]
        return out.reshape(w.shape)


def mlp_evolution(
    key,
    kernel_shape: tuple[int, ...],
    hidden: int,
    *,
    activation: Callable = jnp.tanh,
    solver: str = "rk4",
    substeps: int = 1,
    dtype=jnp.float32,
) -> ODEEvolution:
    """A hypernetwork-style weight ODE (Eq. 2.3c with q a small neural network): :class:`MLPField` in an :class:`ODEEvolution`.

    The same MLP ``R^K -> R^K`` (``K = kh * kw``, ``hidden`` units) acts on every
    ``(cin, cout)`` slice. ``W1`` is LeCun-normal (std ``1/sqrt(K)``), ``b1 = 0``; the last
    layer ``W2, b2`` is zero, so ``q = 0`` at initialization: no evolution until trained.

    Args:
      key: PRNG key for ``W1``.
      kernel_shape: shape of the kernel it will evolve (rank 2-4, spatial axes first).
      hidden: hidden units (int >= 1).
      activation: hidden-layer nonlinearity (static).
      solver, substeps: as in :class:`ODEEvolution`.
      dtype: parameter dtype.

    Returns:
      An ``ODEEvolution`` with ``params = {"w1": (K, hidden), "b1": (hidden,), "w2": (hidden, K), "b2": (K,)}``.

    Examples:
      >>> op = mlp_evolution(jax.random.PRNGKey(0), (3, 3, 2, 4), hidden=8)
      >>> op.params["w1"].shape, bool(jnp.all(op.step(jnp.ones((3, 3, 2, 4)), 0.2) == 1))  # q = 0 at init
      ((9, 8), True)
    """
    if not 2 <= len(kernel_shape) <= 4:
        raise ValueError(f"mlp_evolution: kernel_shape={tuple(kernel_shape)} must have rank 2-4 (kh, kw[, cin, cout])")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ValueError(f"mlp_evolution: hidden={hidden!r} must be a Python int >= 1 (hidden units)")
    if not callable(activation):
        raise TypeError(f"mlp_evolution: activation={activation!r} must be callable")
    k = int(kernel_shape[0]) * int(kernel_shape[1])
    params = {
        "w1": jax.random.normal(key, (k, hidden), dtype) * (1.0 / float(np.sqrt(k))),
        "b1": jnp.zeros((hidden,), dtype),
        "w2": jnp.zeros((hidden, k), dtype),
        "b2": jnp.zeros((k,), dtype),
    }
    return ODEEvolution(MLPField(activation), params, solver=solver, substeps=substeps)
