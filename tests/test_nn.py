"""Tests of anodev2_jax.nn: the linen, NNX and Equinox blocks equal the pure coupled_block and the models' block, train, and vmap.

The problem is small (batch 4, 6x6x3 activations, configuration 2's schedule with 2
activation and 4 weight steps, both kernels RDA-evolved, per-step BatchNorm) and float64, with non-trivial parameters (numpy
random numbers, as in tests/test_models.py) copied into every shell.
"""

import ast
import functools
import math
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from flax import nnx

from anodev2_jax import ExponentialKernel, RDACoeffs, RDAEquation, coupled_block, layers, mlp_evolution
from anodev2_jax.methods import resolve_config
from anodev2_jax.nn import equinox as neqx
from anodev2_jax.nn import linen as nlinen
from anodev2_jax.nn import nnx as nnnx
from helpers import max_rel_err

N, HW, C, STEPS = 4, 6, 3, 2
F64 = jnp.float64
KNOBS = dict(steps_z=STEPS, steps_w=4, schedule="endpoints", remat="none")
CONVS = (("conv1", "bn1"), ("conv2", "bn2"))

# Tolerances (float64, eps = 2.2e-16). SAME: the shells and the models' block run one jaxpr
# (nn.core.ode_block) in separately compiled programs, so they may differ only by XLA's
# round-off choices; measured: bit-identical here, 1e-13 relative allows a few ulps per step.
# DIFFERENT: against the pure coupled_block with a hand-written f (lax convolutions, BN written
# out, differentiated by autodiff), with the discrete adjoint, and around users' fields with
# Flax / Equinox BatchNorms, the arithmetic differs (the models' closed-form conv -> BN -> ReLU
# backward pass, Eq. 2.5's recursions, per-example means reduced by pmean, Flax's BN formula):
# measured up to 3.6e-14 (gradients; outputs and statistics 3e-16): bound 1e-11.
SAME, DIFFERENT = 1e-13, 1e-11


def _fill(shapes, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jtu.keystr(path[-1:])
        if "scale" in name:
            a = 1.0 + 0.2 * rng.normal(size=s.shape)
        elif "'var'" in name:
            a = 1.0 + 0.5 * rng.uniform(size=s.shape)
        elif "'rda_d'" in name:
            a = 0.13 + 0.03 * rng.normal(size=s.shape)
        elif "rda_" in name:
            a = 0.3 * rng.normal(size=s.shape)
        elif "kernel" in name:
            a = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        else:  # BN shifts, running means
            a = 0.1 * rng.normal(size=s.shape)
        return jnp.asarray(a, s.dtype)

    return jtu.tree_map_with_path(fill, shapes)


@functools.cache
def _problem(adjoint):
    """The models' block (its config and class), its variables, an input and an output cotangent."""
    cfg = resolve_config("anodev2_conf1", dtype="float64", adjoint=adjoint, **KNOBS)
    block = layers.ODEBlock(C, cfg)
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(N, HW, HW, C)), F64)
    cot = jnp.asarray(rng.normal(size=(N, HW, HW, C)), F64)
    variables = _fill(jax.eval_shape(block.init, jax.random.key(0), z))
    return cfg, block, variables, z, cot


def _conv(h, w):
    return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _reference_f(z, theta, args):
    """ANODE's f written out: two (3x3 conv -> BatchNorm with batch moments -> ReLU), moments as aux."""
    h, aux = z, {}
    for conv, bn in CONVS:
        h = _conv(h, theta[conv])
        mean = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(h - mean.reshape(1, 1, 1, -1)), axis=(0, 1, 2))
        h = (h - mean.reshape(1, 1, 1, -1)) / jnp.sqrt(var + 1e-5).reshape(1, 1, 1, -1)
        h = jax.nn.relu(h * args[bn]["scale"].reshape(1, 1, 1, -1) + args[bn]["bias"].reshape(1, 1, 1, -1))
        aux[bn] = (mean, var)
    return h, aux


