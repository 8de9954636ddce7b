"""Tests of anodev2_jax.models: Table 3 counts, shapes, a hand-written reference, BN statistics, gradients.

Costs on a 2-core CPU are dominated by compiles, so: shapes for all 15 model x method
pairs come from ``jax.eval_shape``; real computation uses ResNet-4 (8x8 images for the
gradient checks), and variables are filled from their shapes with numpy random numbers
(non-trivial BN parameters, running statistics and RDA coefficients) instead of paying
for ``init``'s PRNG compiles; one test checks ``init`` itself.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import layers, models
from anodev2_jax.rda import check_coeffs
from anodev2_jax.methods import METHODS, MODELS, method_defaults
from anodev2_jax.models import count_params, get_model
from helpers import max_rel_err, tree_allclose

TABLE3_BASELINE = {"resnet4": 7_706, "resnet10": 44_186, "alexnet": 1_756_682}
KEY = jax.random.key(0)


def _images(n=2, hw=32, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, hw, hw, 3)), dtype)


def _shapes(model, x):
    return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(x.shape, x.dtype))


_SHAPES = {}


def _model_and_shapes(name, method):
    """``get_model(name, method)`` and its variable shapes for a (2, 32, 32, 3) batch, traced once per pair."""
    if (name, method) not in _SHAPES:
        model = get_model(name, method)
        _SHAPES[name, method] = model, _shapes(model, _images())
    return _SHAPES[name, method]


def random_variables(model, x, seed=0):
    """Variables with ``model.init``'s structure, filled with numpy random values (no compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            a = 1.0 + 0.2 * rng.normal(size=s.shape)
        elif "'var'" in name:
            a = 1.0 + 0.5 * rng.uniform(size=s.shape)
        elif "rda_d_raw" in name:
            a = -2.0 + 0.5 * rng.normal(size=s.shape)  # d = softplus(.) ~ 0.13
        elif "'rda_d'" in name:
            a = 0.13 + 0.03 * rng.normal(size=s.shape)  # d = |.| ~ 0.13
        elif "rda_" in name:
            a = 0.3 * rng.normal(size=s.shape)
        elif "kernel" in name:
            a = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        else:  # biases, BN shifts, running means
            a = 0.1 * rng.normal(size=s.shape)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, _shapes(model, x))


def _loss(model, variables, x):
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(logits)) + jnp.mean(logits[:, 0])


# ----------------------------------------------------------------------------- counts and shapes


@pytest.fixture(scope="module")
def table():  # what models.param_table() returns, from the shared shape cache
    return {m: {n: count_params(_model_and_shapes(n, m)[1]["params"]) for n in MODELS} for m in METHODS}


def test_param_counts_table3(table):
    print("\n" + models.format_table(table))
    for name, expected in TABLE3_BASELINE.items():
        assert table["baseline"][name] == expected
    for name in MODELS:  # neural_ode and anode share the architecture; per-step BN adds parameters
        assert table["neural_ode"][name] == table["anode"][name] > table["baseline"][name]
    # ResNet-4 conf1: 4 extra per-step copies of two BNs (4 * 2 * 32) + (d, v0, v1, rho) for two kernels
    assert table["anodev2_conf1"]["resnet4"] == 7_706 + 4 * 64 + 2 * 4
    assert count_params({"params": {"a": jnp.zeros((3, 4))}, "batch_stats": {"m": jnp.zeros(7)}}) == 12
    assert count_params(_model_and_shapes("resnet10", "baseline")[1]) == 44_186  # full variables: params only


def test_main_prints_table(table, capsys, monkeypatch):
    monkeypatch.setattr(models, "param_table", lambda **kw: table)
    models.main([])
    out = capsys.readouterr().out
    assert "| anodev2_conf1 |" in out and "7,706 (7.71K)" in out and "1,756,682 (1756.68K)" in out


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_all_methods(name):
    x = _images()
    for method in METHODS:
        model, variables = _model_and_shapes(name, method)
        assert set(variables) == {"params", "batch_stats"}
        logits, updates = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
        assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32), method
        assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
            variables["batch_stats"]
        )
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32), method
        for leaf in jax.tree_util.tree_leaves(variables):
            assert leaf.dtype == jnp.float32


