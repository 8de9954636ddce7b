"""The run directory: its lock, the checks of what a restart reads, metrics.jsonl, and output to a closed stdout.

The lock is exercised in process here (a second holder in this process is as good as a
second process: ``flock`` locks belong to open files, not processes); two real
``train.py`` processes on one workdir are in ``test_reliability.py``.
"""

import errno
import io
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from anodev2_jax import errors, rundir


def test_one_holder_at_a_time_named_by_pid(tmp_path):
    workdir = tmp_path / "new" / "run"  # made by the lock: two new runs may race to create it
    with rundir.RunLock(workdir) as lock:
        assert (workdir / rundir.LOCK_FILE).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(errors.WorkdirInUse) as info:
            rundir.RunLock(workdir).acquire()
        assert (info.value.pid, info.value.host) == (os.getpid(), socket.gethostname())
        message = str(info.value)
        assert f"PID {os.getpid()}" in message and f"kill {os.getpid()}" in message and "another --workdir" in message
        assert isinstance(info.value, errors.ConfigError) and "\n" not in message  # exit 2, one line
        with pytest.raises(errors.WorkdirInUse):
            rundir.check_not_in_use(workdir)
    assert lock.fd is None and (workdir / rundir.LOCK_FILE).read_text() == ""  # emptied: a directory at rest
    rundir.check_not_in_use(workdir)
    with rundir.RunLock(workdir):  # free again
        pass
    inactive = rundir.RunLock(tmp_path / "other", active=False).acquire()  # processes but 0 take no lock
    assert inactive.fd is None and not (tmp_path / "other").exists()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from anodev2_jax import rundir
    with rundir.RunLock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_the_probe_sees_another_process_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
        with pytest.raises(errors.WorkdirInUse, match=f"PID {holder.pid} on host"):
            rundir.check_not_in_use(workdir)
        with pytest.raises(errors.WorkdirInUse, match=f"kill {holder.pid}"):
            rundir.RunLock(workdir).acquire()
        assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunLock(workdir):  # the OS dropped the killed holder's lock
        pass


def test_read_metrics_drops_a_cut_off_last_line_and_refuses_damage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"kind": "epoch", "step": s, "epoch": s}) for s in (2, 4, 6)]
    path.write_text("\n".join(good) + "\n" + '{"kind": "step", "st')  # a crash cut the last record
    assert rundir.read_metrics(path, 4) == good[:2]
    assert rundir.read_metrics(tmp_path / "none.jsonl", 4) == []
    damaged = {
        "not an object": (good[0] + "\n[1, 2]\n" + good[1] + "\n").encode(),
        "not an integer step": (good[0] + '\n{"kind": "epoch", "step": "4"}\n').encode(),
        "not JSON": (good[0] + "\n{oops\n" + good[1] + "\n").encode(),
        "not UTF-8": good[0].encode() + b"\n\xff\xfe\n",
    }
    for what, data in damaged.items():
        path.write_bytes(data)
        with pytest.raises(errors.ConfigError, match="metrics.jsonl line 2 is not .*delete that line") as info:
            rundir.read_metrics(path, 4)
        assert "\n" not in str(info.value), what


def test_check_workdir_refuses_entries_of_the_wrong_kind(tmp_path):
    cfg = {"num_epochs": 1}
    for name in (rundir.METRICS_FILE, rundir.SUMMARY_FILE, rundir.LOCK_FILE):
        workdir = tmp_path / name
        (workdir / name).mkdir(parents=True)  # a folder where the run keeps a file
        with pytest.raises(errors.ConfigError, match=f"{name} is a folder.*move it out"):
            rundir.check_workdir(workdir, cfg)
    (tmp_path / "tb" / "tensorboard").parent.mkdir()
    (tmp_path / "tb" / "tensorboard").write_text("")
    with pytest.raises(errors.ConfigError, match="tensorboard is not a folder"):
        rundir.check_workdir(tmp_path / "tb", cfg)


def test_finished_summary_needs_the_final_checkpoint_and_its_summary(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    assert rundir.finished_summary(tmp_path, 8) is None  # no summary.json (stopped after the last checkpoint)
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4}))  # of a shorter run, since extended
    assert rundir.finished_summary(tmp_path, 8) is None
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 8}))
    assert rundir.finished_summary(tmp_path, 8) == {"steps": 8}
    assert rundir.finished_summary(tmp_path, 12) is None  # a longer run: it trains on
    snap = rundir.snapshot(tmp_path)
    (tmp_path / "checkpoints" / "12").mkdir()
    assert rundir.snapshot(tmp_path) != snap


