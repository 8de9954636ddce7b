"""Checkpoints: the listing of complete ones, save / wait / verified restore, and runs written by older code.

``fixtures/run_before_layout`` is a run directory written by the code before the layout
change (commit 1872b8e): ResNet-4 configuration 2 on 16 synthetic images, batch 8, one epoch
(checkpoint 2). ``fixtures/run_before_layout_expected.json`` holds what that code wrote when
it resumed the same directory for a second epoch: every metrics record and, per leaf of
checkpoint 4, its shape, dtype, sum, absolute sum and first value. Today's code must resume
the directory to the same result: exactly the same records (kinds, steps, epochs, learning
rates), leaves (paths, shapes, dtypes) and steps, and the same numbers to round-off. The
fixture was recorded on another machine: XLA:CPU compiles for the CPU it runs on, so the
float32 numbers of two steps differ between machines by round-off (``RTOL`` says how much).
Those checkpoints have no digest: they restore unverified (readability, tree, shapes and
finiteness are checked).

Corruption: flipping one bit in a checkpoint's array data (the largest file of the OCDBT
store, which holds the compressed chunks) either makes the restore fail or changes the
numbers restored, without any error from orbax: every such case must be caught and passed
over for the checkpoint before it.
"""

import json
import math
import shutil
from pathlib import Path

import orbax.checkpoint as ocp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default

from anodev2_jax import checkpoints, training
from anodev2_jax.errors import ConfigError

