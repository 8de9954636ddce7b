"""Reliability: kill and resume, stop signals, non-finite values, failed writes (issue 6, items 1-3).

The kill / resume test drives ``python train.py`` in subprocesses, as a scheduler would: it
kills one workdir's run with SIGKILL after a checkpoint and in the middle of writing one,
stops it with SIGTERM mid-epoch, makes a checkpoint write fail (``ulimit -f``), restarts
it each time with the same command, and requires the end result to equal, bitwise, an
uninterrupted run of the same command (training is deterministic on CPU: see the
``training`` module docstring). Each ``train.py`` start costs ~10 s on 2 CPU cores (imports
~5 s, compiling ~5 s; tensorboardX also imports torch when that is installed, +~5 s): the
test makes 6 starts, the reference run alongside the first ones, and all share a persistent
compilation cache so that only the first two compile.

The non-finite tests run in process on a dataset holding one image of NaN pixels (float32
images, which the data layer would refuse: a corrupted item that got past it), placed so
that epoch 1 never draws it and epoch 2 does.
"""

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import default  # noqa: E402

from anodev2_jax import data, errors, stopping, training  # noqa: E402

# ----------------------------------------------------------------------------- helpers

# 64 images, batch 16: 4 steps per epoch, 3 epochs; a step record every 3 steps, so logging
# windows straddle epochs and restarts. The baseline model compiles fastest.
ARGS = [
    "--config", "configs/smoke.py:baseline", "--config.num_train=64", "--config.num_test=32",
    "--config.batch_size=16", "--config.num_epochs=3", "--config.log_every_steps=3",
]  # fmt: skip
TIMING = ("images_per_s", "epoch_time_s")

