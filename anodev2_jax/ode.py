"""Fixed-step ODE solvers for the activation ODE ``dz/dt = f(z, theta)`` on ``[0, 1]`` (Eq. 1.1, 2.3b).

* :func:`odeint_fixed`: discretize-then-optimize (DTO). The solve is an unrolled loop of
  ``num_steps`` explicit steps (euler, rk2, rk4), so ``jax.grad`` gives the *exact*
  gradient of the discrete forward pass (ANODE [9]); memory is controlled by ``remat``
  (:data:`REMAT_MODES`), built from :func:`checkpoint`.
* :func:`odeint_diffrax`: the same fixed grid solved by diffrax; ``adjoint="backsolve"`` is
  the Neural ODE of Chen et al. [8] (continuous adjoint, optimize-then-discretize, Eq. 2.2),
  ``adjoint="checkpoint"`` an independent exact cross-check.

The ODE function is ``f(z, theta)``, or ``f(z, theta, args_n)`` when ``step_args`` is
given: a pytree whose leaves have a leading axis of length ``num_steps``; step ``n`` (all
its stages) receives slice ``n``. This is how a model gives each activation step its own
BatchNorm. With ``has_aux=True``, ``f`` returns ``(dz, aux)`` and the solver returns
``(z1, aux)`` with the aux of each step's first stage stacked on a leading axis (aux is not
differentiated: use it for statistics such as BatchNorm's batch moments).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SOLVERS",
    "SOLVER_STAGES",
    "REMAT_MODES",
    "remat_cost",
    "remat_activations",
    "choose_remat",
    "check_num_steps",
    "check_choice",
    "check_leading_axis",
    "check_state",
    "make_step",
    "tree_slice",
    "apply_f",
    "axpy",
    "binomial_schedule",
    "checkpoint",
    "solve_steps",
    "stack_aux",
    "odeint_fixed",
    "odeint_diffrax",
]

SOLVERS = ("euler", "rk2", "rk4")
SOLVER_STAGES = {"euler": 1, "rk2": 2, "rk4": 4}  # evaluations of f per step

# Remat modes. All give the same values and gradients; N = number of steps, |z| = one activation.
#
# - "none": autodiff stores every intermediate of every step: O(N * |internals of f|).
# - "block": ANODE's checkpointing: only the block input is kept; the whole block is
#   recomputed (once) in the backward pass, which then holds the block's full step graph,
#   so the peak is as for "none" but only for one block at a time.
# - "step": "block" plus a checkpoint around each step: the backward pass keeps one
#   activation per step and recomputes one step's internals at a time: N * |z| plus one
#   step's internals.
# - "binomial": "block" plus nested checkpoints over segments of steps (revolve's binomial
#   checkpointing, Griewank & Walther 2000, in recursive form) chosen by binomial_schedule:
#   the backward pass holds s activations (s = 1, 2, 3, 4 for N = 1, 2-4, 5-21, 22-120:
#   O(log N)) plus one step's internals, and each step is recomputed at most
#   floor(log2 N) + 1 times.
#
# Cost, in forward step evaluations per training step (each mode adds one backward
# evaluation per step): "none" N; "block" 2N; "step" 3N - 1; "binomial" 2N + T with T = 1,
# 6, 20, 65 at N = 2, 5, 10, 20 (so 5, 16, 40, 105, against "step"'s 5, 14, 29, 59). Memory
# measured on the test problem (tests/test_ode.py, in activations): 1 step 6.0; 20 steps
# "binomial" 9.2, "step" 24.1, "none"/"block" 82. ResNet-10's whole training step
# (benchmarks/memory.py: compiled temporary memory, batch 256, configuration 1 with
# steps_w = steps_z, XLA:CPU) at steps_z = 1 / 5 / 20: "none" 332 / 1133 / 4140 MiB, "block"
# 188 / 470 / 1704, "step" 188 / 222 / 481, "binomial" 188 / 221 / 246 (1.31x its 1-step
# memory at 20 steps; "step" 2.56x). At the paper's steps_z (2, 5) "binomial" holds what
# "step" holds, and a ResNet-4 ANODE step at steps_z = 5 (batch 256, 2-core CPU) took about
# 10-15% longer than with "block"; use "binomial" for long solves. The models' default is
# "auto" (the knob value of anodev2_jax.methods): per block, choose_remat below.
#
# Loops are unrolled rather than lax.scan-ned because the step counts are small and static
# and, on XLA:CPU, convolutions inside scan train about 19x slower than unrolled
# (jax-ml/jax#12868, measured again for this project, see DESIGN.md).
REMAT_MODES = ("none", "block", "step", "binomial")

PyTree = Any


def check_num_steps(name: str, value) -> None:
    """Raise a ValueError unless ``value`` is a Python int >= 1 (a number of time steps).

    Examples:
      >>> check_num_steps("steps_z", 5)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a Python int >= 1 (number of time steps on [0, 1])")