@functools.cache
def _reference():
    """The pure coupled_block (autodiff) on the block's params (model naming): output, new statistics, gradients of (params, z)."""
    _, _, variables, z, cot = _problem("autodiff")

    def run(params, z):
        theta = {conv: params[conv]["kernel"] for conv, _ in CONVS}
        evolution = {conv: RDACoeffs(jnp.abs(params[conv]["rda_d"]), params[conv]["rda_v"], params[conv]["rda_rho"]) for conv, _ in CONVS}
        args = {bn: params[bn] for _, bn in CONVS}
        z1, aux = coupled_block(_reference_f, z, theta, evolution, steps_z=STEPS, steps_w=4, schedule="endpoints", step_args=args, has_aux=True)
        stats = variables["batch_stats"]
        new = {bn: {"mean": 0.9 * stats[bn]["mean"] + 0.1 * aux[bn][0], "var": 0.9 * stats[bn]["var"] + 0.1 * aux[bn][1]} for _, bn in CONVS}
        return jnp.sum(z1 * cot), (z1, new)

    (_, (z1, stats)), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(variables["params"], z)
    return z1, stats, grads


def _linen_run(block, variables, z, cot, to_model=lambda p: p):
    """``(z1, new batch_stats, (param grads, z grad))`` of a linen block in train mode."""

    def run(params, z):
        z1, updates = block.apply({**variables, "params": params}, z, train=True, mutable=["batch_stats"])
        return jnp.sum(z1 * cot), (z1, updates["batch_stats"])

    (_, (z1, stats)), (g, gz) = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(variables["params"], z)
    return z1, stats, (to_model(g), gz)


def _nnx_run(block, z, cot):
    @nnx.jit
    def run(block, z):
        def loss(block, z):
            z1 = block(z)
            return jnp.sum(z1 * cot), z1

        (_, z1), (g, gz) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(block, z)
        return z1, g, gz

    z1, g, gz = run(block, z)
    return z1, nnx.to_pure_dict(g), gz


def _eqx_run(block, state, z, cot):
    @eqx.filter_jit
    def run(block, state, z):
        def loss(diff, state):  # filter_value_and_grad differentiates the first argument
            block, z = diff
            z1, state = block(z, state)
            return jnp.sum(z1 * cot.transpose(0, 3, 1, 2)), (z1, state)

        (_, (z1, state)), (g, gz) = eqx.filter_value_and_grad(loss, has_aux=True)((block, z), state)
        return z1.transpose(0, 2, 3, 1), state, g, gz.transpose(0, 2, 3, 1)

    return run(block, state, z.transpose(0, 3, 1, 2))


def _assert_close(got, want, tol, what):
    got_z1, got_stats, got_grads = got
    want_z1, want_stats, want_grads = want
    for name, a, b in (("z1", got_z1, want_z1), ("stats", got_stats, want_stats), ("grads", got_grads, want_grads)):
        assert jtu.tree_structure(a) == jtu.tree_structure(b), (what, name)
        err = max_rel_err(a, b)
        assert err < tol, f"{what}: {name} differs by {err:.2e} (relative), bound {tol:.0e}"


# ----------------------------------------------------------------------------- ODEBlock in three systems


def _flat(tree):
    return [(tuple(k.key for k in path), a) for path, a in jtu.tree_flatten_with_path(tree)[0]]


def _shell_blocks(variables, adjoint):
    """The three public ODEBlocks with the models' block's variables."""
    knobs = dict(KNOBS, adjoint=adjoint)
    params, stats = variables["params"], variables["batch_stats"]
    linen_block = nlinen.ODEBlock(C, param_dtype=F64, **knobs)
    nnx_block = nnnx.ODEBlock(C, param_dtype=F64, rngs=nnx.Rngs(0), **knobs)
    nnx.update(nnx_block, nnx.from_flat_state(_flat(params) + _flat(stats)))  # the same paths as linen's
    eqx_block, eqx_state = eqx.nn.make_with_state(neqx.ODEBlock)(C, dtype=F64, key=jax.random.key(0), **knobs)
    eqx_block = eqx.tree_at(lambda b: b.params, eqx_block, params)
    eqx_state = eqx_state.set(eqx_block.stats, stats)
    return linen_block, nnx_block, (eqx_block, eqx_state)


