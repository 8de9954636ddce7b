"""ANODEV2 blocks for Flax linen: :class:`ODEBlock` (the paper's, our models' own) and :class:`CoupledBlock` (your vector field).

Both are ``nn.Module`` s for NHWC batches, used like any linen layer inside your ``@nn.compact``::

    z = ODEBlock(16, steps_z=5, evolution="rda")(z, train)          # configuration 1 of the paper
    z = CoupledBlock(MyField(), steps_z=2, steps_w=10, schedule="endpoints")(z, train)

``train=True`` normalizes with batch statistics; call ``model.apply(variables, x, train=True,
mutable=["batch_stats"])`` to get the updated running statistics, as for ``nn.BatchNorm``.
The knobs are the models' (:mod:`anodev2_jax.methods`), validated before any compute with
one-line errors; the numerics are :mod:`anodev2_jax.nn.core`'s.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from anodev2_jax import layers
from anodev2_jax.methods import DEFAULT_REMAT_BUDGET_MB
from anodev2_jax.nn import core

__all__ = ["ODEBlock", "CoupledBlock"]


class ODEBlock(nn.Module):
    """The ANODEV2 block of the paper: ``z(1)`` of ``dz/dt = f(z, theta(t))``, ``f = relu(bn2(conv2(relu(bn1(conv1(z))))))`` (Eq. 2.3).

    Exactly the block of our ResNet-4/10 (``num_convs=2``) and AlexNet (``num_convs=1,
    use_bias=True``): the same variables under the same names (``conv1/kernel`` HWIO, the
    evolution's ``conv1/rda_d, rda_v, rda_rho``, ``bn1/scale, bias`` of shape ``(steps_z, C)``,
    ``batch_stats`` ``bn1/mean, var``, the time kernel's ``time_log_rate`` /
    ``time_values``) and the same numbers (:func:`anodev2_jax.layers.run_ode_block` and
    :func:`anodev2_jax.nn.core.ode_block`, the code path of the models).

    Attributes:
      features: channels ``C`` of the input and output (the block preserves the shape).
      kernel_size, num_convs, use_bias: the convs of ``f`` (3, 2, False: a ResNet block).
      evolution: None (static kernels: ANODE, or the Neural ODE with ``adjoint="backsolve"``),
        ``"rda"`` (Eq. B.4, the paper's), ``"rda_equation"`` (Eq. 2.6), ``"linear"``, ``"mlp"``.
      time_kernel: None / ``"dirac"`` (the paper's), ``"exponential"``, ``"discrete"`` (Eq. 2.3d).
      steps_z, steps_w, schedule: activation steps, weight steps (None: ``steps_z``) and
        ``"aligned"`` (configuration 1) or ``"endpoints"`` (configuration 2, e.g.
        ``steps_z=2, steps_w=10``). The default is configuration 1, ``5, 5, "aligned"``.
      solver: ``"euler"`` (the paper), ``"rk2"``, ``"rk4"``.
      remat: ``"none"``, ``"block"`` (ANODE's checkpointing), ``"step"``, ``"binomial"``, or
        ``"auto"`` (the cheapest whose activations fit ``remat_budget_mb`` MiB).
      adjoint: ``"autodiff"``, ``"discrete"`` (the hand-written Eq. 2.5 adjoint) or
        ``"backsolve"`` (diffrax's continuous adjoint; ``evolution=None`` only).
      norm: ``"per_step"`` (every step its own BatchNorm) or ``"shared"`` (ANODE's).
      bn_momentum: Flax convention (0.9 keeps 90% of the old statistics).
      nonlinearity: sigma of Eq. B.4 / 2.6: ``"tanh"``, ``"sigmoid"``, ``"none"``.
      coeff_granularity: ``"kernel"`` (one set of coefficients per kernel) or ``"filter"``.
      rda_parameterization: ``"abs"`` (``d = |rda_d|``) or ``"softplus"``.
      param_dtype: ``float32`` or ``float64``; the activations keep the input's dtype.

    Example: ``y, updates = ODEBlock(16).apply(variables, z, train=True, mutable=["batch_stats"])``.
    """

    features: int
    kernel_size: int = 3
    num_convs: int = 2
    use_bias: bool = False
    evolution: Optional[str] = "rda"
    time_kernel: Optional[str] = None
    steps_z: int = 5
    steps_w: Optional[int] = None
    schedule: str = "aligned"
    solver: str = "euler"
    remat: str = "none"
    remat_budget_mb: float = DEFAULT_REMAT_BUDGET_MB
    adjoint: str = "autodiff"
    norm: str = "per_step"
    bn_momentum: float = 0.9
    nonlinearity: str = "tanh"
    coeff_granularity: str = "kernel"
    rda_parameterization: str = "abs"
    param_dtype: Any = jnp.float32

    @property
    def config(self):
        """The validated knobs (:func:`anodev2_jax.nn.core.block_config`)."""
        return core.block_config(
            evolution=self.evolution, time_kernel=self.time_kernel, steps_z=self.steps_z, steps_w=self.steps_w,
            schedule=self.schedule, solver=self.solver, remat=self.remat, remat_budget_mb=self.remat_budget_mb,
            adjoint=self.adjoint, norm=self.norm, bn_momentum=self.bn_momentum, nonlinearity=self.nonlinearity,
            coeff_granularity=self.coeff_granularity, rda_parameterization=self.rda_parameterization, dtype=self.param_dtype,
        )

    @nn.compact
    def __call__(self, z, train: bool = False):
        """``z(1)`` for ``z`` of shape ``(N, H, W, features)``."""
        if not isinstance(self.evolution, (str, type(None))) or not isinstance(self.time_kernel, (str, type(None))):
            raise TypeError("ODEBlock: evolution and time_kernel are names here (the models'); pass operators to CoupledBlock")
        return layers.run_ode_block(
            self, self.config, z, train,
            features=self.features, kernel_size=self.kernel_size, num_convs=self.num_convs, use_bias=self.use_bias,
        )


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _paths_and_leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


class CoupledBlock(nn.Module):
    """Your vector field solved as an ANODEV2 block: ``z(1)`` of ``dz/dt = vector_field(z; theta(t))`` (Eq. 2.3).

    ``vector_field`` is any linen Module mapping ``z`` to ``dz`` of the same shape, e.g. convs and
    ``nn.BatchNorm`` s; it is called ``field(z, train=train)`` when its ``__call__`` takes
    ``train`` and ``field(z)`` otherwise. The block initializes it (``field.init``) and keeps
    its variables as its own (under ``field``, the name the NNX and Equinox blocks use; the
    attribute is ``vector_field`` because linen reserves an attribute's name for the
    submodule it holds): ``params/field`` (the field's params, its stateful layers'
    with a leading axis ``steps_z`` under ``norm="per_step"``), ``batch_stats/field`` (its
    statistics, likewise), ``params/evolution`` (``{"Conv_0/kernel": <learnable pytree>}``
    per evolved kernel) and ``params/time_kernel``. Inside the solve the field runs as a pure
    function (``field.apply`` on explicit arrays), so remat and ``adjoint="discrete"`` apply.
    How parameters become ``theta``, which evolve and how BatchNorm is kept per step or
    shared: :mod:`anodev2_jax.nn.core` (its docstring). Only the ``params`` and
    ``batch_stats`` collections are supported in a field.

    Attributes:
      vector_field: the vector field (an unbound linen Module).
      evolution: None, a name (``"rda"``, ...), an operator / ``RDACoeffs`` (each evolved
        kernel starts from a copy) or a factory ``evolution(key, kernel)`` (``kernel`` a
        ``jax.ShapeDtypeStruct``, HWIO) returning an operator.
      time_kernel: None / ``"dirac"``, ``"exponential"``, ``"discrete"`` or a time-kernel pytree.
      evolve: predicate ``evolve(path, leaf) -> bool`` on the field's params (path: tuple
        of names, e.g. ``("Conv_0", "kernel")``); default every rank-4 kernel (HWIO).
      steps_z: as in :class:`ODEBlock`, like ``steps_w``, ``schedule``, ``solver``,
        ``adjoint``, ``norm``, ``nonlinearity``, ``coeff_granularity``,
        ``rda_parameterization`` and ``param_dtype`` (the dtype of the named evolutions'
        params).
      remat: ``"none"``, ``"block"``, ``"step"`` or ``"binomial"``.

    Example: ``CoupledBlock(MyField(), steps_z=5)(z, train)`` inside a compact ``__call__``.
    """

    vector_field: nn.Module
    evolution: Any = "rda"
    time_kernel: Any = None
    evolve: Optional[Callable] = None
    steps_z: int = 5
    steps_w: Optional[int] = None
    schedule: str = "aligned"
    solver: str = "euler"
    remat: str = "none"
    adjoint: str = "autodiff"
    norm: str = "per_step"
    nonlinearity: str = "tanh"
    coeff_granularity: str = "kernel"
    rda_parameterization: str = "abs"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool = False):
        """``z(1)``, the shape and dtype of ``z``."""
        cfg = core.field_config(
            evolution=self.evolution, time_kernel=self.time_kernel, steps_z=self.steps_z, steps_w=self.steps_w,
            schedule=self.schedule, solver=self.solver, remat=self.remat, adjoint=self.adjoint, norm=self.norm,
            nonlinearity=self.nonlinearity, coeff_granularity=self.coeff_granularity,
            rda_parameterization=self.rda_parameterization, dtype=self.param_dtype,
        )
        field = self.vector_field.clone(parent=None)  # unbound: applied to explicit variables inside the solve
        kwargs = {"train": train} if "train" in inspect.signature(field.__call__).parameters else {}
        shapes = jax.eval_shape(lambda: field.init(jax.random.key(0), z, **kwargs))
        other = sorted(set(shapes) - {"params", "batch_stats"})
        if other:
            raise ValueError(
                f"CoupledBlock: the field declares the collection(s) {other}; a vector field may hold only 'params' and "
                "'batch_stats' (its state must be per step)"
            )
        param_paths, param_shapes, param_def = _paths_and_leaves(shapes.get("params", {}))
        state_paths, _, state_def = _paths_and_leaves(shapes.get("batch_stats", {}))
        per_step = core.per_step_mask(param_paths, state_paths) if cfg.norm == "per_step" else (False,) * len(param_paths)
        is_evolved = self.evolve or core.default_evolve
        evolved = [cfg.evolve and not s and is_evolved(p, w) for p, w, s in zip(param_paths, param_shapes, per_step)]

        def field_variables(rng):
            v = field.init(rng, z, **kwargs)
            params = jax.tree.unflatten(param_def, [
                core.stack_per_step(w, cfg.steps_z) if s else w for w, s in zip(jax.tree.leaves(v.get("params", {})), per_step)
            ])
            stats = v.get("batch_stats", {})
            if cfg.norm == "per_step":
                stats = jax.tree.map(lambda s: core.stack_per_step(s, cfg.steps_z), stats)
            return params, stats

        params = self.param("field", lambda rng: field_variables(rng)[0])
        stats = self.variable("batch_stats", "field", lambda: field_variables(self.make_rng("params"))[1]) if state_paths else None
        names = ["/".join(p) for p, e in zip(param_paths, evolved) if e]

        def init_evolutions(rng):
            keys = jax.random.split(rng, max(len(names), 1))
            kernels = [w for w, e in zip(param_shapes, evolved) if e]
            return {
                n: core.init_evolution(self.evolution, k, jax.ShapeDtypeStruct(w.shape, w.dtype), cfg, name=f"evolution[{n!r}]")
                for n, k, w in zip(names, keys, kernels)
            }

        learned = self.param("evolution", init_evolutions) if names else {}
        kernel = None
        if names and self.time_kernel not in (None, "dirac"):
            learned_kernel = self.param("time_kernel", lambda rng: core.init_time_kernel(self.time_kernel, rng, cfg))
            kernel = core.time_kernel_operator(learned_kernel, cfg, named=isinstance(self.time_kernel, str))
        operators = iter(core.evolution_operator(learned[n], cfg, named=isinstance(self.evolution, str)) for n in names)
        evolution = [next(operators) if e else None for e in evolved]

        def apply(z, leaves, state):
            variables = {"params": jax.tree.unflatten(param_def, leaves)}
            if stats is None:
                return field.apply(variables, z, **kwargs), []
            variables["batch_stats"] = jax.tree.unflatten(state_def, state)
            dz, updates = field.apply(variables, z, mutable=["batch_stats"], **kwargs)
            return dz, state_def.flatten_up_to(updates["batch_stats"])

        state = [] if stats is None else state_def.flatten_up_to(stats.value)
        z1, new_state = core.field_block(
            apply, z, param_def.flatten_up_to(params), per_step, state, evolution, cfg, time_kernel=kernel
        )
        if stats is not None and train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
            stats.value = jax.tree.unflatten(state_def, new_state)
        return z1