def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming ``name`` and the allowed values unless ``value`` is one of them.

    Examples:
      >>> check_choice("solver", "rk4", SOLVERS)
    """
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


def check_leading_axis(tree: PyTree, name: str, num_steps: int) -> None:
    """Raise a ValueError unless every leaf of ``tree`` has a leading axis of length ``num_steps``.

    Examples:
      >>> check_leading_axis({"scale": jnp.ones((5, 16))}, "step_args", 5)
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_steps:
            raise ValueError(
                f"{name}: every leaf needs a leading axis of length num_steps={num_steps}, "
                f"got a leaf of shape {jnp.shape(leaf)}"
            )


def tree_slice(tree: PyTree, n: int) -> PyTree:
    """Slice ``n`` of the leading axis of every leaf (step ``n``'s weights or ``step_args``).

    Examples:
      >>> tree_slice({"scale": jnp.ones((5, 16))}, 2)["scale"].shape
      (16,)
    """
    return jax.tree_util.tree_map(lambda a: a[n], tree)


def check_state(z0, name: str = "z0") -> None:
    """Refuse a state that is not one floating-point (or complex) array: a solve of ``dz/dt = f`` needs real arithmetic.

    Why refuse rather than promote: an integer ``z0`` would make every step round to an
    integer (``z + h * dz`` cast back to ``z``'s dtype, ``axpy``), a silent wrong answer;
    promoting it ourselves would pick a float width for the caller (under strict dtype
    promotion a user asks for exactly that not to happen). Cast it: ``z0.astype(jnp.float32)``.

    Args:
      z0: the initial state.
      name: how the error names it.

    Returns:
      None; raises TypeError naming the dtype and the cast that fixes it.

    Examples:
      >>> check_state(jnp.ones(3))
      >>> check_state(jnp.ones(3, jnp.int32))
      Traceback (most recent call last):
      TypeError: z0 has dtype int32: the ODE state must be floating point (an integer state rounds every step); pass z0.astype(jnp.float32)
    """
    if not hasattr(z0, "dtype") and not isinstance(z0, (int, float, complex)):
        raise TypeError(
            f"{name} is a {type(z0).__name__}: the ODE state must be one array (e.g. NHWC activations); "
            "pass jnp.asarray(...) of a floating dtype"
        )
    dtype = jnp.result_type(z0)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{name} has dtype {dtype}: the ODE state must be floating point (an integer state rounds every step); "
            f"pass {name}.astype(jnp.float32)"
        )