_CLOSED_STDOUT = textwrap.dedent(
    """
    import sys
    from anodev2_jax import rundir
    print("first", flush=True)
    sys.stdin.readline()  # the reader has closed its end when this returns
    for i in range(3):
        rundir.say(f"line {i}")
    progress = rundir.Progress(True)
    progress.done("epoch 1")
    sys.stderr.write("carried on\\n")
    """
)


def test_a_closed_stdout_is_silenced_not_fatal():
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLOSED_STDOUT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"first\n"
    proc.stdout.close()  # `| head -1`
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "carried on\n", err  # no BrokenPipeError, at exit either


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_one_line_per_epoch_in_a_file(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # the bar is as wide as the terminal: wide enough for all of it
    term = _Terminal()
    progress = rundir.Progress(True, term)
    progress.start("epoch 2/3", total=10, initial=4)  # resumed after 4 steps of the epoch
    progress.update(7, "run ETA 0:01:05, loss 0.5000 acc 0.2500")
    shown = term.getvalue()
    assert "epoch 2/3" in shown and "7/10" in shown and "run ETA 0:01:05" in shown
    progress.done("epoch 2/3 loss 0.5000")
    assert term.getvalue().endswith("epoch 2/3 loss 0.5000\n")  # the bar cleared, the epoch's line kept

    log = io.StringIO()  # not a terminal: only the epoch lines, nothing per step
    progress = rundir.Progress(True, log)
    progress.start("epoch 1/3", total=10)
    for i in range(1, 11):
        progress.update(i, f"step {i}")
    progress.done("epoch 1/3 done")
    assert log.getvalue() == "epoch 1/3 done\n"
    quiet = io.StringIO()  # not process 0: nothing at all
    rundir.Progress(False, quiet).done("epoch 1/3")
    assert quiet.getvalue() == ""


def test_durations_read_as_clock_times():
    assert [rundir.duration(s) for s in (0, 59.6, 3723, 90061)] == ["0:00:00", "0:01:00", "1:02:03", "1d 1:01:01"]


# ----------------------------------------------------------------------------- entries, run.json, sessions, metrics


def test_check_workdir_refuses_devices_fifos_and_dangling_symlinks_as_its_files(tmp_path):
    cfg = {"num_epochs": 1}
    cases = {
        rundir.LOCK_FILE: (lambda p: p.symlink_to(os.devnull), f"is a symlink to {os.devnull}, not a regular file"),
        rundir.METRICS_FILE: (os.mkfifo, "is not a regular file"),  # reading it would block
        rundir.RUN_FILE: (lambda p: p.symlink_to(tmp_path / "nowhere"), "which does not exist"),
    }
    for name, (make, words) in cases.items():
        workdir = tmp_path / name
        workdir.mkdir()
        make(workdir / name)
        with pytest.raises(errors.ConfigError, match="a run keeps a file") as info:
            rundir.check_workdir(workdir, cfg)
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
        rundir.check_not_in_use(workdir)  # the probe neither blocks nor fails on them


def test_an_emptied_config_json_is_named_as_damage_not_a_config_mismatch(tmp_path):
    from configs import default

    from anodev2_jax import run_config

    cfg = run_config.config_dict(default.get_config())
    (tmp_path / rundir.CONFIG_FILE).write_text("{}")
    with pytest.raises(errors.ConfigError) as info:
        rundir.check_workdir(tmp_path, cfg)
    message = str(info.value)
    assert re.search(r"config.json lacks field\(s\) \w+, \w+, \w+, \w+ and \d+ more that every run records", message)
    assert "emptied or edited" in message
    assert not isinstance(info.value, errors.WorkdirMismatch) and "--config." not in message
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "dtype"}))
    assert rundir.check_workdir(tmp_path, cfg)["model"] == cfg["model"]  # a field added since is not damage


