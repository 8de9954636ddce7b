"""Checkpoints: the listing of complete ones, save / wait / restore, and runs written by older code.

``fixtures/run_before_layout`` is a run directory written by the code before the layout
change (commit 1872b8e): ResNet-4 configuration 2 on 16 synthetic images, batch 8, one epoch
(checkpoint 2). ``fixtures/run_before_layout_expected.json`` holds what that code wrote when
it resumed the same directory for a second epoch: every metrics record and, per leaf of
checkpoint 4, its shape, dtype, sum, absolute sum and first value. Today's code must resume
the directory to the same result. On the same jax version and XLA flags the numbers are
bitwise equal (training is deterministic on CPU); the comparison allows 1e-6 relative so a
jax upgrade that reorders float32 sums does not fail it while any real change does (one SGD
step at lr 1e-3 moves these values by ~1e-3 relative).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default

from anodev2_jax import checkpoints, training
from anodev2_jax.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RTOL = 1e-6


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
    tree, step = checkpoints.restore_raw(workdir / "checkpoints", 4)
    digest = _digest(tree)
    want = {k: (v["shape"], v["dtype"], v["sum"], v["abs_sum"], v["first"]) for k, v in expected["checkpoint_4"].items()}
    assert sorted(digest) == sorted(want) and step == 4
    for key in want:
        shape, dtype, *values = digest[key]
        assert (shape, dtype) == tuple(want[key][:2]), key
        np.testing.assert_allclose(values, want[key][2:], rtol=RTOL, atol=1e-9, err_msg=key)


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
        assert saver.save(step, tree) == ckpt_dir / str(step)
    saver.wait()
    assert saver.last_good() == ckpt_dir / "9" and sorted(checkpoints.checkpoint_steps(ckpt_dir)) == [6, 9]
    saver.close()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    step, restored = checkpoints.restore_latest(ckpt_dir, target)
    assert step == 9 and np.array_equal(restored["w"], tree["w"])
    raw, step = checkpoints.restore_raw(ckpt_dir, 6)
    assert step == 6 and np.array_equal(raw["w"], tree["w"])
    with pytest.raises(ValueError, match="no checkpoint 5; available: 6, 9"):
        checkpoints.restore_raw(ckpt_dir, 5)
    wrong = {**target, "w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    with pytest.raises(ConfigError, match=r"checkpoints/9 cannot be restored .*stored shape: \(2, 3\).*from another model"):
        checkpoints.restore_latest(ckpt_dir, wrong)
    assert checkpoints.restore_latest(tmp_path / "missing", target) is None