# ``ulimit -f`` (the kernel fails a write past the limit with EFBIG, as a full disk fails it
# with ENOSPC; CPython ignores SIGXFSZ), set in a wrapper: no fork of the threaded pytest.
FILE_SIZE_LIMITED = (
    "import resource, runpy, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def start(workdir: Path, cache: Path, max_file_bytes=None) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",  # compiles ~5x faster; same for every run
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    command = [str(REPO / "train.py"), *ARGS, f"--workdir={workdir}"]
    if max_file_bytes is not None:
        command = ["-c", FILE_SIZE_LIMITED, str(max_file_bytes), *command]
    return subprocess.Popen(
        [sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout=300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def wait_until(proc: subprocess.Popen, condition, timeout=300) -> None:
    """Polls ``condition`` every 2 ms (a checkpoint write here takes ~100-200 ms) while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before the condition: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.002)


def complete_checkpoints(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def partial_checkpoints(workdir: Path) -> list[str]:
    ckpt = workdir / "checkpoints"
    return sorted(p.name for p in ckpt.iterdir() if "orbax-checkpoint-tmp" in p.name) if ckpt.is_dir() else []


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def raw_checkpoint(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore())


def metrics(workdir: Path, *, timing=False) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_bitwise_equal(a, b) -> None:
    (la, ta), (lb, tb) = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


# ----------------------------------------------------------------------------- kill and resume


def test_killed_stopped_and_failed_run_resumes_to_the_uninterrupted_result(tmp_path, cache):
    reference = start(tmp_path / "reference", cache)  # uninterrupted, alongside the first stages
    work = tmp_path / "run"
    ckpt = work / "checkpoints"

    # 1. SIGKILL right after the epoch-1 checkpoint (step 4) is complete: somewhere in epoch 2.
    run = start(work, cache)
    wait_until(run, lambda: 4 in complete_checkpoints(work))
    run.kill()
    run.wait()
    assert complete_checkpoints(work) == [4]

    # 2. SIGTERM once the handlers are in (the start line): the first step after it (step 5,
    #    mid-epoch 2) finishes, is saved, and the run says so and exits 143.
    run = start(work, cache)
    assert "(resumed from step 4)" in run.stdout.readline()
    run.send_signal(signal.SIGTERM)
    out, err = finish(run)
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip() == (
        f"received SIGTERM at step 5 (step 1/4 of epoch 2): saved checkpoint {ckpt / '5'}; "
        "rerun the same command to resume"
    )
    assert complete_checkpoints(work) == [4, 5]

    # 3. SIGKILL in the middle of writing the next checkpoint (orbax's temporary directory).
    run = start(work, cache)
    assert "(resumed from step 5, step 1/4 of epoch 2)" in run.stdout.readline()
    wait_until(run, lambda: partial_checkpoints(work))
    run.kill()
    run.wait()
    cut_off, last = partial_checkpoints(work), max(complete_checkpoints(work))
    assert cut_off and int(cut_off[0].split(".")[0]) > last, (cut_off, last)

    # 4. A write fails (file size limit 8 kB: a checkpoint's _METADATA alone is ~11 kB, the
    #    metrics and event files stay < 3 kB): one line, exit 4, the complete checkpoints
    #    untouched, the cut-off one not loaded.
    out, err = finish(reference)  # every program is in the cache now: no cache write to fail
    assert reference.returncode == 0, err[-3000:]
    before = {s: tree_hash(ckpt / str(s)) for s in complete_checkpoints(work)}
    run = start(work, cache, max_file_bytes=8 * 1024)
    out, err = finish(run)
    assert f"(resumed from step {last}" in out  # the cut-off checkpoint was not loaded
    assert run.returncode == 4, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: writing a checkpoint in {ckpt} failed: File too large (EFBIG)"), lines[0]
    assert f"rerun the same command: it resumes from the last complete checkpoint {ckpt / str(last)}" in lines[0]
    assert {s: tree_hash(ckpt / str(s)) for s in complete_checkpoints(work)} == before

    # 5. The same command once more finishes the run.
    run = start(work, cache)
    out, err = finish(run)
    assert run.returncode == 0, err[-3000:]
    assert f"(resumed from step {last}" in out
    assert not partial_checkpoints(work)  # leftovers of the cut-off writes are removed

    # Bitwise the uninterrupted run: params, BatchNorm statistics, optimizer state, loop
    # sums, every metrics record (timings aside) and the summary's numbers.
    assert_bitwise_equal(raw_checkpoint(work, 12), raw_checkpoint(tmp_path / "reference", 12))
    assert metrics(work) == metrics(tmp_path / "reference")
    assert [(r["kind"], r["step"]) for r in metrics(work)] == [
        ("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8), ("step", 9), ("step", 12), ("epoch", 12)
    ]  # fmt: skip
    ours, theirs = (json.loads((w / "summary.json").read_text()) for w in (work, tmp_path / "reference"))
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps", "nonfinite_skipped"):
        assert ours[key] == theirs[key], key


# ----------------------------------------------------------------------------- non-finite values


def tiny_config(**overrides):
    """Two steps per epoch (20 images, batch 8: 4 left out per epoch), two epochs."""
    config = default.get_config("baseline")
    config.dataset, config.num_train, config.num_test = "synthetic", 20, 16
    config.batch_size, config.num_epochs, config.learning_rate = 8, 2, 0.01
    config.lr_boundaries_epochs, config.log_every_steps = (), 1
    for name, value in overrides.items():
        config[name] = value
    return config


@pytest.fixture
def nan_image(monkeypatch):
    """Patches ``load_dataset`` to hold one NaN image, drawn in epoch 2 only; gives its global step."""
    ds = data.load_dataset("synthetic", num_train=20, num_test=16)
    epochs = [list(training.epoch_indices(20, 8, [0], e)) for e in (0, 1)]
    unused_in_epoch_1 = sorted(set(range(20)) - {int(i) for b in epochs[0] for i in b.ravel()})
    batch, poisoned = next((j, int(i)) for j, b in enumerate(epochs[1]) for i in b.ravel() if i in unused_in_epoch_1)
    x = ds.x_train.astype(np.float32)
    x[poisoned] = np.nan
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: ds._replace(x_train=x))
    return 2 + batch + 1  # epoch 1 is steps 1-2


def test_nonfinite_stops_naming_the_step_and_the_intact_last_checkpoint(tmp_path, nan_image):
    config = tiny_config()
    with pytest.raises(training.NonFiniteError) as info:
        training.train_and_evaluate(config, tmp_path)
    good = tmp_path / "checkpoints" / "2"
    assert (info.value.step, info.value.seeds, info.value.checkpoint) == (nan_image, [0], good)
    message = str(info.value)
    assert f"at step {nan_image} (epoch 2, seed 0)" in message and f"last good checkpoint {good}" in message
    assert "--config.nonfinite=skip" in message and "\n" not in message
    assert complete_checkpoints(tmp_path) == [2]
    records = metrics(tmp_path)
    assert max(r["step"] for r in records) < nan_image
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    state = raw_checkpoint(tmp_path, 2)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state["params"]))

    # The same command again: resumes from the good checkpoint, meets the same step, and
    # still leaves the checkpoint as it was.
    before = tree_hash(good)
    with pytest.raises(training.NonFiniteError, match=f"at step {nan_image} "):
        training.train_and_evaluate(config, tmp_path)
    assert tree_hash(good) == before and complete_checkpoints(tmp_path) == [2]


def test_nonfinite_skip_leaves_the_step_out_and_counts_it(tmp_path, nan_image):
    summary = training.train_and_evaluate(tiny_config(nonfinite="skip"), tmp_path)
    assert summary["nonfinite_skipped"] == [1] and summary["steps"] == 4
    epochs = [r for r in metrics(tmp_path) if r["kind"] == "epoch"]
    assert [r["nonfinite_skipped"] for r in epochs] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in epochs)
    (bad,) = [r for r in metrics(tmp_path) if r["kind"] == "step" and r["step"] == nan_image]
    assert bad["train_loss"] is None  # a window of one skipped step has no mean
    state = raw_checkpoint(tmp_path, 4)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves((state["params"], state["opt_state"])))
    # Counters advance on a skipped step (the learning-rate schedule stays on the global step).
    counts = [leaf for leaf in jax.tree_util.tree_leaves(state["opt_state"]) if np.issubdtype(leaf.dtype, np.integer)]
    assert counts and all(int(c[0]) == 4 for c in counts)
    assert int(state["step"][0]) == 4 and int(state["loop"]["skipped"][0]) == 1
