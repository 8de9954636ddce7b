"""Weight trajectories of the coupled block: schedules, trajectory indices, block spec, time-kernel weights (Eq. 2.3c-d, 2.7; App. B).

The weights ``w`` of every evolved leaf take ``steps_w`` evolution steps of ``dt = 1/steps_w``
(Eq. 2.3c: Eq. B.4 for ``RDACoeffs``, ``op.step`` for an evolution operator); activation
step ``n`` of ``steps_z`` uses the trajectory entry ``idx_n = round(tau_n * steps_w)``
(:func:`trajectory_indices`) or, with a time kernel, ``theta_n = sum_m kappa[n, m] w_m``
(Eq. 2.3d on the grid of :func:`kernel_grid`). This module holds the pieces the forward
solve (:mod:`anodev2_jax.coupled`) and the hand-written adjoint (:mod:`anodev2_jax.adjoint`) share.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import ode
from anodev2_jax.evolution import check_operator, evolve, is_operator
from anodev2_jax.rda import RDACoeffs, check_coeffs, check_kernel, evolve_weights
from anodev2_jax.time_kernels import check_time_kernel

__all__ = [
    "SCHEDULES",
    "trajectory_indices",
    "leaf_trajectory",
    "BlockSpec",
    "make_spec",
    "is_evolution_leaf",
    "split_tree",
    "weight_trajectories",
    "kernel_grid",
    "time_weights",
    "mix_trajectories",
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

    Args:
      steps_z: activation steps (Python int >= 1).
      steps_w: weight steps of the trajectory (Python int >= 1).
      schedule: ``"aligned"`` or ``"endpoints"``.

    Returns:
      A tuple of ``steps_z`` Python ints in ``[0, steps_w]``, non-decreasing.

    Examples:
      >>> trajectory_indices(5, 5, "aligned"), trajectory_indices(2, 10, "endpoints")
      ((0, 1, 2, 3, 4), (0, 10))
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
    """A leaf of the ``evolution`` pytree: None (held static), an ``RDACoeffs`` or an evolution operator.

    Operators are recognized by duck typing (:func:`anodev2_jax.evolution.is_operator`: a
    non-container with a callable ``step``), so flattening stops at them although they are
    pytrees themselves.
    """
    return x is None or isinstance(x, RDACoeffs) or is_operator(x)


def split_tree(theta0: PyTree, evolution: PyTree, *, dt: float = 1.0):
    """Flatten ``theta0`` up to the structure of ``evolution`` (None / ``RDACoeffs`` / operator leaves).

    Returns ``(flat_theta, flat_evolution, treedef)``; ``evolution=None`` means no evolution.
    Validates every evolved leaf against its kernel from shapes only (operators:
    :func:`anodev2_jax.evolution.check_operator` with step length ``dt``). Raises
    ValueError / TypeError naming the leaf when the structures, shapes or types disagree.
    """
    if evolution is None:
        flat_theta, treedef = jax.tree_util.tree_flatten(theta0)
        return flat_theta, [None] * len(flat_theta), treedef
    flat_evo, treedef = jax.tree_util.tree_flatten(evolution, is_leaf=is_evolution_leaf)
    try:
        flat_theta = treedef.flatten_up_to(theta0)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "evolution: the pytree of operators/coeffs must have the structure of theta0, with an RDACoeffs or "
            f"an evolution operator for each evolved kernel and None for each static leaf; got structure {treedef} ({e})"
        ) from None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(evolution, is_leaf=is_evolution_leaf)[0]]
    for path, w, c in zip(paths, flat_theta, flat_evo):
        if c is None:
            continue
        if isinstance(c, RDACoeffs):
            if not hasattr(w, "ndim") or not 2 <= w.ndim <= 4:
                raise ValueError(
                    f"theta0{path} has RDACoeffs but shape {jnp.shape(w)}: only kernels of rank 2-4 "
                    "(kh, kw[, cin, cout]) can evolve; give it None in coeffs to hold it static"
                )
            check_kernel(w, name=f"theta0{path}")
            check_coeffs(c, w.shape, name=f"coeffs{path}")
        elif is_operator(c):
            check_operator(c, w, dt, name=f"evolution{path}")
        else:
            raise TypeError(
                f"evolution{path} = {c!r} is not an evolution: use None (static), RDACoeffs(d, v, rho) (Eq. B.4) "
                "or an operator with step(w, dt) (RDAEquation, LinearEvolution, ODEEvolution, mlp_evolution)"
            )
    return flat_theta, flat_evo, treedef


def leaf_trajectory(w, c, *, num_steps: int, dt: float, nonlinearity=None):
    """``[W_0, ..., W_M]`` stacked on a new leading axis for one evolved leaf: Eq. B.4 for ``RDACoeffs``
    (with ``nonlinearity``), the operator's own ``step`` otherwise (Eq. 2.3c)."""
    if isinstance(c, RDACoeffs):
        return evolve_weights(w, c, num_steps=num_steps, dt=dt, nonlinearity=nonlinearity, trajectory=True)
    return evolve(c, w, num_steps=num_steps, dt=dt, trajectory=True)


