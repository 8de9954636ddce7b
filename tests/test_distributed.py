"""Many processes: two JAX processes joined by ``jax.distributed`` equal one process.

Two CPU processes (2 devices each, ``--xla_force_host_platform_device_count``) join through
the library's own ``jax.distributed.initialize`` call (``config.distributed=True`` with
``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``); their cross-process collectives run over gloo, JAX's default
``jax_cpu_collectives_implementation`` on CPU (nothing to set). Each runs
``tests/_distributed_worker.py``: three train steps on one fixed global batch, each
process putting only its own half on its devices, then ``train_and_evaluate`` of a tiny
config (one epoch, two steps; what ``python train.py --config.distributed=True`` runs)
into a run directory both share, as hosts share a file system. A third process runs the
same alone on one device. All three run at once, in subprocesses (which keeps the suite's
float64 / strict-promotion settings out), and are killed together on a failure or after
``_TIMEOUT_S``.

Tolerance: float32 results cannot be bitwise equal, since the gradient and BatchNorm
reductions sum in another order (per device, then across devices and, over gloo, across
processes). Measured (jax 0.10.2, CPU), as relative L2 distances ``|a - b| / |b|`` over
all leaves, 2 processes vs 1 device: params 2.3e-8 and BatchNorm statistics 3.3e-8 after
the 3 steps, losses 1.5e-7; after ``train_and_evaluate`` params 1.6e-8, train and test
loss 1.3e-7 (one process with 4 vs 1 devices after the 3 steps: 2.1e-8, the same
round-off); the initial params are identical. ``_RTOL = 1e-5`` leaves a margin of 300x, and is 1000x below a wrong
split: feeding each process the other's half gave 2.0e-2 (params) and 8.6e-3 (statistics).
Leafwise relative errors are no good here: the RDA coefficients ``rda_rho`` start at 0, so
their few ~1e-4 entries show 3e-5 of relative round-off. Runs are kept to 2-3 steps
because this tiny problem (learning rate 0.02, batch 32) is chaotic: after 4 steps of
``train_and_evaluate`` the round-off had grown to 1.4e-4 (1 vs 4 devices alone: 2.1e-5).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the configs package lives at the repository root

from configs import default  # noqa: E402

from anodev2_jax import sharding, training  # noqa: E402

WORKER = REPO / "tests" / "_distributed_worker.py"
_TIMEOUT_S = 240  # all three processes together; they take 30-60 s on 2 cores
_RTOL = 1e-5  # relative L2 distance of params, BatchNorm statistics and losses (module docstring)
_LAUNCH_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_BIND_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "JAX_ENABLE_X64",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **launch) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    # Optimization level 0: XLA:CPU compiles ~5x faster; only speed changes (tests/conftest.py).
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}",
        **{k: str(v) for k, v in launch.items()},
    )
    return env


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    return text[-n:]


def _run_all(jobs: dict[str, tuple[Path, dict]], tmp_path: Path) -> None:
    """Runs the workers at once; on a failure or timeout kills all and fails with their output."""
    procs, logs = {}, {}
    try:
        for name, (outdir, env) in jobs.items():
            outdir.mkdir(parents=True, exist_ok=True)
            logs[name] = tmp_path / f"{name}.log"
            with logs[name].open("w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(WORKER), str(outdir)],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # killed as a group, with anything it started
                )
        deadline = time.monotonic() + _TIMEOUT_S
        failed = None
        while failed is None and any(p.poll() is None for p in procs.values()):
            failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                failed = f"timeout after {_TIMEOUT_S} s"
            time.sleep(0.2)
        failed = failed or next((n for n, p in procs.items() if p.returncode != 0), None)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if failed:
        report = "\n".join(f"--- {n} (exit {procs[n].returncode}):\n{_tail(logs[n])}" for n in procs)
        pytest.fail(f"worker failure ({failed}); a killed peer of a failed process shows exit -9\n{report}")


def _restore_numpy(workdir: Path) -> dict:
    """The latest checkpoint of a run as numpy arrays (any device topology)."""
    import orbax.checkpoint as ocp

    ckpt = workdir / "checkpoints"
    step = max(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
    path = (ckpt / str(step) / "default").absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _leaves(npz, prefix: str) -> dict:
    return {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)}


def _rel_l2(a, b) -> float:
    """``|a - b| / |b|`` over all leaves of two pytrees at once (float64)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert la and all(np.shape(x) == np.shape(y) for x, y in zip(la, lb))
    diff = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2) for x, y in zip(la, lb))
    return float(np.sqrt(diff / sum(np.sum(np.asarray(y, np.float64) ** 2) for y in lb)))


