"""Weight trajectories of the coupled block: schedules, trajectory indices, block spec (Eq. 2.3c-d, 2.7; App. B).

The weights ``w`` of every evolved leaf take ``steps_w`` evolution steps of ``dt = 1/steps_w``
(Eq. 2.3c); activation step ``n`` of ``steps_z`` uses the trajectory entry
``round(tau_n * steps_w)`` (K of Eq. 2.3d a Dirac delta: ``theta(t) = w(t)``). The
``schedule`` places the ``tau_n`` (:func:`trajectory_indices`). This module holds the
pieces the forward solve (:mod:`anodev2_jax.coupled`) and the hand-written adjoint
(:mod:`anodev2_jax.adjoint`) share.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from anodev2_jax import ode
from anodev2_jax.rda import RDACoeffs, check_coeffs, evolve_weights

__all__ = [
    "SCHEDULES",
    "trajectory_indices",
    "BlockSpec",
    "make_spec",
    "is_evolution_leaf",
    "split_tree",
    "weight_trajectories",
    "weights_at_step",
]

SCHEDULES = ("aligned", "endpoints")

PyTree = Any


def trajectory_indices(steps_z: int, steps_w: int, schedule: str) -> tuple[int, ...]:
    """Index into the weight trajectory used by each activation step (Eq. 2.7, Appendix B; length ``steps_z``).

    ``idx_n = round(tau_n * steps_w)`` where

    * ``schedule="aligned"`` (configuration 1, Eq. 2.7): ``tau_n = n / steps_z``; needs
      ``steps_w`` to be a multiple of ``steps_z``. ``steps_z = steps_w = 5`` is the paper's.
    * ``schedule="endpoints"`` (configuration 2, Appendix B): ``tau_n = n / (steps_z - 1)``
      (``tau_0 = 0`` if ``steps_z == 1``). ``steps_z = 2, steps_w = 10`` is the paper's: the
      first step uses ``w(0)``, the second ``w(1)`` after 10 evolution steps.
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
        """Evolution steps actually needed: the largest trajectory index any activation step uses.

        Only those entries are computed: configuration 1 with 5/5 evolves 4 steps, not 5
        (``w(1)`` is never applied).
        """
        return max(self.indices)


def make_spec(steps_z, steps_w, schedule, nonlinearity, solver, has_aux) -> BlockSpec:
    """Validate the block's static arguments (before any compute) and build its :class:`BlockSpec`."""
    ode.check_choice("solver", solver, ode.SOLVERS)
    if nonlinearity is not None and not callable(nonlinearity):
        raise TypeError(f"nonlinearity={nonlinearity!r} must be callable or None")
    steps_w = steps_z if steps_w is None else steps_w
    indices = trajectory_indices(steps_z, steps_w, schedule)
    return BlockSpec(int(steps_z), int(steps_w), indices, nonlinearity, solver, bool(has_aux))


def is_evolution_leaf(x) -> bool:
    """A leaf of the ``coeffs`` pytree: None (held static) or an ``RDACoeffs``."""
    return x is None or isinstance(x, RDACoeffs)


def split_tree(theta0: PyTree, coeffs: PyTree):
    """Flatten ``theta0`` up to the structure of ``coeffs`` (``RDACoeffs``/None leaves).

    Returns ``(flat_theta, flat_coeffs, treedef)``; ``coeffs=None`` means no evolution.
    Raises ValueError / TypeError naming the leaf when the structures or shapes disagree.
    """
    if coeffs is None:
        flat_theta, treedef = jax.tree_util.tree_flatten(theta0)
        return flat_theta, [None] * len(flat_theta), treedef
    flat_coeffs, treedef = jax.tree_util.tree_flatten(coeffs, is_leaf=is_evolution_leaf)
    try:
        flat_theta = treedef.flatten_up_to(theta0)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "coeffs must have the structure of theta0, with an RDACoeffs for each evolved kernel "
            f"and None for each static leaf; got coeffs structure {treedef} ({e})"
        ) from None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(coeffs, is_leaf=is_evolution_leaf)[0]]
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