def _describe(x) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    if hasattr(x, "shape"):
        return f"an array of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def apply_f(f, z, theta, args, has_aux):
    """``(dz, aux)`` of the ODE function: ``f(z, theta[, args])``; aux is None without ``has_aux``.

    Checks the output's structure at trace time (free under ``jit``): with ``has_aux`` it
    must be a pair ``(dz, aux)``, without it one array, and ``dz`` must have ``z``'s shape.
    Unpacking a plain array of leading size 2 as ``(dz, aux)`` would give a wrong result
    without an error, as would broadcasting a ``dz`` of another shape into ``z``.

    Args:
      f: the ODE function. z: the state (an array). theta: the weights. args: the step's
        ``step_args`` slice, or None (then ``f(z, theta)``). has_aux: ``f`` returns ``(dz, aux)``.

    Returns:
      ``(dz, aux)``; ``dz`` has ``z``'s shape.

    Examples:
      >>> apply_f(lambda z, th: -th * z, jnp.ones(3), 2.0, None, False)[0].shape
      (3,)
    """
    out = f(z, theta) if args is None else f(z, theta, args)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"has_aux=True but f returned {_describe(out)}, not a pair (dz, aux); "
                "return (dz, aux) from f, or pass has_aux=False"
            )
        dz, aux = out
    else:
        if isinstance(out, (tuple, list)):
            raise TypeError(
                f"f returned {_describe(out)}, not one array dz; if it returns (dz, aux) pass has_aux=True"
            )
        dz, aux = out, None
    if hasattr(z, "shape") and jnp.shape(dz) != jnp.shape(z):
        raise ValueError(
            f"f returned dz of shape {jnp.shape(dz)} for a state z of shape {jnp.shape(z)}; dz/dt = f(z, theta) "
            "must have z's shape"
        )
    return dz, aux


def axpy(h, k, z):
    """``z + h * k`` keeping ``z``'s dtype (``h`` is a Python float).

    Examples:
      >>> axpy(0.5, jnp.ones(2), jnp.zeros(2)).tolist()
      [0.5, 0.5]
    """
    return z + (h * k).astype(z.dtype)


def _zero_from(tree: PyTree):
    """A scalar ``0`` that XLA can only compute after every inexact leaf of ``tree`` (None if none).

    ``0 * s`` is not folded away (IEEE: ``0 * inf`` is NaN), so the zero depends on the
    data. ``s`` sums the first two elements of each leaf: a reduction, which XLA never fuses
    into its consumers, so the zero is one materialized scalar. With a plain element read
    ``x[0]`` instead, XLA fused the read into every consumer of the tied values, keeping
    the whole cotangent ``x`` alive as long as they were (measured: the nested checkpoints
    of ``remat="binomial"`` then held 13.2 activations at 20 steps instead of 9.2).
    """
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return None
    dtype = jnp.result_type(leaves[0])
    s = sum(jnp.sum(jnp.ravel(x)[:2]).astype(dtype) for x in leaves)
    return s * jnp.zeros((), dtype)


