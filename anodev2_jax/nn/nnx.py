"""ANODEV2 blocks for Flax NNX: :class:`ODEBlock` (the paper's, our models' own) and :class:`CoupledBlock` (your vector field).

``nnx.Module`` s for NHWC batches: parameters are ``nnx.Param`` (the conv kernels, the
BatchNorm scales and shifts, and every array leaf of the evolution operators and time
kernels), BatchNorm statistics ``nnx.BatchStat``, initialized from ``nnx.Rngs``. Train them
as any NNX model::

    block = ODEBlock(16, steps_z=5, rngs=nnx.Rngs(0))             # configuration 1 of the paper
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    model.train(); model.eval()                                   # batch / running statistics

A block updates its statistics in place in train mode (as ``nnx.BatchNorm``), so call it
inside ``nnx.jit`` / ``nnx.value_and_grad``. Ensembles: ``nnx.vmap`` with ``nnx.split_rngs``
over the constructor, ``nnx.vmap(..., in_axes=(0, None))`` over the call. The numerics are
:mod:`anodev2_jax.nn.core`'s, the models' code path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from anodev2_jax.methods import DEFAULT_REMAT_BUDGET_MB
from anodev2_jax.nn import core

__all__ = ["ODEBlock", "CoupledBlock"]


def _params(specs: dict, rngs: nnx.Rngs, dtype) -> dict:
    return {name: nnx.Param(init(rngs.params(), shape, dtype)) for name, (init, shape) in specs.items()}


def _learnable(tree):
    """A pytree (params dict, operator, time kernel) whose array leaves become ``nnx.Param`` s."""
    return nnx.data(jax.tree.map(nnx.Param, tree))


def _values(tree):
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class ODEBlock(nnx.Module):
    """The ANODEV2 block of the paper: ``z(1)`` of ``dz/dt = f(z, theta(t))``, ``f = relu(bn2(conv2(relu(bn1(conv1(z))))))`` (Eq. 2.3).

    The block of our ResNet-4/10 and AlexNet with the same variables under the same paths
    (``conv1.kernel`` HWIO and the evolution's ``conv1.rda_d, rda_v, rda_rho`` as
    ``nnx.Param``; ``bn1.scale, bias`` ``nnx.Param`` and ``bn1.mean, var`` ``nnx.BatchStat``
    of shape ``(steps_z, C)`` per step; ``time_log_rate`` / ``time_values``) and the same
    numbers: ``__call__`` is :func:`anodev2_jax.nn.core.ode_block` on them. The knobs are
    those of :class:`anodev2_jax.nn.linen.ODEBlock` (default: configuration 1, ``steps_z =
    steps_w = 5``, RDA evolution, per-step BatchNorm); ``use_running_average`` (set by
    ``model.train()`` / ``model.eval()``) picks batch or running statistics.

    Args:
      features: channels ``C`` (the block preserves ``(N, H, W, C)``).
      rngs: ``nnx.Rngs`` for the kernels (He normal) and the MLP evolution's first layer.
      (the rest): as :class:`anodev2_jax.nn.linen.ODEBlock`'s attributes.

    Example: ``ODEBlock(16, steps_z=2, steps_w=10, schedule="endpoints", rngs=nnx.Rngs(0))(z)`` (configuration 2).
    """

    def __init__(
        self,
        features: int,
        *,
        kernel_size: int = 3,
        num_convs: int = 2,
        use_bias: bool = False,
        evolution: Optional[str] = "rda",
        time_kernel: Optional[str] = None,
        steps_z: int = 5,
        steps_w: Optional[int] = None,
        schedule: str = "aligned",
        solver: str = "euler",
        remat: str = "none",
        remat_budget_mb: float = DEFAULT_REMAT_BUDGET_MB,
        adjoint: str = "autodiff",
        norm: str = "per_step",
        bn_momentum: float = 0.9,
        nonlinearity: str = "tanh",
        coeff_granularity: str = "kernel",
        rda_parameterization: str = "abs",
        param_dtype: Any = jnp.float32,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
    ):
        if not isinstance(evolution, (str, type(None))) or not isinstance(time_kernel, (str, type(None))):
            raise TypeError("ODEBlock: evolution and time_kernel are names here (the models'); pass operators to CoupledBlock")
        cfg = core.block_config(
            evolution=evolution, time_kernel=time_kernel, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
            solver=solver, remat=remat, remat_budget_mb=remat_budget_mb, adjoint=adjoint, norm=norm,
            bn_momentum=bn_momentum, nonlinearity=nonlinearity, coeff_granularity=coeff_granularity,
            rda_parameterization=rda_parameterization, dtype=param_dtype,
        )
        self.config = cfg
        self.features, self.num_convs = features, num_convs
        self.use_running_average = use_running_average
        dtype = cfg.jnp_dtype
        for conv_name, bn_name in core.layer_names(num_convs):
            specs = core.conv_param_specs(cfg, (kernel_size, kernel_size, features, features), use_bias)
            stats = {name: nnx.BatchStat(a) for name, a in core.norm_stats_init(cfg, features).items()}
            setattr(self, conv_name, nnx.Dict(_params(specs, rngs, dtype)))
            setattr(self, bn_name, nnx.Dict({**_params(core.norm_param_specs(cfg, features), rngs, dtype), **stats}))
        for name, param in _params(core.time_kernel_param_specs(cfg), rngs, dtype).items():
            setattr(self, name, param)

    def __call__(self, z):
        """``z(1)`` for ``z`` of shape ``(N, H, W, features)``; in train mode the running statistics are updated in place."""
        if z.shape[-1] != self.features:
            raise ValueError(f"ODEBlock with features={self.features} got input with {z.shape[-1]} channels")
        train = not self.use_running_average
        params, stats = {}, {}
        for conv_name, bn_name in core.layer_names(self.num_convs):
            params[conv_name] = _values(dict(getattr(self, conv_name).items()))
            norm = getattr(self, bn_name)
            params[bn_name] = {"scale": norm.scale.get_value(), "bias": norm.bias.get_value()}
            stats[bn_name] = {"mean": norm.mean.get_value(), "var": norm.var.get_value()}
        for name in core.time_kernel_param_specs(self.config):
            params[name] = getattr(self, name).get_value()
        z1, new_stats = core.ode_block(self.config, z, params, stats, train=train, num_convs=self.num_convs, update_stats=train)
        if train:
            for bn_name, s in new_stats.items():
                getattr(self, bn_name).mean.set_value(s["mean"])
                getattr(self, bn_name).var.set_value(s["var"])
        return z1


class CoupledBlock(nnx.Module):
    """Your vector field ``field`` (an ``nnx.Module``, ``field(z) -> dz``) solved as an ANODEV2 block (Eq. 2.3).

    The block takes ``field`` over as its ``field`` attribute: its ``nnx.Param`` s are
    ``theta`` (every rank-4 kernel evolves by default: ``nnx.Conv`` kernels are HWIO, the
    evolution's layout), its ``nnx.BatchStat`` s the state; with ``norm="per_step"`` every
    variable of a stateful layer (an ``nnx.BatchNorm``: scale, bias, mean, var) gets a
    leading axis ``steps_z``, in place, one copy per activation step (so call the block,
    not ``block.field``). Inside the solve the field is rebuilt from explicit arrays
    (``nnx.merge``) at each step and its BatchNorms update their statistics by their own
    rule, written back after the block; ``model.train()`` / ``model.eval()`` switch the
    field's BatchNorms as usual. The learnable pytree of each evolved kernel's evolution is
    ``evolution["<path>"]`` (``"conv1/kernel"``), the time kernel's ``time_kernel``, all
    ``nnx.Param``. Details (``theta``, per-step or shared state): :mod:`anodev2_jax.nn.core`.
    The field may hold only ``nnx.Param`` and ``nnx.BatchStat`` variables.

    Args:
      field: the vector field.
      evolution: None, a name (``"rda"``, ...), an operator / ``RDACoeffs`` (each evolved
        kernel starts from a copy) or a factory ``evolution(key, kernel)`` (``kernel`` a
        ``jax.ShapeDtypeStruct``, HWIO) returning an operator.
      time_kernel: None / ``"dirac"``, ``"exponential"``, ``"discrete"`` or a time-kernel pytree.
      evolve: predicate ``evolve(path, leaf) -> bool`` on the field's params (path: tuple
        of keys, e.g. ``("conv1", "kernel")``); default every rank-4 kernel.
      rngs: ``nnx.Rngs`` for the evolutions' initialization.
      (the rest): as :class:`anodev2_jax.nn.linen.CoupledBlock`'s attributes.

    Example: ``CoupledBlock(MyField(16, rngs=rngs), steps_z=5, rngs=rngs)(z)``.
    """

    def __init__(
        self,
        field: nnx.Module,
        *,
        evolution: Any = "rda",
        time_kernel: Any = None,
        evolve: Optional[Callable] = None,
        steps_z: int = 5,
        steps_w: Optional[int] = None,
        schedule: str = "aligned",
        solver: str = "euler",
        remat: str = "none",
        adjoint: str = "autodiff",
        norm: str = "per_step",
        nonlinearity: str = "tanh",
        coeff_granularity: str = "kernel",
        rda_parameterization: str = "abs",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        cfg = core.field_config(
            evolution=evolution, time_kernel=time_kernel, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
            solver=solver, remat=remat, adjoint=adjoint, norm=norm, nonlinearity=nonlinearity,
            coeff_granularity=coeff_granularity, rda_parameterization=rda_parameterization, dtype=param_dtype,
        )
        flat = list(nnx.to_flat_state(nnx.state(field)))
        for path, var in flat:
            if not isinstance(var, (nnx.Param, nnx.BatchStat)):
                raise ValueError(
                    f"CoupledBlock: the field holds a {type(var).__name__} at {'.'.join(map(str, path))}; a vector field "
                    "may hold only nnx.Param and nnx.BatchStat variables (no RNG streams or caches inside the solve)"
                )
        params = [(path, var) for path, var in flat if isinstance(var, nnx.Param)]
        stats = [(path, var) for path, var in flat if isinstance(var, nnx.BatchStat)]
        if cfg.norm == "per_step":
            per_step = core.per_step_mask([p for p, _ in params], [p for p, _ in stats])
            for (_, var), stepped in zip(params, per_step):
                if stepped:
                    var.set_value(core.stack_per_step(var.get_value(), cfg.steps_z))
            for _, var in stats:
                var.set_value(core.stack_per_step(var.get_value(), cfg.steps_z))
        else:
            per_step = (False,) * len(params)
        is_evolved = evolve or core.default_evolve
        evolved = [cfg.evolve and not s and is_evolved(p, v.get_value()) for (p, v), s in zip(params, per_step)]
        names = ["/".join(map(str, p)) for (p, _), e in zip(params, evolved) if e]
        learned = {}
        for name, (_, var) in zip(names, [pv for pv, e in zip(params, evolved) if e]):
            w = var.get_value()
            learned[name] = _learnable(
                core.init_evolution(evolution, rngs.params(), jax.ShapeDtypeStruct(w.shape, w.dtype), cfg, name=f"evolution[{name!r}]")
            )

        self.config = cfg
        self.field = field
        self.evolution = nnx.Dict(learned)
        has_kernel = bool(names) and time_kernel not in (None, "dirac")
        self.time_kernel = _learnable(core.init_time_kernel(time_kernel, rngs.params(), cfg)) if has_kernel else None
        self.named = (isinstance(evolution, str), isinstance(time_kernel, str))
        self.param_paths = tuple(p for p, _ in params)
        self.state_paths = tuple(p for p, _ in stats)
        self.per_step, self.evolved, self.names = per_step, tuple(evolved), tuple(names)

    def __call__(self, z):
        """``z(1)``, the shape and dtype of ``z``; the field's statistics are updated in place (train mode)."""
        cfg = self.config
        graphdef, state = nnx.split(self.field)
        values = {path: var.get_value() for path, var in nnx.to_flat_state(state)}
        named_evolution, named_kernel = self.named
        operators = iter(core.evolution_operator(_values(self.evolution[n]), cfg, named=named_evolution) for n in self.names)
        evolution = [next(operators) if e else None for e in self.evolved]
        kernel = None if self.time_kernel is None else core.time_kernel_operator(_values(self.time_kernel), cfg, named=named_kernel)
        param_paths, state_paths = self.param_paths, self.state_paths

        def apply(z, leaves, state):
            field = nnx.merge(graphdef, nnx.from_flat_state([*zip(param_paths, leaves), *zip(state_paths, state)]))
            dz = field(z)
            new = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(field, nnx.BatchStat))}
            return dz, [new[path] for path in state_paths]

        z1, new_state = core.field_block(
            apply, z, [values[p] for p in param_paths], self.per_step, [values[p] for p in state_paths], evolution, cfg,
            time_kernel=kernel,
        )
        if state_paths:
            nnx.update(self.field, nnx.from_flat_state(list(zip(state_paths, new_state))))
        return z1