@pytest.mark.exact
@pytest.mark.slow  # 30-60 s on 2 shared CPU cores: three processes, each compiling the tiny model
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"  # the coordinator binds to loopback only (JAX's default: all interfaces)
    launch = {"JAX_COORDINATOR_ADDRESS": address, "JAX_COORDINATOR_BIND_ADDRESS": address, "JAX_NUM_PROCESSES": 2}
    one, many = tmp_path / "one", tmp_path / "many"
    jobs = {  # the two processes share one output folder, as hosts share a file system
        "single": (one, _env(1)),
        "process0": (many, _env(2, **launch, JAX_PROCESS_ID=0)),
        "process1": (many, _env(2, **launch, JAX_PROCESS_ID=1)),
    }
    _run_all(jobs, tmp_path)

    # ---- 3 steps on a fixed batch, each process holding its half
    ref, got = np.load(one / "steps.npz"), np.load(many / "steps.npz")
    assert (int(ref["num_devices"]), int(got["num_devices"]), int(got["num_processes"])) == (1, 4, 2)
    err = {part: _rel_l2(_leaves(got, part), _leaves(ref, part)) for part in ("init", "params", "batch_stats")}
    err["losses"] = float(np.max(np.abs(got["losses"] - ref["losses"]) / np.abs(ref["losses"])))
    print(f"3 steps, 2 processes vs 1, relative L2 differences: {err}")
    assert got["losses"].shape == (3, 1)
    assert all(e <= _RTOL for e in err.values()), err

    # ---- train_and_evaluate, one epoch: same summary, same checkpoint, files written once
    s_ref = json.loads((one / "run" / "summary.json").read_text())
    s_got = json.loads((many / "run" / "summary.json").read_text())
    assert (s_ref["num_devices"], s_got["num_devices"]) == (1, 4)
    assert s_got["steps"] == s_ref["steps"] == 2
    assert s_got["steps_per_call"] == s_ref["steps_per_call"] == 2 and s_got["data_on_device"]  # one call, on-device data
    c_ref, c_got = _restore_numpy(one / "run"), _restore_numpy(many / "run")
    assert int(np.ravel(c_got["step"])[0]) == int(np.ravel(c_ref["step"])[0]) == 2
    err = {part: _rel_l2(c_got[part], c_ref[part]) for part in ("params", "batch_stats")}
    err.update({k: abs(s_got[k][0] - s_ref[k][0]) / abs(s_ref[k][0]) for k in ("train_loss", "test_loss")})
    print(f"train_and_evaluate, 2 processes vs 1, relative differences: {err}")
    assert all(e <= _RTOL for e in err.values()), err
    np.testing.assert_allclose(s_got["test_accuracy"], s_ref["test_accuracy"], atol=1 / 64 + 1e-9)  # <= 1 flip of 64
    metrics = (many / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len((one / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # not once per process
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.iterdir())  # noqa: E731
    assert files(many / "run") == files(one / "run")


@pytest.mark.parametrize(
    "env, match",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "set both"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "set both"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_bad_launch_environment_is_a_config_error(monkeypatch, env, match):
    """Checked before ``jax.distributed.initialize`` is called (so this process stays single)."""
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = default.get_config()
    sharding.maybe_initialize_distributed(config)  # distributed=False: the environment is ignored
    config.distributed = True
    with pytest.raises(training.ConfigError, match=match):
        sharding.maybe_initialize_distributed(config)
    assert not jax.distributed.is_initialized()
