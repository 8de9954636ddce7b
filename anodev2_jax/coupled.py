"""The ANODEV2 coupled block: weight trajectory + activation solve (Eq. 2.3, 2.7; Appendix B).

Weights evolve on their own grid (:mod:`anodev2_jax.trajectory`: ``steps_w`` steps of Eq.
B.4, schedules of configurations 1 and 2); activations take ``steps_z`` fixed steps
(:mod:`anodev2_jax.ode`), step ``n`` using the trajectory entry its schedule names.
Gradients: ``adjoint="autodiff"`` differentiates the unrolled discrete solve with
``jax.grad`` (DTO, exact); ``adjoint="discrete"`` uses the hand-written Eq. 2.5 adjoint of
:mod:`anodev2_jax.adjoint` through a ``jax.custom_vjp``. Both give the same numbers to
round-off (tested in float64).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp

from anodev2_jax import ode
from anodev2_jax.adjoint import coupled_block_discrete
from anodev2_jax.trajectory import BlockSpec, make_spec, split_tree, weight_trajectories, weights_at_step

__all__ = ["ADJOINTS", "coupled_block"]

ADJOINTS = ("autodiff", "discrete")

PyTree = Any


def _forward(f, spec: BlockSpec, z0, theta0, coeffs, step_args, remat: str):
    flat_theta, flat_coeffs, treedef = split_tree(theta0, coeffs)
    trajs = weight_trajectories(flat_theta, flat_coeffs, spec)
    thetas = [weights_at_step(flat_theta, trajs, treedef, spec, n) for n in range(spec.steps_z)]
    args = None if step_args is None else [ode.tree_slice(step_args, n) for n in range(spec.steps_z)]
    # the nested checkpoints of "step"/"binomial" take their steps' weights as inputs: the
    # trajectory (kernel-sized) is computed once per block (re)computation, not per segment
    z1, auxs = ode.solve_steps(f, z0, thetas, args, solver=spec.solver, remat=remat, has_aux=spec.has_aux)
    return (z1, ode.stack_aux(auxs)) if spec.has_aux else z1


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
        ode.check_leading_axis(step_args, "step_args", spec.steps_z)

    if adjoint == "discrete":
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