@pytest.mark.exact
@pytest.mark.parametrize("adjoint", ["autodiff", "discrete"])
def test_ode_blocks_equal_the_models_block_and_the_pure_coupled_block(adjoint):
    _, model_block, variables, z, cot = _problem(adjoint)
    reference = _reference()
    model = _linen_run(model_block, variables, z, cot)
    _assert_close(model, reference, DIFFERENT, "models' block vs pure coupled_block")
    linen_block, nnx_block, (eqx_block, eqx_state) = _shell_blocks(variables, adjoint)
    _assert_close(_linen_run(linen_block, variables, z, cot), model, SAME, "linen ODEBlock")
    z1, g, gz = _nnx_run(nnx_block, z, cot)
    stats = {bn: {"mean": getattr(nnx_block, bn).mean.get_value(), "var": getattr(nnx_block, bn).var.get_value()} for _, bn in CONVS}
    _assert_close((z1, stats, (g, gz)), model, SAME, "NNX ODEBlock")
    z1, state, g, gz = _eqx_run(eqx_block, eqx_state, z, cot)
    _assert_close((z1, state.get(eqx_block.stats), (g.params, gz)), model, SAME, "Equinox ODEBlock")

    if adjoint == "autodiff":  # eval mode: the running statistics normalize (fresh blocks: NNX's moved in train mode)
        want = model_block.apply(variables, z, train=False)
        linen_block, nnx_block, (eqx_block, eqx_state) = _shell_blocks(variables, adjoint)
        nnx_block.eval()
        eqx_z1, _ = eqx.filter_jit(eqx.nn.inference_mode(eqx_block))(z.transpose(0, 3, 1, 2), eqx_state)
        got = {
            "linen": jax.jit(lambda v: linen_block.apply(v, z, train=False))(variables),
            "nnx": nnx.jit(lambda block: block(z))(nnx_block),
            "equinox": eqx_z1.transpose(0, 2, 3, 1),
        }
        for name, z1 in got.items():
            assert max_rel_err(z1, want) < SAME, name


# ----------------------------------------------------------------------------- CoupledBlock around a user's field
#
# Each system's own layers written as ANODE's f (3x3 convs without bias, BatchNorm with the
# models' momentum 0.9, eps 1e-5 and two-pass variance, ReLU): the block with per-step
# BatchNorm and RDA evolution must give the models' block's numbers from the same parameters.


class LinenField(nn.Module):
    features: int = C
    dtype: object = F64

    @nn.compact
    def __call__(self, z, train: bool):
        for conv, bn in CONVS:
            z = nn.Conv(self.features, (3, 3), use_bias=False, param_dtype=self.dtype, name=conv)(z)
            z = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                force_float32_reductions=False, param_dtype=self.dtype, name=bn,
            )(z)
            z = nn.relu(z)
        return z


def _nnx_batch_norm(features, dtype, rngs):
    norm = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs)
    for stat in (norm.mean, norm.var):  # nnx.BatchNorm keeps float32 statistics whatever param_dtype says
        stat.set_value(stat.get_value().astype(dtype))
    return norm


class NNXField(nnx.Module):
    def __init__(self, rngs, features=C, dtype=F64):
        for conv, bn in CONVS:
            setattr(self, conv, nnx.Conv(features, features, (3, 3), use_bias=False, param_dtype=dtype, rngs=rngs))
            setattr(self, bn, _nnx_batch_norm(features, dtype, rngs))

    def __call__(self, z):
        for conv, bn in CONVS:
            z = nnx.relu(getattr(self, bn)(getattr(self, conv)(z)))
        return z


class EqxField(eqx.Module):
    """Per example, channel-first: ``(C, H, W)``; BatchNorm over the block's vmapped batch axis."""

    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm

    def __init__(self, key, features=C, dtype=F64):
        k1, k2 = jax.random.split(key)
        bn = functools.partial(eqx.nn.BatchNorm, features, "batch", momentum=0.9, eps=1e-5, mode="batch", dtype=dtype)
        self.conv1 = eqx.nn.Conv2d(features, features, 3, padding=1, use_bias=False, dtype=dtype, key=k1)
        self.conv2 = eqx.nn.Conv2d(features, features, 3, padding=1, use_bias=False, dtype=dtype, key=k2)
        self.bn1, self.bn2 = bn(), bn()

    def __call__(self, z, state):
        for conv, bn in CONVS:
            z, state = getattr(self, bn)(getattr(self, conv)(z), state)
            z = jax.nn.relu(z)
        return z, state


def _rda(params):
    return {k: params[k] for k in ("rda_d", "rda_v", "rda_rho")}


def _linen_coupled(params, stats, adjoint):
    block = nlinen.CoupledBlock(LinenField(), adjoint=adjoint, param_dtype=F64, **KNOBS)
    variables = {
        "params": {
            "field": {name: {"kernel": params[name]["kernel"]} if name.startswith("conv") else params[name] for name in params},
            "evolution": {f"{conv}/kernel": _rda(params[conv]) for conv, _ in CONVS},
        },
        "batch_stats": {"field": stats},
    }

    def to_model(g):
        return {
            **{conv: {"kernel": g["field"][conv]["kernel"], **g["evolution"][f"{conv}/kernel"]} for conv, _ in CONVS},
            **{bn: g["field"][bn] for _, bn in CONVS},
        }

    return block, variables, to_model