@pytest.mark.parametrize(
    "name, method",
    [("resnet4", "anodev2_conf1"), ("resnet4", "anodev2_conf2"), ("alexnet", "anodev2_conf2"), ("resnet10", "baseline")],
)
def test_forward_and_batch_stats(name, method):
    """Real forward passes on 16x16 images (to save time).

    The other methods run for real in the reference tests (baseline, anode) and in
    test_neural_ode_matches_anode.
    """
    model = get_model(name, method)
    x = _images(hw=16)
    variables = random_variables(model, x)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    old, new = jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(old, new)), "every running statistic moves in train mode"
    logits_eval, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
    assert logits_eval.shape == (2, 10) and logits_eval.dtype == jnp.float32
    assert tree_allclose(same["batch_stats"], variables["batch_stats"], rtol=0, atol=0)


def test_init_values():
    model = get_model("resnet4", "anodev2_conf1")
    # unsafe_rbg: the same init code at a fraction of threefry's compile time
    variables = model.init(jax.random.key(0, impl="unsafe_rbg"), _images(n=1, hw=8))
    block = variables["params"]["layer1_1"]
    assert block["conv1"]["kernel"].shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(block["conv1"]["rda_d"], np.float32(layers.D_INIT))  # d = |rda_d|
    assert np.all(block["conv2"]["rda_v"] == 0) and np.all(block["conv2"]["rda_rho"] == 0)
    assert np.all(block["bn1"]["scale"] == 1) and block["bn1"]["scale"].shape == (5, 16)
    stats = variables["batch_stats"]["layer1_1"]["bn2"]
    assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)
    std = float(jnp.std(block["conv1"]["kernel"]))
    assert 0.7 * math.sqrt(2 / 144) < std < 1.3 * math.sqrt(2 / 144)  # He normal, fan_out = 3 * 3 * 16


# ----------------------------------------------------------------------------- hand-written reference


def _ref_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ref_bn(x, scale, bias, mean, var, train):
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    c = (1, 1, 1, -1)
    y = (x - mean.reshape(c)) / jnp.sqrt(var.reshape(c) + 1e-5) * scale.reshape(c) + bias.reshape(c)
    return y, (mean, var)


