"""End-to-end tests of anodev2_jax.training on generated data (tiny batches, one or two epochs).

Every test drives ``train_and_evaluate`` in process (STYLE.md 13) under the suite's strict
dtype and rank promotion with x64 enabled: training must stay float32 by itself. Runs of
the same setup share compiled programs (``steps.programs`` is cached), so the resume
and seed tests compile each program once.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import max_rel_err, read_metrics, restore_state, tiny_config, tree_allclose, without_timing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs package lives at the repository root

from configs import smoke  # noqa: E402

from anodev2_jax import engine, methods, models, optim, rundir, run_config, sharding, steps, training  # noqa: E402


# ----------------------------------------------------------------------------- every model x method


# Every method trains on ResNet-4; ResNet-10 and AlexNet train every method whose block code
# differs for them. Left out (for suite time: 15-30 s each on 2 CPU cores): ResNet-10 with
# configuration 1, ANODE and the Neural ODE, whose ODE blocks are ResNet-4's (the same
# layers.ODEBlock; configuration 2 and the baseline exercise ResNet-10's three ODE blocks,
# its downsampling block and its evolution). Every model x method is still traced in train
# and eval mode (logits, BatchNorm statistics) by tests/test_models.py::test_output_shapes_all_methods.
COMBOS = [(name, method) for name in ("resnet4", "alexnet") for method in methods.METHODS]
COMBOS += [("resnet10", "baseline"), ("resnet10", "anodev2_conf2")]


def _combo_params():
    for name, method in COMBOS:
        marks = [pytest.mark.slow] if name != "resnet4" else []  # ~5-30 s each on 2 shared CPU cores
        yield pytest.param(name, method, id=f"{name}-{method}", marks=marks)


def test_two_steps_with_a_learned_operator_and_time_kernel(tmp_path):
    """--config.evolution=mlp --config.time_kernel=exponential trains: q's and K's params move, at evolution_lr_scale."""
    config = tiny_config("resnet4", "anodev2_conf1", evolution="mlp", time_kernel="exponential", evolution_lr_scale=4.0)
    summary = training.train_and_evaluate(config, tmp_path)
    assert (summary["ode"]["evolution"], summary["ode"]["time_kernel"]) == ("mlp", "exponential")
    assert math.isfinite(summary["train_loss"][0]) and summary["steps"] == 2
    block = restore_state(tmp_path, 2)["params"]["layer1_1"]
    init = jax.jit(models.get_model("resnet4", "anodev2_conf1", evolution="mlp", time_kernel="exponential").init)(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
    )["params"]["layer1_1"]
    assert np.all(np.asarray(init["conv1"]["evo_w2"]) == 0) and np.any(np.asarray(block["conv1"]["evo_w2"][0]) != 0)
    assert np.asarray(block["time_log_rate"][0]) != np.asarray(init["time_log_rate"])
    assert json.loads((tmp_path / "config.json").read_text())["evolution_lr_scale"] == 4.0


@pytest.mark.parametrize("name, method", list(_combo_params()))
def test_two_steps_every_model_and_method(tmp_path, name, method):
    summary = training.train_and_evaluate(tiny_config(name, method), tmp_path)

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("test_accuracy", "test_loss", "num_params", "wall_time_s", "images_per_s", "model", "method", "config"):
        assert key in on_disk, key
    assert (on_disk["model"], on_disk["method"], on_disk["seeds"], on_disk["steps"]) == (name, method, [0], 2)
    blocks = {"resnet4": ["layer1_1"], "resnet10": ["layer1_1", "layer1_2", "layer2_2"], "alexnet": ["conv2"]}[name]
    assert on_disk["ode"]["remat_per_block"] == ({} if method == "neural_ode" else dict.fromkeys(blocks, "none"))
    assert len(on_disk["test_accuracy"]) == len(on_disk["test_loss"]) == 1
    assert 0.0 <= on_disk["test_accuracy_avg"] <= 1.0 and math.isfinite(on_disk["test_loss"][0])
    assert math.isfinite(on_disk["train_loss"][0])
    shapes = jax.eval_shape(models.get_model(name, method).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    assert on_disk["num_params"] == models.count_params(shapes["params"])

    (record,) = read_metrics(tmp_path)
    assert record["kind"] == "epoch" and (record["epoch"], record["step"], record["seed"]) == (1, 2, 0)
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "images_per_s"):
        assert math.isfinite(record[key]), key
    assert record["learning_rate"] == pytest.approx(0.01)
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]  # by global step
    assert list((tmp_path / "tensorboard" / "seed0").glob("events.out.tfevents.*"))

    state = restore_state(tmp_path, 2)
    for leaf in jax.tree_util.tree_leaves(state["params"]):
        assert leaf.dtype == np.float32 and leaf.shape[0] == 1  # float32, leading seed axis


# ----------------------------------------------------------------------------- learning


def test_smoke_config_learns(tmp_path):
    summary = training.train_and_evaluate(smoke.get_config(), tmp_path)
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert summary["test_accuracy"][0] > 0.3  # chance: 0.1


def test_bfloat16_run_learns_the_smoke_data(tmp_path):
    """``--config.dtype=bfloat16`` on the smoke config, 2 epochs: the loss halves, the test accuracy is far above chance."""
    config = smoke.get_config()
    config.dtype, config.num_epochs = "bfloat16", 2
    summary = training.train_and_evaluate(config, tmp_path)
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < 0.6 * epochs[0]["train_loss"]
    assert summary["test_accuracy"][0] > 0.3  # chance: 0.1 (measured: 0.57; float32: 0.48)
    state = restore_state(tmp_path, summary["steps"])
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((state["params"], state["batch_stats"]))} == {np.dtype("float32")}


# ----------------------------------------------------------------------------- seeds


@pytest.mark.exact
@pytest.mark.standard_promotion  # the training system in float64 (optax schedules mix Python floats in)
def test_vmapped_seeds_equal_single_runs(tmp_path):
    """Replica i of ``num_seeds=2`` (one vmapped program) is the single run with seed ``seed + i``.

    The vmapped run trains its whole epoch in one call (each replica gathering its own
    order's batches on the device), the single runs one step per call: other programs (the
    vmapped convolutions sum in another order), so the numbers agree to round-off. In float64
    (``config.dtype="float64"``): in float32 a max pool's arg-max can flip at a near tie and
    move a momentum leaf by 1e-2 (``benchmarks/round_off.py``; ``tests/test_engine.py`` says
    more); float64 round-off after these two steps is ~1e-15, a different replica (another
    seed) differs by > 0.1.
    """
    config = tiny_config("resnet4", "anodev2_conf2", num_seeds=2, seed=3, steps_per_call=2, dtype="float64")
    both = training.train_and_evaluate(config, tmp_path / "both")
    assert both["seeds"] == [3, 4]
    vmapped = restore_state(tmp_path / "both", 2)
    for i, seed in enumerate((3, 4)):
        single = training.train_and_evaluate(tiny_config("resnet4", "anodev2_conf2", seed=seed, dtype="float64"), tmp_path / f"seed{seed}")
        alone = restore_state(tmp_path / f"seed{seed}", 2)
        replica = jax.tree.map(lambda a: a[i : i + 1], vmapped)
        # Scalar RDA coefficients hold ~1e-4 after two steps, their gradients sums that
        # cancel: an atol at the float64 round-off of the O(1) terms summed.
        for part in ("params", "batch_stats", "opt_state"):
            assert tree_allclose(replica[part], alone[part], rtol=1e-10, atol=1e-12), (part, max_rel_err(replica[part], alone[part]))
        assert np.array_equal(replica["step"], alone["step"])
        assert single["test_loss"][0] == pytest.approx(both["test_loss"][i], rel=1e-10)
        # the train loss is the mean of float32 running sums (the checkpointed tally): one ulp
        assert single["train_loss"][0] == pytest.approx(both["train_loss"][i], rel=1e-6)
    # Independent replicas: different initializations and data orders.
    assert max_rel_err(jax.tree.map(lambda a: a[:1], vmapped["params"]), jax.tree.map(lambda a: a[1:], vmapped["params"])) > 0.1
    records = read_metrics(tmp_path / "both")
    assert [(r["epoch"], r["seed"]) for r in records] == [(1, 3), (1, 4)]


# ----------------------------------------------------------------------------- resume


@pytest.mark.exact
def test_resume_equals_uninterrupted_run(tmp_path):
    kw = dict(log_every_steps=1)  # 2 steps per epoch, the learning rate drops after epoch 1
    training.train_and_evaluate(tiny_config("resnet4", "anodev2_conf1", num_epochs=2, **kw), tmp_path / "full")

    first = training.train_and_evaluate(tiny_config("resnet4", "anodev2_conf1", num_epochs=1, **kw), tmp_path / "cut")
    assert first["steps"] == 2
    # A crash during epoch 2: a metrics record past the checkpoint, and a checkpoint cut off
    # mid-write (orbax's temporary directory, renamed into place only when complete).
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "step": 3, "epoch": 2}) + "\n")
    partial = tmp_path / "cut" / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "garbage").write_bytes(b"\0" * 10)
    resumed = training.train_and_evaluate(tiny_config("resnet4", "anodev2_conf1", num_epochs=2, **kw), tmp_path / "cut")
    assert (resumed["resumed_from_epoch"], resumed["resumed_from_step"], resumed["steps"]) == (1, 2, 4)
    assert not partial.exists()  # cleaned up, never loaded

    full, cut = restore_state(tmp_path / "full", 4), restore_state(tmp_path / "cut", 4)
    assert tree_allclose(cut, full, rtol=0, atol=0)  # same programs, same inputs: bitwise equal
    assert int(np.asarray(cut["step"])[0]) == 4
    # The stray record after the checkpoint (a crashed run's tail) is dropped on resume.
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(read_metrics(tmp_path / "full"))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["num_epochs"] == 2


def tree_hash(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_rerunning_a_finished_run_changes_nothing(tmp_path, capsys):
    config = tiny_config()
    done = json.loads(json.dumps(training.train_and_evaluate(config, tmp_path)))
    before = tree_hash(tmp_path)
    for _ in range(2):
        assert training.train_and_evaluate(config, tmp_path) == done  # the summary it wrote then
        assert tree_hash(tmp_path) == before  # no file rewritten, none added (no TensorBoard file, no lock)
    assert "holds this run, finished (epoch 1/1, step 2)" in capsys.readouterr().out

    # Stopped after its last checkpoint, before summary.json: the rerun evaluates that checkpoint
    # and writes the summary the run would have written (timings aside), adding no other file.
    (tmp_path / "summary.json").unlink()
    rebuilt = training.train_and_evaluate(config, tmp_path)
    timing = ("wall_time_s", "images_per_s", "resumed_from_epoch", "resumed_from_step")
    assert {k: v for k, v in rebuilt.items() if k not in timing} == {k: v for k, v in done.items() if k not in timing}
    assert rebuilt["images_per_s"] == read_metrics(tmp_path)[-1]["images_per_s"]  # the last epoch's, as logged
    after = tree_hash(tmp_path)
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k not in ("summary.json", "sessions.jsonl")} == {
        k: v for k, v in before.items() if k not in ("summary.json", "sessions.jsonl")
    }


# ----------------------------------------------------------------------------- validation in process


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(model="vgg"), "config.model='vgg'"),
        (dict(method="ode"), "config.method='ode'"),
        (dict(method="anodev2_conf1", steps_w=7), "steps_w=7 is not a multiple of steps_z=5"),
        (dict(steps_z=0), "config.steps_z=0"),
        (dict(batch_size=0), "config.batch_size=0"),
        (dict(batch_size=32), "batch_size=32 exceeds the 16 training examples"),
        (dict(lr_boundaries_epochs=(3, 2)), "lr_boundaries_epochs"),
        (dict(dataset="npz", data_dir="/does/not/exist.npz"), "does not exist"),
        (dict(dtype="float16"), "config.dtype='float16' is invalid: it must be one of float32, bfloat16"),
        (dict(steps_per_call=-1), "config.steps_per_call=-1 is invalid: it must be an integer >= 0"),
        (dict(remat_budget_mb=0.0), "config.remat_budget_mb=0.0"),
    ],
)
def test_bad_config_fails_before_writing(tmp_path, overrides, match):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match) as info:
        training.train_and_evaluate(tiny_config(**overrides), workdir)
    assert "\n" not in str(info.value)
    assert not workdir.exists()


def test_unknown_field_and_other_config_in_workdir(tmp_path):
    config = tiny_config()
    config.unlock()
    config.foo = 1
    with pytest.raises(training.ConfigError, match="unknown config field.*foo"):
        training.train_and_evaluate(config, tmp_path / "a")

    workdir = tmp_path / "b"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(run_config.config_dict(tiny_config(method="anode"))))
    before = (workdir / "config.json").read_text()
    with pytest.raises(training.ConfigError, match="method='anode'.*--config.method='anode'"):
        training.train_and_evaluate(tiny_config(), workdir)
    assert (workdir / "config.json").read_text() == before and sorted(os.listdir(workdir)) == ["config.json"]
    # An explicit value equal to the method's default is the same run as None.
    (workdir / "config.json").write_text(json.dumps(run_config.config_dict(tiny_config(method="anode", steps_z=2))))
    training.validate_config(tiny_config(method="anode"))
    assert rundir.check_workdir(workdir, run_config.config_dict(tiny_config(method="anode"))) is not None


def test_run_written_before_remat_auto_keeps_block_and_the_budget_is_per_device(tmp_path):
    """A config.json without remat_budget_mb ran remat=None as "block": the resume check (and model) keep it."""
    workdir = tmp_path / "old"
    workdir.mkdir()
    old = run_config.config_dict(tiny_config(method="anodev2_conf2"))
    del old["remat_budget_mb"]
    (workdir / "config.json").write_text(json.dumps(old))
    assert rundir.check_workdir(workdir, run_config.config_dict(tiny_config(method="anodev2_conf2"))) == old
    assert rundir.check_workdir(workdir, run_config.config_dict(tiny_config(method="anodev2_conf2", remat="block")))
    with pytest.raises(training.ConfigError, match="holds a run with remat='block', but this config has remat='auto'"):
        rundir.check_workdir(workdir, run_config.config_dict(tiny_config(method="anodev2_conf2", remat="auto")))
    assert run_config.legacy_defaults(old) == {"remat": "block"} and run_config.legacy_defaults({**old, "method": "baseline"}) == {}
    # a budget change resumes (memory, not values)
    new = run_config.config_dict(tiny_config(method="anodev2_conf2"))
    (workdir / "config.json").write_text(json.dumps(new))
    assert rundir.check_workdir(workdir, run_config.config_dict(tiny_config(method="anodev2_conf2", remat_budget_mb=64.0)))
    assert steps.create_model(tiny_config(method="anodev2_conf2"), defaults={"remat": "block"}).remat == "block"

    # the model sees one replica's global batch; a device holds 1/num_devices of each of num_seeds replicas
    config = tiny_config(method="anodev2_conf1", num_seeds=2, remat_budget_mb=100.0)
    assert steps.create_model(config, num_devices=4).remat_budget_mb == 200.0
    assert steps.create_model(config).remat_budget_mb == 100.0 * jax.device_count() / 2


# ----------------------------------------------------------------------------- devices


_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from configs import default
    from anodev2_jax import data, optim, sharding, steps

    assert jax.device_count() == 4, jax.devices()
    config = default.get_config("anode")  # ODE block with per-step BN; compiles fastest
    ds = data.load_dataset("synthetic", num_train=16, num_test=16)
    model = steps.create_model(config)
    tx, _ = optim.create_optimizer(config, steps_per_epoch=1)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = sharding.make_mesh(devices)
        state = steps.init_train_state(model, tx, [0], mesh)
        step = steps.make_train_step(model, tx, mesh, 1)
        batch = sharding.batch_sharding(mesh)
        images = sharding.put_global(ds.x_train[None], batch)
        labels = sharding.put_global(ds.y_train[None], batch)
        assert len(images.sharding.device_set) == len(devices)
        seeds = sharding.put_global(np.zeros((1,), np.int32), sharding.replicated(mesh))
        for _ in range(2):
            state, metrics = step(state, images, labels, seeds)
        assert len(state.params["fc"]["kernel"].sharding.device_set) == len(devices)
        results.append(jax.device_get((metrics, state)))
    (m4, s4), (m1, s1) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s4), jax.tree_util.tree_leaves(s1)):
        # float32: the gradient all-reduce sums in another order; atol scales with the leaf.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
    print("OK", float(m4["loss"][0]), float(m1["loss"][0]))
    """
)