def _nnx_coupled(params, stats, adjoint):
    block = nnnx.CoupledBlock(NNXField(nnx.Rngs(0)), adjoint=adjoint, param_dtype=F64, rngs=nnx.Rngs(1), **KNOBS)
    values = {
        "field": {**{conv: {"kernel": params[conv]["kernel"]} for conv, _ in CONVS}, **{bn: {**params[bn], **stats[bn]} for _, bn in CONVS}},
        "evolution": {f"{conv}/kernel": _rda(params[conv]) for conv, _ in CONVS},
    }
    nnx.update(block, nnx.from_flat_state(_flat(values)))

    def to_model(g):
        return {
            **{conv: {"kernel": g["field"][conv]["kernel"], **g["evolution"][f"{conv}/kernel"]} for conv, _ in CONVS},
            **{bn: {k: g["field"][bn][k] for k in ("scale", "bias")} for _, bn in CONVS},
        }

    def new_stats(block):
        return {bn: {"mean": getattr(block.field, bn).mean.get_value(), "var": getattr(block.field, bn).var.get_value()} for _, bn in CONVS}

    return block, to_model, new_stats


def _eqx_coupled(params, stats, adjoint):
    make = lambda: neqx.CoupledBlock(EqxField(jax.random.key(0)), adjoint=adjoint, dtype=F64, key=jax.random.key(1), **KNOBS)
    block, state = eqx.nn.make_with_state(make)()
    oihw = lambda w: w.transpose(3, 2, 0, 1)
    for conv, bn in CONVS:
        block = eqx.tree_at(lambda b: getattr(b.field, conv).weight, block, oihw(params[conv]["kernel"]))
        block = eqx.tree_at(lambda b: (getattr(b.field, bn).weight, getattr(b.field, bn).bias), block, (params[bn]["scale"], params[bn]["bias"]))
        state = state.set(getattr(block.field, bn).batch_state_index, (stats[bn]["mean"], stats[bn]["var"]))
    block = eqx.tree_at(lambda b: b.evolution, block, {f"{conv}/weight": _rda(params[conv]) for conv, _ in CONVS})

    def to_model(g):
        return {
            **{conv: {"kernel": getattr(g.field, conv).weight.transpose(2, 3, 1, 0), **g.evolution[f"{conv}/weight"]} for conv, _ in CONVS},
            **{bn: {"scale": getattr(g.field, bn).weight, "bias": getattr(g.field, bn).bias} for _, bn in CONVS},
        }

    def new_stats(block, state):
        return {bn: dict(zip(("mean", "var"), state.get(getattr(block.field, bn).batch_state_index))) for _, bn in CONVS}

    return block, state, to_model, new_stats


@pytest.mark.exact
@pytest.mark.standard_promotion  # nnx.BatchNorm promotes its input with float32 (an error under strict promotion)
@pytest.mark.parametrize("adjoint", ["autodiff", "discrete"])
def test_coupled_blocks_around_users_fields_equal_the_models_block(adjoint):
    _, _, variables, z, cot = _problem(adjoint)
    reference = _reference()
    params, stats = variables["params"], variables["batch_stats"]

    block, linen_variables, to_model = _linen_coupled(params, stats, adjoint)
    z1, new, grads = _linen_run(block, linen_variables, z, cot, to_model)
    _assert_close((z1, new["field"], grads), reference, DIFFERENT, "linen CoupledBlock")

    block, to_model, new_stats = _nnx_coupled(params, stats, adjoint)
    z1, g, gz = _nnx_run(block, z, cot)
    _assert_close((z1, new_stats(block), (to_model(g), gz)), reference, DIFFERENT, "NNX CoupledBlock")

    block, state, to_model, new_stats = _eqx_coupled(params, stats, adjoint)
    z1, state, g, gz = _eqx_run(block, state, z, cot)
    _assert_close((z1, new_stats(block, state), (to_model(g), gz)), reference, DIFFERENT, "Equinox CoupledBlock")