def reference_resnet4(variables, x, *, train, steps, shared):
    """ResNet-4 written out: stem, ``steps`` Euler steps of z + f(z)/steps, 8x8 max pool, fc."""
    p, s = variables["params"], variables["batch_stats"]
    z = _ref_conv(x, p["conv1"]["kernel"])
    z = jax.nn.relu(_ref_bn(z, p["bn1"]["scale"], p["bn1"]["bias"], s["bn1"]["mean"], s["bn1"]["var"], train)[0])
    pb, sb = p["layer1_1"], s["layer1_1"]
    at = (lambda a, n: a) if shared else (lambda a, n: a[n])
    batch_stats = []
    for n in range(steps):
        h, step_stats = z, {}
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            h = _ref_conv(h, pb[conv]["kernel"])
            args = [at(pb[bn]["scale"], n), at(pb[bn]["bias"], n), at(sb[bn]["mean"], n), at(sb[bn]["var"], n)]
            h, step_stats[bn] = _ref_bn(h, *args, train)
            h = jax.nn.relu(h)
        z = z + h / steps
        batch_stats.append(step_stats)
    n, hh, ww, c = z.shape
    z = z.reshape(n, hh // 8, 8, ww // 8, 8, c).max(axis=(2, 4)).reshape(n, -1)
    return z @ p["fc"]["kernel"] + p["fc"]["bias"].reshape(1, -1), batch_stats


@pytest.mark.parametrize("train", [False, True])
def test_baseline_resnet4_matches_reference(train):
    model = get_model("resnet4", "baseline", dtype="float64")
    x = _images(dtype=jnp.float64)
    variables = random_variables(model, x)
    logits, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
    expected, batch_stats = reference_resnet4(variables, x, train=train, steps=1, shared=False)
    assert logits.dtype == jnp.float64
    assert tree_allclose(logits, expected, rtol=1e-10, atol=1e-10)
    old, new = jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(updates["batch_stats"])
    assert all(np.any(a != b) == train for a, b in zip(old, new)), "stats move in train mode only"
    if train:  # the block's running statistics: 0.9 * old + 0.1 * batch moment (biased variance)
        old = variables["batch_stats"]["layer1_1"]["bn2"]
        new = updates["batch_stats"]["layer1_1"]["bn2"]
        np.testing.assert_allclose(new["mean"][0], 0.9 * old["mean"][0] + 0.1 * batch_stats[0]["bn2"][0], rtol=1e-10)
        np.testing.assert_allclose(new["var"][0], 0.9 * old["var"][0] + 0.1 * batch_stats[0]["bn2"][1], rtol=1e-10)


@pytest.mark.parametrize("norm", ["per_step", "shared"])
def test_norm_modes_shapes_and_running_stats(norm):
    m, steps = 0.7, 3
    model = get_model("resnet4", "anode", steps_z=steps, norm=norm, bn_momentum=m, dtype="float64", remat="none")
    x = _images(hw=16, dtype=jnp.float64)
    variables = random_variables(model, x)
    block_shape = (16,) if norm == "shared" else (steps, 16)
    assert variables["params"]["layer1_1"]["bn1"]["scale"].shape == block_shape
    assert variables["batch_stats"]["layer1_1"]["bn2"]["var"].shape == block_shape
    assert variables["params"]["bn1"]["scale"].shape == (16,)  # the stem's ordinary BN

    for train in (False, True):
        logits, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
        expected, batch_stats = reference_resnet4(variables, x, train=train, steps=steps, shared=norm == "shared")
        assert tree_allclose(logits, expected, rtol=1e-10, atol=1e-10)
    old = variables["batch_stats"]["layer1_1"]["bn1"]["mean"]
    new = updates["batch_stats"]["layer1_1"]["bn1"]["mean"]
    step_means = [s["bn1"][0] for s in batch_stats]
    if norm == "per_step":
        want = jnp.stack([m * old[n] + (1 - m) * step_means[n] for n in range(steps)])
    else:  # one BN called once per step, in order
        want = old
        for mean in step_means:
            want = m * want + (1 - m) * mean
    np.testing.assert_allclose(new, want, rtol=1e-10)


# ----------------------------------------------------------------------------- gradients


def _grad(model, variables, x):
    return jax.jit(jax.grad(lambda p: _loss(model, {**variables, "params": p}, x)))(variables["params"])


def _check_finite_grads(grads, params, dtype):
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert g.dtype == dtype and np.all(np.isfinite(g)), jax.tree_util.keystr(path)


def test_anodev2_conf2_gradients_finite():
    """float32 end to end; conf1's gradients are checked in float64 by the adjoint test below."""
    model = get_model("resnet4", "anodev2_conf2")
    x = _images(hw=8)
    variables = random_variables(model, x)
    grads = _grad(model, variables, x)
    _check_finite_grads(grads, variables["params"], jnp.float32)
    for conv in ("conv1", "conv2"):
        for coeff in ("rda_d", "rda_v", "rda_rho"):
            assert np.any(grads["layer1_1"][conv][coeff] != 0), (conv, coeff)


def test_diffusion_nonnegative():
    d_raw = jnp.asarray([-1e4, -100.0, -1.0, 0.0, 30.0], jnp.float32)
    coeffs = layers.rda_coeffs(d_raw, jnp.zeros((5, 2), jnp.float32), jnp.zeros(5, jnp.float32))
    assert np.all(coeffs.d >= 0) and coeffs.d.dtype == jnp.float32
    check_coeffs(coeffs, (3, 3, 4, 5))  # the core's validator rejects any concrete d < 0
    d = layers.rda_diffusion({"rda_d": jnp.asarray([-0.5, -1e-3, 0.0, 2.0], jnp.float32)}, "abs")
    np.testing.assert_array_equal(d, np.asarray([0.5, 1e-3, 0.0, 2.0], np.float32))


def test_softplus_parameterization_is_the_one_before():
    """rda_parameterization='softplus' declares rda_d_raw at softplus^-1(1e-3), as every run before the knob."""
    model = get_model("resnet4", "anodev2_conf1", rda_parameterization="softplus")
    shapes = _shapes(model, _images(n=1, hw=8))
    assert set(shapes["params"]["layer1_1"]["conv1"]) == {"kernel", "rda_d_raw", "rda_v", "rda_rho"}
    variables = model.init(jax.random.key(0, impl="unsafe_rbg"), _images(n=1, hw=8))
    np.testing.assert_allclose(jax.nn.softplus(variables["params"]["layer1_1"]["conv1"]["rda_d_raw"]), layers.D_INIT, rtol=1e-5)


# Every evolution operator (Eq. 2.3c) with a time kernel (Eq. 2.3d) in ResNet-4 conf. 1: the
# declared params (names, shapes, inits) and, in float64 on 8x8 images, the hand-written
# adjoint against jax.grad with every evolution and kernel parameter getting a gradient.
EVOLUTION_CASES = [
    ("rda", "exponential", {"rda_d": (), "rda_v": (2,), "rda_rho": ()}),
    ("rda_equation", "discrete", {"rda_d": (), "rda_v": (2,), "rda_rho": ()}),
    ("linear", "dirac", {"evo_generator": (9, 9)}),
    ("mlp", "exponential", {"evo_w1": (9, 16), "evo_b1": (16,), "evo_w2": (16, 9), "evo_b2": (9,)}),
]


@pytest.mark.parametrize("evolution,time_kernel,declared", EVOLUTION_CASES, ids=[c[0] + "-" + c[1] for c in EVOLUTION_CASES])
def test_every_evolution_and_time_kernel_in_the_model(evolution, time_kernel, declared):
    kw = dict(evolution=evolution, time_kernel=time_kernel, dtype="float64", remat="none")
    auto = get_model("resnet4", "anodev2_conf1", adjoint="autodiff", **kw)
    disc = get_model("resnet4", "anodev2_conf1", adjoint="discrete", **kw)
    x = _images(hw=8, dtype=jnp.float64)
    shapes = _shapes(auto, x)["params"]["layer1_1"]
    for conv in ("conv1", "conv2"):
        assert {k: v.shape for k, v in shapes[conv].items() if k != "kernel"} == declared
    kernel_params = {"dirac": set(), "exponential": {"time_log_rate"}, "discrete": {"time_values"}}[time_kernel]
    assert {k for k in shapes if k.startswith("time_")} == kernel_params
    if time_kernel == "discrete":
        assert shapes["time_values"].shape == (6,)  # one weight per lag, steps_w + 1

    init = auto.init(jax.random.key(0, impl="unsafe_rbg"), x)["params"]["layer1_1"]
    if time_kernel == "exponential":
        np.testing.assert_allclose(jnp.exp(init["time_log_rate"]), layers.EXP_RATE_INIT, rtol=1e-12)
    if time_kernel == "discrete":
        np.testing.assert_array_equal(init["time_values"], [1, 0, 0, 0, 0, 0])  # the Dirac delta
    for name in declared:
        if name in ("evo_generator", "evo_w2", "evo_b1", "evo_b2", "rda_v", "rda_rho"):
            assert np.all(init["conv1"][name] == 0), name  # no evolution at init

    variables = random_variables(auto, x)
    g_auto, g_disc = _grad(auto, variables, x), _grad(disc, variables, x)
    _check_finite_grads(g_auto, variables["params"], jnp.float64)
    for conv in ("conv1", "conv2"):
        for name in declared:
            assert np.any(g_auto["layer1_1"][conv][name] != 0), (conv, name)
    for name in kernel_params:
        assert np.all(g_auto["layer1_1"][name] != 0) if name == "time_log_rate" else np.any(g_auto["layer1_1"][name] != 0)
    assert max_rel_err(g_disc, g_auto) < 1e-10


def test_per_filter_operators_and_bad_evolution_knobs():
    shapes = _shapes(get_model("resnet4", "anodev2_conf1", evolution="linear", coeff_granularity="filter"), _images(n=1, hw=8))
    assert shapes["params"]["layer1_1"]["conv1"]["evo_generator"].shape == (16, 9, 9)
    shapes = _shapes(get_model("alexnet", "anodev2_conf2", evolution="rda_equation", coeff_granularity="filter"), _images(n=1))
    assert shapes["params"]["conv2"]["conv"]["rda_v"].shape == (64, 2)
    with pytest.raises(ValueError, match=r"evolution='fourier' is not supported; use one of 'rda', 'rda_equation'"):
        get_model("resnet4", "anodev2_conf1", evolution="fourier")
    with pytest.raises(ValueError, match=r"time_kernel='gaussian' is not supported"):
        get_model("resnet4", "anodev2_conf1", time_kernel="gaussian")
    with pytest.raises(ValueError, match=r"rda_parameterization='square' is not supported"):
        get_model("resnet4", "anodev2_conf1", rda_parameterization="square")
    with pytest.raises(ValueError, match=r"coeff_granularity='filter' with evolution='mlp'.*use coeff_granularity='kernel'"):
        get_model("resnet4", "anodev2_conf1", evolution="mlp", coeff_granularity="filter")


def test_discrete_adjoint_matches_autodiff():
    """resnet4 anodev2_conf1 in float64: hand-written Eq. 2.5 adjoint == jax.grad, all grads finite."""
    kw = dict(dtype="float64", remat="none")
    auto = get_model("resnet4", "anodev2_conf1", adjoint="autodiff", **kw)
    disc = get_model("resnet4", "anodev2_conf1", adjoint="discrete", **kw)
    x = _images(hw=8, dtype=jnp.float64)
    variables = random_variables(auto, x)
    g_auto, g_disc = _grad(auto, variables, x), _grad(disc, variables, x)
    _check_finite_grads(g_auto, variables["params"], jnp.float64)
    for conv in ("conv1", "conv2"):
        for coeff in ("rda_d", "rda_v", "rda_rho"):
            assert np.any(g_auto["layer1_1"][conv][coeff] != 0), (conv, coeff)
    assert max_rel_err(g_disc, g_auto) < 1e-10


def test_neural_ode_matches_anode():
    """Same params: same forward (Euler) and running statistics; the backsolve gradient is finite."""
    node = get_model("resnet4", "neural_ode", dtype="float64")
    anode = get_model("resnet4", "anode", dtype="float64")
    x = _images(hw=8, dtype=jnp.float64)
    variables = random_variables(anode, x)
    out_node = node.apply(variables, x, train=True, mutable=["batch_stats"])
    out_anode = anode.apply(variables, x, train=True, mutable=["batch_stats"])
    assert tree_allclose(out_node, out_anode, rtol=1e-10, atol=1e-12)
    _check_finite_grads(_grad(node, variables, x), variables["params"], jnp.float64)


@pytest.mark.parametrize(
    "name, method, knobs",
    [
        ("resnet4", "anodev2_conf1", dict(solver="rk4", remat="step")),
        ("resnet4", "anodev2_conf1", dict(remat="binomial")),
        ("resnet4", "anodev2_conf2", dict(solver="rk2", norm="shared", nonlinearity="none")),
        ("resnet4", "anodev2_conf1", dict(adjoint="discrete", norm="shared", remat="step", nonlinearity="sigmoid")),
        ("alexnet", "anodev2_conf1", dict(coeff_granularity="filter", adjoint="discrete")),
        ("resnet10", "anodev2_conf2", dict(coeff_granularity="filter")),
        ("resnet4", "anode", dict(adjoint="discrete", steps_z=3)),
    ],
)
def test_knob_combinations_trace(name, method, knobs):
    """Forward (eval) and gradient (train) trace under strict promotion for less common knobs."""
    model = get_model(name, method, **knobs)
    x = _images(hw=16)
    v = _shapes(model, x)
    grads = jax.eval_shape(
        jax.grad(lambda p, s: _loss(model, {"params": p, "batch_stats": s}, x)), v["params"], v["batch_stats"]
    )
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(v["params"])
    assert jax.eval_shape(lambda v: model.apply(v, x, train=False), v).shape == (2, 10)
    if knobs.get("coeff_granularity") == "filter":
        conv = v["params"]["conv2"]["conv"] if name == "alexnet" else v["params"]["layer2_2"]["conv1"]
        assert conv["rda_v"].shape == (conv["kernel"].shape[-1], 2)


@pytest.mark.parametrize(
    "name, method",
    [(m, "anodev2_conf2") for m in MODELS] + [("resnet4", m) for m in ("baseline", "neural_ode", "anode", "anodev2_conf1")],
)
def test_bfloat16_compute_keeps_params_statistics_and_evolution_float32(name, method):
    """``compute_dtype="bfloat16"``: every convolution in bfloat16; params, BatchNorm statistics and gradients float32.

    Traced (no compute) under strict promotion, forward and backward. The RDA evolution runs
    on the float32 kernels before they are cast, and the batch moments are float32.
    """
    model = get_model(name, method, compute_dtype="bfloat16")
    assert model.config.jnp_compute_dtype == jnp.bfloat16 and model.config.jnp_dtype == jnp.float32
    x = _images(hw=32)
    v = _shapes(model, x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(v)} == {jnp.dtype(jnp.float32)}

    def loss(p, s):
        logits, updates = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(logits.astype(jnp.float32))), (logits, updates)

    grads, (logits, updates) = jax.eval_shape(jax.grad(loss, has_aux=True), v["params"], v["batch_stats"])
    assert logits.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree_util.tree_leaves((grads, updates))} == {jnp.dtype(jnp.float32)}
    text = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(v))
    conv_dtypes = re.findall(r":(\w+)\[[\d,]*\] = conv_general_dilated", text)
    assert conv_dtypes and set(conv_dtypes) == {"bf16"}, conv_dtypes
    with pytest.raises(ValueError, match="compute_dtype='float32' with dtype='float64'"):
        get_model(name, method, dtype="float64", compute_dtype="float32")
    with pytest.raises(ValueError, match="compute_dtype='float16' is not supported"):
        get_model(name, method, compute_dtype="float16")


