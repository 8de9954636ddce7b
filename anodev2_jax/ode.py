"""Fixed-step ODE solvers for the activation ODE ``dz/dt = f(z, theta)`` on ``[0, 1]`` (Eq. 1.1, 2.3b).

Two families behind one call shape:

* :func:`odeint_fixed`: discretize-then-optimize (DTO). The solve is an unrolled Python
  loop of ``num_steps`` explicit steps, so ``jax.grad`` gives the *exact* gradient of the
  discrete forward pass (ANODE [9]). Memory is controlled by ``remat``:

  - ``"none"``: autodiff stores every intermediate of every step.
  - ``"block"``: ANODE's checkpointing: only the block input is kept; the whole block is
    recomputed in the backward pass (which then holds the block's full step graph).
  - ``"step"``: ``"block"`` plus a checkpoint around each step, so the backward pass keeps
    one activation per step and recomputes one step's internals at a time: memory
    ``O(num_steps * |z|)`` instead of ``O(num_steps * |internals of f|)``.

  Both are built by :func:`checkpoint`, a ``jax.custom_vjp`` that recomputes in order,
  because ``jax.checkpoint`` inside an unrolled loop saved no memory on XLA:CPU (see there).

  Loops are unrolled rather than ``lax.scan``-ned because the step counts are small and
  static and, on XLA:CPU, convolutions inside ``scan`` train about 19x slower than unrolled
  (jax-ml/jax#12868, measured again for this project, see DESIGN.md).

* :func:`odeint_diffrax`: the same fixed grid and solvers, solved by diffrax. With
  ``adjoint="backsolve"`` it is the Neural ODE of Chen et al. [8] (continuous adjoint,
  optimize-then-discretize: the gradient is *approximate*, Table 4 row [8]); with
  ``adjoint="checkpoint"`` diffrax's ``RecursiveCheckpointAdjoint`` gives the exact DTO
  gradient and serves as an independent cross-check of :func:`odeint_fixed`.

The ODE function is ``f(z, theta)``, or ``f(z, theta, args_n)`` when ``step_args`` is
given: a pytree whose leaves have a leading axis of length ``num_steps``; step ``n`` (all
its stages) receives slice ``n``. This is how a model gives each activation step its own
BatchNorm (see models.py). With ``has_aux=True``, ``f`` returns ``(dz, aux)`` and the
solver returns ``(z1, aux)`` with the aux of each step's first stage stacked on a leading
axis (aux is not differentiated: use it for statistics such as BatchNorm's batch moments).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SOLVERS", "REMAT_MODES", "checkpoint", "odeint_fixed", "odeint_diffrax", "solve_steps"]

SOLVERS = ("euler", "rk2", "rk4")
REMAT_MODES = ("none", "block", "step")

PyTree = Any


def check_num_steps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a Python int >= 1 (number of time steps on [0, 1])")


def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


def _leading_len(tree: PyTree, name: str, num_steps: int) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_steps:
            raise ValueError(
                f"{name}: every leaf needs a leading axis of length num_steps={num_steps}, "
                f"got a leaf of shape {jnp.shape(leaf)}"
            )


def _slice(tree: PyTree, n: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[n], tree)


def _call(f, z, theta, args, has_aux):
    out = f(z, theta) if args is None else f(z, theta, args)
    return out if has_aux else (out, None)


def _axpy(h, k, z):
    """``z + h * k`` keeping ``z``'s dtype (``h`` is a Python float)."""
    return z + (h * k).astype(z.dtype)