@pytest.mark.exact
def test_stateless_fields_of_plain_layers_equal_the_pure_coupled_block_with_a_time_kernel():
    """A conv and tanh as the field (linen and Equinox ``Sequential``s), exponential time kernel: the pure block's numbers."""
    _, _, variables, z, cot = _problem("autodiff")
    kernel, rda = variables["params"]["conv1"]["kernel"], _rda(variables["params"]["conv1"])
    log_rate = jnp.asarray(0.7, F64)
    knobs = dict(KNOBS, time_kernel="exponential")

    def reference(kernel, rda, log_rate, z):
        evolution = {"w": RDACoeffs(jnp.abs(rda["rda_d"]), rda["rda_v"], rda["rda_rho"])}
        f = lambda z, theta: jnp.tanh(_conv(z, theta["w"]))
        z1 = coupled_block(f, z, {"w": kernel}, evolution, steps_z=STEPS, steps_w=4, schedule="endpoints",
                           time_kernel=ExponentialKernel(jnp.exp(log_rate)))
        return jnp.sum(z1 * cot)

    want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3)))(kernel, rda, log_rate, z)

    field = nn.Sequential([nn.Conv(C, (3, 3), use_bias=False, param_dtype=F64), jnp.tanh])
    block = nlinen.CoupledBlock(field, param_dtype=F64, **knobs)
    params = {"field": {"layers_0": {"kernel": kernel}}, "evolution": {"layers_0/kernel": rda}, "time_kernel": {"time_log_rate": log_rate}}
    assert jax.tree.structure(jax.eval_shape(block.init, jax.random.key(0), z)["params"]) == jax.tree.structure(params)
    value, (g, gz) = jax.jit(jax.value_and_grad(lambda p, z: jnp.sum(block.apply({"params": p}, z) * cot), argnums=(0, 1)))(params, z)
    got = (value, (g["field"]["layers_0"]["kernel"], g["evolution"]["layers_0/kernel"], g["time_kernel"]["time_log_rate"], gz))
    assert max_rel_err(got, want) < DIFFERENT

    field = eqx.nn.Sequential([eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, dtype=F64, key=jax.random.key(0)), eqx.nn.Lambda(jnp.tanh)])
    block = neqx.CoupledBlock(field, dtype=F64, key=jax.random.key(1), **knobs)
    block = eqx.tree_at(lambda b: (b.field.layers[0].weight, b.evolution, b.time_kernel), block,
                        (kernel.transpose(3, 2, 0, 1), {"layers/0/weight": rda}, {"time_log_rate": log_rate}))

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(diff):
        block, z = diff
        z1, _ = block(z, eqx.nn.State(block))
        return jnp.sum(z1 * cot.transpose(0, 3, 1, 2))

    value, (g, gz) = loss((block, z.transpose(0, 3, 1, 2)))
    got = (value, (g.field.layers[0].weight.transpose(2, 3, 1, 0), g.evolution["layers/0/weight"], g.time_kernel["time_log_rate"], gz.transpose(0, 2, 3, 1)))
    assert max_rel_err(got, want) < DIFFERENT


# ----------------------------------------------------------------------------- training on the digits