# ----------------------------------------------------------------------------- configuration


def test_method_defaults():
    assert method_defaults("baseline")["steps_z"] == 1
    method_defaults("baseline")["steps_z"] = 7  # a fresh dict every call
    assert method_defaults("baseline")["steps_z"] == 1
    nd = method_defaults("neural_ode")
    assert (nd["steps_z"], nd["adjoint"]) == (2, "backsolve")
    assert (method_defaults("anode")["steps_z"], method_defaults("anode")["remat"]) == (2, "auto")
    assert [method_defaults(m)["remat"] for m in METHODS] == ["none", "none", "auto", "auto", "auto"]
    c1, c2 = method_defaults("anodev2_conf1"), method_defaults("anodev2_conf2")
    assert (c1["steps_z"], c1["steps_w"], c1["schedule"]) == (5, 5, "aligned")
    assert (c2["steps_z"], c2["steps_w"], c2["schedule"]) == (2, 10, "endpoints")
    model = get_model("resnet4", "anodev2_conf2", steps_z=3, solver="rk2")
    assert (model.steps_z, model.steps_w, model.solver, model.remat) == (3, 10, "rk2", "auto")
    assert model.remat_budget_mb == method_defaults("anode")["remat_budget_mb"] == 2048.0


@pytest.mark.parametrize(
    "call, field, bad",
    [
        (lambda: get_model("vgg", "anode"), "name", "vgg"),
        (lambda: get_model("resnet4", "anodev3"), "method", "anodev3"),
        (lambda: get_model("resnet4", "anode", step_z=2), "step_z", "step_z"),
        (lambda: get_model("resnet4", "anode", solver="rk3"), "solver", "rk3"),
        (lambda: get_model("resnet4", "anode", steps_z=0), "steps_z", "0"),
        (lambda: get_model("resnet4", "anodev2_conf1", steps_w=7), "steps_w", "7"),
        (lambda: get_model("resnet4", "anode", remat="all"), "remat", "all"),
        (lambda: get_model("resnet4", "anode", remat_budget_mb=0), "remat_budget_mb", "0"),
        (lambda: get_model("resnet4", "anode", remat_budget_mb="1G"), "remat_budget_mb", "1G"),
        (lambda: get_model("resnet4", "anode", norm="layer"), "norm", "layer"),
        (lambda: get_model("resnet4", "anode", adjoint="adjoint"), "adjoint", "adjoint"),
        (lambda: get_model("resnet4", "anode", adjoint="discrete", solver="rk4"), "adjoint", "discrete"),
        (lambda: get_model("resnet4", "anodev2_conf2", adjoint="backsolve"), "adjoint", "backsolve"),
        (lambda: get_model("resnet4", "neural_ode", solver="rk2"), "norm", "rk2"),
        (lambda: get_model("resnet4", "anodev2_conf1", schedule="middle"), "schedule", "middle"),
        (lambda: get_model("resnet4", "anodev2_conf1", nonlinearity="relu"), "nonlinearity", "relu"),
        (lambda: get_model("resnet4", "anodev2_conf1", coeff_granularity="channel"), "coeff_granularity", "channel"),
        (lambda: get_model("resnet4", "anode", bn_momentum=1.5), "bn_momentum", "1.5"),
        (lambda: get_model("resnet4", "anode", dtype="bfloat16"), "dtype", "bfloat16"),
        (lambda: models.ResNet4(method="anode", solver="rk3").init(KEY, _images(n=1, hw=8)), "solver", "rk3"),
    ],
)
def test_bad_config_raises_naming_field(call, field, bad):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert field in msg and bad in msg, msg


