"""ANODEV2 blocks for Equinox: :class:`ODEBlock` (the paper's, our models' own) and :class:`CoupledBlock` (your vector field).

``eqx.Module`` s whose array leaves are the parameters (conv kernels, BatchNorm scales and
shifts, every array leaf of the evolution operators and time kernels: ``eqx.filter(block,
eqx.is_inexact_array)``) and whose BatchNorm statistics live in ``eqx.nn.State``, so build
a model holding them with ``eqx.nn.make_with_state`` and call it ``model(x, state) ->
(y, state)``; ``eqx.nn.inference_mode(model)`` switches to running statistics. Ensembles:
``eqx.filter_vmap`` over the constructor (``make_with_state``) and over the call.

**Batches, channel-first.** A block is called on the whole batch ``(N, C, H, W)`` (Equinox's
``(C, H, W)`` layout per example), not under a ``jax.vmap`` over examples: BatchNorm inside
the vector field needs its batch statistics, and a collective over a vmapped batch axis
inside the solver's custom VJPs (``remat`` other than ``"none"``, ``adjoint="discrete"``)
fails in JAX (``NameError: unbound axis name``, tried here), so the block vmaps the field
over the batch itself, inside the solve, with ``axis_name`` (default ``"batch"``): write the
field per example with ``eqx.nn.BatchNorm(C, axis_name="batch")`` as usual. The stem of a
model around the block vmaps its own layers (``jax.vmap(conv)(x)``). The numerics are
:mod:`anodev2_jax.nn.core`'s, the models' code path; kernels are evolved in HWIO (the
evolution's layout: spatial axes first), so :class:`CoupledBlock` transposes a field's
``(O, I, kh, kw)`` conv weights for the evolution and back for the field.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from anodev2_jax.methods import DEFAULT_REMAT_BUDGET_MB, ODEConfig
from anodev2_jax.nn import core

__all__ = ["ODEBlock", "CoupledBlock"]


def _dtype(dtype):
    # Equinox's default: float64 when x64 is enabled, else float32
    return (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32) if dtype is None else dtype


def _init(specs: dict, key, dtype) -> dict:
    keys = jax.random.split(key, max(len(specs), 1))
    return {name: init(k, shape, dtype) for (name, (init, shape)), k in zip(specs.items(), keys)}


class ODEBlock(eqx.Module):
    """The ANODEV2 block of the paper: ``z(1)`` of ``dz/dt = f(z, theta(t))``, ``f = relu(bn2(conv2(relu(bn1(conv1(z))))))`` (Eq. 2.3).

    The block of our ResNet-4/10 and AlexNet: ``params`` is the linen block's params tree
    (``params["conv1"]["kernel"]`` HWIO, the evolution's ``rda_d, rda_v, rda_rho``,
    ``params["bn1"]["scale"]`` of shape ``(steps_z, C)`` per step, ``time_log_rate`` /
    ``time_values``), ``stats`` the ``eqx.nn.StateIndex`` of its ``batch_stats`` tree
    (``{"bn1": {"mean", "var"}}``), and ``__call__`` is
    :func:`anodev2_jax.nn.core.ode_block` on them, so the numbers are the models'. The knobs
    are those of :class:`anodev2_jax.nn.linen.ODEBlock` (default: configuration 1, RDA
    evolution, per-step BatchNorm); ``dtype=None`` is Equinox's default floating dtype.

    Args:
      features: channels ``C`` (the block preserves ``(N, C, H, W)``).
      key: PRNG key for the kernels (He normal) and the MLP evolution's first layer.
      (the rest): as :class:`anodev2_jax.nn.linen.ODEBlock`'s attributes.

    Example: ``block, state = eqx.nn.make_with_state(ODEBlock)(16, key=key); z1, state = block(z, state)``.
    """

    params: dict
    stats: eqx.nn.StateIndex
    inference: bool
    config: ODEConfig = eqx.field(static=True)
    features: int = eqx.field(static=True)
    num_convs: int = eqx.field(static=True)

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
        dtype=None,
        inference: bool = False,
        key,
    ):
        if not isinstance(evolution, (str, type(None))) or not isinstance(time_kernel, (str, type(None))):
            raise TypeError("ODEBlock: evolution and time_kernel are names here (the models'); pass operators to CoupledBlock")
        cfg = core.block_config(
            evolution=evolution, time_kernel=time_kernel, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
            solver=solver, remat=remat, remat_budget_mb=remat_budget_mb, adjoint=adjoint, norm=norm,
            bn_momentum=bn_momentum, nonlinearity=nonlinearity, coeff_granularity=coeff_granularity,
            rda_parameterization=rda_parameterization, dtype=_dtype(dtype),
        )
        dtype = cfg.jnp_dtype
        names = core.layer_names(num_convs)
        keys = jax.random.split(key, 2 * len(names) + 1)
        params, stats = {}, {}
        for i, (conv_name, bn_name) in enumerate(names):
            specs = core.conv_param_specs(cfg, (kernel_size, kernel_size, features, features), use_bias)
            params[conv_name] = _init(specs, keys[2 * i], dtype)
            params[bn_name] = _init(core.norm_param_specs(cfg, features), keys[2 * i + 1], dtype)
            stats[bn_name] = core.norm_stats_init(cfg, features)
        params.update(_init(core.time_kernel_param_specs(cfg), keys[-1], dtype))
        self.params = params
        self.stats = eqx.nn.StateIndex(stats)
        self.inference = inference
        self.config = cfg
        self.features = features
        self.num_convs = num_convs

    def __call__(self, z, state: eqx.nn.State, *, key=None) -> tuple[Any, eqx.nn.State]:
        """``(z(1), state)`` for a batch ``z`` of shape ``(N, features, H, W)``; in train mode ``state`` holds the new statistics."""
        del key
        if z.ndim != 4 or z.shape[1] != self.features:
            raise ValueError(
                f"ODEBlock with features={self.features} takes a batch (N, {self.features}, H, W) (channel-first, "
                f"called on the whole batch, not under jax.vmap), got shape {z.shape}"
            )
        train = not self.inference
        stats = state.get(self.stats)
        z1, new_stats = core.ode_block(
            self.config, jnp.transpose(z, (0, 2, 3, 1)), self.params, stats,
            train=train, num_convs=self.num_convs, update_stats=train,
        )
        if train:
            state = state.set(self.stats, new_stats)
        return jnp.transpose(z1, (0, 3, 1, 2)), state


def _is_index(x) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def _path(path) -> tuple:
    return tuple(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _to_hwio(w):
    return jnp.transpose(w, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def _to_oihw(w):
    return jnp.transpose(w, (3, 2, 0, 1))


class CoupledBlock(eqx.Module):
    """Your vector field ``field`` (an ``eqx.Module`` written per example) solved as an ANODEV2 block (Eq. 2.3).

    ``field`` maps one example ``z`` ``(C, H, W)`` to ``dz`` of the same shape: called
    ``field(z, state) -> (dz, state)`` when it holds ``eqx.nn.StateIndex`` es (e.g. an
    ``eqx.nn.BatchNorm(C, axis_name="batch")``), ``field(z)`` otherwise, vmapped over the
    batch with ``axis_name`` by the block. Its inexact arrays are ``theta`` (every rank-4
    weight evolves by default: ``eqx.nn.Conv2d`` weights, transposed to HWIO for the
    evolution); with ``norm="per_step"`` every stateful layer's parameters and the initial
    value of its state get a leading axis ``steps_z`` (one copy per activation step) when
    the block is built, so build it inside the model you give ``eqx.nn.make_with_state``.
    Each evolved kernel's learnable pytree is ``evolution["<path>"]`` (``"conv1/weight"``),
    the time kernel's ``time_kernel``. Details (``theta``, per-step or shared state):
    :mod:`anodev2_jax.nn.core`.

    Args:
      field: the vector field.
      evolution: None, a name (``"rda"``, ...), an operator / ``RDACoeffs`` (each evolved
        kernel starts from a copy) or a factory ``evolution(key, kernel)`` (``kernel`` a
        ``jax.ShapeDtypeStruct``, HWIO) returning an operator.
      time_kernel: None / ``"dirac"``, ``"exponential"``, ``"discrete"`` or a time-kernel pytree.
      evolve: predicate ``evolve(path, leaf) -> bool`` on the field's arrays (path: tuple
        of names, e.g. ``("conv1", "weight")``; leaf in the field's own layout); default
        every rank-4 weight, which must then be ``(O, I, kh, kw)``.
      axis_name: the batch axis name the field's BatchNorms use.
      key: PRNG key for the evolutions' initialization.
      dtype: of the named evolutions' params (None: Equinox's default).
      (the rest): as :class:`anodev2_jax.nn.linen.CoupledBlock`'s attributes.

    Example: ``z1, state = block(z, state)`` for ``z`` of shape ``(N, C, H, W)``.
    """

    field: eqx.Module
    evolution: dict
    time_kernel: Any
    config: ODEConfig = eqx.field(static=True)
    axis_name: Hashable = eqx.field(static=True)
    per_step: tuple = eqx.field(static=True)
    evolved: tuple = eqx.field(static=True)
    names: tuple = eqx.field(static=True)
    named: tuple = eqx.field(static=True)

    def __init__(
        self,
        field: eqx.Module,
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
        axis_name: Hashable = "batch",
        dtype=None,
        key,
    ):
        cfg = core.field_config(
            evolution=evolution, time_kernel=time_kernel, steps_z=steps_z, steps_w=steps_w, schedule=schedule,
            solver=solver, remat=remat, adjoint=adjoint, norm=norm, nonlinearity=nonlinearity,
            coeff_granularity=coeff_granularity, rda_parameterization=rda_parameterization, dtype=_dtype(dtype),
        )
        flat, treedef = jtu.tree_flatten_with_path(field, is_leaf=_is_index)
        indices = [_path(p) for p, leaf in flat if _is_index(leaf)]
        for p, leaf in flat:
            if _is_index(leaf) and not jtu.tree_leaves(leaf.init):
                raise ValueError(
                    f"CoupledBlock: the field's state {'.'.join(map(str, _path(p)))} has no initial value (the field went "
                    "through eqx.nn.make_with_state already); build the block inside the model given to make_with_state"
                )
        params = [(_path(p), leaf) for p, leaf in flat if eqx.is_inexact_array(leaf)]
        per_step = core.per_step_mask([p for p, _ in params], indices) if cfg.norm == "per_step" else (False,) * len(params)
        stepped = {p for (p, _), s in zip(params, per_step) if s}

        def adopt(p, leaf):
            if _is_index(leaf) and cfg.norm == "per_step":
                return eqx.nn.StateIndex(jtu.tree_map(lambda a: core.stack_per_step(a, cfg.steps_z), leaf.init))
            return core.stack_per_step(leaf, cfg.steps_z) if _path(p) in stepped else leaf

        self.field = jtu.tree_unflatten(treedef, [adopt(p, leaf) for p, leaf in flat])
        is_evolved = evolve or core.default_evolve
        evolved = tuple(cfg.evolve and not s and is_evolved(p, w) for (p, w), s in zip(params, per_step))
        kernels = [(("/".join(map(str, p))), _to_hwio(w)) for (p, w), e in zip(params, evolved) if e]
        keys = jax.random.split(key, len(kernels) + 1)
        self.evolution = {
            n: core.init_evolution(evolution, k, jax.ShapeDtypeStruct(w.shape, w.dtype), cfg, name=f"evolution[{n!r}]")
            for (n, w), k in zip(kernels, keys)
        }
        has_kernel = bool(kernels) and time_kernel not in (None, "dirac")
        self.time_kernel = core.init_time_kernel(time_kernel, keys[-1], cfg) if has_kernel else None
        self.config = cfg
        self.axis_name = axis_name
        self.per_step, self.evolved, self.names = per_step, evolved, tuple(n for n, _ in kernels)
        self.named = (isinstance(evolution, str), isinstance(time_kernel, str))

    def __call__(self, z, state: eqx.nn.State, *, key=None) -> tuple[Any, eqx.nn.State]:
        """``(z(1), state)`` for a batch ``z`` ``(N, ...)``; ``state`` holds the field's new statistics."""
        del key
        cfg = self.config
        leaves, treedef = jtu.tree_flatten(self.field, is_leaf=_is_index)
        positions = [i for i, leaf in enumerate(leaves) if eqx.is_inexact_array(leaf)]
        stateful = any(_is_index(leaf) for leaf in leaves)
        template = [None if i in positions else leaf for i, leaf in enumerate(leaves)]  # no traced value in the closure
        params = [_to_hwio(leaves[i]) if e else leaves[i] for i, e in zip(positions, self.evolved)]
        named_evolution, named_kernel = self.named
        operators = iter(core.evolution_operator(self.evolution[n], cfg, named=named_evolution) for n in self.names)
        evolution = [next(operators) if e else None for e in self.evolved]
        kernel = None if self.time_kernel is None else core.time_kernel_operator(self.time_kernel, cfg, named=named_kernel)
        substate = state.substate(self.field)
        state_leaves, state_def = jtu.tree_flatten(substate)
        evolved, axis_name = self.evolved, self.axis_name

        def apply(z, ps, st):
            new_leaves = list(template)
            for i, p, e in zip(positions, ps, evolved):
                new_leaves[i] = _to_oihw(p) if e else p
            field = jtu.tree_unflatten(treedef, new_leaves)
            if not stateful:
                return jax.vmap(field, axis_name=axis_name)(z), []
            s = jtu.tree_unflatten(state_def, st)
            dz, s = jax.vmap(field, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(z, s)
            return dz, jtu.tree_leaves(s)

        z1, new_state = core.field_block(apply, z, params, self.per_step, state_leaves, evolution, cfg, time_kernel=kernel)
        if stateful:
            state = state.update(jtu.tree_unflatten(state_def, new_state))
        return z1, state
