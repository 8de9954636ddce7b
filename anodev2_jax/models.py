"""AlexNet, ResNet-4 and ResNet-10 with ODE blocks (Tables 3, 5, 6 of the paper).

``get_model(name, method, **overrides)`` returns a linen Module; ``model.init(key, x)`` with
``x`` of shape ``(N, 32, 32, 3)`` gives ``{"params", "batch_stats"}``;
``model.apply(vars, x, train=True, mutable=["batch_stats"])`` returns ``(logits, updates)``
and ``model.apply(vars, x, train=False)`` returns logits ``(N, 10)`` in the model dtype.
The method and ODE knobs are :mod:`anodev2_jax.methods`'; the blocks :mod:`anodev2_jax.layers`'.

Architectures (Appendix C; batch norm and ReLU after every convolution, as the paper says)

* ResNet-4 / ResNet-10 (Table 6). Stem: conv 3x3 3->16 (no bias) + BN + ReLU. Every
  shape-preserving residual block is an ODE block (``layer1_1`` for ResNet-4;
  ``layer1_1, layer1_2, layer2_2`` for ResNet-10) with the ANODE ODE function
  ``f(z) = relu(bn2(conv2(relu(bn1(conv1(z))))))``, 3x3 convs without bias, SAME padding;
  the solver supplies the residual, so one Euler step is the ResNet block ``z + f(z)``.
  ResNet-10's downsampling block ``layer2_1`` (16->32, stride 2) stays ordinary:
  ``shortcut(z) + relu(bn2(conv2(relu(bn1(conv1(z))))))`` with ``conv1`` 3x3 stride 2,
  padding 1 on each side (PyTorch's ``padding=1``, not Flax's asymmetric SAME) and
  ``shortcut = BN(conv 1x1 stride 2)``. Head: max pool 8x8 stride 8 (32x32x16 -> 256
  features for ResNet-4, 16x16x32 -> 128 for ResNet-10), flatten, Dense -> 10.
* AlexNet (Table 5). conv1 5x5 3->64 (bias) + BN + ReLU at 32x32, max pool to 16x16,
  conv2 5x5 64->64 (bias) as the ODE block with ``f(z) = relu(bn(conv2(z)))``, max pool
  to 8x8, flatten 4096 -> Dense 384 -> ReLU -> Dense 192 -> ReLU -> Dense 10. **The pool
  window is not in the paper**: we use 3x3, stride 2, SAME padding (the classic CIFAR
  AlexNet), which gives the 16x16 and 8x8 of Table 5.

Baseline parameter counts (BN scale and shift counted, running statistics not) are the
paper's Table 3 exactly: ResNet-4 7,706; ResNet-10 44,186; AlexNet 1,756,682
(``python -m anodev2_jax.models`` prints the whole table beside the paper's).

Params are created in the knob ``dtype`` (float32 by default) and inputs are cast to the
knob ``compute_dtype`` (``dtype`` unless ``"bfloat16"``) explicitly, so the models run under
strict dtype promotion with x64 enabled. With bfloat16 compute the logits are bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from anodev2_jax import kernels, layers, ode
from anodev2_jax.methods import (
    COEFF_GRANULARITIES,
    EVOLUTIONS,
    KNOBS,
    METHODS,
    MODELS,
    NORMS,
    TIME_KERNELS,
    ODEConfig,
    resolve_config,
)
from anodev2_jax.paper import MODEL_TITLES, PAPER_PARAMS

__all__ = [
    "ResNet4",
    "ResNet10",
    "AlexNet",
    "get_model",
    "remat_plan",
    "count_params",
    "param_table",
    "format_table",
    "evolution_param_table",
    "format_evolution_table",
    "main",
]


class _ODEModel(nn.Module):
    """Knobs shared by the models; ``None`` means the method's default (:func:`method_defaults`)."""

    method: str = "baseline"
    steps_z: Optional[int] = None
    steps_w: Optional[int] = None
    schedule: Optional[str] = None
    solver: Optional[str] = None
    remat: Optional[str] = None
    remat_budget_mb: Optional[float] = None
    adjoint: Optional[str] = None
    coeff_granularity: Optional[str] = None
    nonlinearity: Optional[str] = None
    norm: Optional[str] = None
    bn_momentum: Optional[float] = None
    dtype: Any = None
    compute_dtype: Any = None
    evolution: Optional[str] = None
    time_kernel: Optional[str] = None
    rda_parameterization: Optional[str] = None

    @property
    def config(self) -> ODEConfig:
        return resolve_config(self.method, **{name: getattr(self, name) for name in KNOBS})

    def _prepare(self, x):
        cfg = self.config
        if jnp.ndim(x) != 4 or jnp.shape(x)[-1] != 3:
            raise ValueError(
                f"expected NHWC images (N, H, W, 3), e.g. CIFAR-10's (N, 32, 32, 3), got shape {jnp.shape(x)}"
            )
        return cfg, jnp.asarray(x).astype(cfg.jnp_compute_dtype)

    def _stem(self, cfg: ODEConfig, x, train: bool, features: int, kernel: int, use_bias: bool):
        dtype = cfg.jnp_dtype
        x = layers.Conv(features, (kernel, kernel), padding="SAME", use_bias=use_bias, dtype=dtype, name="conv1")(x)
        return jax.nn.relu(layers.flax_batch_norm(cfg, train, "bn1")(x))

    def _resnet_head(self, cfg: ODEConfig, z):
        z = kernels.max_pool_blocks(z, 8)
        z = z.reshape((z.shape[0], -1))
        return nn.Dense(10, dtype=cfg.jnp_compute_dtype, param_dtype=cfg.jnp_dtype, name="fc")(z)