# ----------------------------------------------------------------------------- remat="auto"


def test_auto_remat_is_the_explicit_schedule_it_picks():
    """remat="auto" traces to exactly the program of the schedule it picks: the same values and gradients."""
    x = _images(n=2, hw=8, dtype=jnp.float64)  # one activation of the block: 2 * 8 * 8 * 16 * 8 B = 16 KiB

    def program(model):
        v = random_variables(model, x)
        return str(jax.make_jaxpr(jax.value_and_grad(lambda p: _loss(model, {**v, "params": p}, x)))(v["params"]))

    # configuration 1 (5 steps): none 25 activations (400 KiB), step 10 (160 KiB), binomial 8 (128 KiB)
    for budget_mb, mode in ((1.0, "none"), (0.2, "step"), (0.13, "binomial")):
        auto = get_model("resnet4", "anodev2_conf1", dtype="float64", remat_budget_mb=budget_mb)
        assert auto.config.remat == "auto" and models.remat_plan(auto, x.shape) == {"layer1_1": mode}
        assert program(auto) == program(get_model("resnet4", "anodev2_conf1", dtype="float64", remat=mode)), mode
    assert program(auto) != program(get_model("resnet4", "anodev2_conf1", dtype="float64", remat="step"))


def test_remat_plan_decides_per_block_from_its_activation():
    """At CIFAR-10 batch 256 every paper configuration runs without remat; a small budget splits ResNet-10's blocks."""
    batch = (256, 32, 32, 3)
    for name in MODELS:
        for method in ("anode", "anodev2_conf1", "anodev2_conf2"):
            assert set(models.remat_plan(get_model(name, method), batch).values()) == {"none"}, (name, method)
    # 100 MiB at steps_z = 2: ResNet's 16 MiB blocks need 10 activations (step: 7), layer2_2's 8 MiB
    # ones and AlexNet's block (one conv: 6 activations of 16 MiB) fit without remat
    small = dict(remat_budget_mb=100)
    assert models.remat_plan(get_model("resnet10", "anode", **small), batch) == {
        "layer1_1": "step", "layer1_2": "step", "layer2_2": "none"}
    assert models.remat_plan(get_model("alexnet", "anode", **small), batch) == {"conv2": "none"}
    assert models.remat_plan(get_model("resnet4", "anode", remat="block", **small), batch) == {"layer1_1": "block"}
    assert models.remat_plan(get_model("resnet4", "neural_ode"), batch) == {}  # diffrax's backsolve: no remat
    cfg = get_model("resnet4", "anode", **small).config
    assert layers.block_remat(cfg, (256, 32, 32, 16), jnp.float32, 2) == "step"
    assert layers.block_remat(cfg, (256, 32, 32, 16), jnp.float32, 1) == "none"
    assert layers.block_remat(cfg, (128, 32, 32, 16), jnp.float64, 2) == "step"  # the same bytes