def _tie(tree: PyTree, zero) -> PyTree:
    """``tree`` with ``zero`` added to every floating leaf: the same values, computed after ``zero``."""
    if zero is None:
        return tree

    def tie(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return x + jnp.real(zero).astype(jnp.result_type(x))

    return jax.tree_util.tree_map(tie, tree)


def checkpoint(fn: Callable) -> Callable:
    """Rematerialize ``fn`` in the backward pass, in order: ANODE [9] checkpointing that works unrolled.

    ``fn(*args)`` takes and returns pytrees of arrays. The forward pass keeps only the
    inputs; the backward pass recomputes ``fn`` (inside its own ``jax.vjp``) right before
    it is needed.

    Why not ``jax.checkpoint``: measured here with jax 0.10.2 on XLA:CPU, a
    ``jax.checkpoint`` around each step of an *unrolled* loop saved nothing (4 activation
    buffers per step with and without it) because XLA is free to merge the recomputation
    with the original forward computation (common-subexpression elimination) or schedule
    it early (``jax.lax.optimization_barrier`` between the cotangent and the recomputation's
    inputs did not stop it either: memory stayed that of ``remat="none"``). Here the
    recomputation's inputs are made to depend on the incoming cotangent
    (``x + 0 * (g[0] + g[1])``, see :func:`_zero_from`), which both forbids the merge and
    forces the recompute to run only once its cotangent exists. Result on the test
    problem: about 1 activation buffer per step, and still unrolled, so convolutions keep
    XLA:CPU's fast path (``lax.scan`` + ``jax.checkpoint`` was 23x slower). Nested
    checkpoints (``remat="binomial"``) work the same way, level by level.

    Caveat: like any ``jax.custom_vjp``, the result supports reverse mode only (no
    ``jax.jvp``); use ``remat="none"`` for forward-mode differentiation.
    """

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args  # saved: the inputs only

    def bwd(args, out_bar):
        _, vjp = jax.vjp(fn, *_tie(args, _zero_from(out_bar)))  # recomputed here, after out_bar
        return vjp(out_bar)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def make_step(f, solver: str, h: float, has_aux: bool):
    """One explicit step ``(z_n, theta, args) -> (z_{n+1}, aux)`` of the chosen Runge-Kutta method.

    ``f`` is called as in :func:`apply_f`; ``h`` is the step length (a Python float, or an
    array of ``z``'s dtype). Also the stepper of :class:`anodev2_jax.evolution.ODEEvolution`.
    """

    def euler(z, theta, args):
        k1, aux = apply_f(f, z, theta, args, has_aux)
        return axpy(h, k1, z), aux

    def rk2(z, theta, args):  # explicit midpoint
        k1, aux = apply_f(f, z, theta, args, has_aux)
        k2, _ = apply_f(f, axpy(0.5 * h, k1, z), theta, args, has_aux)
        return axpy(h, k2, z), aux

    def rk4(z, theta, args):
        k1, aux = apply_f(f, z, theta, args, has_aux)
        k2, _ = apply_f(f, axpy(0.5 * h, k1, z), theta, args, has_aux)
        k3, _ = apply_f(f, axpy(0.5 * h, k2, z), theta, args, has_aux)
        k4, _ = apply_f(f, axpy(h, k3, z), theta, args, has_aux)
        return axpy(h / 6.0, k1 + 2 * k2 + 2 * k3 + k4, z), aux

    return {"euler": euler, "rk2": rk2, "rk4": rk4}[solver]


@functools.lru_cache(maxsize=None)
def binomial_schedule(num_steps: int) -> tuple[int, int, Any]:
    """The nested checkpoint schedule of ``remat="binomial"``: ``(snapshots, recomputed, tree)``.

    A schedule is a binary tree over the ``num_steps`` steps: a leaf (``1``) is one step
    under its own :func:`checkpoint`; a node ``(left, right)`` runs its two subtrees in
    order, each under its own :func:`checkpoint`. In the backward pass of a node the
    left subtree's forward is recomputed once (from the node's input, to get the right
    subtree's input), the right subtree's backward runs while the left's input is held,
    then the left's. So with ``M`` the activations a subtree holds (its input included)
    and ``T`` the step evaluations its recomputations cost,

        M(leaf) = 1,  M(node) = max(1 + M(right), M(left)),
        T(leaf) = 0,  T(node) = size(left) + T(left) + T(right).

    With at most ``s`` held activations and each step recomputed at most ``r`` times, such
    trees reach ``C(s - 1 + r, r)`` steps (revolve's binomial bound, Griewank & Walther
    2000, for this nested form). ``snapshots`` is the fewest ``s`` that reaches
    ``num_steps`` with ``r = floor(log2 num_steps) + 1`` (about plain bisection's recompute
    count, with fewer activations: 3 instead of 6 at ``num_steps = 20``), made
    non-decreasing in ``num_steps``: 1 for 1 step, 2 for 2-4, 3 for 5-21, 4 for 22-120.
    ``tree`` is the schedule with the fewest recomputed step evaluations ``T``
    (``recomputed``) among those holding at most ``snapshots`` activations (dynamic
    programming, ``O(N^2 s)``): ``T`` = 1, 6, 20, 65 at 2, 5, 10, 20 steps.

    Not counted in ``T``: the forward pass itself and the one recompute of each step
    inside its own checkpoint, ``N`` evaluations each (as in ``remat="step"``, whose
    ``T`` is ``N - 1``; ``"block"`` recomputes ``N``, all inside the block's checkpoint).
    """
    check_num_steps("num_steps", num_steps)
    n = int(num_steps)
    s = 1
    for k in range(2, n + 1):  # fewest snapshots for k steps, kept non-decreasing in k
        r = k.bit_length()
        while math.comb(s - 1 + r, r) < k:
            s += 1
    inf = float("inf")
    cost = {(1, j): 0 for j in range(1, s + 1)}
    split = {}
    for j in range(1, s + 1):
        for k in range(2, n + 1):
            best, arg = inf, None
            if j > 1:
                for m in range(1, k):  # left subtree of m steps
                    c = m + cost[m, j] + cost[k - m, j - 1]
                    if c < best:
                        best, arg = c, m
            cost[k, j], split[k, j] = best, arg

    def tree(k, j):
        if k == 1:
            return 1
        m = split[k, j]
        return (tree(m, j), tree(k - m, j - 1))

    return s, int(cost[n, s]), tree(n, s)


def _tree_size(tree) -> int:
    return 1 if tree == 1 else _tree_size(tree[0]) + _tree_size(tree[1])


def _tree_solve(step, tree):
    """``fn(z, thetas, args) -> (z, auxs)`` over the steps of ``tree``; each subtree of a node is
    wrapped in :func:`checkpoint` (the caller checkpoints the root: the block checkpoint)."""
    if tree == 1:

        def leaf(z, thetas, args):
            z, aux = step(z, thetas[0], args[0])
            return z, [aux]

        return leaf
    m = _tree_size(tree[0])
    left, right = checkpoint(_tree_solve(step, tree[0])), checkpoint(_tree_solve(step, tree[1]))

    def node(z, thetas, args):
        # saved by the checkpoints: this node's input z (left's) and left's output (right's input)
        z, aux_left = left(z, thetas[:m], args[:m])
        z, aux_right = right(z, thetas[m:], args[m:])
        return z, aux_left + aux_right

    return node


def solve_steps(
    f: Callable,
    z0,
    thetas: Sequence[PyTree],
    step_args: Optional[Sequence[PyTree]],
    *,
    solver: str = "euler",
    remat: str = "none",
    has_aux: bool = False,
):
    """Unrolled fixed-step solve of Eq. 1.1b / 2.3b with an explicit weight pytree per step (the shared core).

    ``len(thetas)`` is the number of steps ``N`` and ``h = 1/N``. ``remat`` applies the
    part of a remat mode *inside* the block: ``"step"`` wraps each step in
    :func:`checkpoint`, ``"binomial"`` nests checkpoints by :func:`binomial_schedule`;
    ``"none"`` and ``"block"`` add nothing. The caller adds the block checkpoint (every
    mode but ``"none"``), without which ``"binomial"`` would keep its root's activations.

    Returns ``(z1, auxs)`` where ``auxs`` is the list of per-step aux values (Nones when
    ``has_aux`` is False).
    """
    check_choice("remat", remat, REMAT_MODES)
    num_steps = len(thetas)
    step = make_step(f, solver, 1.0 / num_steps, has_aux)
    if step_args is None:
        step_args = [None] * num_steps
    if remat == "binomial":
        _, _, tree = binomial_schedule(num_steps)
        return _tree_solve(step, tree)(z0, list(thetas), list(step_args))
    if remat == "step":
        step = checkpoint(step)
    z, auxs = z0, []
    for n in range(num_steps):
        z, aux = step(z, thetas[n], step_args[n])
        auxs.append(aux)
    return z, auxs


def stack_aux(auxs: Sequence[PyTree]) -> PyTree:
    """Stack a list of per-step pytrees on a new leading axis.

    Examples:
      >>> stack_aux([{"m": jnp.zeros(3)}, {"m": jnp.ones(3)}])["m"].shape
      (2, 3)
    """
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
        ``(dz, aux)`` with ``has_aux``). ``dz`` must have ``z``'s shape (checked at trace
        time, as is the pair structure ``has_aux`` promises); it is cast to ``z``'s dtype.
      z0: initial activation, one floating-point (or complex) array of any shape. An
        integer or bool ``z0`` is refused (TypeError): every step would round to an
        integer; cast it, e.g. ``z0.astype(jnp.float32)``.
      theta: weight pytree. Static (q = 0: Neural ODE / ANODE), or with ``per_step=True``
        a pytree whose leaves carry a leading axis of length ``num_steps``; step ``n`` and
        all of its stages use slice ``n``.
      num_steps: number of steps, static int >= 1.
      solver: ``"euler"`` (1st order), ``"rk2"`` (explicit midpoint, 2nd), ``"rk4"`` (4th).
      per_step: see ``theta``.
      remat: ``"none"``, ``"block"``, ``"step"`` or ``"binomial"`` (see :data:`REMAT_MODES`).
      step_args: optional pytree with leaves of leading axis ``num_steps``, passed to ``f``
        as its third argument, slice ``n`` at step ``n``.
      has_aux: ``f`` returns ``(dz, aux)``; the result is then ``(z1, aux)`` with aux
        stacked over steps.

    Returns:
      ``z(1)`` (``z0``'s shape and dtype), or ``(z(1), aux)`` with ``has_aux`` (aux stacked
      on a leading axis of length ``num_steps``).

    Examples:
      >>> z1 = odeint_fixed(lambda z, a: -a * z, jnp.ones(3), 0.75, num_steps=1)  # one Euler step: 1 - 0.75
      >>> z1.tolist()
      [0.25, 0.25, 0.25]
      >>> odeint_fixed(lambda z, a: -a * z, jnp.ones(3), 1.0, num_steps=10, solver="rk4").shape
      (3,)
    """
    check_num_steps("num_steps", num_steps)
    check_choice("solver", solver, SOLVERS)
    check_choice("remat", remat, REMAT_MODES)
    check_state(z0)
    if per_step:
        check_leading_axis(theta, "theta (per_step=True)", num_steps)
    if step_args is not None:
        check_leading_axis(step_args, "step_args", num_steps)

    def solve(z0, theta, step_args):
        thetas = [tree_slice(theta, n) if per_step else theta for n in range(num_steps)]
        args = None if step_args is None else [tree_slice(step_args, n) for n in range(num_steps)]
        z1, auxs = solve_steps(f, z0, thetas, args, solver=solver, remat=remat, has_aux=has_aux)
        return (z1, stack_aux(auxs)) if has_aux else z1

    if remat != "none":
        solve = checkpoint(solve)
    return solve(z0, theta, step_args)


def remat_cost(mode: str, num_steps: int) -> int:
    """Forward step evaluations of one training step's block under ``mode`` (the backward adds ``N`` more in every mode).

    ``"none"`` ``N``; ``"block"`` ``2N``; ``"step"`` ``3N - 1`` (the block's recomputation
    needs no output of its last step); ``"binomial"`` ``2N + T`` (:func:`binomial_schedule`).
    """
    check_choice("remat", mode, REMAT_MODES)
    check_num_steps("num_steps", num_steps)
    n = int(num_steps)
    return {"none": n, "block": 2 * n, "step": 3 * n - 1, "binomial": 2 * n + binomial_schedule(n)[1]}[mode]


# Activation memory of one block in its backward pass, in activations (multiples of the
# block's input |z|): fitted to XLA's compiled temporary memory of whole training steps
# (benchmarks/memory.py's measurement; XLA:CPU, jax 0.10.2, batch 256, |z| = 16 MiB), the
# rest of the step subtracted. ResNet-4 ANODE (f = two conv -> BN -> ReLU, by
# kernels.conv_bn_relu_chain, which keeps its input and its convolution outputs):
#   "none" 5, 10, 25 at steps_z = 1, 2, 5 (5 per Euler step = f_activations; rk2 10, rk4 20);
#   "block" exactly "none" (131.6 / 211.6 / 451.7 MiB against 131.6 / 211.6 / 451.6 for the
#   whole step): for one block checkpointing saves nothing at the peak, which is the
#   block's own backward pass re-running its full step graph;
#   "step" 5, 6, 8, 13 at steps_z = 1, 2, 5, 10 (estimate N + I: 6, 7, 10, 15);
#   "binomial" 5, 6, 8, 8 (estimate s + I: 6, 7, 8, 8); rk4 at steps_z = 5: "step" 23
#   (estimate 25), "binomial" 26 (estimate s + I + 3 = 26: the stage slopes of the step
#   being recomputed).
# AlexNet's block (one conv -> BN -> ReLU): 3 per Euler step "none" (f_activations = 3).
# Where the estimate errs it errs high, by up to 2 activations. XLA:GPU's buffer
# assignment differs in detail; the budget is a guide, not a guarantee.
def remat_activations(
    mode: str, num_steps: int, *, solver: str = "euler", f_activations: float = 5.0, adjoint: str = "autodiff"
) -> float:
    """Estimated peak activation memory of one block's training step under ``mode``, in activations.

    ``f_activations`` is what autodiff keeps per evaluation of the ODE function, in
    activations (5 for ResNet's two conv -> BN -> ReLU, 3 for AlexNet's one); ``I =
    stages * f_activations`` is one step's. ``"none"`` and ``"block"``: ``N * I``;
    ``"step"``: ``N + I``; ``"binomial"``: ``s + I + stages - 1`` with ``s`` the
    schedule's snapshots (neither more than ``N * I``). ``adjoint="discrete"``: ``N + I``
    in every mode (the hand-written adjoint keeps one activation per step and
    differentiates one step at a time). Measurements: the comment above.
    """
    check_choice("remat", mode, REMAT_MODES)
    check_num_steps("num_steps", num_steps)
    check_choice("solver", solver, SOLVERS)
    n, stages = int(num_steps), SOLVER_STAGES[solver]
    one_step = stages * float(f_activations)
    if adjoint == "discrete":
        return min(n * one_step, n + one_step)
    if mode in ("none", "block"):
        return n * one_step
    if mode == "step":
        return min(n * one_step, n + one_step)
    return min(n * one_step, binomial_schedule(n)[0] + one_step + stages - 1)


def choose_remat(
    num_steps: int,
    activation_bytes: float,
    budget_bytes: float,
    *,
    solver: str = "euler",
    f_activations: float = 5.0,
    adjoint: str = "autodiff",
) -> str:
    """``remat="auto"``: the cheapest mode whose estimated activation memory fits ``budget_bytes``.

    Cheapest by :func:`remat_cost` (ties: less memory); memory by
    :func:`remat_activations` times ``activation_bytes`` (one activation of the block, as
    a device holds it). So "none" while it fits, then "step" or "binomial" (whichever is
    cheaper among those that fit; "step" for short solves). "block" is never chosen: for
    one block it holds at its peak what "none" holds, at twice the forward cost; it pays
    off only where the stored activations of several blocks would add up, which a
    per-block budget does not see (ask for it with ``remat="block"``). If nothing fits,
    the mode with the smallest estimate ("binomial" or "step").
    """
    kw = dict(solver=solver, f_activations=f_activations, adjoint=adjoint)
    mem = {m: remat_activations(m, num_steps, **kw) * float(activation_bytes) for m in REMAT_MODES}
    by_cost = sorted(REMAT_MODES, key=lambda m: (remat_cost(m, num_steps), mem[m]))
    fits = [m for m in by_cost if mem[m] <= budget_bytes]
    return fits[0] if fits else min(by_cost, key=lambda m: mem[m])


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
      ``z(1)``, ``z0``'s shape and dtype (``z0`` must be floating point, as in ``odeint_fixed``).

    Examples:
      >>> z1 = odeint_diffrax(lambda z, a: -a * z, jnp.ones(3), 0.75, num_steps=1, adjoint="checkpoint")
      >>> z1.tolist()
      [0.25, 0.25, 0.25]
    """
    import diffrax  # local import: only this function needs it

    check_num_steps("num_steps", num_steps)
    check_choice("solver", solver, SOLVERS)
    check_choice("adjoint", adjoint, ("backsolve", "checkpoint"))
    check_state(z0)
    if step_args is not None:
        check_leading_axis(step_args, "step_args", num_steps)
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