class ResNet4(_ODEModel):
    """ResNet-4 (Table 6): stem, one ODE block ``layer1_1`` (16 channels, 32x32), pool, fc."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        z = self._stem(cfg, x, train, 16, 3, False)
        z = layers.ODEBlock(16, cfg, name="layer1_1")(z, train)
        return self._resnet_head(cfg, z)


class ResNet10(_ODEModel):
    """ResNet-10 (Table 6): stem, ODE blocks ``layer1_1, layer1_2`` (16), downsample ``layer2_1``, ODE ``layer2_2`` (32)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        z = self._stem(cfg, x, train, 16, 3, False)
        z = layers.ODEBlock(16, cfg, name="layer1_1")(z, train)
        z = layers.ODEBlock(16, cfg, name="layer1_2")(z, train)
        z = layers.DownsampleBlock(32, cfg, name="layer2_1")(z, train)
        z = layers.ODEBlock(32, cfg, name="layer2_2")(z, train)
        return self._resnet_head(cfg, z)


class AlexNet(_ODEModel):
    """AlexNet (Table 5): conv1 5x5 + BN + ReLU, pool, ODE block conv2 5x5, pool, fc 4096-384-192-10.

    The pool window (3x3, stride 2, SAME) is our choice: the paper gives only the output sizes.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, x = self._prepare(x)
        dtype, param_dtype = cfg.jnp_compute_dtype, cfg.jnp_dtype
        z = self._stem(cfg, x, train, 64, 5, True)
        z = nn.max_pool(z, (3, 3), strides=(2, 2), padding="SAME")
        z = layers.ODEBlock(64, cfg, kernel_size=5, num_convs=1, use_bias=True, name="conv2")(z, train)
        z = nn.max_pool(z, (3, 3), strides=(2, 2), padding="SAME")
        z = z.reshape((z.shape[0], -1))
        z = jax.nn.relu(nn.Dense(384, dtype=dtype, param_dtype=param_dtype, name="fc1")(z))
        z = jax.nn.relu(nn.Dense(192, dtype=dtype, param_dtype=param_dtype, name="fc2")(z))
        return nn.Dense(10, dtype=dtype, param_dtype=param_dtype, name="fc3")(z)


_MODEL_CLASSES = {"alexnet": AlexNet, "resnet4": ResNet4, "resnet10": ResNet10}


def get_model(name: str, method: str, **overrides) -> nn.Module:
    """The linen Module for model ``name`` trained by ``method``, with knob ``overrides``.

    Args:
      name: ``"alexnet"``, ``"resnet4"`` or ``"resnet10"``.
      method: ``"baseline"``, ``"neural_ode"``, ``"anode"``, ``"anodev2_conf1"`` or
        ``"anodev2_conf2"``.
      **overrides: knobs (see the module docstring; :data:`KNOBS`), e.g. ``steps_z=3``.

    Returns:
      A linen Module: ``model.init(key, x)`` with ``x`` of shape ``(N, 32, 32, 3)`` gives
      ``{"params", "batch_stats"}``; ``model.apply(variables, x, train=...)`` the logits ``(N, 10)``.

    Raises:
      ValueError: unknown name, method or knob, or a bad knob value (before any compute).

    Examples:
      >>> model = get_model("resnet4", "anodev2_conf2")  # Table 4's configuration 2 (Appendix B)
      >>> model.config.steps_z, model.config.steps_w, model.config.schedule
      (2, 10, 'endpoints')
    """
    ode.check_choice("name", name, MODELS)
    cfg = resolve_config(method, **overrides)
    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "evolve"}
    return _MODEL_CLASSES[name](**knobs)


def remat_plan(model: nn.Module, input_shape: tuple[int, ...] = (1, 32, 32, 3)) -> dict[str, str]:
    """``{ODE block name: remat schedule}`` of ``model`` on inputs of ``input_shape``: what ``remat="auto"`` chose.

    Traces ``model.init`` for shapes only (``jax.eval_shape``: nothing is computed) and asks
    each :class:`~anodev2_jax.layers.ODEBlock` the question it asks itself at trace time
    (:func:`anodev2_jax.layers.block_remat` of its input), so the answer is the schedule the
    jitted step runs on that input shape. Blocks solved by diffrax (``adjoint="backsolve"``)
    use no remat and are left out.
    """
    plan = {}

    def ask(next_fun, args, kwargs, context):
        block = context.module
        if isinstance(block, layers.ODEBlock) and context.method_name == "__call__" and block.config.adjoint != "backsolve":
            z = args[0]
            plan["/".join(block.path)] = layers.block_remat(block.config, z.shape, z.dtype, block.num_convs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(ask):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return plan


def count_params(params) -> int:
    """Number of scalars in a params pytree (arrays or ``ShapeDtypeStruct``s).

    A full variables dict ``{"params": ..., "batch_stats": ...}`` counts only ``"params"``
    (running statistics are not parameters, as in Table 3).
    """
    if isinstance(params, dict) or hasattr(params, "keys"):
        if "params" in params:
            params = params["params"]
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def param_table(**overrides) -> dict[str, dict[str, int]]:
    """Parameter counts ``{method: {model: count}}`` (shapes only, via ``jax.eval_shape``)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    key = jax.random.key(0)
    table = {}
    for method in METHODS:
        table[method] = {}
        for name in MODELS:
            shapes = jax.eval_shape(get_model(name, method, **overrides).init, key, x)
            table[method][name] = count_params(shapes["params"])
    return table


