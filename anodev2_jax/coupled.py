"""The ANODEV2 coupled block (Eq. 2.3 in full, 2.7; Appendix B): on a fixed grid, and in continuous time.

:func:`coupled_block`: weights evolve on their own grid (:mod:`anodev2_jax.trajectory`:
``steps_w`` steps of Eq. B.4 or of an evolution operator, schedules of configurations 1
and 2, optional time kernel); activations take ``steps_z`` fixed steps (:mod:`anodev2_jax.ode`).
Gradients: ``adjoint="autodiff"`` differentiates the unrolled discrete solve with
``jax.grad`` (DTO, exact); ``adjoint="discrete"`` uses the hand-written Eq. 2.5 adjoint of
:mod:`anodev2_jax.adjoint` through a ``jax.custom_vjp``. Both give the same numbers to
round-off (tested in float64). :func:`coupled_odeint_diffrax`: the coupled system solved
jointly by diffrax.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from anodev2_jax import ode
from anodev2_jax.adjoint import coupled_block_discrete
from anodev2_jax.rda import RDACoeffs
from anodev2_jax.time_kernels import DiracKernel, ExponentialKernel, check_time_kernel
from anodev2_jax.trajectory import (
    BlockSpec,
    kernel_grid,
    make_spec,
    mix_trajectories,
    split_tree,
    time_weights,
    weight_trajectories,
    weights_at_step,
)

__all__ = ["ADJOINTS", "coupled_block", "coupled_odeint_diffrax"]

ADJOINTS = ("autodiff", "discrete")

PyTree = Any

class _Missing:
    """The default of ``evolution`` / ``coeffs``: one of the two must be given (``coeffs`` is the old name)."""

    def __repr__(self) -> str:  # what help(coupled_block) shows in the signature
        return "<required>"


_MISSING = _Missing()


def _forward(f, spec: BlockSpec, z0, theta0, evolution, kernel, step_args, remat: str):
    flat_theta, flat_evo, treedef = split_tree(theta0, evolution, dt=1.0 / spec.steps_w)
    trajs = weight_trajectories(flat_theta, flat_evo, spec)
    mixed = None if kernel is None else mix_trajectories(trajs, time_weights(kernel, spec))
    thetas = [weights_at_step(flat_theta, trajs, treedef, spec, n, mixed) for n in range(spec.steps_z)]
    args = None if step_args is None else [ode.tree_slice(step_args, n) for n in range(spec.steps_z)]
    # the nested checkpoints of "step"/"binomial" take their steps' weights as inputs: the
    # trajectory (kernel-sized) is computed once per block (re)computation, not per segment
    z1, auxs = ode.solve_steps(f, z0, thetas, args, solver=spec.solver, remat=remat, has_aux=spec.has_aux)
    return (z1, ode.stack_aux(auxs)) if spec.has_aux else z1


def coupled_block(
    f: Callable,
    z0,
    theta0: PyTree,
    evolution: PyTree = _MISSING,
    *,
    steps_z: int,
    steps_w: Optional[int] = None,
    schedule: str = "aligned",
    nonlinearity: Optional[Callable] = jnp.tanh,
    time_kernel: Optional[PyTree] = None,
    remat: str = "none",
    adjoint: str = "autodiff",
    solver: str = "euler",
    step_args: Optional[PyTree] = None,
    has_aux: bool = False,
    coeffs: PyTree = _MISSING,
):
    """The ANODEV2 block: evolve the weights (Eq. 2.3c), weight them in time (Eq. 2.3d), solve the activation ODE (Eq. 2.3b).

    Computes ``z(1)`` of ``dz/dt = f(z, theta(t))`` with ``steps_z`` fixed steps, where the
    weights ``w`` of every evolved leaf of ``theta0`` take ``steps_w`` steps of
    ``dt = 1/steps_w`` (``W_0 = w0``, ``W_{m+1} = Phi(W_m)``; Eq. B.4 for ``RDACoeffs``,
    ``op.step`` for an operator) and activation step ``n`` uses ``theta_n = W_{idx_n}``
    (``idx_n`` from the schedule; ``time_kernel=None``) or ``theta_n = sum_m kappa[n, m] W_m``
    (a time kernel). ``None`` leaves are held static. ``evolution=None`` and ``steps_z=1`` is
    exactly the ResNet block ``z0 + f(z0, theta0)``.

    Input checks (before any compute; one-line TypeError / ValueError naming the argument,
    the value and the fix): ``z0`` must be floating point; the evolution tree must match
    ``theta0``'s structure; evolved kernels have rank 2-4 and non-empty spatial axes;
    concrete coefficients and operator / kernel parameters must be finite (``d >= 0``); a
    time kernel must be causal; ``f``'s output must match ``has_aux`` (a pair ``(dz, aux)``
    or one array) and ``z``'s shape. Values that are traced (under ``jit``, ``grad``,
    ``vmap``) are not read, so the checks cost nothing in a jitted training step.

    Args:
      f: ``f(z, theta) -> dz`` (``f(z, theta, args_n)`` with ``step_args``; returning
        ``(dz, aux)`` with ``has_aux``). With ``adjoint="discrete"`` ``f`` must not close over
        traced values (pass everything differentiable through ``theta0``/``step_args``).
      z0: block input, floating point, any shape (e.g. NHWC activations ``(N, H, W, C)``).
      theta0: pytree of weights ``w0`` (Eq. 2.3c initial condition); evolved leaves are
        kernels ``(kh, kw[, cin, cout])`` (HWIO).
      evolution: None (no evolution: Neural ODE/ANODE), or a pytree with ``theta0``'s
        structure whose leaves are None (static), ``RDACoeffs`` (Eq. B.4 with
        ``nonlinearity``) or evolution operators (q of Eq. 2.3c: any pytree with a callable
        ``step(w, dt)``: a NamedTuple, dataclass, ``eqx.Module``, ``flax.struct.dataclass``
        or ``nnx.Module``, or the provided ``RDAEquation``, ``LinearEvolution``,
        ``ODEEvolution``, ``mlp_evolution``; see :mod:`anodev2_jax.evolution`; their
        floating-point leaves are learnable and get gradients). Was named ``coeffs``:
        positional use and the keyword ``coeffs=`` keep working.
      steps_z: activation steps (static int >= 1).
      steps_w: weight steps of the trajectory (static int >= 1; default ``steps_z``).
      schedule: ``"aligned"`` (configuration 1) or ``"endpoints"`` (configuration 2).
      nonlinearity: ``sigma`` of Eq. B.4 for ``RDACoeffs`` leaves (default tanh) or None for
        the linear PDE; operators carry their own.
      time_kernel: None (``theta_n = W_{idx_n}``, the paper's Dirac delta, by selection) or a
        time kernel (K of Eq. 2.3d, :mod:`anodev2_jax.time_kernels`: ``DiracKernel()``,
        ``ExponentialKernel(rate)``, ``DiscreteKernel(values)`` or any pytree with
        ``weights(t, tau)``), applied to every evolved leaf; a differentiable argument (its
        array leaves get gradients, also through ``adjoint="discrete"``).
      remat: ``"none"``, ``"block"`` (ANODE: keep only the input, recompute the block,
        weight evolution included, in the backward pass), ``"step"`` (also checkpoint
        each activation step) or ``"binomial"`` (block checkpoint plus nested checkpoints
        over segments of steps: a few activations per block, each step recomputed at most
        ``ceil(log2 steps_z)`` times). See :mod:`anodev2_jax.ode`.
      adjoint: ``"autodiff"`` (``jax.grad`` through the unrolled solve) or ``"discrete"``
        (the hand-written Eq. 2.5 adjoint, Euler only, for every operator and kernel; it
        keeps one activation per step, and with any ``remat`` but ``"none"`` it keeps only
        the block input: ``"step"`` and ``"binomial"`` then act as ``"block"``, since the
        adjoint's backward pass stores its own per-step checkpoints).
      solver: ``"euler"`` (the paper), ``"rk2"`` or ``"rk4"``; all stages of step ``n`` use
        ``theta_n``.
      step_args: optional pytree, leaves with leading axis ``steps_z`` (e.g. per-step
        BatchNorm parameters); slice ``n`` is passed to ``f`` at step ``n``.
      has_aux: ``f`` returns ``(dz, aux)``; the result is ``(z1, aux)``, aux stacked over
        steps and not differentiated.
      coeffs: keyword alias of ``evolution`` (the old name).

    Returns:
      ``z(1)`` with the shape and dtype of ``z0`` (or ``(z(1), aux)``, aux with a leading
      axis of length ``steps_z``).

    Examples:
      >>> conv = lambda z, w: jax.lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> f = lambda z, theta: jnp.tanh(conv(z, theta["w"]) + theta["b"].reshape(1, 1, 1, -1))
      >>> theta0 = {"w": 0.1 * jnp.ones((3, 3, 4, 4)), "b": jnp.zeros(4)}
      >>> evolution = {"w": RDACoeffs(d=0.1, v=jnp.asarray([0.5, 0.0]), rho=0.0), "b": None}  # configuration 1
      >>> coupled_block(f, jnp.ones((2, 8, 8, 4)), theta0, evolution, steps_z=5, steps_w=5).shape
      (2, 8, 8, 4)
      >>> z1 = coupled_block(f, jnp.ones((2, 8, 8, 4)), theta0, evolution, steps_z=2, steps_w=10,
      ...                    schedule="endpoints", time_kernel=ExponentialKernel(2.0), adjoint="discrete")
    """
    if coeffs is not _MISSING:
        if evolution is not _MISSING:
            raise TypeError("coupled_block: got both evolution and coeffs (its old name); pass only evolution")
        evolution = coeffs
    elif evolution is _MISSING:
        raise TypeError(
            "coupled_block: missing the evolution argument (4th): None (no evolution) or a pytree of "
            "None / RDACoeffs / evolution operators with theta0's structure"
        )
    spec = make_spec(steps_z, steps_w, schedule, nonlinearity, solver, has_aux)
    ode.check_state(z0)
    ode.check_choice("remat", remat, ode.REMAT_MODES)
    ode.check_choice("adjoint", adjoint, ADJOINTS)
    # validate structure, coefficients, operators (by eval_shape) and the kernel before any compute
    split_tree(theta0, evolution, dt=1.0 / spec.steps_w)
    if time_kernel is not None:
        check_time_kernel(time_kernel, *kernel_grid(spec))
    if step_args is not None:
        ode.check_leading_axis(step_args, "step_args", spec.steps_z)

    if adjoint == "discrete":
        if spec.solver != "euler":
            raise ValueError(
                f"adjoint='discrete' implements Eq. 2.5 for forward Euler only, got solver={solver!r}; "
                "use solver='euler' or adjoint='autodiff'"
            )
        block = lambda z0, theta0, evo, kernel, step_args: coupled_block_discrete(f, spec, z0, theta0, evo, kernel, step_args)
    else:
        block = lambda z0, theta0, evo, kernel, step_args: _forward(f, spec, z0, theta0, evo, kernel, step_args, remat)
    if remat != "none":
        block = ode.checkpoint(block)
    return block(z0, theta0, evolution, time_kernel, step_args)


class _CoupledField(eqx.Module):
    """The joint vector field ``(t, (z, ws, thetas), args) -> (f(z, theta), [op.rhs(w)], [rate (w - theta)])``.

    A Module with static ``f`` and structure, so equal problems compare equal and diffrax's
    compiled solve is reused. Everything differentiable travels in ``y`` or ``args``.
    """

    f: Callable = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)
    evolved: tuple[int, ...] = eqx.field(static=True)
    exponential: bool = eqx.field(static=True)

    def __call__(self, t, y, args):
        z, ws, thetas = y
        static_leaves, ops, kernel = args
        leaves = list(static_leaves)
        for j, i in enumerate(self.evolved):
            leaves[i] = thetas[j] if self.exponential else ws[j]  # Dirac: theta(t) = w(t)
        dz = self.f(z, jax.tree_util.tree_unflatten(self.treedef, leaves))
        dws = [op.rhs(w) for op, w in zip(ops, ws)]
        if not self.exponential:
            return dz, dws, []
        dthetas = [kernel.rate.astype(w.dtype) * (w - th) for w, th in zip(ws, thetas)]
        return dz, dws, dthetas


def coupled_odeint_diffrax(
    f: Callable,
    z0,
    theta0: PyTree,
    evolution: PyTree,
    *,
    solver,
    t0: float = 0.0,
    t1: float = 1.0,
    dt0: Optional[float] = None,
    stepsize_controller=None,
    adjoint=None,
    time_kernel=None,
    max_steps: int = 4096,
):
    """The coupled system of Eq. 2.3 in continuous time, ``(z, w)`` (and ``theta``) solved jointly by diffrax.

    Solves, on ``[t0, t1]``,

        dz/dt = f(z, theta(t)),  dw/dt = q(w; p) = op.rhs(w)  (every evolved leaf),
        theta = w                                   (time_kernel None or DiracKernel()), or
        dtheta/dt = rate (w - theta), theta(t0) = w0  (ExponentialKernel: Eq. 2.3d's average),

    with any diffrax solver and step-size controller. Static (None) leaves stay ``w0``.

    Args:
      f: ``f(z, theta) -> dz`` (no ``step_args``/aux here).
      z0, theta0: as in :func:`coupled_block` (``z0`` floating point).
      evolution: None or a pytree with ``theta0``'s structure whose leaves are None or
        operators with ``rhs`` (``RDAEquation``, ``LinearEvolution``, ``ODEEvolution``,
        ``mlp_evolution``). ``RDACoeffs`` is rejected: Eq. B.4 is a discrete map with no
        continuous right-hand side (use ``RDAEquation``, Eq. 2.6 itself).
      solver: a diffrax solver instance (``diffrax.Euler()``, ``diffrax.Tsit5()``, ...).
      t0, t1: time interval.
      dt0: initial step (required by ``ConstantStepSize``).
      stepsize_controller: diffrax controller; None means ``diffrax.ConstantStepSize()``.
      adjoint: diffrax adjoint; None means ``diffrax.RecursiveCheckpointAdjoint()`` (exact
        gradients of the discrete solve, DTO). ``diffrax.BacksolveAdjoint()`` solves the
        continuous adjoint (Eq. 2.5, optimize-then-discretize): O(1) memory, gradient only
        approximate.
      time_kernel: None, ``DiracKernel()`` or ``ExponentialKernel(rate)``; ``DiscreteKernel``
        has no continuous form (it lives on the weight grid) and is rejected.
      max_steps: diffrax's step limit.

    Returns:
      ``z(t1)``, ``z0``'s shape and dtype. Gradients flow to ``z0``, ``theta0``, the
      operators' and the kernel's leaves (the kernel's ``log_rate``).

    Examples:
      >>> import diffrax
      >>> f = lambda z, theta: jnp.tanh(z @ theta["w"][0, 0])
      >>> theta0, evolution = {"w": 0.1 * jnp.ones((3, 3, 4, 4))}, {"w": LinearEvolution.zeros((3, 3, 4, 4))}
      >>> coupled_odeint_diffrax(f, jnp.ones((2, 4)), theta0, evolution, solver=diffrax.Tsit5(), dt0=0.25).shape
      (2, 4)
    """
    import diffrax  # local import: only this function needs it

    ode.check_state(z0)
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"coupled_odeint_diffrax: solver={solver!r} must be a diffrax solver instance, e.g. diffrax.Tsit5()")
    controller = diffrax.ConstantStepSize() if stepsize_controller is None else stepsize_controller
    adj = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    if isinstance(controller, diffrax.ConstantStepSize) and dt0 is None:
        raise ValueError(
            "coupled_odeint_diffrax: dt0=None with a constant step size; pass dt0 (e.g. 1/steps) or an adaptive "
            "stepsize_controller such as diffrax.PIDController(rtol, atol)"
        )
    if time_kernel is None or isinstance(time_kernel, DiracKernel):
        exponential = False
    elif isinstance(time_kernel, ExponentialKernel):
        exponential = True
    else:
        raise ValueError(
            f"coupled_odeint_diffrax: time_kernel={type(time_kernel).__name__} has no continuous form here; use None, "
            "DiracKernel() or ExponentialKernel(rate), or coupled_block for kernels on the weight grid (DiscreteKernel)"
        )
    flat_theta, flat_evo, treedef = split_tree(theta0, evolution)
    evolved = []
    for i, (w, op) in enumerate(zip(flat_theta, flat_evo)):
        if op is None:
            continue
        if isinstance(op, RDACoeffs):
            raise ValueError(
                "coupled_odeint_diffrax: an RDACoeffs leaf is Eq. B.4, a discrete map (exact linear step, then sigma) "
                "with no continuous right-hand side; use RDAEquation(d, v, rho) (Eq. 2.6 itself), or coupled_block"
            )
        if not callable(getattr(op, "rhs", None)):
            raise ValueError(
                f"coupled_odeint_diffrax: the operator {type(op).__name__} has no rhs(w) (only a discrete step); "
                "give it rhs(w) -> dw/dt, or use coupled_block"
            )
        out = jax.eval_shape(lambda op, w: op.rhs(w), op, w)
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != w.shape or out.dtype != w.dtype:
            raise ValueError(
                f"coupled_odeint_diffrax: {type(op).__name__}.rhs(w) must return one array of the kernel's shape "
                f"{w.shape} and dtype {w.dtype}, got {out}"
            )
        evolved.append(i)
    evolved = tuple(evolved)

    ws0 = [flat_theta[i] for i in evolved]
    y0 = (z0, ws0, list(ws0) if exponential else [])
    static_leaves = [None if i in evolved else w for i, w in enumerate(flat_theta)]
    args = (static_leaves, [flat_evo[i] for i in evolved], time_kernel if exponential else None)
    dtype = jnp.result_type(z0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_CoupledField(f, treedef, evolved, exponential)),
        solver,
        t0=jnp.asarray(t0, dtype),
        t1=jnp.asarray(t1, dtype),
        dt0=None if dt0 is None else jnp.asarray(dt0, dtype),
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        adjoint=adj,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda x: x[0], sol.ys[0])