def _lowered_text(step, args, platform: str) -> str:
    return jax.export.export(step, platforms=[platform])(*args).mlir_module()


def test_train_step_lowers_for_gpu_and_tpu_without_cpu_kernels():
    """The 5-seed ResNet-4 conf. 1 train step lowers for CUDA and TPU on this CPU-only machine.

    Lowering needs no accelerator (``jax.export``), so CPU-only CI still catches an op with
    no accelerator lowering, or a CPU-only code path leaking into the accelerator program.
    ``kernels.conv2d`` computes kernel gradients as matrix products on CPU only
    (``lax.platform_dependent``), inside a ``lax.scan`` where the batch needs several cache-
    sized chunks (here: the ODE block's 16-channel layers). The accelerator programs must have
    no loop at all and one more convolution per layer (stem + 2 per Euler step x 5 = 11): each
    kernel gradient as the library's convolution.
    """
    config = tiny_config("resnet4", "anodev2_conf1", num_seeds=5)
    model = steps.create_model(config)
    tx, _ = optim.create_optimizer(config, steps_per_epoch=2)
    mesh = sharding.make_mesh()
    step = steps.make_train_step(model, tx, mesh, 5)
    args = (
        jax.eval_shape(lambda: steps.init_train_state(model, tx, list(range(5)), mesh)),  # shapes only
        jax.ShapeDtypeStruct((5, 8, 32, 32, 3), np.uint8),
        jax.ShapeDtypeStruct((5, 8), np.int32),
        jax.ShapeDtypeStruct((5,), np.int32),
    )
    cpu = _lowered_text(step, args, "cpu")
    assert cpu.count("stablehlo.while") >= 10  # the ODE block's kernel-gradient scans (threefry also loops on CPU)
    for platform in ("cuda", "tpu"):
        text = _lowered_text(step, args, platform)
        assert text.count("stablehlo.while") == 0, platform
        assert text.count("stablehlo.convolution") == cpu.count("stablehlo.convolution") + 11, platform