def checkpoint(fn: Callable) -> Callable:
    """Rematerialize ``fn`` in the backward pass, in order: ANODE [9] checkpointing that works unrolled.

    ``fn(*args)`` takes and returns pytrees of arrays. The forward pass keeps only the
    inputs; the backward pass recomputes ``fn`` (inside its own ``jax.vjp``) right before
    it is needed.

    Why not ``jax.checkpoint``: measured here with jax 0.10.2 on XLA:CPU, a
    ``jax.checkpoint`` around each step of an *unrolled* loop saved nothing (4 activation
    buffers per step with and without it) because XLA is free to merge the recomputation
    with the original forward computation (common-subexpression elimination) or schedule
    it early. Here the recomputation's inputs are made to depend on the incoming cotangent
    (``x + 0 * g[0]``; IEEE arithmetic forbids folding ``0 * g`` away), which both forbids
    the merge and forces the recompute to run only once its cotangent exists. Result on the
    test problem: about 1 activation buffer per step, and still unrolled, so convolutions
    keep XLA:CPU's fast path (``lax.scan`` + ``jax.checkpoint`` was 23x slower).

    Caveat: like any ``jax.custom_vjp``, the result supports reverse mode only (no
    ``jax.jvp``); use ``remat="none"`` for forward-mode differentiation.
    """

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args  # saved: the inputs only

    def bwd(args, out_bar):
        g = [x for x in jax.tree_util.tree_leaves(out_bar) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
        dep = sum(jnp.ravel(x)[0] for x in g) * jnp.zeros((), jnp.result_type(g[0])) if g else None

        def tie(x):
            if dep is None or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                return x
            return x + dep.astype(jnp.result_type(x))

        _, vjp = jax.vjp(fn, *jax.tree_util.tree_map(tie, args))  # recomputed here, after out_bar
        return vjp(out_bar)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _make_step(f, solver: str, h: float, has_aux: bool):
    """One explicit step ``z_n -> z_{n+1}`` of the chosen Runge-Kutta method."""

    def euler(z, theta, args):
        k1, aux = _call(f, z, theta, args, has_aux)
        return _axpy(h, k1, z), aux

    def rk2(z, theta, args):  # explicit midpoint
        k1, aux = _call(f, z, theta, args, has_aux)
        k2, _ = _call(f, _axpy(0.5 * h, k1, z), theta, args, has_aux)
        return _axpy(h, k2, z), aux

    def rk4(z, theta, args):
        k1, aux = _call(f, z, theta, args, has_aux)
        k2, _ = _call(f, _axpy(0.5 * h, k1, z), theta, args, has_aux)
        k3, _ = _call(f, _axpy(0.5 * h, k2, z), theta, args, has_aux)
        k4, _ = _call(f, _axpy(h, k3, z), theta, args, has_aux)
        return _axpy(h / 6.0, k1 + 2 * k2 + 2 * k3 + k4, z), aux

    return {"euler": euler, "rk2": rk2, "rk4": rk4}[solver]


def solve_steps(
    f: Callable,
    z0,
    thetas: Sequence[PyTree],
    step_args: Optional[Sequence[PyTree]],
    *,
    solver: str = "euler",
    checkpoint_steps: bool = False,
    has_aux: bool = False,
):
    """Unrolled fixed-step solve of Eq. 1.1b / 2.3b with an explicit weight pytree per step (the shared core).

    ``len(thetas)`` is the number of steps ``N`` and ``h = 1/N``. ``checkpoint_steps`` wraps
    each step in ``jax.checkpoint`` (the inner part of ``remat="step"``).

    Returns ``(z1, auxs)`` where ``auxs`` is the list of per-step aux values (Nones when
    ``has_aux`` is False).
    """
    num_steps = len(thetas)
    step = _make_step(f, solver, 1.0 / num_steps, has_aux)
    if checkpoint_steps:
        step = checkpoint(step)
    z, auxs = z0, []
    for n in range(num_steps):
        z, aux = step(z, thetas[n], None if step_args is None else step_args[n])
        auxs.append(aux)
    return z, auxs


def stack_aux(auxs: Sequence[PyTree]) -> PyTree:
    """Stack a list of per-step pytrees on a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *auxs)


def odeint_fixed(
    f: Callable,
    z0,
    theta: PyTree,
    *,
    num_steps: int,
    solver: str = "euler",
    per_step: bool = False,
    remat: str = "none",
    step_args: Optional[PyTree] = None,
    has_aux: bool = False,
):
    """Fixed-step solve of ``dz/dt = f(z, theta)`` on ``[0, 1]`` with ``h = 1/num_steps`` (Eq. 1.1b).

    Forward Euler with ``num_steps=1`` is exactly the ResNet block ``z0 + f(z0, theta)``
    (Eq. 1.1a/c). Gradients by ``jax.grad`` are exact for the discrete solve (DTO).

    Args:
      f: ``f(z, theta) -> dz`` (or ``f(z, theta, args_n)`` with ``step_args``; returning
        ``(dz, aux)`` with ``has_aux``). Must preserve the shape and dtype of ``z``.
      z0: initial activation, any array (or pytree supporting ``+`` and scalar ``*``).
      theta: weight pytree. Static (q = 0: Neural ODE / ANODE), or with ``per_step=True``
        a pytree whose leaves carry a leading axis of length ``num_steps``; step ``n`` and
        all of its stages use slice ``n``.
      num_steps: number of steps, static int >= 1.
      solver: ``"euler"`` (1st order), ``"rk2"`` (explicit midpoint, 2nd), ``"rk4"`` (4th).
      per_step: see ``theta``.
      remat: ``"none"``, ``"block"`` or ``"step"`` (see module docstring).
      step_args: optional pytree with leaves of leading axis ``num_steps``, passed to ``f``
        as its third argument, slice ``n`` at step ``n``.
      has_aux: ``f`` returns ``(dz, aux)``; the result is then ``(z1, aux)`` with aux
        stacked over steps.

    Returns:
      ``z(1)``, or ``(z(1), aux)`` with ``has_aux``.
    """
    check_num_steps("num_steps", num_steps)
    check_choice("solver", solver, SOLVERS)
    check_choice("remat", remat, REMAT_MODES)
    if per_step:
        _leading_len(theta, "theta (per_step=True)", num_steps)
    if step_args is not None:
        _leading_len(step_args, "step_args", num_steps)

    def solve(z0, theta, step_args):
        thetas = [_slice(theta, n) if per_step else theta for n in range(num_steps)]
        args = None if step_args is None else [_slice(step_args, n) for n in range(num_steps)]
        z1, auxs = solve_steps(
            f, z0, thetas, args, solver=solver, checkpoint_steps=remat == "step", has_aux=has_aux
        )
        return (z1, stack_aux(auxs)) if has_aux else z1

    if remat in ("block", "step"):
        solve = checkpoint(solve)
    return solve(z0, theta, step_args)


@functools.lru_cache(maxsize=None)
def _diffrax_rk4_class():
    """The classical 4th-order Runge-Kutta method as a diffrax explicit RK solver.

    diffrax ships no classical RK4; the tableau below is the textbook one, so diffrax's
    integrator is an independent check of :func:`odeint_fixed`'s ``"rk4"``. Built once
    (cached) so repeated solves hit diffrax's compilation cache.
    """
    import diffrax

    class ClassicalRK4(diffrax.AbstractERK):
        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return ClassicalRK4


class _VectorField(eqx.Module):
    """``(t, z, (theta, step_args)) -> f(z, theta[, args_n])``; a Module so that equal ``f``
    and ``num_steps`` compare equal and diffrax's compiled solve is reused across calls."""

    f: Callable = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    def __call__(self, t, z, args):
        theta, step_args = args
        if step_args is None:
            return self.f(z, theta)
        n = jnp.clip(jnp.round(t * self.num_steps).astype(jnp.int32), 0, self.num_steps - 1)
        return self.f(z, theta, jax.tree_util.tree_map(lambda a: a[n], step_args))


def odeint_diffrax(
    f: Callable,
    z0,
    theta: PyTree,
    *,
    num_steps: int,
    solver: str = "euler",
    adjoint: str = "backsolve",
    step_args: Optional[PyTree] = None,
):
    """Solve ``dz/dt = f(z, theta)`` on ``[0, 1]`` with diffrax on the fixed grid ``h = 1/num_steps``.

    The Neural ODE baseline of Table 4 row [8] is ``adjoint="backsolve"``: diffrax's
    ``BacksolveAdjoint`` solves the continuous adjoint equations (Eq. 2.5a with q = 0)
    backwards in time with the same fixed-step solver, reconstructing ``z(t)`` by solving
    the ODE backwards. The forward value equals :func:`odeint_fixed`'s, but the gradient
    is only an *approximation* of the gradient of the discrete forward pass (the
    optimize-then-discretize error that ANODE [9] points out); it converges to it as
    ``num_steps`` grows. ``adjoint="checkpoint"`` uses ``RecursiveCheckpointAdjoint``
    and is exact (DTO).

    Args:
      f, z0, theta, num_steps: as in :func:`odeint_fixed` (static ``theta`` only).
      solver: ``"euler"``, ``"rk2"`` (diffrax ``Midpoint``) or ``"rk4"`` (classical RK4
        built from a diffrax ``ButcherTableau``).
      adjoint: ``"backsolve"`` or ``"checkpoint"``.
      step_args: optional per-step pytree as in :func:`odeint_fixed` (Euler only); the vector
        field at time ``t`` uses slice ``clip(round(t * num_steps), 0, num_steps - 1)`` (the backward
        solve of ``"backsolve"`` evaluates at the right end of each step, one more source
        of its gradient error).

    Returns:
      ``z(1)``.
    """
    import diffrax  # local import: only this function needs it

    check_num_steps("num_steps", num_steps)
    check_choice("solver", solver, SOLVERS)
    check_choice("adjoint", adjoint, ("backsolve", "checkpoint"))
    if step_args is not None:
        _leading_len(step_args, "step_args", num_steps)
        if solver != "euler":
            # an interior stage time (t_n + h/2, t_n + h) does not identify its step: rk4's last
            # stage coincides with the start of step n + 1
            raise ValueError(
                f"odeint_diffrax: step_args need solver='euler' (got solver={solver!r}): a stage time "
                "does not identify its step; use odeint_fixed, or static weights"
            )

    dsolver = {"euler": diffrax.Euler, "rk2": diffrax.Midpoint, "rk4": _diffrax_rk4_class()}[solver]()
    adj = diffrax.BacksolveAdjoint(solver=dsolver) if adjoint == "backsolve" else diffrax.RecursiveCheckpointAdjoint()
    dtype = jnp.result_type(z0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_VectorField(f, num_steps)),
        dsolver,
        t0=jnp.asarray(0.0, dtype),
        t1=jnp.asarray(1.0, dtype),
        dt0=jnp.asarray(1.0 / num_steps, dtype),
        y0=z0,
        args=(theta, step_args),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        adjoint=adj,
        max_steps=num_steps + 1,
    )
    return sol.ys[0]
