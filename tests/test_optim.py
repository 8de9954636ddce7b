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


def test_every_evolution_and_time_kernel_param_is_masked_off_decay():
    params = {
        "conv1": {"kernel": 1.0, "rda_d": 2.0, "evo_generator": 3.0, "evo_w1": 4.0},
        "time_log_rate": 5.0, "time_values": 6.0, "bn": {"scale": 7.0},
    }  # fmt: skip
    assert optim.weight_decay_mask(params) == {
        "conv1": {"kernel": True, "rda_d": False, "evo_generator": False, "evo_w1": False},
        "time_log_rate": False, "time_values": False, "bn": {"scale": True},
    }  # fmt: skip
    assert optim.evolution_mask(params) == jax.tree.map(lambda keep: not keep, optim.weight_decay_mask(params))


@pytest.mark.exact
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_evolution_lr_scale_multiplies_exactly_the_evolution_params_updates(momentum):
    """Step 1: evolution updates are exactly scale x (a power of 2: bitwise); every other update is unchanged, also in step 2."""
    import jax.numpy as jnp

    params = {"conv1": {"kernel": jnp.ones(3), "rda_d": jnp.full((), 0.5), "evo_generator": jnp.ones((2, 2))},
              "time_log_rate": jnp.full((), 2.0), "fc": {"kernel": jnp.ones(2)}}  # fmt: skip
    grads = jax.tree.map(lambda a: 0.25 * jnp.ones_like(a) + 0.5, params)
    updates = {}
    for scale in (1.0, 8.0):
        config = default.get_config()
        config.evolution_lr_scale, config.momentum = scale, momentum
        tx, _ = optim.create_optimizer(config, steps_per_epoch=10)
        state, p, steps = tx.init(params), params, []
        for _ in range(2):
            u, state = tx.update(grads, state, p)
            p = jax.tree.map(lambda a, b: a + b, p, u)
            steps.append(u)
        updates[scale] = steps
    evo = jax.tree_util.tree_leaves(optim.evolution_mask(params))
    assert evo == [True, False, True, False, True]  # conv1/evo_generator, conv1/kernel, conv1/rda_d, fc/kernel, time_log_rate
    first1, first8 = (jax.tree_util.tree_leaves(updates[s][0]) for s in (1.0, 8.0))
    second1, second8 = (jax.tree_util.tree_leaves(updates[s][1]) for s in (1.0, 8.0))
    for is_evo, a1, a8, b1, b8 in zip(evo, first1, first8, second1, second8):
        if is_evo:
            np.testing.assert_array_equal(a8, 8.0 * a1)
        else:
            np.testing.assert_array_equal(a8, a1)
            np.testing.assert_array_equal(b8, b1)
    spec = optim.OptimizerSpec.from_config(default.get_config(), 10)
    assert spec.evolution_lr_scale == 1.0 and len(optim.make_optimizer(spec)[0]) == 2  # the plain chain at 1
