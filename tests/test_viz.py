"""Figures of anodev2_jax.viz rendered from generated data: valid PNGs of the documented pixel size.

Kernels are drawn from a freshly initialized model and from fake orbax checkpoints saved
here in the layouts ``viz kernels --workdir`` accepts: the training state of
anodev2_jax.training (``{"step", "params", "batch_stats", "opt_state"}``, leading seed
axis, ``config.json`` beside it) and a bare ``{"params": ...}`` without the seed axis.
"""

import json

import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from anodev2_jax import RDACoeffs, evolve_weights, viz
from anodev2_jax.evolution import LinearEvolution, MLPField, ODEEvolution, RDAEquation, evolve
from anodev2_jax.layers import rda_coeffs
from anodev2_jax.methods import resolve_config
from anodev2_jax.models import get_model


def read_png(path, size):
    """Pixels of a PNG (checked by matplotlib's reader), asserting its ``(width, height)``."""
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[:2] == (size[1], size[0]), f"{path.name}: {img.shape[1]}x{img.shape[0]} px, wanted {size}"
    assert np.ptp(img[..., :3]) > 0.1  # something is drawn, not a blank canvas
    return img


@pytest.fixture(scope="module")
def init_params():
    # Under the suite's strict promotion (module fixtures run outside the autouse one), so
    # the compiled init is shared with the --init command-line test (the cache keys on it).
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        return viz.init_params("resnet4", "anodev2_conf1")


# ----------------------------------------------------------------------------- Figure 3


def test_gaussian_figure_cli(tmp_path, capsys):
    out = tmp_path / "fig3.png"
    assert viz.main(["gaussian", "--out", str(out)]) == 0
    read_png(out, viz.GAUSSIAN_PX)
    assert "1000x820" in capsys.readouterr().out


def test_gaussian_rows_are_the_exact_linear_solutions():
    trajs = viz.gaussian_trajectories(times=(0.0, 0.5, 1.0))
    w0 = viz.gaussian_kernel()
    diffusion, advection, reaction, _ = trajs
    assert diffusion.dtype == np.float64 and diffusion.shape == (3, 32, 32)
    for traj in trajs:
        np.testing.assert_allclose(traj[0], w0, rtol=0, atol=0)  # t = 0 is the Gaussian itself
    # diffusion conserves mass and lowers the peak; advection conserves the peak; reaction scales by e^(rho t)
    np.testing.assert_allclose(diffusion.sum(axis=(1, 2)), w0.sum(), rtol=1e-12)
    assert diffusion[2].max() < diffusion[1].max() < w0.max()
    np.testing.assert_allclose(advection.max(axis=(1, 2)), w0.max(), rtol=5e-2)
    np.testing.assert_allclose(reaction[2], np.exp(1.5) * w0, rtol=1e-12, atol=1e-13)
    # advection by v=(4, -7) for t=1 moves the peak 4 rows up and 7 columns right (+v.grad: towards -v).
    # The even grid's Gaussian has four tied maxima around its centre; compare the centres of the
    # (near-)maximal pixels, since round-off decides which of the four an argmax would pick.
    def peak_centre(a):
        return np.argwhere(a >= a.max() * (1 - 1e-9)).mean(axis=0)

    np.testing.assert_allclose(peak_centre(w0), (15.5, 15.5))
    np.testing.assert_allclose(peak_centre(advection[2]) - peak_centre(w0), (-4, 7))


def test_gaussian_times_must_be_uniform(capsys):
    assert viz.main(["gaussian", "--times", "0", "0.3", "1", "--out", "unused.png"]) == 2
    assert "equally spaced" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Figures 1, 4, 5


def test_kernels_from_init_cli(tmp_path):
    out = tmp_path / "k.png"
    rc = viz.main(["kernels", "--model", "resnet4", "--method", "anodev2_conf1", "--init", "--out", str(out)])
    assert rc == 0
    read_png(out, (120 * 6 + 140, 120 * 4 + 130))  # steps_w = 5: 6 columns; 4 filters


def test_first_evolved_kernel_is_layer1_1_conv1(init_params):
    paths = [p for p, _ in viz.find_evolved_kernels(init_params)]
    assert paths == [("layer1_1", "conv1"), ("layer1_1", "conv2")]
    net = get_model("alexnet", "anodev2_conf2")
    shapes = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    alex = viz.find_evolved_kernels(shapes["params"])
    assert [p for p, _ in alex] == [("conv2", "conv")]