from helpers import array_data_file, flip_bit

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Round-off between machines, float32, 2 SGD steps (``python benchmarks/round_off.py`` prints
# the table, native / AVX2 / AVX / SSE4_2 code at both XLA optimization levels): the records'
# numbers and the test loss differ from the recorded ones by at most 8.4e-8 relative, each
# leaf's sums and first entry (over the leaf's L1 norm: a sum may cancel) by at most 3.5e-5
# (the arg-max of the final max pool can flip at a near tie and move a few entries). A real
# change (the learning rate 1% off for the two steps) moves the records by 1e-2, the test loss
# by 1.6e-4 and the leaves by 1.3e-2. So: 1e-5 for the numbers (120x above round-off, 16x
# below a real change of the test loss) and 1e-3 for the leaves (28x above, 13x below).
RTOL = 1e-5
RTOL_LEAVES = 1e-3

# A failed restore leaves orbax's other reads as coroutines never awaited; their "Exception
# ignored in" reports are orbax's, not this code's (train.py hides them too).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def fixture_config(num_epochs):
    """The config that wrote ``fixtures/run_before_layout`` (see the module docstring)."""
    config = default.get_config("anodev2_conf2")
    config.dataset, config.num_train, config.num_test, config.batch_size = "synthetic", 16, 16, 8
    config.num_epochs, config.lr_boundaries_epochs, config.learning_rate, config.log_every_steps = num_epochs, (1,), 0.01, 1
    return config


def _digest(tree):
    return {
        jax.tree_util.keystr(path): (list(np.shape(v)), str(np.asarray(v).dtype), float(np.sum(v, dtype=np.float64)),
                                     float(np.sum(np.abs(v), dtype=np.float64)), float(np.ravel(v)[0]))
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }  # fmt: skip


@pytest.mark.exact
def test_a_run_written_before_the_layout_change_resumes_to_the_old_result(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_before_layout", workdir)
    expected = json.loads((FIXTURES / "run_before_layout_expected.json").read_text())
    summary = training.train_and_evaluate(fixture_config(2), workdir)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    np.testing.assert_allclose(summary["test_loss"], expected["test_loss"], rtol=RTOL)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in records]
    assert [sorted(r) for r in records] == [sorted(r) for r in expected["metrics"]]
    for got, want in zip(records, expected["metrics"]):
        numbers = [k for k, v in want.items() if isinstance(v, float)]
        assert {k: v for k, v in got.items() if k not in numbers} == {k: v for k, v in want.items() if k not in numbers}
        np.testing.assert_allclose([got[k] for k in numbers], [want[k] for k in numbers], rtol=RTOL)
    assert (workdir / "checkpoints" / "2").is_dir()  # restored, unverified (no digest), not set aside
    # It got a run id now; run.json lists checkpoint 2 as adopted, with the digest of what was read back.
    record = json.loads((workdir / "run.json").read_text())
    raw2, _ = checkpoints.restore_raw(workdir / "checkpoints", 2)
    assert record["adopted"] == {"2": checkpoints.state_digest(raw2)}
    meta4 = checkpoints.read_metadata(workdir / "checkpoints" / "4")
    assert meta4[checkpoints.RUN_ID_KEY] == record["run_id"] and meta4[checkpoints.CONFIG_KEY]["method"] == "anodev2_conf2"
    tree, step = checkpoints.restore_raw(workdir / "checkpoints", 4)
    digest = _digest(tree)
    want = {k: (v["shape"], v["dtype"], v["sum"], v["abs_sum"], v["first"]) for k, v in expected["checkpoint_4"].items()}
    assert sorted(digest) == sorted(want) and step == 4
    for key in want:
        shape, dtype, total, abs_total, first = digest[key]
        assert (shape, dtype) == tuple(want[key][:2]), key
        # A leaf's sum may cancel (the fc bias' momentum sums to ~1e-7 of an L1 norm of 2):
        # its round-off, and the first entry's, scale with the leaf's L1 norm, not with itself.
        scale = RTOL_LEAVES * want[key][3]
        np.testing.assert_allclose(abs_total, want[key][3], rtol=RTOL_LEAVES, err_msg=key)
        np.testing.assert_allclose([total, first], want[key][2:3] + want[key][4:], rtol=0, atol=scale, err_msg=key)


def test_listing_and_lookup_of_complete_checkpoints(tmp_path):
    assert checkpoints.checkpoint_steps(tmp_path / "none") == [] and checkpoints.last_checkpoint(tmp_path) is None
    ckpt_dir = tmp_path / "checkpoints"
    for name in ("4", "12", "16.orbax-checkpoint-tmp-3", "notes"):
        (ckpt_dir / name).mkdir(parents=True)
    assert sorted(checkpoints.checkpoint_steps(ckpt_dir)) == [4, 12]  # temporaries are not complete
    assert checkpoints.last_checkpoint(ckpt_dir) == ckpt_dir / "12"
    assert checkpoints.find_checkpoint_dir(tmp_path) == ckpt_dir
    assert checkpoints.find_checkpoint_dir(ckpt_dir) == ckpt_dir  # a bare checkpoint folder
    assert checkpoints.find_checkpoint_dir(tmp_path / "none") is None


def test_save_wait_and_restore_against_a_target(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    tree = {"step": jnp.asarray(3, jnp.int32), "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)}
    saver = checkpoints.Checkpointer(ckpt_dir, keep=2)
    for step in (3, 6, 9):
        assert saver.save(step, tree, num_devices=4) == ckpt_dir / str(step)
    saver.wait()
    assert saver.last_good() == ckpt_dir / "9" and sorted(checkpoints.checkpoint_steps(ckpt_dir)) == [6, 9]
    saver.close()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    restored = checkpoints.restore_latest(ckpt_dir, target)
    assert (restored.step, restored.num_devices, restored.verified, restored.rejected) == (9, 4, True, ())
    assert np.array_equal(restored.tree["w"], tree["w"])
    meta = json.loads((ckpt_dir / "9" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]
    assert meta[checkpoints.DIGEST_KEY] == checkpoints.state_digest(tree)  # in the checkpoint, atomic with it
    raw, step = checkpoints.restore_raw(ckpt_dir, 6)
    assert step == 6 and np.array_equal(raw["w"], tree["w"])
    with pytest.raises(ValueError, match="no checkpoint 5; available: 6, 9"):
        checkpoints.restore_raw(ckpt_dir, 5)
    wrong = {**target, "w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    with pytest.raises(ConfigError, match=r"checkpoints/9 cannot be restored .*stored shape: \(2, 3\).*nor can the 1 before"):
        checkpoints.restore_latest(ckpt_dir, wrong)
    assert checkpoints.restore_latest(tmp_path / "missing", target) is None


def test_state_digest_covers_values_dtypes_shapes_and_keys_not_containers():
    a = {"p": (np.zeros(3, np.float32), np.ones((2, 2), np.int32))}
    d = checkpoints.state_digest(a)
    assert d == checkpoints.state_digest({"p": [np.zeros(3, np.float32), jnp.ones((2, 2), jnp.int32)]})
    changed = [
        {"p": (np.asarray([0, 0, 1e-30], np.float32), a["p"][1])},
        {"p": (np.zeros(3, np.float64), a["p"][1])},
        {"p": (np.zeros((3, 1), np.float32), a["p"][1])},
        {"q": a["p"]},
    ]
    assert all(checkpoints.state_digest(t) != d for t in changed)


def _tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "step": np.asarray(seed, np.int32),
        "params": {"w": rng.standard_normal((48, 48)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)},
        "loop": {"loss": rng.standard_normal(4).astype(np.float32)},
    }


def _target(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _changed_on_disk(ckpt_dir: Path, step: int, saved) -> bool:
    """True if orbax, unchecked, fails to read checkpoint ``step`` or reads other numbers than ``saved``."""
    try:
        raw, _ = checkpoints.restore_raw(ckpt_dir, step)
    except Exception:
        return True
    return not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(saved)))


def test_a_corrupt_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    good = tmp_path / "good"
    saver = checkpoints.Checkpointer(good, keep=3)
    saver.save(3, _tree(3))
    saver.save(6, _tree(6))
    saver.wait()
    saver.close()
    for fraction in (0.05, 0.3, 0.6, 0.85):  # inside the compressed chunks, at several places
        ckpt_dir = tmp_path / f"flip{fraction}"
        shutil.copytree(good, ckpt_dir)
        flip_bit(array_data_file(ckpt_dir / "6"), fraction)
        assert _changed_on_disk(ckpt_dir, 6, _tree(6)), fraction  # a real corruption, not a byte nobody reads
        restored = checkpoints.restore_latest(ckpt_dir, _target(_tree(6)))
        assert restored.step == 3 and restored.verified, fraction
        ((path, why, _),) = restored.rejected
        assert path == ckpt_dir / "6" and ("corrupt" in why or "cannot be restored" in why), why
        assert checkpoints.state_digest(restored.tree) == checkpoints.state_digest(_tree(3))
    # Nothing usable left: one line naming the newest checkpoint, exit 2's ConfigError.
    flip_bit(array_data_file(ckpt_dir / "3"), 0.3)
    with pytest.raises(ConfigError, match=r"checkpoint .*/6 .*nor can the 1 before it.*new --workdir") as info:
        checkpoints.restore_latest(ckpt_dir, _target(_tree(6)))
    assert "\n" not in str(info.value) and "TensorStore" not in str(info.value)


def test_an_old_checkpoint_without_digest_that_reads_as_nan_is_corrupt(tmp_path):
    """Bytes that decode to NaN in a checkpoint written before digests: never saved so, hence corrupt."""
    ckpt_dir = tmp_path / "checkpoints"
    nan = _tree(6)
    nan["params"]["w"][5, 7] = np.nan
    with ocp.CheckpointManager(ckpt_dir.absolute()) as manager:  # as the code before digests wrote them
        manager.save(3, args=ocp.args.StandardSave(_tree(3)))
        manager.save(6, args=ocp.args.StandardSave(nan))
        manager.wait_until_finished()
    restored = checkpoints.restore_latest(ckpt_dir, _target(nan))
    assert (restored.step, restored.verified, restored.num_devices) == (3, False, None)
    ((path, why, _),) = restored.rejected
    assert path == ckpt_dir / "6" and "NaN or Inf" in why and "corrupt" in why


def test_set_aside_keeps_the_checkpoint_out_of_the_listing(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    saver = checkpoints.Checkpointer(ckpt_dir, keep=3)
    saver.save(3, _tree(3))
    saver.wait()
    saver.close()
    assert checkpoints.set_aside(ckpt_dir / "3") == ckpt_dir / "3.corrupt"
    (ckpt_dir / "3").mkdir()
    assert checkpoints.set_aside(ckpt_dir / "3") == ckpt_dir / "3.corrupt-2"
    assert checkpoints.checkpoint_steps(ckpt_dir) == [] and checkpoints.restore_latest(ckpt_dir, _target(_tree(3))) is None
    saver = checkpoints.Checkpointer(ckpt_dir, keep=3)  # orbax ignores them, and saves step 3 again
    saver.save(3, _tree(3))
    saver.wait()
    saver.close()
    assert checkpoints.checkpoint_steps(ckpt_dir) == [3] and (ckpt_dir / "3.corrupt").is_dir()


# ----------------------------------------------------------------------------- damaged directories, provenance

RUN_A, RUN_B = "a" * 32, "b" * 32


def _identity(run_id=RUN_A, learning_rate=0.01, **kwargs):
    return checkpoints.RunIdentity(run_id, {"model": "resnet4", "learning_rate": learning_rate}, **kwargs)


def _save(ckpt_dir: Path, steps, identity=None):
    saver = checkpoints.Checkpointer(ckpt_dir, keep=5, identity=identity)
    for step in steps:
        saver.save(step, _tree(step), metrics_records=2 * step)
    saver.wait()
    saver.close()


def _empty(d: Path):
    shutil.rmtree(d)
    d.mkdir()


def _file_in_place(d: Path):
    shutil.rmtree(d)
    d.write_text("")


def _empty_item(d: Path):
    shutil.rmtree(d / "default")
    (d / "default").mkdir()


# How a checkpoint directory can be damaged, and the words naming it. Each used to stop
# orbax's manager for every step ("Must provide args of type Composite...") or be accepted
# unverified (its metadata, which holds the digest, deleted).
DAMAGE = {
    "emptied": (_empty, "is empty"),
    "default item deleted": (lambda d: shutil.rmtree(d / "default"), "has no default/ item"),
    "default item emptied": (_empty_item, "cannot be restored"),
    "metadata deleted": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "has no readable _CHECKPOINT_METADATA"),
    "metadata not JSON": (lambda d: (d / "_CHECKPOINT_METADATA").write_text("{oops"), "has no readable"),
    "a file in its place": (_file_in_place, "is not a directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_of_any_kind_is_passed_over(tmp_path, damage):
    make, words = DAMAGE[damage]
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, (3, 6), _identity())
    make(ckpt_dir / "6")
    restored = checkpoints.restore_latest(ckpt_dir, _target(_tree(6)), _identity())
    assert (restored.step, restored.verified, restored.metrics_records) == (3, True, 6)
    assert checkpoints.state_digest(restored.tree) == checkpoints.state_digest(_tree(3))
    ((path, why, foreign),) = restored.rejected
    assert path == ckpt_dir / "6" and words in why and not foreign and "\n" not in why, why
    assert checkpoints.set_aside(path) == ckpt_dir / "6.corrupt"  # a file too
    _save(ckpt_dir, (6,), _identity())  # the step can be saved again
    assert checkpoints.restore_latest(ckpt_dir, _target(_tree(6)), _identity()).step == 6


def test_a_checkpoint_of_another_run_is_passed_over_as_foreign(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, (3,), _identity())
    _save(ckpt_dir, (6,), _identity(RUN_B, learning_rate=0.1))  # copied in from another run directory
    target = _target(_tree(6))
    restored = checkpoints.restore_latest(ckpt_dir, target, _identity())
    assert restored.step == 3
    ((path, why, foreign),) = restored.rejected
    assert foreign and path == ckpt_dir / "6"
    assert why == (
        f"was written by another run (run id {RUN_B}, with learning_rate=0.1 (this run has 0.01); this run's is {RUN_A})"
    )
    # This run's id with other config values: its metadata was edited, or the id reused.
    with pytest.raises(ConfigError, match=r"/6 records learning_rate=0.1 \(this run has 0.01\): it is another run's, or"):
        checkpoints.restore_latest(ckpt_dir, target, _identity(RUN_B))  # and 3 is another run's for it
    # A field this run has and the checkpoint lacks (added to the config since) is not compared.
    newer = _identity(RUN_B, learning_rate=0.1)._replace(config={"model": "resnet4", "learning_rate": 0.1, "augment": True})
    assert checkpoints.restore_latest(ckpt_dir, target, newer).step == 6
    # Without a run to tie them to (a tool reading any checkpoint), both verify by their digests.
    assert checkpoints.restore_latest(ckpt_dir, target).step == 6
    # A run directory without run.json (a run from before run ids) has no checkpoint with one.
    restore_it = f'no run.json naming its run: if that was deleted, restore it as {{"run_id": "{RUN_B}"}}'
    with pytest.raises(ConfigError, match=restore_it):
        checkpoints.restore_latest(ckpt_dir, target, _identity(None))


def test_checkpoints_from_before_run_ids_and_digests_are_vouched_for_only_by_their_run(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, (3,))  # as the code before run ids wrote them: a digest, no run id
    with ocp.CheckpointManager(ckpt_dir.absolute()) as manager:  # ... and before digests: no metadata at all
        manager.save(6, args=ocp.args.StandardSave(_tree(6)))
        manager.wait_until_finished()
    target, d3, d6 = _target(_tree(6)), checkpoints.state_digest(_tree(3)), checkpoints.state_digest(_tree(6))

    # Not adopted yet (no run.json). Without sessions.jsonl no checkpoint of the run had a
    # digest: 6 restores, checked for tree, shapes and finite values, and its digest is known.
    old = checkpoints.RunIdentity(None, {}, {}, math.inf)
    restored = checkpoints.restore_latest(ckpt_dir, target, old)
    assert (restored.step, restored.verified, restored.digest, restored.rejected) == (6, False, d6, ())
    assert checkpoints.adoptable(ckpt_dir, old) == {3: d3, 6: None}
    # sessions.jsonl says code writing digests first started at step 3: 6 was saved after,
    # so its missing digest is damage (its metadata deleted), not age.
    started_at_3 = old._replace(digest_free_until=3)
    restored = checkpoints.restore_latest(ckpt_dir, target, started_at_3)
    assert (restored.step, restored.verified) == (3, True)
    assert restored.rejected[0].why.startswith("has no digest, but sessions.jsonl shows")
    assert checkpoints.adoptable(ckpt_dir, started_at_3) == {3: d3}

    # Adopted (run.json lists them with the digests known then): they restore, verified.
    adopted = _identity(adopted={3: d3, 6: d6})
    restored = checkpoints.restore_latest(ckpt_dir, target, adopted)
    assert (restored.step, restored.verified) == (6, True)
    # Metadata deleted and a bit flipped: the adopted digest still catches it.
    flip_bit(array_data_file(ckpt_dir / "6"), 0.45)
    restored = checkpoints.restore_latest(ckpt_dir, target, adopted)
    assert restored.step == 3 and restored.rejected[0].path == ckpt_dir / "6"
    # A run with run ids vouches for no checkpoint without one that it did not adopt.
    (ckpt_dir / "3" / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(ConfigError, match=r"checkpoints/6 .*nor can the 1 before it"):
        checkpoints.restore_latest(ckpt_dir, target, _identity())
    shutil.rmtree(ckpt_dir / "6")
    _save(tmp_path / "other", (3,))
    shutil.rmtree(ckpt_dir / "3")
    shutil.copytree(tmp_path / "other" / "3", ckpt_dir / "3")  # an older run's, copied in
    with pytest.raises(ConfigError, match=r"checkpoints/3 carries no run id, so this run did not write it"):
        checkpoints.restore_latest(ckpt_dir, target, _identity())
