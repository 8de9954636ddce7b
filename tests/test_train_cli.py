"""``python train.py`` in subprocesses: true exit codes and stderr for bad input, and one smoke run.

Every bad input must exit with status 2 and ONE line on stderr naming the field (or cause)
and the fix, without a traceback, before anything in the workdir changes: each case runs
against a workdir that already holds a run (config.json, a checkpoint, metrics), hashed
before and after.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import smoke  # noqa: E402


def run_train(args, *, devices=None, timeout=300):
    # Optimization level 0: XLA:CPU compiles ~5x faster (threefry above all); only speed changes.
    flags = ["--xla_backend_optimization_level=0"]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A workdir holding a smoke run: its config.json, a checkpoint folder and metrics."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "checkpoints" / "3" / "state.bin").write_bytes(os.urandom(64))
    config = smoke.get_config().to_dict()
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    (workdir / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 3, "step": 24}) + "\n")
    return workdir


def _npz(tmp_path, *, image_shape=(32, 32, 3), label_max=9):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, *image_shape), dtype=np.uint8)
    y = np.arange(16) % (label_max + 1)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return str(path)


SMOKE = ["--config", "configs/smoke.py"]
CASES = {
    # name: (args (or a function of tmp_path giving them), fake devices, words the one line must hold)
    "unknown config file": (["--config", "configs/nope.py"], None, ["configs/nope.py", "existing config file"]),
    "unknown field": ([*SMOKE, "--config.bogus_field=1"], None, ["bogus_field", "configs/default.py"]),
    "wrong type": ([*SMOKE, "--config.batch_size=abc"], None, ["--config.batch_size", "abc"]),
    "unknown model": ([*SMOKE, "--config.model=vgg"], None, ["config.model='vgg'", "resnet4", "--config.model"]),
    "unknown method": (["--config", "configs/smoke.py:ode"], None, ["config.method='ode'", "anodev2_conf1"]),
    "steps_z 0": ([*SMOKE, "--config.steps_z=0"], None, ["config.steps_z=0", "--config.steps_z"]),
    "aligned with bad steps_w": (
        [*SMOKE, "--config.method=anodev2_conf1", "--config.steps_w=7"], None,
        ["steps_w=7", "multiple of steps_z=5", "endpoints"],
    ),
    "batch size 0": ([*SMOKE, "--config.batch_size=0"], None, ["config.batch_size=0", "--config.batch_size"]),
    "batch not divisible by devices": (
        [*SMOKE, "--config.batch_size=66"], 4, ["batch_size=66", "4 devices", "multiple of 4"],
    ),
    "missing data path": (
        [*SMOKE, "--config.dataset=npz", "--config.data_dir=/does/not/exist.npz"], None,
        ["/does/not/exist.npz", "does not exist", "np.savez"],
    ),
    "npz with NCHW images": (
        lambda tmp: [*SMOKE, "--config.dataset=npz", f"--config.data_dir={_npz(tmp, image_shape=(3, 32, 32))}"],
        None, ["x_train", "(N, 32, 32, 3)", "transpose"],
    ),
    "labels out of range": (
        lambda tmp: [*SMOKE, "--config.dataset=npz", f"--config.data_dir={_npz(tmp, label_max=12)}"],
        None, ["y_train", "outside [0, 10)", "remap"],
    ),
    "workdir of another config": (
        [*SMOKE, "--config.method=anode"], None, ["method='anodev2_conf2'", "--config.method='anodev2_conf2'", "new --workdir"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, existing_run, case):
    args, devices, words = CASES[case]
    args = args(tmp_path) if callable(args) else args
    before = tree_hash(existing_run)
    proc = run_train([*args, f"--workdir={existing_run}"], devices=devices)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert tree_hash(existing_run) == before


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_train([*SMOKE, "--config.steps_z=0", f"--workdir={tmp_path / 'run'}", "--verbose"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_smoke_run_end_to_end(tmp_path):
    workdir = tmp_path / "smoke"
    proc = run_train([*SMOKE, "--workdir", str(workdir)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["method"] == "anodev2_conf2" and summary["test_accuracy_avg"] > 0.3
    assert "test accuracy over 1 seed(s)" in proc.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]
