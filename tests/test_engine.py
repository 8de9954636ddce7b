"""The on-device engine (anodev2_jax.engine): several steps per call give each step the same inputs; no transfer inside an epoch.

One step per call and a ``lax.scan`` over several steps are different compiled programs:
XLA:CPU may round them differently (at the suite's ``--xla_backend_optimization_level=0``
it compiles the loop's transposed convolution differently; another CPU's vector units
round differently again). So the steps_per_call test asserts exactly what must be equal
(every step's batch, augmentation key and step counter, recorded from inside the calls;
the schedule; integer state) and the floats to a justified round-off tolerance; bits only
where one program runs on one machine (a stopped and resumed run against the same
``steps_per_call`` uninterrupted). The host-path test compares two programs without a loop.
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import data, engine, sharding, steps, training
from anodev2_jax.errors import ConfigError

from helpers import max_rel_err, read_metrics, restore_state, tiny_config, without_timing


# Round-off between programs: one step per call and a lax.scan over 3 or 4 steps compile
# differently (at the suite's optimization level XLA:CPU compiles the loop's transposed
# convolution differently; a CPU with other vector units rounds differently again). In
# float32 that is ~1e-6 relative per leaf, but a max pool's arg-max (ResNet-4 pools 8x8 at
# its end) can flip at a near tie and route a gradient elsewhere: measured 1e-2 in a momentum
# leaf after these 8 steps on SSE4_2 and AVX2 code (benchmarks/round_off.py), so float32 states
# cannot be compared tightly. The test trains the model in float64 (config.dtype="float64"):
# there the three programs agree to <= 1e-15 on each of native, AVX2, AVX and SSE4_2 code
# (mostly bit for bit) at the suite's level, and the instruction sets differ from each other
# by up to 1.5e-10 (1.1e-6 at XLA's default level), while a real difference (a step that saw
# another batch or key, an update missed, the learning rate 1% off) moves these leaves by 0.29
# relative. 1e-8 sits far above the round-off between programs and far below a real change.
_ROUND_OFF = 1e-8


def _leaves(state):
    return jax.tree_util.tree_flatten_with_path(state)[0]


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


@pytest.mark.exact
@pytest.mark.standard_promotion  # the training system in float64 (optax schedules mix Python floats in)
def test_data_that_does_not_fit_takes_the_host_path_with_the_same_result(tmp_path, monkeypatch):
    """The per-step host path (batches gathered on the host) trains the run the on-device path trains.

    Two compiled programs (the gather on the device or not), so the numbers are compared to
    round-off, in float64 (see ``_ROUND_OFF``: float32 arg-max flips could make them differ
    by far more); which batches each step saw is the same by construction (one index array).
    """
    on_device = training.train_and_evaluate(tiny_config(dtype="float64"), tmp_path / "device")
    assert (on_device["steps_per_call"], on_device["data_on_device"]) == (1, True)
    monkeypatch.setattr(sharding, "DEVICE_DATA_FRACTION", 0.0)  # as if the data did not fit
    with pytest.raises(ConfigError, match="steps_per_call=2 needs the dataset") as info:
        training.train_and_evaluate(tiny_config(steps_per_call=2), tmp_path / "refused")
    assert "\n" not in str(info.value) and not (tmp_path / "refused").exists()
    on_host = training.train_and_evaluate(tiny_config(dtype="float64"), tmp_path / "host")
    assert (on_host["steps_per_call"], on_host["data_on_device"]) == (1, False)
    assert np.allclose(on_host["test_loss"], on_device["test_loss"], rtol=_ROUND_OFF, atol=0)
    # the train loss is the mean of float32 running sums (the checkpointed tally): one ulp
    assert np.allclose(on_host["train_loss"], on_device["train_loss"], rtol=1e-6, atol=0)
    a, b = restore_state(tmp_path / "host", 2), restore_state(tmp_path / "device", 2)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            assert max_rel_err(x, y) <= _ROUND_OFF, (jax.tree_util.keystr(path), max_rel_err(x, y))
        else:
            assert np.array_equal(x, y), jax.tree_util.keystr(path)


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


def _probed_config(steps_per_call):
    config = tiny_config(num_train=32, num_test=12, num_epochs=2, log_every_steps=3)  # 4 steps/epoch
    config.steps_per_call = steps_per_call  # log windows end inside calls
    config.dtype = "float64"  # the whole model: round-off near 1e-10, no arg-max flips (see _ROUND_OFF)
    return config


class _StepProbe:
    """What every optimizer step saw, recorded from inside the compiled calls: integers only.

    ``steps.train_step_one`` is wrapped to also return, per step and replica, the state's step
    counter, the augmentation key (``key_data``), the gathered labels and the sum of the
    gathered uint8 pixels; ``DeviceEngine.train`` is wrapped to keep each call's metrics.
    These are the inputs of a step (batch, augmentation, schedule position); two programs
    that give every step the same ones differ only by round-off.
    """

    def __init__(self, monkeypatch):
        self.calls = []
        train_step_one, train = steps.train_step_one, engine.DeviceEngine.train

        def probed_step(model, tx, state, images, labels, seed, **kwargs):
            new_state, metrics = train_step_one(model, tx, state, images, labels, seed, **kwargs)
            key = jax.random.fold_in(jax.random.fold_in(steps.root_key(seed), 1), state.step)
            seen = {
                "step": state.step, "key": jax.random.key_data(key), "labels": labels,
                "pixel_sum": jnp.sum(images.astype(jnp.int32)),
            }  # fmt: skip
            return new_state, {**metrics, **{f"probe_{k}": v for k, v in seen.items()}}

        def recording_train(engine_self, state, position, length):
            state, metrics = train(engine_self, state, position, length)
            self.calls.append(metrics)
            return state, metrics

        monkeypatch.setattr(steps, "train_step_one", probed_step)
        monkeypatch.setattr(engine.DeviceEngine, "train", recording_train)

    def take(self) -> dict[str, np.ndarray]:
        """The steps recorded since the last take, concatenated over calls: ``{name: (steps, seeds, ...)}``."""
        calls, self.calls = jax.device_get(self.calls), []
        return {k[len("probe_"):]: np.concatenate([c[k] for c in calls]) for k in calls[0] if k.startswith("probe_")}




@pytest.mark.exact
@pytest.mark.standard_promotion  # the training system (optax schedules mix Python floats with float64 params)
def test_steps_per_call_gives_every_step_the_same_inputs_and_the_same_run_to_round_off(tmp_path, monkeypatch):
    """ResNet-4 baseline, 2 epochs of 4 steps: 1 step per call, 3 (calls of 3 and 1), the whole epoch,
    and 3 stopped by SIGTERM after its first call (step 3, mid-epoch) and resumed.

    Exactly equal, whatever the machine: each step's batch (labels and pixel sum as gathered on
    the device), augmentation key and step counter; the integer state; the records' kinds,
    steps, epochs and learning rates (the schedule). Equal to round-off (``_ROUND_OFF``, the
    model in float64): the float state and metrics of the three programs. Bitwise: the stopped
    and resumed run against the uninterrupted one with the same steps_per_call (the same
    program on this machine).
    """
    probe = _StepProbe(monkeypatch)
    runs, seen = {}, {}
    for name, k in (("k1", 1), ("k3", 3), ("epoch", 4)):
        runs[name] = training.train_and_evaluate(_probed_config(k), tmp_path / name)
        seen[name] = probe.take()

    train = engine.DeviceEngine.train  # the recording wrapper

    def train_then_sigterm(self, state, position, length):
        out = train(self, state, position, length)
        if position == 0 and length == 3:  # the run's first call: the signal is acted on at its end
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(engine.DeviceEngine, "train", train_then_sigterm)
    with pytest.raises(training.Preempted, match=r"received SIGTERM at step 3 \(step 3/4 of epoch 1\)"):
        training.train_and_evaluate(_probed_config(3), tmp_path / "stopped")
    monkeypatch.setattr(engine.DeviceEngine, "train", train)
    runs["stopped"] = training.train_and_evaluate(_probed_config(3), tmp_path / "stopped")  # resumes at step 3
    seen["stopped"] = probe.take()
    assert [runs[n]["steps_per_call"] for n in runs] == [1, 3, 4, 3] and runs["stopped"]["resumed_from_step"] == 3

    # 1. Every step's inputs, exactly.
    assert seen["k1"]["step"].shape == (8, 1) and list(seen["k1"]["step"][:, 0]) == list(range(8))
    for name in runs:
        assert sorted(seen[name]) == sorted(seen["k1"]), name
        for k, v in seen[name].items():
            assert v.dtype == seen["k1"][k].dtype and np.array_equal(v, seen["k1"][k]), (name, k)

    # 2. The schedule and the integer state exactly, the float state and metrics to round-off.
    reference, records = restore_state(tmp_path / "k1", 8), without_timing(read_metrics(tmp_path / "k1"))
    assert [(r["kind"], r["step"]) for r in records] == [("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8)]
    for name in ("k3", "epoch"):
        state = restore_state(tmp_path / name, 8)
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(reference)
        for (path, x), (_, y) in zip(_leaves(state), _leaves(reference)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (name, jax.tree_util.keystr(path))
            if np.issubdtype(x.dtype, np.floating):
                assert max_rel_err(x, y) <= _ROUND_OFF, (name, jax.tree_util.keystr(path), max_rel_err(x, y))
            else:
                assert np.array_equal(x, y), (name, jax.tree_util.keystr(path))
        ours = without_timing(read_metrics(tmp_path / name))
        assert len(ours) == len(records)
        for got, want in zip(ours, records):
            floats = {k for k, v in want.items() if isinstance(v, float) and k != "learning_rate"}
            assert {k: v for k, v in got.items() if k not in floats} == {k: v for k, v in want.items() if k not in floats}
            for key in floats:  # the train metrics are means of float32 running sums: one ulp
                assert abs(got[key] - want[key]) <= 1e-6 * max(abs(want[key]), 1.0), (name, got, want, key)
        assert runs[name]["steps"] == runs["k1"]["steps"]
        assert np.allclose(runs[name]["test_loss"], runs["k1"]["test_loss"], rtol=_ROUND_OFF)

    # 3. A stop and a resume change nothing at all: the same program as the uninterrupted k3 run.
    k3 = restore_state(tmp_path / "k3", 8)
    for (path, x), (_, y) in zip(_leaves(restore_state(tmp_path / "stopped", 8)), _leaves(k3)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), jax.tree_util.keystr(path)
    assert without_timing(read_metrics(tmp_path / "stopped")) == without_timing(read_metrics(tmp_path / "k3"))
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps"):
        assert runs["stopped"][key] == runs["k3"][key], key
