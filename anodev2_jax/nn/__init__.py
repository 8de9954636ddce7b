"""ANODEV2 blocks for your own models, in Flax linen, Flax NNX and Equinox: thin shells over one pure core.

One submodule per module system, each with the same two blocks:

* ``ODEBlock(features, ...)``: the paper's block (ANODE's vector field
  ``relu(bn2(conv2(relu(bn1(conv1(z))))))`` with per-step BatchNorm inside, kernels evolved
  by Eq. B.4 / 2.6 or another operator, exact gradients, remat); the block of our own
  ResNet-4/10 and AlexNet, same variables and names, same numbers.
* ``CoupledBlock(field, ...)``: your vector field (a module of that system, with its own
  convolutions and BatchNorms) solved as an ANODEV2 block.

    from anodev2_jax.nn.linen import ODEBlock, CoupledBlock     # nn.Module s
    from anodev2_jax.nn.nnx import ODEBlock, CoupledBlock       # nnx.Module s: nnx.Param, nnx.BatchStat, nnx.Rngs
    from anodev2_jax.nn.equinox import ODEBlock, CoupledBlock   # eqx.Module s: state in eqx.nn.State

Every block runs :mod:`anodev2_jax.nn.core` (:func:`~anodev2_jax.nn.core.ode_block` and
:func:`~anodev2_jax.nn.core.field_block`), which runs :func:`anodev2_jax.coupled_block`;
its docstring says how a field's parameters become ``theta``, which kernels evolve and how
BatchNorm state is kept per step or shared. The submodules are imported on first use, so
``import anodev2_jax.nn`` imports neither Flax nor Equinox's layers.
"""

import importlib

__all__ = ["core", "linen", "nnx", "equinox"]


def __getattr__(name):
    # each shell imports its own module system; load it only when asked for
    if name in __all__:
        return importlib.import_module(f"anodev2_jax.nn.{name}")
    raise AttributeError(f"module 'anodev2_jax.nn' has no attribute {name!r}")
