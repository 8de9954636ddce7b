"""The on-device engine (anodev2_jax.engine): several steps per call give the per-step run, bitwise; no transfer inside an epoch.

The bitwise test runs in a subprocess at XLA:CPU's default optimization level, where a step
inside ``lax.scan`` computes exactly what the standalone step computes; at the suite's
``--xla_backend_optimization_level=0`` the loop's transposed convolution is compiled
differently (round-off from the first step; see the ``engine`` module docstring), so the
in-process tests here compare paths that have no loop, or check only what does not
depend on round-off.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from anodev2_jax import data, engine, sharding, training
from anodev2_jax.errors import ConfigError

from helpers import read_metrics, restore_state, tiny_config, without_timing

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the pieces


def test_call_lengths_end_at_multiples_of_steps_per_call_and_at_the_epoch_end():
    assert engine.call_lengths(0, 195, 195) == [195]
    assert engine.call_lengths(0, 10, 4) == [4, 4, 2]
    assert engine.call_lengths(5, 10, 4) == [3, 2]  # a resume mid-epoch realigns on the epoch's grid
    assert engine.call_lengths(0, 10, 1) == [1] * 10
    assert engine.call_lengths(10, 10, 4) == []


def test_steps_per_call_resolution():
    assert engine.resolve_steps_per_call(0, 195, True, "gpu") == 195  # automatic: the whole epoch
    assert engine.resolve_steps_per_call(0, 195, True, "tpu") == 195
    assert engine.resolve_steps_per_call(0, 195, True, "cpu") == 1  # jax-ml/jax#12868
    assert engine.resolve_steps_per_call(0, 195, False, "gpu") == 1  # the data does not fit: host path
    assert engine.resolve_steps_per_call(500, 195, True, "cpu") == 195  # capped at the epoch
    assert engine.resolve_steps_per_call(1, 195, False, "gpu") == 1
    with pytest.raises(ConfigError, match="steps_per_call=3 needs the dataset on every device.*steps_per_call=1"):
        engine.resolve_steps_per_call(3, 195, False, "gpu")


def test_epoch_index_array_is_the_per_step_order():
    idx = engine.epoch_index_array(20, 8, [3, 4], epoch=1)
    assert idx.shape == (2, 2, 8) and idx.dtype == np.int32
    for i, batch in enumerate(training.epoch_indices(20, 8, [3, 4], 1)):
        np.testing.assert_array_equal(idx[:, i], batch)


def test_eval_index_array_and_device_gather():
    idx, mask = data.eval_index_array(5, 2)
    np.testing.assert_array_equal(idx, [[0, 1], [2, 3], [4, 0]])
    np.testing.assert_array_equal(mask, [[True, True], [True, True], [True, False]])
    x = np.arange(5 * 3, dtype=np.uint8).reshape(5, 3)
    rows = np.asarray([[4, 0], [2, 2]], np.int32)
    np.testing.assert_array_equal(jax.jit(data.gather_rows)(x, rows), x[rows])


def test_device_memory_fit(monkeypatch):
    mesh = sharding.make_mesh()
    assert sharding.device_memory_bytes(mesh) is None and sharding.fits_on_devices(10**12, mesh)  # CPU: the host's memory
    monkeypatch.setattr(sharding, "DEVICE_DATA_FRACTION", 0.0)
    assert not sharding.fits_on_devices(1, mesh)


# ----------------------------------------------------------------------------- end to end


def test_data_that_does_not_fit_takes_the_host_path_with_the_same_result(tmp_path, monkeypatch):
    on_device = training.train_and_evaluate(tiny_config(), tmp_path / "device")
    assert (on_device["steps_per_call"], on_device["data_on_device"]) == (1, True)
    monkeypatch.setattr(sharding, "DEVICE_DATA_FRACTION", 0.0)  # as if the data did not fit
    with pytest.raises(ConfigError, match="steps_per_call=2 needs the dataset") as info:
        training.train_and_evaluate(tiny_config(steps_per_call=2), tmp_path / "refused")
    assert "\n" not in str(info.value) and not (tmp_path / "refused").exists()
    on_host = training.train_and_evaluate(tiny_config(), tmp_path / "host")
    assert (on_host["steps_per_call"], on_host["data_on_device"]) == (1, False)
    # Neither path has a loop: the same numbers, bitwise, even at optimization level 0.
    assert (on_host["test_loss"], on_host["train_loss"]) == (on_device["test_loss"], on_device["train_loss"])
    a, b = restore_state(tmp_path / "host", 2), restore_state(tmp_path / "device", 2)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_no_host_device_transfer_inside_an_epoch(tmp_path, monkeypatch):
    """Every call, fold and evaluation of the epochs runs under ``jax.transfer_guard("disallow")``.

    The data and each epoch's index array are placed explicitly before; a call takes device
    arrays only (its position comes from the state's step counter) and the loop reads the
    calls' metrics with one explicit copy. The per-step host path, which copies every batch
    to the devices, fails the same guard.
    """
    monkeypatch.setattr(training, "EPOCH_TRANSFER_GUARD", "disallow")
    for k in (1, 2):  # one step per call, and the whole (2-step) epoch in one call
        summary = training.train_and_evaluate(
            tiny_config(num_epochs=2, log_every_steps=1, steps_per_call=k), tmp_path / f"k{k}"
        )
        assert summary["steps"] == 4 and summary["steps_per_call"] == k
        assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / f"k{k}")] == [
            ("step", 1), ("step", 2), ("epoch", 2), ("step", 3), ("step", 4), ("epoch", 4)
        ]  # fmt: skip
    monkeypatch.setattr(sharding, "DEVICE_DATA_FRACTION", 0.0)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        training.train_and_evaluate(tiny_config(), tmp_path / "host")


_BITWISE_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from configs import default
    from anodev2_jax import engine, training

    def config(steps_per_call):
        config = default.get_config("baseline")
        config.dataset, config.num_train, config.num_test, config.batch_size = "synthetic", 32, 12, 8  # 4 steps/epoch
        config.num_epochs, config.lr_boundaries_epochs, config.learning_rate = 2, (1,), 0.01
        config.log_every_steps, config.steps_per_call = 3, steps_per_call  # log windows end inside calls
        return config

    root = Path({root!r})
    for name, k in (("k1", 1), ("k3", 3), ("epoch", 4)):
        training.train_and_evaluate(config(k), root / name)

    train = engine.DeviceEngine.train
    def train_then_sigterm(self, state, position, length):
        out = train(self, state, position, length)
        if position == 0 and length == 3:  # the run's first call: the signal is acted on at its end
            signal.raise_signal(signal.SIGTERM)
        return out
    engine.DeviceEngine.train = train_then_sigterm
    try:
        training.train_and_evaluate(config(3), root / "stopped")
        sys.exit("not stopped")
    except training.Preempted as e:
        print("STOPPED", e.step, e, flush=True)
    engine.DeviceEngine.train = train
    training.train_and_evaluate(config(3), root / "stopped")  # the same command: resumes at step 3
    """
)