def test_run_record_and_the_sessions_that_date_a_run(tmp_path):
    assert rundir.read_run_record(tmp_path) is None  # a run from before run ids
    record = rundir.new_run_record({4: "ab" * 32, 2: None})
    assert len(record["run_id"]) == 32 and record["adopted"] == {"2": None, "4": "ab" * 32}
    assert rundir.new_run_record()["run_id"] != record["run_id"] and "adopted" not in rundir.new_run_record()
    (tmp_path / rundir.RUN_FILE).write_text(json.dumps(record))
    assert rundir.read_run_record(tmp_path) == record
    for damaged in ("", "[]", '{"run_id": 3}', '{"run_id": "x", "adopted": {"two": null}}'):
        (tmp_path / rundir.RUN_FILE).write_text(damaged)
        with pytest.raises(errors.ConfigError, match="run.json is damaged .*restore it .*anodev2_run_id") as info:
            rundir.read_run_record(tmp_path)
        assert "\n" not in str(info.value)

    sessions = tmp_path / rundir.SESSIONS_FILE
    assert rundir.digest_free_until(tmp_path) == math.inf  # no session of code that writes digests
    sessions.write_text(json.dumps({"start_step": 8, "pid": 1}) + "\n" + json.dumps({"start_step": 12}) + "\n")
    assert rundir.digest_free_until(tmp_path) == 8  # the first one's
    for unreadable in ("{oops\n", '{"start_step": "8"}\n', "[8]\n"):
        sessions.write_text(unreadable)
        assert rundir.digest_free_until(tmp_path) == -1, unreadable


def test_metrics_lost_before_the_checkpoint_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "step", "step": s}) for s in (1, 2, 3, 4)]
    assert rundir.metrics_shortfall(path, lines, 4, 4) is None
    assert rundir.metrics_shortfall(path, lines, None, 4) is None  # a checkpoint of older code: no count
    warning = rundir.metrics_shortfall(path, lines[:1], 4, 4)
    assert warning == (
        f"warning: {path} holds 1 of the 4 records written up to checkpoint step 4: it was cut (or edited) after "
        "they were written; the 3 records after step 1 up to step 4 are lost, the run goes on with the 1 kept and "
        "appends after them"
    )


# ----------------------------------------------------------------------------- TensorBoard event files


def _read_events(path):
    """The events of a TFRecord event file, every length and record checked against its masked CRC32C."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    data, events, i = path.read_bytes(), [], 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
        body = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == masked_crc32c(body)
        events.append(event_pb2.Event.FromString(body))
        i += 16 + n
    return events


def _contents(events):
    return [(e.file_version, e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events]


def test_event_files_hold_what_tensorboardX_writes(tmp_path):
    from tensorboardX import SummaryWriter

    scalars = [("train/loss", 2.5, 4), ("steps/train_accuracy", 0.125, 3), ("learning_rate", 0.1, 4)]
    ours = rundir.EventFile(tmp_path / "ours")
    theirs = SummaryWriter(str(tmp_path / "theirs"))
    for tag, value, step in scalars:
        ours.add_scalar(tag, value, step)
        theirs.add_scalar(tag, value, step)
    ours.close()
    theirs.close()
    (mine,), (reference,) = (list((tmp_path / d).iterdir()) for d in ("ours", "theirs"))
    assert mine.name.startswith("events.out.tfevents.") and mine.name.split(".")[-1] == reference.name.split(".")[-1]
    assert _contents(_read_events(mine)) == _contents(_read_events(reference))
    assert _contents(_read_events(mine))[0][0] == "brain.Event:2"


class _FullDisk:
    """A file whose writes fail as on a full disk (what the kernel returns: ENOSPC)."""

    def write(self, data=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write

    def close(self):
        pass


def test_a_full_disk_under_an_event_file_raises_in_the_caller_naming_it(tmp_path):
    """No writer thread and no queue: the OSError reaches the training loop (exit 4), it never waits on a dead thread."""
    logger = rundir.MetricsLogger(tmp_path, [0, 1], [], True)
    logger.writers[1].file = _FullDisk()  # the disk fills while seed 1's events are written
    with pytest.raises(OSError) as info:
        logger.write("step", 1, 3, {"train_loss": np.asarray([1.0, 2.0])}, {"learning_rate": 0.1})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(logger.writers[1].path)
    assert logger.records == 2
    with pytest.raises(OSError, match="No space left"):  # flush, close: each names its file too
        logger.writers[1].flush()
