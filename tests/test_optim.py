"""The Appendix C optimizer: weight decay mask and step-wise learning-rate schedule."""

import jax
import numpy as np
import pytest

from configs import default

from anodev2_jax import optim


def test_weight_decay_skips_rda_coefficients():
    params = {"conv1": {"kernel": 1.0, "rda_d_raw": 2.0, "rda_v": 3.0, "rda_rho": 4.0}, "bn": {"scale": 5.0}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"conv1": {"kernel": True, "rda_d_raw": False, "rda_v": False, "rda_rho": False}, "bn": {"scale": True}}
    assert all(jax.tree_util.tree_leaves(optim.weight_decay_mask(params, decay_rda_coeffs=True)))
    schedule = optim.learning_rate_schedule(default.get_config(), steps_per_epoch=10)
    lrs = [float(schedule(s)) for s in (0, 1499, 1500, 2999, 3000)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert schedule(0).dtype == np.float32


def test_optimizer_spec_is_hashable_and_built_from_the_config():
    spec = optim.OptimizerSpec.from_config(default.get_config(), 195)
    assert hash(spec) == hash(optim.OptimizerSpec.from_config(default.get_config(), 195))
    assert (spec.learning_rate, spec.lr_boundaries_epochs, spec.steps_per_epoch) == (0.1, (150, 300), 195)


def test_host_learning_rate_is_the_schedule_bit_for_bit():
    """The training loop reads the rate on the host (no device computation inside an epoch): the same float32 numbers."""
    config = default.get_config()
    config.lr_boundaries_epochs, config.lr_decay_factor = (40, 80, 100), 0.3
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=7)
    for step in (0, 279, 280, 559, 560, 699, 700, 10_000):
        assert optim.learning_rate_at(config, 7, step) == float(schedule(step)), step