def test_kernel_trajectory_matches_evolve_weights(init_params):
    module = init_params["layer1_1"]["conv1"]
    config = resolve_config("anodev2_conf2")
    traj, _ = viz.kernel_trajectory(module, config)
    coeffs = RDACoeffs(jnp.abs(jnp.asarray(module["rda_d"])), jnp.asarray(module["rda_v"]), jnp.asarray(module["rda_rho"]))
    want = evolve_weights(jnp.asarray(module["kernel"]), coeffs, num_steps=10, dt=0.1, trajectory=True)
    assert traj.shape == (11, 3, 3, 16, 16)
    np.testing.assert_allclose(traj, np.asarray(want), rtol=1e-6, atol=1e-7)


def _module(names_shapes, seed=0):
    rng = np.random.default_rng(seed)
    module = {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32) * 0.3}
    for name, shape in names_shapes.items():
        module[name] = (0.2 * rng.normal(size=shape)).astype(np.float32)
    return module


@pytest.mark.parametrize("evolution", ["rda_equation", "linear", "mlp", "softplus"])
def test_kernel_trajectory_of_every_operator(evolution):
    """The param names pick the operator (and the RDA parameterization), so a run replays as it trained."""
    if evolution == "rda_equation":
        module = _module({"rda_d": (), "rda_v": (2,), "rda_rho": ()})
        op = RDAEquation(abs(module["rda_d"]), module["rda_v"], module["rda_rho"], sigma=jnp.tanh)
        text = "RDA (Eq. 2.6): d="
    elif evolution == "linear":
        module = _module({"evo_generator": (9, 9)})
        op, text = LinearEvolution(module["evo_generator"]), "linear dw/dt = G w: max abs G="
    elif evolution == "mlp":
        module = _module({"evo_w1": (9, 16), "evo_b1": (16,), "evo_w2": (16, 9), "evo_b2": (9,)})
        op = ODEEvolution(MLPField(), {k[4:]: jnp.asarray(module[k]) for k in module if k != "kernel"})
        text = "ODEEvolution q, max abs: b1="
    else:  # a run written before rda_parameterization: d = softplus(rda_d_raw), B.4
        module = _module({"rda_d_raw": (), "rda_v": (2,), "rda_rho": ()})
        op = rda_coeffs(jnp.asarray(module["rda_d_raw"]), jnp.asarray(module["rda_v"]), jnp.asarray(module["rda_rho"]))
        text = "RDA (B.4): d="
    config = resolve_config("anodev2_conf1", evolution="rda_equation" if evolution == "rda_equation" else None)
    traj, got = viz.kernel_trajectory(module, config)
    if evolution == "softplus":
        want = evolve_weights(jnp.asarray(module["kernel"]), op, num_steps=5, dt=0.2, trajectory=True)
    else:
        want = evolve(op, jnp.asarray(module["kernel"]), num_steps=5, dt=0.2, trajectory=True)
    np.testing.assert_allclose(traj, np.asarray(want), rtol=1e-6, atol=1e-7)
    assert viz.evolution_text(got).startswith(text)
    assert viz.relative_change(traj) == pytest.approx(np.max(np.abs(traj[-1] - traj[0])) / np.max(np.abs(traj[0])))


def _stack_seeds(tree, n):
    return jax.tree.map(lambda a: jnp.stack([jnp.asarray(a) + 0.01 * i for i in range(n)]), tree)