@functools.cache
def _digits(num_train=512, num_test=512):
    """scikit-learn's 8x8 handwritten digits, scaled to [0, 1], NHWC float32: a fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.images[order] / 16.0).astype(np.float32)[..., None]
    y = digits.target[order].astype(np.int32)
    return x[:num_train], y[:num_train], x[num_train:num_train + num_test], y[num_train:num_train + num_test]


WIDTH, TRAIN_STEPS, BATCH = 8, 60, 64


def _batches(seed):
    x, y, _, _ = _digits()
    rng = np.random.default_rng(seed)
    for _ in range(TRAIN_STEPS):
        idx = rng.choice(len(y), BATCH, replace=False)
        yield x[idx], y[idx]


class NNXNet(nnx.Module):
    """conv 1->8 + BN + ReLU at 8x8, an ANODEV2 block around a user's field, 2x2 max pool, fc 128 -> 10."""

    def __init__(self, rngs, dtype=jnp.float32, **knobs):
        self.conv = nnx.Conv(1, WIDTH, (3, 3), use_bias=False, param_dtype=dtype, rngs=rngs)
        self.bn = _nnx_batch_norm(WIDTH, dtype, rngs)
        knobs = {"steps_z": 2, "steps_w": 2, **knobs}
        self.block = nnnx.CoupledBlock(NNXField(rngs, WIDTH, dtype), param_dtype=dtype, rngs=rngs, **knobs)
        self.fc = nnx.Linear(4 * 4 * WIDTH, 10, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.block(nnx.relu(self.bn(self.conv(x))))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        return self.fc(h.reshape(h.shape[0], -1))


class EqxNet(eqx.Module):
    """NNXNet in Equinox: per-example layers vmapped over the batch (channel-first), the block on the batch.

    ``dtype=None`` is Equinox's default, float64 under the suite's x64: with float32 params,
    ``eqx.nn.BatchNorm(mode="batch")`` returns float64 in inference mode under x64 (its
    debiasing ``momentum ** counter`` is float64), which a float32 conv then refuses.
    """

    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    block: neqx.CoupledBlock
    fc: eqx.nn.Linear

    def __init__(self, key, dtype=None, **knobs):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, WIDTH, 3, padding=1, use_bias=False, dtype=dtype, key=k1)
        self.bn = eqx.nn.BatchNorm(WIDTH, "batch", momentum=0.9, mode="batch", dtype=dtype)
        knobs = {"steps_z": 2, "steps_w": 2, **knobs}
        self.block = neqx.CoupledBlock(EqxField(k2, WIDTH, dtype), dtype=dtype, key=k3, **knobs)
        self.fc = eqx.nn.Linear(4 * 4 * WIDTH, 10, dtype=dtype, key=k4)

    def __call__(self, x, state):  # x: (N, 1, 8, 8)
        h = jax.vmap(self.conv)(x.astype(self.conv.weight.dtype))
        h, state = jax.vmap(self.bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(h, state)
        h, state = self.block(jax.nn.relu(h), state)
        h = jax.vmap(eqx.nn.MaxPool2d(2, 2))(h)
        return jax.vmap(self.fc)(h.reshape(h.shape[0], -1)), state


def _nnx_train(seed):
    model = NNXNet(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for x, y in _batches(seed)]
    model.eval()
    _, _, x_test, y_test = _digits()
    accuracy = float(jnp.mean(nnx.jit(lambda m, x: m(x))(model, x_test).argmax(-1) == y_test))
    return losses, accuracy


def _eqx_train(seed):
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(seed))
    tx = optax.adam(1e-2)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, opt_state, x, y):
        def loss_fn(model, state):
            logits, state = model(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for x, y in _batches(seed):
        model, state, opt_state, loss = step(model, state, opt_state, x.transpose(0, 3, 1, 2), y)
        losses.append(float(loss))
    _, _, x_test, y_test = _digits()
    logits, _ = eqx.filter_jit(eqx.nn.inference_mode(model))(x_test.transpose(0, 3, 1, 2), state)
    return losses, float(jnp.mean(logits.argmax(-1) == y_test))


@pytest.mark.slow
@pytest.mark.standard_promotion  # nnx.BatchNorm and optax mix float32 with Python floats under x64
def test_nnx_model_learns_the_digits_with_nnx_optimizer_and_jit():
    losses, accuracy = _nnx_train(seed=0)
    # measured with _nnx_train(seed) for seeds 0-4 (60 Adam steps of 64 images, 8 channels, 2
    # activation and weight steps): mean loss of the first 5 steps 2.2-3.0, of the last 5
    # 0.04-0.07 (ratio <= 0.025), test accuracy 0.94-0.98 (chance 0.10)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert accuracy > 0.8


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_equinox_model_learns_the_digits_with_filter_jit_and_state():
    losses, accuracy = _eqx_train(seed=0)
    # measured with _eqx_train(seed), seeds 0-4 (float64, Equinox's default under x64): first 5
    # steps 2.1-2.3, last 5 0.04-0.05 (ratio <= 0.024), test accuracy 0.95-0.98
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert accuracy > 0.8


# ----------------------------------------------------------------------------- ensembles by vmap
#
# A vmapped ensemble and one member alone are different compiled programs (batched
# convolutions reduce in another order): float64 round-off, measured up to 7.7e-16 relative
# (outputs and statistics, both systems), against members that differ from each other by O(1).
ENSEMBLE = 1e-13


@pytest.mark.exact
@pytest.mark.standard_promotion
def test_nnx_ensemble_of_three_by_vmap_gives_each_member_its_own_result():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return NNXNet(rngs, F64)

    models = make(nnx.Rngs(0))
    assert models.block.field.bn1.scale.shape == (3, 2, WIDTH)  # members x steps x channels
    graphdef, state = nnx.split(models)
    members = [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(3)]  # copies, before training
    x = jnp.asarray(_digits()[0][:16], F64)
    ys = nnx.jit(lambda models, x: nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(models, x))(models, x)
    forward = nnx.jit(lambda m, x: m(x))
    for i, member in enumerate(members):
        assert max_rel_err(forward(member, x), ys[i]) < ENSEMBLE, i
        assert max_rel_err(member.block.field.bn2.mean.get_value(), models.block.field.bn2.mean.get_value()[i]) < ENSEMBLE, i
    assert max_rel_err(ys[0], ys[1]) > 1e-2 and max_rel_err(ys[1], ys[2]) > 1e-2  # three different members


@pytest.mark.exact
def test_equinox_ensemble_of_three_by_filter_vmap_gives_each_member_its_own_result():
    keys = jax.random.split(jax.random.key(0), 3)
    models, states = eqx.filter_vmap(lambda key: eqx.nn.make_with_state(EqxNet)(key, F64))(keys)
    x = jnp.asarray(_digits()[0][:16], F64).transpose(0, 3, 1, 2)
    ensemble = eqx.filter_vmap(lambda m, s, x: m(x, s), in_axes=(eqx.if_array(0), 0, None))
    ys, new_states = eqx.filter_jit(ensemble)(models, states, x)
    forward = eqx.filter_jit(lambda m, s, x: m(x, s))
    for i in range(3):
        member = jtu.tree_map(lambda a: a[i] if eqx.is_array(a) else a, models)
        y, new_state = forward(member, jtu.tree_map(lambda a: a[i], states), x)
        assert max_rel_err(y, ys[i]) < ENSEMBLE, i
        assert max_rel_err(new_state, jtu.tree_map(lambda a: a[i], new_states)) < ENSEMBLE, i
    assert max_rel_err(ys[0], ys[1]) > 1e-2 and max_rel_err(ys[1], ys[2]) > 1e-2


# ----------------------------------------------------------------------------- options, state modes, errors


@pytest.mark.standard_promotion
def test_shared_norm_keeps_the_fields_layers_and_the_last_steps_statistics():
    """norm="shared": one copy of every layer, used by every step; the statistics are the last step's update."""
    _, _, variables, z, _ = _problem("autodiff")
    params, stats = variables["params"], variables["batch_stats"]
    block = nnnx.CoupledBlock(NNXField(nnx.Rngs(0)), norm="shared", param_dtype=F64, rngs=nnx.Rngs(1), **KNOBS)
    assert block.field.bn1.scale.shape == (C,) and block.field.bn1.mean.shape == (C,)
    shared = {bn: {k: v[0] for k, v in params[bn].items()} for _, bn in CONVS}  # step 0's, used by both steps
    values = {
        "field": {**{c: {"kernel": params[c]["kernel"]} for c, _ in CONVS}, **{b: {**shared[b], **{k: v[0] for k, v in stats[b].items()}} for _, b in CONVS}},
        "evolution": {f"{c}/kernel": _rda(params[c]) for c, _ in CONVS},
    }
    nnx.update(block, nnx.from_flat_state(_flat(values)))
    nnx.jit(lambda block, z: block(z))(block, z)

    theta = {c: params[c]["kernel"] for c, _ in CONVS}
    evolution = {c: RDACoeffs(jnp.abs(params[c]["rda_d"]), params[c]["rda_v"], params[c]["rda_rho"]) for c, _ in CONVS}
    args = {b: {k: jnp.stack([v] * STEPS) for k, v in shared[b].items()} for _, b in CONVS}
    _, aux = coupled_block(_reference_f, z, theta, evolution, steps_z=STEPS, steps_w=4, schedule="endpoints", step_args=args, has_aux=True)
    for _, bn in CONVS:
        want = 0.9 * stats[bn]["mean"][0] + 0.1 * aux[bn][0][-1]
        assert max_rel_err(getattr(block.field, bn).mean.get_value(), want) < DIFFERENT


def test_evolve_predicate_operators_factories_and_kernels_are_learnable_params():
    rngs = nnx.Rngs(0)
    only_conv1 = nnnx.CoupledBlock(NNXField(rngs), evolve=lambda path, leaf: path[0] == "conv1", param_dtype=F64, rngs=rngs)
    assert list(only_conv1.evolution) == ["conv1/kernel"]
    op = RDAEquation(jnp.asarray(0.1, F64), jnp.zeros(2, F64), jnp.asarray(0.0, F64))
    block = nnnx.CoupledBlock(NNXField(rngs), evolution=op, time_kernel="discrete", param_dtype=F64, rngs=rngs, **KNOBS)
    params = nnx.to_flat_state(nnx.state(block, nnx.Param))
    names = {".".join(map(str, p)) for p, _ in params}
    assert {"evolution.conv2/kernel.d", "evolution.conv2/kernel.v", "time_kernel.time_values"} <= names
    assert block.time_kernel["time_values"].shape == (5,)  # steps_w + 1 lags

    factory = lambda key, kernel: mlp_evolution(key, kernel.shape, 4, solver="euler", dtype=kernel.dtype)
    model, state = eqx.nn.make_with_state(neqx.CoupledBlock)(EqxField(jax.random.key(0)), evolution=factory, dtype=F64, key=jax.random.key(1), **KNOBS)
    assert model.evolution["conv1/weight"].params["w1"].shape == (9, 4)  # q acts on the HWIO kernel's 3x3 values
    learnable = eqx.filter(model, eqx.is_inexact_array)
    assert learnable.evolution["conv2/weight"].params["w2"] is not None
    with pytest.raises(TypeError, match=r"^evolution=42 is not an evolution: use None, one of 'rda'"):
        neqx.CoupledBlock(EqxField(jax.random.key(0)), evolution=42, key=jax.random.key(1))


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: nnnx.ODEBlock(C, steps_z=2, steps_w=3, rngs=nnx.Rngs(0)), ValueError, r"^steps_w=3 is not a multiple of steps_z=2"),
        (lambda: nnnx.ODEBlock(C, evolution=RDACoeffs(0.1, jnp.zeros(2), 0.0), rngs=nnx.Rngs(0)), TypeError, r"^ODEBlock: evolution and time_kernel are names"),
        (lambda: nnnx.ODEBlock(C, norm="batch", rngs=nnx.Rngs(0)), ValueError, r"^norm='batch' is not supported; use one of 'per_step', 'shared'"),
        (lambda: nnnx.CoupledBlock(NNXField(nnx.Rngs(0)), remat="auto", rngs=nnx.Rngs(0)), ValueError, r"^CoupledBlock: remat='auto' needs"),
        (lambda: neqx.ODEBlock(C, adjoint="backsolve", key=jax.random.key(0)), ValueError, r"^adjoint='backsolve' \(diffrax continuous adjoint\) needs static weights"),
        (lambda: neqx.CoupledBlock(EqxField(jax.random.key(0)), adjoint="backsolve", key=jax.random.key(0)), ValueError, r"^CoupledBlock: adjoint='backsolve' is not supported"),
        (lambda: nlinen.ODEBlock(C, solver="rk4", adjoint="discrete").init(jax.random.key(0), jnp.zeros((1, 4, 4, C))), ValueError, r"^adjoint='discrete' implements Eq. 2.5 for forward Euler only"),
    ],
)
def test_bad_knobs_fail_in_one_line_before_any_work(build, error, match):
    with pytest.raises(error, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_fields_with_unsupported_state_are_refused_with_the_fix():
    class Dropping(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(C, C, (3, 3), rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    with pytest.raises(ValueError, match=r"^CoupledBlock: the field holds a \w+ at drop\.rngs.*only nnx.Param and nnx.BatchStat"):
        nnnx.CoupledBlock(Dropping(nnx.Rngs(0)), rngs=nnx.Rngs(0))

    field, _ = eqx.nn.make_with_state(EqxField)(jax.random.key(0))
    with pytest.raises(ValueError, match=r"no initial value .*build the block inside the model given to make_with_state"):
        neqx.CoupledBlock(field, key=jax.random.key(1))

    class Counting(nn.Module):
        @nn.compact
        def __call__(self, z):
            self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
            return nn.Conv(C, (3, 3))(z)

    with pytest.raises(ValueError, match=r"^CoupledBlock: the field declares the collection\(s\) \['counters'\]"):
        nlinen.CoupledBlock(Counting()).init(jax.random.key(0), jnp.zeros((1, 4, 4, C), jnp.float32))


def test_layout_the_core_and_the_equinox_blocks_import_no_flax():
    package = Path(__file__).resolve().parents[1] / "anodev2_jax" / "nn"
    for name in ("__init__", "core", "equinox"):
        tree = ast.parse((package / f"{name}.py").read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.startswith("flax") or m == "anodev2_jax.layers" for m in modules), (name, modules)
    for name in ("core", "linen", "nnx", "equinox"):
        assert "__all__" in (package / f"{name}.py").read_text(), name