def weight_trajectories(flat_theta, flat_evolution, spec: BlockSpec):
    """Per-leaf weight trajectories ``[W_0, ..., W_M]`` (lists, ``M = spec.num_rda_steps``) for evolved leaves, None for static."""
    dt = 1.0 / spec.steps_w
    out = []
    for w, c in zip(flat_theta, flat_evolution):
        if c is None:
            out.append(None)
            continue
        traj = leaf_trajectory(w, c, num_steps=spec.num_rda_steps, dt=dt, nonlinearity=spec.nonlinearity)
        out.append([traj[m] for m in range(spec.num_rda_steps + 1)])
    return out


def kernel_grid(spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
    """The grids ``(t, tau)`` a time kernel's ``weights`` is evaluated on (concrete NumPy float64).

    ``tau_m = m / steps_w`` for ``m = 0..M``, ``M = spec.num_rda_steps`` (the last weight
    any step uses: a causal kernel needs no later one), and ``t_n = tau[idx_n]``.

    Why ``t_n = idx_n * dt`` (DESIGN.md says "the schedule's tau_n"): it is the schedule's
    time rounded onto the weight grid, the time of the weights step ``n`` uses today, so
    the Dirac kernel is exactly ``kappa[n, idx_n] = 1`` (today's result) and causality,
    ``tau_m <= t_n``, means exactly ``m <= idx_n`` (``t`` is taken from ``tau`` itself, no
    round-off in the comparison). With ``"aligned"`` the two times coincide; with
    ``"endpoints"`` and ``steps_w`` not a multiple of ``steps_z - 1`` they differ by the
    rounding of :func:`trajectory_indices`. (The activation step itself sits at ``n / steps_z``
    on the activation grid; configuration 2 applies ``w(1)`` at activation time 1/2, so the
    kernel lives on weight time, as the trajectory index does.)
    """
    tau = np.arange(spec.num_rda_steps + 1, dtype=np.float64) / spec.steps_w
    return tau[np.asarray(spec.indices)], tau


def time_weights(kernel, spec: BlockSpec):
    """The validated quadrature weights ``kappa``, shape ``(steps_z, M + 1)``, of a time kernel (Eq. 2.3d)."""
    t, tau = kernel_grid(spec)
    check_time_kernel(kernel, t, tau)
    return kernel.weights(t, tau)


def mix_trajectories(trajs, kappa):
    """Per evolved leaf the list of ``theta_n = sum_m kappa[n, m] W_m`` (Eq. 2.3d), None for static leaves."""
    out = []
    for traj in trajs:
        if traj is None:
            out.append(None)
        else:
            stacked = jnp.stack(traj)
            mixed = jnp.tensordot(kappa.astype(stacked.dtype), stacked, axes=1)
            out.append([mixed[n] for n in range(kappa.shape[0])])
    return out


def weights_at_step(flat_theta, trajs, treedef, spec: BlockSpec, n: int, mixed=None) -> PyTree:
    """The weight pytree ``theta(tau_n)`` that activation step ``n`` uses.

    Without a time kernel (``mixed=None``) the trajectory entry ``idx_n`` itself (no
    arithmetic: bit for bit the Dirac kernel); otherwise the entry ``n`` of
    :func:`mix_trajectories`. Static leaves are ``w0`` either way.
    """
    if mixed is not None:
        leaves = [w if t is None else t[n] for w, t in zip(flat_theta, mixed)]
        return jax.tree_util.tree_unflatten(treedef, leaves)
    m = spec.indices[n]
    leaves = [w if t is None else t[m] for w, t in zip(flat_theta, trajs)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