def _while_trip_counts(text: str) -> list[int]:
    """The static trip count of every ``stablehlo.while`` in ``text``: the constant its ``cond`` compares against."""
    counts = []
    for m in re.finditer(r"cond \{\s*%\S+ = stablehlo\.compare\s+LT, %\w+, (%\w+)", text):
        bound = m.group(1)
        defs = re.findall(rf"{re.escape(bound)} = stablehlo\.constant dense<(\d+)> : tensor<i\d+>", text[: m.start()])
        counts.append(int(defs[-1]) if defs else -1)
    return counts


def test_whole_epoch_call_lowers_for_gpu_as_one_loop_over_the_epoch():
    """``steps_per_call=0`` on a GPU is the whole epoch in one call: one loop, the epoch's trip count, no host callback.

    The 5-seed ResNet-4 conf. 1 call over a 7-step epoch, lowered for CUDA on this CPU-only
    machine: its only ``stablehlo.while`` runs 7 times (the step itself has no loop there,
    see the test above), and nothing in it calls back to the host.
    """
    steps_per_epoch = 7
    config = tiny_config("resnet4", "anodev2_conf1", num_seeds=5, num_train=8 * steps_per_epoch)
    assert engine.resolve_steps_per_call(config.steps_per_call, steps_per_epoch, True, "gpu") == steps_per_epoch
    model = steps.create_model(config)
    tx, _ = optim.create_optimizer(config, steps_per_epoch=steps_per_epoch)
    mesh = sharding.make_mesh()
    call = steps.make_train_call(model, tx, mesh, 5, steps_per_epoch, steps_per_epoch)
    args = (
        jax.eval_shape(lambda: steps.init_train_state(model, tx, list(range(5)), mesh)),
        jax.ShapeDtypeStruct((config.num_train, 32, 32, 3), np.uint8),  # the whole training split
        jax.ShapeDtypeStruct((config.num_train,), np.int32),
        jax.ShapeDtypeStruct((5, steps_per_epoch, 8), np.int32),  # the epoch's index array
        jax.ShapeDtypeStruct((5,), np.int32),
    )
    text = _lowered_text(call, args, "cuda")
    assert text.count("stablehlo.while") == 1 and _while_trip_counts(text) == [steps_per_epoch]
    assert "callback" not in text and "stablehlo.custom_call" not in text


@pytest.mark.exact
def test_four_devices_equal_one_device():
    """Two data-parallel steps over 4 (fake CPU) devices equal the same steps on 1 device."""
    # Optimization level 0: XLA:CPU compiles threefry and the model ~5x faster; both sides alike.
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _DEVICE_SCRIPT.format(repo=str(REPO))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK"), proc.stdout


def test_each_epoch_line_gives_the_run_eta_and_nothing_per_step_reaches_a_file(tmp_path, capsys):
    training.train_and_evaluate(tiny_config(num_epochs=3, log_every_steps=1), tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] and "\r" not in "".join(lines)
    assert re.search(r", ETA \d+:\d\d:\d\d \(2 epochs left\)$", lines[0]), lines[0]
    assert re.search(r", ETA \d+:\d\d:\d\d \(1 epoch left\)$", lines[1]), lines[1]
    assert "ETA" not in lines[2]
