"""The ANODEV2 coupled block: RDA weight trajectory + activation solve (Eq. 2.3, 2.7; Appendix B).

Weights ``w`` (the conv kernels with RDA coefficients) evolve by ``steps_w`` RDA steps of
``dt = 1/steps_w`` (:func:`anodev2_jax.rda.evolve_weights`); activations take ``steps_z``
forward-Euler steps of ``h = 1/steps_z``, step ``n`` using the trajectory entry
``round(tau_n * steps_w)`` (K in Eq. 2.3d is a Dirac delta: ``theta(t) = w(t)``):

* ``schedule="aligned"`` (configuration 1, Eq. 2.7): ``tau_n = n / steps_z``; needs
  ``steps_w`` to be a multiple of ``steps_z``. ``steps_z = steps_w = 5`` is the paper's.
* ``schedule="endpoints"`` (configuration 2, Appendix B): ``tau_n = n / (steps_z - 1)``
  (``tau_0 = 0`` if ``steps_z == 1``). ``steps_z = 2, steps_w = 10`` is the paper's: the
  first step uses ``w(0)``, the second ``w(1)`` after 10 RDA steps.

Only the trajectory entries that some activation step uses are computed (configuration 1
with 5/5 evolves 4 steps, not 5: ``w(1)`` is never applied).

Gradients: ``adjoint="autodiff"`` differentiates the unrolled discrete solve with
``jax.grad`` (DTO, exact); ``adjoint="discrete"`` uses the hand-written Eq. 2.5 adjoint of
:mod:`anodev2_jax.adjoint` through a ``jax.custom_vjp``. Both give the same numbers to
round-off (tested in float64).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import ode
from anodev2_jax.rda import RDACoeffs, check_coeffs, evolve_weights

__all__ = ["SCHEDULES", "ADJOINTS", "trajectory_indices", "coupled_block", "BlockSpec"]

SCHEDULES = ("aligned", "endpoints")
ADJOINTS = ("autodiff", "discrete")

PyTree = Any


def trajectory_indices(steps_z: int, steps_w: int, schedule: str) -> tuple[int, ...]:
    """Index into the weight trajectory used by each activation step (Eq. 2.7, Appendix B; length ``steps_z``).

    ``idx_n = round(tau_n * steps_w)`` with ``tau_n`` as in the module docstring.
    """
    ode.check_num_steps("steps_z", steps_z)
    ode.check_num_steps("steps_w", steps_w)
    ode.check_choice("schedule", schedule, SCHEDULES)
    if schedule == "aligned":
        if steps_w % steps_z:
            raise ValueError(
                f"steps_w={steps_w} is not a multiple of steps_z={steps_z}, which schedule='aligned' "
                "needs (activation step n uses w(n/steps_z)); use steps_w = k * steps_z or "
                "schedule='endpoints'"
            )
        return tuple(n * (steps_w // steps_z) for n in range(steps_z))
    if steps_z == 1:
        return (0,)
    # exact integer round-half-up of n * steps_w / (steps_z - 1)
    return tuple((2 * n * steps_w + (steps_z - 1)) // (2 * (steps_z - 1)) for n in range(steps_z))


class BlockSpec(NamedTuple):
    """Static description of a coupled block (hashable, so it can be a nondiff argument)."""

    steps_z: int
    steps_w: int
    indices: tuple[int, ...]
    nonlinearity: Optional[Callable]
    solver: str
    has_aux: bool

    @property
    def num_rda_steps(self) -> int:
        """RDA steps actually needed: the largest trajectory index any activation step uses."""
        return max(self.indices)


def _is_coeff_leaf(x) -> bool:
    return x is None or isinstance(x, RDACoeffs)


def split_tree(theta0: PyTree, coeffs: PyTree):
    """Flatten ``theta0`` up to the structure of ``coeffs`` (``RDACoeffs``/None leaves).

    Returns ``(flat_theta, flat_coeffs, treedef)``; ``coeffs=None`` means no evolution.
    """
    if coeffs is None:
        flat_theta, treedef = jax.tree_util.tree_flatten(theta0)
        return flat_theta, [None] * len(flat_theta), treedef
    flat_coeffs, treedef = jax.tree_util.tree_flatten(coeffs, is_leaf=_is_coeff_leaf)
    try:
        flat_theta = treedef.flatten_up_to(theta0)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "coeffs must have the structure of theta0, with an RDACoeffs for each evolved kernel "
            f"and None for each static leaf; got coeffs structure {treedef} ({e})"
        ) from None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(coeffs, is_leaf=_is_coeff_leaf)[0]]
    for path, w, c in zip(paths, flat_theta, flat_coeffs):
        if c is not None:
            if not hasattr(w, "ndim") or not 2 <= w.ndim <= 4:
                raise ValueError(
                    f"theta0{path} has RDACoeffs but shape {jnp.shape(w)}: only kernels of rank 2-4 "
                    "(kh, kw[, cin, cout]) can evolve; give it None in coeffs to hold it static"
                )
            check_coeffs(c, w.shape, name=f"coeffs{path}")
    return flat_theta, flat_coeffs, treedef


def weight_trajectories(flat_theta, flat_coeffs, spec: BlockSpec):
    """Per-leaf weight trajectories ``[W_0, ..., W_M]`` (lists) for evolved leaves, None for static."""
    dt = 1.0 / spec.steps_w
    out = []
    for w, c in zip(flat_theta, flat_coeffs):
        if c is None:
            out.append(None)
        else:
            traj = evolve_weights(
                w, c, num_steps=spec.num_rda_steps, dt=dt, nonlinearity=spec.nonlinearity, trajectory=True
            )
            out.append([traj[m] for m in range(spec.num_rda_steps + 1)])
    return out


def weights_at_step(flat_theta, trajs, treedef, spec: BlockSpec, n: int) -> PyTree:
    """The weight pytree ``theta(tau_n)`` that activation step ``n`` uses."""
    m = spec.indices[n]
    leaves = [w if t is None else t[m] for w, t in zip(flat_theta, trajs)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _forward(f, spec: BlockSpec, z0, theta0, coeffs, step_args, remat: str):
    flat_theta, flat_coeffs, treedef = split_tree(theta0, coeffs)
    trajs = weight_trajectories(flat_theta, flat_coeffs, spec)
    thetas = [weights_at_step(flat_theta, trajs, treedef, spec, n) for n in range(spec.steps_z)]
    args = None if step_args is None else [ode._slice(step_args, n) for n in range(spec.steps_z)]
    # the nested checkpoints of "step"/"binomial" take their steps' weights as inputs: the
    # trajectory (kernel-sized) is computed once per block (re)computation, not per segment
    z1, auxs = ode.solve_steps(f, z0, thetas, args, solver=spec.solver, remat=remat, has_aux=spec.has_aux)
    return (z1, ode.stack_aux(auxs)) if spec.has_aux else z1


def make_spec(steps_z, steps_w, schedule, nonlinearity, solver, has_aux) -> BlockSpec:
    ode.check_choice("solver", solver, ode.SOLVERS)
    if nonlinearity is not None and not callable(nonlinearity):
        raise TypeError(f"nonlinearity={nonlinearity!r} must be callable or None")
    steps_w = steps_z if steps_w is None else steps_w
    indices = trajectory_indices(steps_z, steps_w, schedule)
    return BlockSpec(int(steps_z), int(steps_w), indices, nonlinearity, solver, bool(has_aux))


def coupled_block(
    f: Callable,
    z0,
    theta0: PyTree,
    coeffs: PyTree,
    *,
    steps_z: int,
    steps_w: Optional[int] = None,
    schedule: str = "aligned",
    nonlinearity: Optional[Callable] = jnp.tanh,
    remat: str = "none",
    adjoint: str = "autodiff",
    solver: str = "euler",
    step_args: Optional[PyTree] = None,
    has_aux: bool = False,
):
    """The ANODEV2 block: evolve the weights by RDA, then solve the activation ODE (Eq. 2.3, 2.7).

    Computes ``z(1)`` of ``dz/dt = f(z, theta(t))`` with ``steps_z`` forward-Euler steps,
    where ``theta(t)`` is ``theta0`` with every leaf that has an ``RDACoeffs`` evolved by
    Eq. B.4 (``steps_w`` steps of ``dt = 1/steps_w``) and every ``None`` leaf held static.
    ``coeffs=None`` and ``steps_z=1`` is exactly the ResNet block ``z0 + f(z0, theta0)``.

    Args:
      f: ``f(z, theta) -> dz`` (``f(z, theta, args_n)`` with ``step_args``; returning
        ``(dz, aux)`` with ``has_aux``). With ``adjoint="discrete"`` ``f`` must not close over
        traced values (pass everything differentiable through ``theta0``/``step_args``).
      z0: block input (any shape, e.g. NHWC activations).
      theta0: pytree of weights ``w0`` (Eq. 2.3c initial condition).
      coeffs: None (no evolution: Neural ODE/ANODE), or a pytree with ``theta0``'s structure
        whose leaves are ``RDACoeffs`` (evolved kernels, HWIO) or None (static leaves).
      steps_z: activation steps (static int >= 1).
      steps_w: RDA steps of the weight trajectory (static int >= 1; default ``steps_z``).
      schedule: ``"aligned"`` (configuration 1) or ``"endpoints"`` (configuration 2).
      nonlinearity: ``sigma`` of Eq. 2.6 (default tanh) or None for the linear PDE.
      remat: ``"none"``, ``"block"`` (ANODE: keep only the input, recompute the block,
        weight evolution included, in the backward pass), ``"step"`` (also checkpoint
        each activation step) or ``"binomial"`` (block checkpoint plus nested checkpoints
        over segments of steps: a few activations per block, each step recomputed at most
        ``ceil(log2 steps_z)`` times). See :mod:`anodev2_jax.ode`.
      adjoint: ``"autodiff"`` (``jax.grad`` through the unrolled solve) or ``"discrete"``
        (the hand-written Eq. 2.5 adjoint, Euler only; it keeps one activation per step,
        and with any ``remat`` but ``"none"`` it keeps only the block input: ``"step"`` and
        ``"binomial"`` then act as ``"block"``, since the adjoint's backward pass stores
        its own per-step checkpoints).
      solver: ``"euler"`` (the paper), ``"rk2"`` or ``"rk4"``; all stages of step ``n`` use
        ``theta(tau_n)``.
      step_args: optional pytree, leaves with leading axis ``steps_z`` (e.g. per-step
        BatchNorm parameters); slice ``n`` is passed to ``f`` at step ``n``.
      has_aux: ``f`` returns ``(dz, aux)``; the result is ``(z1, aux)``, aux stacked over
        steps and not differentiated.

    Returns:
      ``z(1)`` with the shape and dtype of ``z0`` (or ``(z(1), aux)``).
    """
    spec = make_spec(steps_z, steps_w, schedule, nonlinearity, solver, has_aux)
    ode.check_choice("remat", remat, ode.REMAT_MODES)
    ode.check_choice("adjoint", adjoint, ADJOINTS)
    split_tree(theta0, coeffs)  # validate structure and coefficients before any compute
    if step_args is not None:
        ode._leading_len(step_args, "step_args", spec.steps_z)

    if adjoint == "discrete":
        from anodev2_jax.adjoint import coupled_block_discrete  # adjoint imports this module

        if spec.solver != "euler":
            raise ValueError(
                f"adjoint='discrete' implements Eq. 2.5 for forward Euler only, got solver={solver!r}; "
                "use solver='euler' or adjoint='autodiff'"
            )
        block = lambda z0, theta0, coeffs, step_args: coupled_block_discrete(f, spec, z0, theta0, coeffs, step_args)
    else:
        block = lambda z0, theta0, coeffs, step_args: _forward(f, spec, z0, theta0, coeffs, step_args, remat)
    if remat != "none":
        block = ode.checkpoint(block)
    return block(z0, theta0, coeffs, step_args)
