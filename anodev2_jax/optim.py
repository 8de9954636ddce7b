"""The optimizer of Appendix C: SGD with momentum, coupled weight decay, step-wise learning-rate decay.

SGD with momentum 0.9, weight decay 5e-4 and learning rate 0.1 divided by
``lr_decay_factor`` (10) at ``lr_boundaries_epochs`` (150 and 300 of 350 for the ResNets; 40,
80 and 100 of 120 for AlexNet), all from the config.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from anodev2_jax.methods import EVOLUTION_PARAM_PREFIXES

__all__ = [
    "OptimizerSpec",
    "learning_rate_schedule",
    "learning_rate_at",
    "weight_decay_mask",
    "evolution_mask",
    "create_optimizer",
    "make_optimizer",
]


class OptimizerSpec(NamedTuple):
    """The config fields that define the optimizer (hashable: a cache key for compiled steps)."""

    learning_rate: float
    lr_boundaries_epochs: tuple[int, ...]
    lr_decay_factor: float
    momentum: float
    weight_decay: float
    decay_rda_coeffs: bool
    steps_per_epoch: int
    evolution_lr_scale: float = 1.0

    @classmethod
    def from_config(cls, config, steps_per_epoch: int) -> "OptimizerSpec":
        return cls(
            float(config.learning_rate),
            tuple(int(e) for e in config.lr_boundaries_epochs),
            float(config.lr_decay_factor),
            float(config.momentum),
            float(config.weight_decay),
            bool(config.decay_rda_coeffs),
            int(steps_per_epoch),
            float(config.get("evolution_lr_scale", 1.0)),
        )


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
    """Step-wise schedule: ``learning_rate * lr_decay_factor ** (#boundaries passed)``; float32.

    A boundary at epoch ``e`` takes effect from global step ``e * steps_per_epoch`` on
    (after ``e`` complete epochs, as PyTorch's ``MultiStepLR`` stepped per epoch). Written
    here rather than ``optax.piecewise_constant_schedule`` so it returns float32 under x64 too.
    """
    lr0, factor = float(config.learning_rate), float(config.lr_decay_factor)
    boundaries = [int(e) * steps_per_epoch for e in config.lr_boundaries_epochs]

    def schedule(count):
        count = jnp.asarray(count)
        lr = jnp.full((), lr0, jnp.float32)
        for b in boundaries:
            lr = jnp.where(count >= b, lr * jnp.float32(factor), lr)
        return lr

    return schedule


def learning_rate_at(config, steps_per_epoch: int, step: int) -> float:
    """:func:`learning_rate_schedule`'s value at global step ``step``, computed on the host.

    The same float32 arithmetic in numpy, so the same number without a device computation
    (the training loop reads it inside an epoch, where nothing may be copied to the device).
    """
    lr = np.float32(config.learning_rate)
    for e in config.lr_boundaries_epochs:
        if step >= int(e) * steps_per_epoch:
            lr = lr * np.float32(config.lr_decay_factor)
    return float(lr)


def _is_evolution_param(path) -> bool:
    name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
    return str(name).startswith(EVOLUTION_PARAM_PREFIXES)


def evolution_mask(params):
    """True for every evolution and time-kernel parameter (names ``rda_*``, ``evo_*``, ``time_*``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_evolution_param(path), params)


def weight_decay_mask(params, decay_rda_coeffs: bool = False):
    """True for every leaf weight decay applies to: all but the evolution and time-kernel params.

    Those are the RDA coefficients (``rda_*``), the other operators' params (``evo_*``) and
    the time kernels' (``time_*``). Decay pulls towards 0, which for them is no neutral
    value: ``rda_d_raw -> 0`` means ``d = softplus(0) = log 2`` (strong diffusion), a
    discrete time kernel's values -> 0 means ``theta -> 0``. ``decay_rda_coeffs=True``
    (``config.decay_rda_coeffs``) decays them too. BatchNorm scale and shift are decayed,
    as PyTorch's ``SGD(weight_decay=...)`` does.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: decay_rda_coeffs or not _is_evolution_param(path), params)


def create_optimizer(config, steps_per_epoch: int):
    """SGD + momentum + coupled (PyTorch-style) weight decay, masked off the evolution params.

    ``config.evolution_lr_scale`` multiplies the learning rate of the evolution and
    time-kernel params (:func:`evolution_mask`); at 1 (the default) the optimizer is the
    plain chain, the same program as before the knob existed.

    Coupled L2: ``optax.add_decayed_weights`` before the momentum trace, exactly
    ``torch.optim.SGD(weight_decay=5e-4)``.

    Args:
      config: anything with the optimizer fields of ``configs/default.py`` (a ConfigDict).
      steps_per_epoch: optimizer steps per epoch (places the learning-rate boundaries).

    Returns:
      ``(tx, schedule)``: the optax transformation and the learning-rate schedule.
    """
    return make_optimizer(OptimizerSpec.from_config(config, steps_per_epoch))


def make_optimizer(spec: OptimizerSpec):
    """:func:`create_optimizer` from an :class:`OptimizerSpec`: ``(tx, schedule)``."""
    schedule = learning_rate_schedule(spec, spec.steps_per_epoch)
    decay_rda = spec.decay_rda_coeffs
    parts = [
        optax.add_decayed_weights(spec.weight_decay, mask=lambda p: weight_decay_mask(p, decay_rda)),
        optax.sgd(schedule, momentum=spec.momentum or None),
    ]
    if spec.evolution_lr_scale != 1.0:
        # the evolution params' updates times the scale: their learning rate (and, SGD being
        # linear in it, their momentum-averaged step) is evolution_lr_scale times the schedule's
        parts.append(optax.masked(optax.scale(spec.evolution_lr_scale), evolution_mask))
    return optax.chain(*parts), schedule