def evolution_param_table(method: str = "anodev2_conf1", **overrides) -> dict[tuple[str, str], dict[str, int]]:
    """Parameter counts ``{(evolution, time_kernel): {model: count}}`` of an evolving ``method`` (shapes only)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    key = jax.random.key(0)
    table = {}
    for evolution in EVOLUTIONS:
        for time_kernel in TIME_KERNELS:
            if evolution == "mlp" and overrides.get("coeff_granularity", "kernel") != "kernel":
                continue  # the MLP has no per-filter form (resolve_config says so)
            row = table[evolution, time_kernel] = {}
            for name in MODELS:
                model = get_model(name, method, evolution=evolution, time_kernel=time_kernel, **overrides)
                row[name] = count_params(jax.eval_shape(model.init, key, x)["params"])
    return table


def format_evolution_table(table: dict[tuple[str, str], dict[str, int]], method: str = "anodev2_conf1") -> str:
    """Markdown: rows = (evolution, time kernel), columns = models; the first row is the paper's ANODEV2."""
    lines = [
        "| evolution q | time kernel K | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |",
        "|---|---|" + "---:|" * len(MODELS),
    ]
    for (evolution, time_kernel), row in table.items():
        lines.append(f"| {evolution} | {time_kernel} | " + " | ".join(f"{row[m]:,}" for m in MODELS) + " |")
    return "\n".join(lines)


def format_table(table: dict[str, dict[str, int]]) -> str:
    """Markdown: rows = methods, columns = models, ``ours (paper)``; ours exact, paper's Table 3 rounded."""
    lines = ["| method | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    for method, row in table.items():
        cells = [f"{row[m]:,} ({PAPER_PARAMS[method][m]})" for m in MODELS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Print the Table 3 analogue (our parameter counts, the paper's in parentheses), then every q x K combination's."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--coeff-granularity", default="kernel", choices=COEFF_GRANULARITIES)
    parser.add_argument("--norm", default="per_step", choices=NORMS)
    args = parser.parse_args(argv)
    table = param_table(coeff_granularity=args.coeff_granularity, norm=args.norm)
    print(f"Parameters (BN scale+shift counted, running stats not; norm={args.norm!r}, "
          f"coeff_granularity={args.coeff_granularity!r}); paper's Table 3 in parentheses\n")
    print(format_table(table))
    for method in ("anodev2_conf1", "anodev2_conf2"):
        print(f"\n{method}: every evolution operator q (Eq. 2.3c) and time kernel K (Eq. 2.3d), same settings\n")
        table = evolution_param_table(method, coeff_granularity=args.coeff_granularity, norm=args.norm)
        print(format_evolution_table(table, method))


if __name__ == "__main__":
    main()