def _save(directory, step, tree):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory.absolute()) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def test_kernels_from_training_checkpoint(tmp_path, init_params):
    """The training layout: train state with a seed axis of 2, config.json naming the method."""
    params = _stack_seeds(init_params, 2)
    # give replica 1 visible dynamics: advection along axis 1 and some reaction
    conv1 = dict(params["layer1_1"]["conv1"])
    conv1["rda_v"] = conv1["rda_v"].at[1].set(jnp.asarray([0.0, 1.5], jnp.float32))
    conv1["rda_rho"] = conv1["rda_rho"].at[1].set(0.5)
    params["layer1_1"] = {**params["layer1_1"], "conv1": conv1}
    state = {"step": jnp.zeros((2,), jnp.int32), "params": params, "batch_stats": {}, "opt_state": {}}
    _save(tmp_path / "checkpoints", 3, {**state, "batch_stats": {"x": jnp.zeros((2, 1))}, "opt_state": {"y": jnp.ones((2, 1))}})
    (tmp_path / "config.json").write_text(json.dumps({"model": "resnet4", "method": "anodev2_conf2", "steps_w": None}))

    loaded, step = viz.load_checkpoint_params(tmp_path)
    assert step == 3
    np.testing.assert_array_equal(loaded["layer1_1"]["conv1"]["kernel"], np.asarray(conv1["kernel"]))

    out = tmp_path / "k.png"
    assert viz.main(["kernels", "--workdir", str(tmp_path), "--seed-index", "1", "--filters", "2", "--out", str(out)]) == 0
    read_png(out, (120 * 11 + 140, 120 * 2 + 130))  # conf2: steps_w = 10, 11 columns

    traj, coeffs = viz.kernel_trajectory(loaded["layer1_1"]["conv1"], resolve_config("anodev2_conf2"), seed_index=1)
    want = evolve_weights(
        conv1["kernel"][1],
        RDACoeffs(jnp.abs(conv1["rda_d"][1]), conv1["rda_v"][1], conv1["rda_rho"][1]),
        num_steps=10, dt=0.1, trajectory=True,
    )
    np.testing.assert_allclose(traj, np.asarray(want), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(coeffs.v, [0.0, 1.5])


def test_kernels_from_bare_params_checkpoint(tmp_path, init_params):
    """A checkpoint of {"params": ...} without seed axis or config.json needs --method."""
    _save(tmp_path, 7, {"params": jax.tree.map(jnp.asarray, init_params)})
    out = tmp_path / "k.png"
    assert viz.main(["kernels", "--workdir", str(tmp_path), "--out", str(out)]) == 2  # no config.json, no --method
    assert viz.main(["kernels", "--workdir", str(tmp_path), "--method", "anodev2_conf1", "--out", str(out)]) == 0
    read_png(out, (120 * 6 + 140, 120 * 4 + 130))


def test_kernels_bad_input(tmp_path, capsys):
    assert viz.main(["kernels", "--model", "resnet4", "--method", "baseline", "--init", "--out", "x.png"]) == 2
    assert "does not evolve" in capsys.readouterr().err
    assert viz.main(["kernels", "--workdir", str(tmp_path), "--method", "anodev2_conf1"]) == 2
    assert "no orbax checkpoint" in capsys.readouterr().err
    assert viz.main(["kernels", "--out", "x.png"]) == 2
    capsys.readouterr()
    missing = tmp_path / "no_such_run"
    assert viz.main(["kernels", "--workdir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {missing} does not exist" in err and "config.json" not in err and not missing.exists()


# ----------------------------------------------------------------------------- curves


def _fake_run(directory, method, accs, losses, seeds=(0, 1)):
    directory.mkdir(parents=True)
    lines = []
    for e, (acc, loss) in enumerate(zip(accs, losses), start=1):
        lines.append({"kind": "step", "epoch": e, "step": 10 * e - 5, "seed": 0, "train_loss": 99.0})
        for s in seeds:
            lines.append({"kind": "epoch", "epoch": e, "step": 10 * e, "seed": s,
                          "train_loss": loss + 0.1 * s, "test_accuracy": acc - 0.02 * s, "test_loss": loss})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "epo')
    (directory / "config.json").write_text(json.dumps({"model": "resnet4", "method": method}))


def test_curves_cli(tmp_path):
    _fake_run(tmp_path / "a", "baseline", [0.3, 0.5, 0.6], [2.0, 1.5, 1.2])
    _fake_run(tmp_path / "b", "anodev2_conf1", [0.35, 0.55, 0.7], [1.9, 1.3, 1.0])
    recs = viz.read_metrics(tmp_path / "a")
    assert len(recs) == 6 and all(r["kind"] == "epoch" for r in recs)  # step records and the torn line dropped
    out = tmp_path / "curves.png"
    assert viz.main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    read_png(out, viz.CURVES_PX)


def test_curves_bad_input(tmp_path, capsys):
    assert viz.main(["curves", str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
