"""``python train.py`` in subprocesses: true exit codes and stderr for bad input, and one smoke run.

Every bad input, tried as a new user would (a table of 39), must exit non-zero (2, or 4 for
a failed write) with ONE line on stderr naming the field (or cause) and the fix, without a
traceback, and leave the workdir as it was: each case runs against a workdir that already
holds a run (config.json, a checkpoint, metrics), hashed before and after. Kill / resume,
signals, concurrent runs, corrupt checkpoints and non-finite values are in
``test_reliability.py``.
"""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import smoke  # noqa: E402

from anodev2_jax import rundir  # noqa: E402


# ``ulimit -f`` for train.py: a write past the limit fails in the kernel (EFBIG; CPython
# ignores SIGXFSZ), for Python and tensorstore (orbax) alike, so it takes the path a full
# disk's ENOSPC takes. A wrapper rather than preexec_fn: no fork of the threaded test process.
FILE_SIZE_LIMITED = (
    "import resource, runpy, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def train_command(args, max_file_bytes=None):
    command = [sys.executable, str(REPO / "train.py"), *args]
    return command if max_file_bytes is None else [sys.executable, "-c", FILE_SIZE_LIMITED, str(max_file_bytes), *command[1:]]


def run_train(args, *, devices=None, timeout=300, max_file_bytes=None, env=None):
    # Optimization level 0: XLA:CPU compiles ~5x faster (threefry above all); only speed changes.
    flags = ["--xla_backend_optimization_level=0"]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), **(env or {})}
    return subprocess.run(
        train_command(args, max_file_bytes), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
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


def _npz(tmp_path, *, image_shape=(32, 32, 3), label_max=9, dtype=np.uint8):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, *image_shape)).astype(dtype)
    y = np.arange(16) % (label_max + 1)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return str(path)


def _npz_args(**npz_kwargs):
    """A case's args: the smoke config reading a generated npz made by :func:`_npz` with ``npz_kwargs``."""
    return lambda tmp, run: [*SMOKE, "--config.dataset=npz", f"--config.data_dir={_npz(tmp, **npz_kwargs)}"]