@pytest.mark.slow  # ~35-45 s on 2 shared CPU cores: XLA:CPU's default optimization level compiles slowly
def test_steps_per_call_1_3_and_a_whole_epoch_and_a_stopped_run_are_bitwise_equal(tmp_path):
    """ResNet-4 baseline, 2 epochs of 4 steps: 1 step per call, 3 (calls of 3 and 1), the whole
    epoch, and 3 stopped by SIGTERM after its first call (step 3, mid-epoch) and resumed: the
    same final state, metrics records (timings aside) and summary, bitwise."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
    env["XLA_FLAGS"] = " ".join(flags)  # XLA's default optimization level, what train.py runs
    env.pop("JAX_ENABLE_X64", None)
    script = _BITWISE_SCRIPT.format(repo=str(REPO), root=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED 3 received SIGTERM at step 3 (step 3/4 of epoch 1)" in proc.stdout, proc.stdout

    runs = {name: tmp_path / name for name in ("k1", "k3", "epoch", "stopped")}
    summaries = {n: json.loads((w / "summary.json").read_text()) for n, w in runs.items()}
    assert [summaries[n]["steps_per_call"] for n in runs] == [1, 3, 4, 3]
    assert summaries["stopped"]["resumed_from_step"] == 3
    reference = restore_state(runs["k1"], 8)
    records = without_timing(read_metrics(runs["k1"]))
    assert [(r["kind"], r["step"]) for r in records] == [("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8)]
    for name, workdir in runs.items():
        state = restore_state(workdir, 8)
        (la, ta), (lb, tb) = jax.tree_util.tree_flatten_with_path(state), jax.tree_util.tree_flatten_with_path(reference)
        assert ta == tb
        for (path, x), (_, y) in zip(la, lb):
            assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), (name, jax.tree_util.keystr(path))
        assert without_timing(read_metrics(workdir)) == records, name
        for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps"):
            assert summaries[name][key] == summaries["k1"][key], (name, key)