def _corrupt_npz(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(b"PK\x03\x04" + os.urandom(200))  # a zip header, then garbage
    return str(path)


def _text_file(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("x_train,y_train\n1,2\n")  # what a CSV export renamed .npz looks like
    return str(path)


def _foreign_checkpoint(tmp_path, run):
    """Replaces the run's checkpoint by a real orbax checkpoint of another tree (another program's)."""
    import orbax.checkpoint as ocp

    shutil.rmtree(run / "checkpoints")
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as manager:
        tree = {"step": np.zeros(1, np.int32), "params": {"w": np.ones((3, 3), np.float32)}}
        manager.save(3, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    return SMOKE


def _read_only_workdir(tmp_path, run):
    """The run made read-only (chmod); root ignores permissions, so it gets a read-only file system instead."""
    if os.geteuid() == 0:
        return [*SMOKE, "--workdir=/proc/sys/anodev2-run"]  # /proc/sys is mounted read-only
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    return SMOKE


def _config_file(text: str):
    """A case's args: ``--config`` a file of ``text`` (written into the test's tmp_path)."""

    def args(tmp_path, run):
        path = tmp_path / "my_config.py"
        path.write_text(text)
        return ["--config", str(path)]

    return args


def _damaged_metrics(data: bytes):
    """A case's args: the run's metrics.jsonl with ``data`` appended after its record."""

    def args(tmp_path, run):
        with (run / "metrics.jsonl").open("ab") as f:
            f.write(data)
        return SMOKE

    return args


def _lock_to_dev_null(tmp_path, run):
    (run / "run.lock").symlink_to(os.devnull)  # was a failed write (exit 4, "free disk space")
    return SMOKE


def _emptied_config(tmp_path, run):
    (run / "config.json").write_text("{}")  # was read as a run of adjoint=None ("use --config.adjoint=None")
    return SMOKE


def _metrics_folder(tmp_path, run):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    return SMOKE


_HELD: list = []  # locks a case holds while train.py runs (released by the test)


def _workdir_in_use(tmp_path, run):
    """The run's lock held by this test process, as a run in progress holds it."""
    _HELD.append(rundir.RunLock(run).acquire())
    return SMOKE


class Case(NamedTuple):
    args: Any  # a list, or a function of (tmp_path, existing_run) making the input and giving the list
    words: list  # what the one line must hold
    devices: Optional[int] = None  # fake CPU devices
    status: int = 2
    max_file_bytes: Optional[int] = None  # `ulimit -f`
    env: Optional[dict] = None  # environment variables for train.py


SMOKE = ["--config", "configs/smoke.py"]
CASES = {
    "unknown config file": Case(["--config", "configs/nope.py"], ["configs/nope.py", "existing config file"]),
    "unknown field": Case([*SMOKE, "--config.bogus_field=1"], ["bogus_field", "configs/default.py"]),
    "misspelt field": Case(
        [*SMOKE, "--config.metod=anode"],
        ["unknown config field 'metod' (in a --config.FIELD override); did you mean --config.method? The fields"],
    ),
    "unknown augmentation": Case(
        [*SMOKE, "--config.augment=flip"], ["config.augment='flip'", "crop_flip, crop, none", "--config.augment"]
    ),
    "wrong type": Case([*SMOKE, "--config.batch_size=abc"], ["--config.batch_size", "abc"]),
    "unknown model": Case([*SMOKE, "--config.model=vgg"], ["config.model='vgg'", "resnet4", "--config.model"]),
    "unknown method": Case(["--config", "configs/smoke.py:ode"], ["config.method='ode'", "anodev2_conf1"]),
    "unknown nonfinite mode": Case([*SMOKE, "--config.nonfinite=ignore"], ["config.nonfinite='ignore'", "stop, skip"]),
    "steps_z 0": Case([*SMOKE, "--config.steps_z=0"], ["config.steps_z=0", "--config.steps_z"]),
    "negative num_epochs": Case([*SMOKE, "--config.num_epochs=-3"], ["config.num_epochs=-3", "--config.num_epochs"]),
    "aligned with bad steps_w": Case(
        [*SMOKE, "--config.method=anodev2_conf1", "--config.steps_w=7"], ["steps_w=7", "multiple of steps_z=5", "endpoints"]
    ),
    "batch size 0": Case([*SMOKE, "--config.batch_size=0"], ["config.batch_size=0", "--config.batch_size"]),
    "batch not divisible by devices": Case(
        [*SMOKE, "--config.batch_size=66"], ["batch_size=66", "4 devices", "multiple of 4"], devices=4
    ),
    "missing data path": Case(
        [*SMOKE, "--config.dataset=npz", "--config.data_dir=/does/not/exist.npz"],
        ["/does/not/exist.npz", "does not exist", "np.savez"],
    ),
    "corrupt data file": Case(
        lambda tmp, run: [*SMOKE, "--config.dataset=npz", f"--config.data_dir={_corrupt_npz(tmp)}"],
        ["data.npz", "not a readable .npz", "np.savez"],
    ),
    "npz that is a text file": Case(
        lambda tmp, run: [*SMOKE, "--config.dataset=npz", f"--config.data_dir={_text_file(tmp)}"],
        ["data.npz is not an .npz archive", "a text file (it begins 'x_train,y_train 1,2')", "np.savez"],
    ),
    "npz with NCHW images": Case(
        _npz_args(image_shape=(3, 32, 32)),
        ["x_train", "(N, 32, 32, 3)", "transpose"],
    ),
    "npz with float images": Case(
        _npz_args(dtype=np.float32),
        ["x_train", "dtype float32", "astype(np.uint8)"],
    ),
    "labels out of range": Case(
        _npz_args(label_max=12),
        ["y_train", "outside [0, 10)", "remap"],
    ),
    "workdir of another config": Case(
        [*SMOKE, "--config.method=anode"], ["method='anodev2_conf2'", "--config.method='anodev2_conf2'", "new --workdir"]
    ),
    "corrupt checkpoint": Case(SMOKE, ["checkpoints/3 has no default/ item", "corrupt", "new --workdir"]),
    "foreign checkpoint": Case(_foreign_checkpoint, ["checkpoints/3", "another model", "new --workdir"]),
    "workdir not writable": Case(_read_only_workdir, ["is not writable", "permissions", "another --workdir"]),
    "config file with a syntax error": Case(
        _config_file("def get_config(:\n"), ["my_config.py has a syntax error at line 1", "fix it"]
    ),
    "config file raising on import": Case(
        _config_file("import os\nraise RuntimeError('no data here')\n"),
        ["my_config.py raised RuntimeError at line 2", "no data here", "fix the file"],
    ),
    "config file without get_config": Case(_config_file("X = 1\n"), ["my_config.py has no get_config()", "ConfigDict"]),
    "seed beyond int32": Case(
        [*SMOKE, "--config.seed=3000000000"], ["config.seed=3000000000", "[0, 2147483647]", "--config.seed"]
    ),
    "steps_z in the hundred thousands": Case(
        [*SMOKE, "--config.steps_z=100000"], ["config.steps_z=100000", "[1, 100]", "unrolled", "--config.steps_z"]
    ),
    "JAX platform not installed": Case(
        SMOKE, ["JAX_PLATFORMS='cuda'", "set JAX_PLATFORMS=cpu", "install"], env={"JAX_PLATFORMS": "cuda"}
    ),
    "empty workdir": Case([*SMOKE, "--workdir="], ["--workdir is empty", "--workdir=runs/"]),
    "num_train beyond the data": Case(
        _npz_args(), ["config.num_train=512 exceeds the 16 training images", "--config.num_train"]
    ),
    "metrics line not an object": Case(
        _damaged_metrics(b"[1, 2]\n"), ["metrics.jsonl line 2 is not a JSON object", "delete that line"]
    ),
    "metrics step not an integer": Case(
        _damaged_metrics(b'{"kind": "epoch", "step": 8.5}\n'), ["metrics.jsonl line 2", "integer \"step\""]
    ),
    "metrics not UTF-8": Case(_damaged_metrics(b"\xff\xfe\n"), ["metrics.jsonl line 2 is not UTF-8", "damaged"]),
    "metrics.jsonl a folder": Case(_metrics_folder, ["metrics.jsonl is a folder", "move it out"]),
    "run.lock a symlink to /dev/null": Case(
        _lock_to_dev_null, [f"run.lock is a symlink to {os.devnull}, not a regular file", "move it out"]
    ),
    "config.json emptied": Case(_emptied_config, ["config.json lacks field(s)", "emptied or edited", "new --workdir"]),
    "workdir in use": Case(
        _workdir_in_use, ["is in use by another run", f"PID {os.getpid()}", f"kill {os.getpid()}", "another --workdir"]
    ),
    "disk full": Case(  # config.json (~700 bytes) is the first write
        lambda tmp, run: [*SMOKE, f"--workdir={tmp / 'new'}"],
        ["config.json failed: File too large", "free disk space", "then run python", "--workdir=", ": it starts over"],
        status=4, max_file_bytes=256,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_nonzero_with_one_line(tmp_path, existing_run, case):
    c = CASES[case]
    try:
        args = c.args(tmp_path, existing_run) if callable(c.args) else c.args
        if not any(a.startswith("--workdir") for a in args):
            args = [*args, f"--workdir={existing_run}"]
        before = tree_hash(existing_run)
        proc = run_train(args, devices=c.devices, max_file_bytes=c.max_file_bytes, env=c.env)
        after = tree_hash(existing_run)  # with the case's lock still held
    finally:
        for p in [existing_run, *existing_run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
        while _HELD:
            _HELD.pop().release()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == c.status, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in c.words:
        assert word in lines[0], (word, lines[0])
    assert after == before


def test_missing_cifar10_is_one_line_naming_the_offline_options(tmp_path, existing_run):
    """No prepared tfds copy, no TensorFlow, no network (a refused local port): one line, exit 2, nothing written."""
    import importlib.util
    import socket

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("with TensorFlow, tfds would prepare CIFAR-10 itself (over the network)")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"
    before = tree_hash(existing_run)
    data_dir = tmp_path / "tfds"
    proc = run_train(
        ["--config", "configs/resnet4.py:anodev2_conf1", f"--config.data_dir={data_dir}", f"--workdir={existing_run}"],
        env={"ANODEV2_CIFAR10_URL": url},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: CIFAR-10 is missing"), proc.stderr
    for words in ("refused the connection", f"copy cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a) to "
                  f"{data_dir}/downloads/cifar-10-python.tar.gz", "--config.dataset=digits",
                  "--config.dataset=cifar10_local --config.data_dir=DIR", "--config.dataset=synthetic"):  # fmt: skip
        assert words in lines[0], (words, lines[0])
    assert tree_hash(existing_run) == before and not (data_dir / "downloads" / "cifar-10-python.tar.gz.part").exists()


def test_digits_config_trains_one_step(tmp_path):
    """``configs/digits.py`` end to end on 100 of its images (one step of the baseline): the offline real-data path."""
    pytest.importorskip("sklearn")
    workdir = tmp_path / "digits"
    args = ["--config", "configs/digits.py:baseline", "--config.num_train=100", "--config.num_test=50",
            "--config.num_epochs=1", f"--workdir={workdir}"]  # fmt: skip
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert len(summary["test_accuracy"]) == 1 and 0.0 <= summary["test_accuracy"][0] <= 1.0
    config = json.loads((workdir / "config.json").read_text())
    assert (config["dataset"], config["augment"], config["batch_size"]) == ("digits", "crop", 100)
    assert [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())] == [1]


def test_a_stop_signal_before_anything_is_written_ends_at_once(existing_run):
    """SIGTERM while train.py starts (imports, data, checkpoint): one line, 143, the workdir untouched."""
    before = tree_hash(existing_run)
    flags = "--xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    proc = subprocess.Popen(
        train_command([*SMOKE, f"--workdir={existing_run}"]), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # train.py's own handler is in by now (its imports take ~0.2 s)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and err.startswith("received SIGTERM"), err
    assert tree_hash(existing_run) == before


# Loading the data runs out of host memory (a MemoryError, as numpy raises it under ``ulimit -v``).
OUT_OF_MEMORY = textwrap.dedent(
    """
    import runpy, sys
    from anodev2_jax import data

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 24.0 MiB for an array with shape (1024, 32, 32, 3)")

    data.load_dataset = exhausted
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def test_out_of_memory_is_one_line_and_exit_5(existing_run):
    before = tree_hash(existing_run)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    args = [sys.executable, "-c", OUT_OF_MEMORY, str(REPO / "train.py"), *SMOKE, f"--workdir={existing_run}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory on the host (Unable to allocate 24.0 MiB"), lines
    assert "--config.batch_size (now" in lines[0] and "Traceback" not in proc.stderr
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
    assert "remat auto (budget 2048 MiB per device and block): layer1_1 none" in proc.stdout
    assert "evolution q = rda (Eq. B.4), d = |rda_d|, time kernel K = dirac, evolution_lr_scale 1" in proc.stdout
    assert summary["ode"]["remat"] == "auto" and summary["ode"]["remat_per_block"] == {"layer1_1": "none"}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [24, 32]  # global steps


def test_resume_command_replaces_any_workdir_and_quotes_for_the_shell():
    import train  # the entry point's own helper (importing defines its absl flags once)

    python = os.path.basename(sys.executable)
    assert train.resume_command(["train.py", "--config", "configs/smoke.py"], "runs/a b") == (
        f"{python} train.py --config configs/smoke.py '--workdir=runs/a b'"
    )
    assert train.resume_command(["t.py", "--workdir", "old", "--config.seed=3", "--workdir=older"], "new") == (
        f"{python} t.py --config.seed=3 --workdir=new"
    )


def test_a_run_stopped_without_workdir_names_the_command_that_resumes_it(tmp_path):
    """Ctrl-C / SIGTERM of a run in its default (time-stamped) workdir: the line printed names the
    exact command, with --workdir; run as printed, it continues that run (no second run directory)."""
    args = [
        "--config", f"{REPO / 'configs' / 'smoke.py'}:baseline", "--config.num_train=32", "--config.num_test=16",
        "--config.batch_size=16", "--config.num_epochs=2", "--config.log_every_steps=0",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    run = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run.stdout.readline().startswith("resnet4 baseline")
        hint = run.stdout.readline()
        assert hint.startswith("if stopped, resume with: "), hint
        command = hint.split(": ", 1)[1].strip()
        run.send_signal(signal.SIGTERM)  # armed once the header is out: the first step is saved
        out, err = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().startswith("received SIGTERM at step ") and err.strip().endswith(f"; resume with: {command}"), err
    argv = shlex.split(command)
    assert argv[0] == os.path.basename(sys.executable) and argv[-1].startswith("--workdir=runs/resnet4-baseline-seed0-")
    (workdir,) = (tmp_path / "runs").iterdir()
    assert argv[-1] == f"--workdir=runs/{workdir.name}"
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(resumed from step " in resumed.stdout.splitlines()[0]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [workdir.name] and (workdir / "summary.json").is_file()
