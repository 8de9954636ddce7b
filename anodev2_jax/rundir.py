"""The run directory: its checks and lock, config.json, metrics.jsonl, TensorBoard, sessions, the progress line.

``workdir/config.json`` holds the run's config; a restart compares it with the new one
(:func:`check_workdir`). ``metrics.jsonl`` has one JSON object per seed every
``log_every_steps`` steps (``"kind": "step"``) and every epoch (``"kind": "epoch"``);
TensorBoard event files per seed live under ``workdir/tensorboard/seed<N>`` (tensorboardX,
no TensorFlow); ``summary.json`` is written at the end; ``sessions.jsonl`` has one line per
process start that trained (device count, host, jax version). ``run.lock`` is the run's
lock (:class:`RunLock`): one writer per run directory. ``run.json`` names the run: its id
(a uuid4 made when the run directory is created; every checkpoint records it) and, for a
run written before run ids, the checkpoints it had then (:func:`new_run_record`). Only
process 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import tqdm

from anodev2_jax import checkpoints, run_config
from anodev2_jax.errors import ConfigError, WorkdirInUse, WorkdirMismatch

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "LOCK_FILE",
    "SESSIONS_FILE",
    "RUN_FILE",
    "check_workdir",
    "check_writable",
    "check_not_in_use",
    "RunLock",
    "snapshot",
    "finished_summary",
    "write_text",
    "read_metrics",
    "metrics_shortfall",
    "read_run_record",
    "new_run_record",
    "digest_free_until",
    "append_session",
    "json_number",
    "EventFile",
    "MetricsLogger",
    "Progress",
    "duration",
    "say",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"
SESSIONS_FILE = "sessions.jsonl"
RUN_FILE = "run.json"

# What a run keeps in its directory, and whether each is a folder (else a regular file):
# anything else in its place (a folder for a file, a device, a FIFO, a symlink to
# /dev/null or to nothing) is bad input (exit 2), found before anything is written, not a
# failed write later.
_ENTRIES = {
    CONFIG_FILE: False, METRICS_FILE: False, SUMMARY_FILE: False, LOCK_FILE: False, SESSIONS_FILE: False,
    RUN_FILE: False, checkpoints.CHECKPOINT_DIR: True, "tensorboard": True,
}  # fmt: skip


def _wrong_kind(path: Path, is_dir: bool) -> Optional[str]:
    """What ``path`` is, if it exists but is not what the run keeps there (a folder / a regular file); else None."""
    if path.is_symlink() and not path.exists():
        return f"a symlink to {os.readlink(path)}, which does not exist"
    if not path.exists() or (path.is_dir() if is_dir else path.is_file()):
        return None
    link = f"a symlink to {os.readlink(path)}, " if path.is_symlink() else ""
    if path.is_dir():
        return f"{link}a folder"
    return f"{link}not {'a folder' if is_dir else 'a regular file'}"


def check_workdir(workdir: Path, cfg: dict[str, Any], steps_per_epoch: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Checks that ``workdir`` is new or holds a run of a compatible config; writes nothing.

    Also that what a run keeps there is of the right kind (a file, a folder) and that
    ``metrics.jsonl`` is undamaged (:func:`read_metrics`); with ``steps_per_epoch``, that no
    checkpoint (numbered by global step) lies beyond ``cfg["num_epochs"]``. Returns the
    stored config (a dict) or None for a fresh workdir.

    Raises:
      WorkdirMismatch: the stored config differs in a field a restart may not change.
      ConfigError: any other of the above.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; pass a directory to --workdir")
    for name, is_dir in _ENTRIES.items():
        path = workdir / name
        kind = _wrong_kind(path, is_dir)
        if kind is not None:
            raise ConfigError(
                f"{path} is {kind}, but a run keeps {'its' if is_dir else 'a file'} {name} there; move it out of "
                f"{workdir}, or pass another --workdir"
            )
    stored_path = workdir / CONFIG_FILE
    if not stored_path.exists():
        if (workdir / "checkpoints").exists():
            raise ConfigError(
                f"workdir {workdir} has checkpoints but no {CONFIG_FILE}, so its config is unknown; "
                "use a new --workdir"
            )
        return None
    ckpt_dir = workdir / "checkpoints"
    read_metrics(workdir / METRICS_FILE)  # damaged metrics are bad input, found now, not after the lock
    steps_done = checkpoints.checkpoint_steps(ckpt_dir)
    if steps_done and steps_per_epoch and max(steps_done) > cfg["num_epochs"] * steps_per_epoch:
        epochs = -(-max(steps_done) // steps_per_epoch)
        raise ConfigError(
            f"workdir {workdir} already holds a checkpoint of step {max(steps_done)} (epoch {epochs}) > "
            f"num_epochs={cfg['num_epochs']}; use --config.num_epochs={epochs} or more, or a new --workdir"
        )
    try:
        stored = json.loads(stored_path.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{stored_path} is unreadable ({type(e).__name__}: {e}); use a new --workdir") from None
    # Every run's config.json has every field of its time: one without them was emptied or
    # edited (not a run of another config, whose field and value a mismatch would name).
    lacking = [name for name in cfg if name not in stored and name not in run_config.ADDED_FIELDS]
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        raise ConfigError(
            f"{stored_path} lacks field(s) {shown} that every run records: it was emptied or edited, not written by "
            "a run; restore it (from a copy, or the \"config\" of the run's summary.json), or pass a new --workdir"
        )
    legacy = run_config.legacy_defaults(stored)  # a run written before a method default changed keeps the old one
    new_knobs, old_knobs = run_config.resolved_knobs(cfg, legacy), run_config.resolved_knobs(stored, legacy)
    for name in cfg:
        if name in run_config.RESUMABLE_FIELDS:
            continue
        old, new = (old_knobs[name], new_knobs[name]) if name in run_config.KNOB_FIELDS else (stored.get(name), cfg[name])
        if name not in stored and name not in run_config.KNOB_FIELDS:
            # a field added after the run was written: it ran with the value the field names there
            old = run_config.ADDED_FIELDS.get(name, "<missing>")
        if old != new:
            raise WorkdirMismatch(workdir, name, old, new)
    return stored


def check_writable(workdir: Path) -> None:
    """Raises :class:`ConfigError` unless ``workdir`` (or the folder it will be made in) and its files are writable.

    ``os.access`` writes nothing; it answers for the process's real user and for read-only
    file systems (root passes any permission check, but not a read-only mount).
    """
    existing = workdir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, so workdir {workdir} cannot be created in it; pass another --workdir")
    paths = [existing]  # the workdir itself, or the folder it will be created in
    if workdir.is_dir():
        paths += [workdir / n for n in _ENTRIES if (workdir / n).exists()]
    for p in paths:
        if not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise ConfigError(
                f"workdir {workdir} is not writable ({p} denies writing); fix the permissions "
                f"(e.g. chmod -R u+w {workdir}) or pass another --workdir"
            )


def _read_holder(lock_file: Path) -> tuple[Optional[int], Optional[str]]:
    """(PID, host) the lock's holder wrote into it, or (None, None) if it has not yet (it is just starting)."""
    for _ in range(10):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid, host = lock_file.read_text().split()[:2]
            return int(pid), host
        time.sleep(0.05)
    return None, None


def check_not_in_use(workdir: Path) -> None:
    """Raises :class:`WorkdirInUse` if a run holds ``workdir``'s lock; writes nothing (a probe, not the lock).

    Asked first, so that a second run on a busy workdir stops at once, before it loads data
    or reads a checkpoint the holder may be replacing. A shared lock, taken and dropped at
    once: it conflicts with a holder's exclusive one, not with another probe.
    """
    lock_file = workdir / LOCK_FILE
    try:  # non-blocking: a FIFO in its place would block an open for reading (check_workdir refuses it)
        fd = os.open(lock_file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:  # no lock file (a new run directory), or unreadable: RunLock decides
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkdirInUse(workdir, lock_file, *_read_holder(lock_file)) from None
    except OSError:  # a file system without locks: RunLock says so
        return
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock of a run directory: ``fcntl.flock`` on ``workdir/run.lock`` while a run writes there.

    Taken before anything of the run is written (``workdir`` itself is created for it, as
    two new runs may race to): a second run on the same directory raises
    :class:`WorkdirInUse` (exit 2) naming the holder, and writes nothing. The OS drops a
    flock when its holder ends, however it ends (SIGKILL too), so no stale lock ever blocks
    a restart. The holder writes ``"PID host"`` into the file for that error message and
    empties it on release, so a run directory at rest looks the same whichever run held it
    last. The file is never deleted: a lock file deleted while a second process waits on
    it lets a third lock a new file beside the second. Only process 0 of a multi-process run
    takes it (``active``). On a file system without locks (some NFS mounts) a one-line
    warning says so and the run goes on unlocked.
    """

    # A probe (check_not_in_use) holds its shared lock for microseconds: a conflict that
    # lasts beyond this is a real holder.
    PATIENCE_S = 0.5

    def __init__(self, workdir: Path, active: bool = True):
        self.workdir, self.path, self.active = workdir, workdir / LOCK_FILE, active
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Takes the lock (creating ``workdir`` and the lock file if need be); :class:`WorkdirInUse` if held."""
        if not self.active:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                os.close(fd)
                raise WorkdirInUse(self.workdir, self.path, *_read_holder(self.path)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                os.close(fd)
                why = os.strerror(e.errno)
                say(f"warning: {self.path} cannot be locked ({why}): make sure no other run uses {self.workdir}", sys.stderr)
                return self
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return self

    def release(self) -> None:
        """Empties the lock file and drops the lock (the OS drops it anyway when the process ends)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def snapshot(workdir: Path) -> tuple:
    """What a start reads from ``workdir``: size and mtime of its files, the complete checkpoints.

    Compared before and after taking the lock: a run that ended in between changed it, and
    the start reads it again instead of resuming from what it found before.
    """
    out: list[Any] = []
    for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE):
        try:
            st = (workdir / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    out.append(tuple(sorted(checkpoints.checkpoint_steps(workdir / checkpoints.CHECKPOINT_DIR))))
    return tuple(out)


def finished_summary(workdir: Path, final_step: int) -> Optional[dict[str, Any]]:
    """``summary.json`` of a finished run (``final_step`` steps, beside its checkpoint of that step), or None.

    Called after :func:`check_workdir` (the stored config matches). A run whose last
    checkpoint is final but whose summary is missing or older (it stopped after its last
    checkpoint) is not finished: the restart evaluates that checkpoint and writes the summary.
    """
    steps = checkpoints.checkpoint_steps(workdir / checkpoints.CHECKPOINT_DIR)
    if not steps or max(steps) != final_step:
        return None
    try:
        summary = json.loads((workdir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == final_step else None


def write_text(path: Path, text: str) -> None:
    """Writes ``path`` atomically (a temporary file renamed over it): a failed write leaves the old file.

    Its OSError names the file (a failing ``write()`` alone does not).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_metrics(path: Path, max_step: Optional[int] = None) -> list[str]:
    """Lines of ``metrics.jsonl`` up to global step ``max_step`` (all: None; drops a crashed run's tail); writes nothing.

    A crash can cut off only the last line (records are appended whole and flushed), so an
    unparsable last line is dropped; any other line that is not a JSON object with an
    integer ``"step"``, or bytes that are not UTF-8 text, mean the file was damaged or edited:
    a :class:`ConfigError` names the line (nothing is rewritten, so nothing is lost). A cut
    last line is a crash's only if it is younger than the checkpoint resumed from: the
    caller compares what is kept with the count that checkpoint recorded
    (:func:`metrics_shortfall`).
    """
    if not path.exists():
        return []
    fix = "restore it, or delete that line (or the whole file: its records are then lost) to resume"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path} is unreadable ({e.strerror or e}); fix its permissions or pass another --workdir") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line} is not UTF-8 text: the file is damaged; {fix}") from None
    lines = text.split("\n")
    cut_off = lines.pop() if lines else ""  # the text after the last newline: a record cut off by a crash, or ""
    keep = []
    for number, line in enumerate(lines + [cut_off], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) + 1:  # cut off by a crash
                continue
            raise ConfigError(f"{path} line {number} is not JSON: the file is damaged; {fix}") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(record, dict) or isinstance(step, bool) or not isinstance(step, int):
            what = "a JSON object" if not isinstance(record, dict) else "a record with an integer \"step\""
            raise ConfigError(f"{path} line {number} is not {what}: the file was edited or damaged; {fix}")
        if max_step is None or step <= max_step:
            keep.append(line)
    return keep


def metrics_shortfall(path: Path, kept: Sequence[str], written: Optional[int], step: int) -> Optional[str]:
    """A one-line warning if ``kept`` (the records up to checkpoint ``step``) are fewer than the ``written`` it recorded.

    Records are appended and flushed before the checkpoint of their step is saved, so the
    file holds every one of them: fewer mean the file was cut (a truncated copy: the cut-off
    line was not a crash's, which only ever cuts a record younger than the checkpoint) or
    edited. The run goes on with what is left (the lost records cannot be recomputed, and
    refusing would not bring them back); the warning says which are lost. None when nothing
    is missing or the checkpoint recorded no count (older code).
    """
    if written is None or len(kept) >= written:
        return None
    last = json.loads(kept[-1])["step"] if kept else 0
    return (
        f"warning: {path} holds {len(kept)} of the {written} records written up to checkpoint step {step}: it was "
        f"cut (or edited) after they were written; the {written - len(kept)} records after step {last} up to step "
        f"{step} are lost, the run goes on with the {len(kept)} kept and appends after them"
    )


def read_run_record(workdir: Path) -> Optional[dict[str, Any]]:
    """``run.json`` of a run directory (None: absent, a run from before run ids); writes nothing.

    Raises:
      ConfigError: it is unreadable or lacks the run id (damaged; one line).
    """
    path = workdir / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise ValueError('not a JSON object with a "run_id" string')
        adopted = record.get("adopted", {})
        if not isinstance(adopted, dict) or not all(k.isdigit() and (v is None or isinstance(v, str)) for k, v in adopted.items()):
            raise ValueError('"adopted" is not an object of steps and digests')
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} is damaged ({type(e).__name__}: {e}); it names the run its checkpoints belong to: restore it "
            f"(its run id is the {checkpoints.RUN_ID_KEY} in any checkpoints/<step>/{checkpoints.METADATA_FILE}), "
            "or pass a new --workdir"
        ) from None
    return record


def new_run_record(adopted: Optional[dict[int, Optional[str]]] = None) -> dict[str, Any]:
    """A new run's ``run.json``: a fresh run id; ``adopted``: a run from before run ids, its checkpoints then."""
    record: dict[str, Any] = {
        "run_id": uuid.uuid4().hex,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if adopted is not None:
        record["adopted"] = {str(step): digest for step, digest in sorted(adopted.items())}
    return record


def digest_free_until(workdir: Path) -> float:
    """The highest step a checkpoint of this run without a digest may have: how a run proves it predates digests.

    The code that saves digests also writes ``sessions.jsonl``, a line per start, before
    its first checkpoint. So without that file (or with an empty one) no checkpoint of
    the run was saved with a digest, and any may lack one (``math.inf``); with it, only
    those up to the first session's ``start_step`` (saved before that start) may. An
    unreadable first line vouches for none (-1).
    """
    path = workdir / SESSIONS_FILE
    try:
        first = path.read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return math.inf
    except (OSError, UnicodeDecodeError):
        return -1
    if not first.strip():
        return math.inf
    try:
        step = json.loads(first).get("start_step")
    except (ValueError, AttributeError):
        return -1
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


def append_session(workdir: Path, record: dict[str, Any]) -> None:
    """Appends one line to ``sessions.jsonl``: what this process start ran on (an OSError names the file)."""
    path = workdir / SESSIONS_FILE
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def json_number(x):
    """``x``, or None (JSON null) for NaN: the mean of a window whose every step was skipped."""
    return None if isinstance(x, float) and math.isnan(x) else x


class EventFile:
    """One TensorBoard event file, written synchronously by the calling thread (no writer thread, no queue).

    tensorboardX's ``SummaryWriter`` hands events to a writer thread through a bounded
    queue: when a write fails (a full disk) that thread dies, the queue fills, and the next
    ``add_scalar`` blocks forever, holding the main thread (and its stop signal) with it.
    Here a failing write raises its ``OSError`` (naming this file) in the caller, which
    reports it as a failed write (exit 4). The file format is tensorboardX's: TFRecord
    framing (length, masked CRC32C of it, the serialized ``Event``, its masked CRC32C)
    under the name ``events.out.tfevents.<time>.<host>``, the first event its file version.
    ``flush`` moves the bytes to the OS (as ``metrics.jsonl``'s records), no ``fsync``.

    Example: ``f = EventFile(workdir / "tensorboard" / "seed0"); f.add_scalar("train/loss", 2.3, 10); f.flush()``.
    """

    def __init__(self, logdir: Path):
        from tensorboardX.proto import event_pb2, summary_pb2  # imported late: only needed once training starts
        from tensorboardX.record_writer import masked_crc32c

        self._event, self._summary, self._crc = event_pb2.Event, summary_pb2.Summary, masked_crc32c
        self.path = Path(logdir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        with self._naming_errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("ab")  # append: a second start in the same second adds to the file
            self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    @contextlib.contextmanager
    def _naming_errors(self):
        try:
            yield
        except OSError as e:  # a failing write() does not name its file
            e.filename = e.filename or str(self.path)
            raise

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.file.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Appends one scalar (buffered; :meth:`flush` writes it)."""
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))])
        with self._naming_errors():
            self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        with self._naming_errors():
            self.file.flush()

    def close(self) -> None:
        with self._naming_errors():
            self.file.close()


class MetricsLogger:
    """metrics.jsonl and TensorBoard (one :class:`EventFile` per seed); only process 0 writes.

    Every write happens in the calling thread and is flushed before :meth:`write` returns,
    so a failed one (disk full, quota) raises an ``OSError`` naming its file there, and a
    checkpoint saved after it never counts a record that did not reach the file.
    ``records`` counts the lines of ``metrics.jsonl`` (kept and written), for the
    checkpoints (:func:`metrics_shortfall`).
    """

    def __init__(self, workdir: Path, seeds: Sequence[int], kept: Sequence[str], active: bool):
        """``kept``: the lines of metrics.jsonl up to the resumed step (:func:`read_metrics`)."""
        self.active, self.seeds, self.records = active, list(seeds), len(kept)
        self.file, self.writers = None, []
        if not active:
            return
        path = workdir / METRICS_FILE
        self.path = path
        write_text(path, "".join(line + "\n" for line in kept))  # atomic: a full disk loses no record
        self.file = path.open("a")
        self.writers = [EventFile(workdir / "tensorboard" / f"seed{s}") for s in self.seeds]

    def write(self, kind: str, epoch: int, step: int, per_seed: dict[str, np.ndarray], shared: dict[str, float]):
        self.records += len(self.seeds)
        if not self.active:
            return
        try:
            for i, seed in enumerate(self.seeds):
                rec = {"kind": kind, "epoch": epoch, "step": step, "seed": seed}
                rec.update({k: json_number(np.asarray(v)[i].item()) for k, v in per_seed.items()})  # counts stay ints
                rec.update({k: float(v) for k, v in shared.items()})
                self.file.write(json.dumps(rec) + "\n")
                for k, v in rec.items():
                    if k not in ("kind", "epoch", "step", "seed") and v is not None:
                        self.writers[i].add_scalar(self._tag(kind, k), v, step)
            self.file.flush()
        except OSError as e:  # a failing write() does not name its file (the event files name theirs)
            e.filename = e.filename or str(self.path)
            raise
        for w in self.writers:
            w.flush()

    @staticmethod
    def _tag(kind: str, key: str) -> str:
        """TensorBoard tag: ``train/loss``, ``test/accuracy``, ``learning_rate``; step records under ``steps/``."""
        split, _, name = key.partition("_")
        tag = f"{split}/{name}" if split in ("train", "test") else key
        return tag if kind == "epoch" else f"steps/{key}"

    def close(self):
        if self.active:
            self.file.close()
            for w in self.writers:
                w.close()


def say(text: str, stream=None) -> None:
    """Prints ``text`` as a line on ``stream`` (stdout); if it is closed, silences it and carries on.

    Progress output is not essential: when the reader of a pipe went away (``train.py | head
    -1``: EPIPE) or the terminal closed (EIO), the stream's file descriptor is pointed at
    /dev/null, so its pending bytes, later lines and the interpreter's last flush all
    succeed and the run goes on, instead of stopping (and being reported as a disk problem).
    """
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except OSError:
        _silence(stream)


def _silence(stream) -> None:
    with contextlib.suppress(Exception):  # a stream without a file descriptor (a test's capture) has nothing to silence
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        stream.flush()


def duration(seconds: float) -> str:
    """``"1:02:03"`` (hours:minutes:seconds), ``"2d 3:04:05"`` past a day: an ETA a person can plan by."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class Progress:
    """The run's progress for a person: a tqdm bar per epoch on a terminal, one line per epoch otherwise.

    On a terminal, :meth:`start` opens a bar over the epoch's steps (tqdm shows the epoch's
    rate and ETA) and :meth:`update` moves it, with the loss, accuracy, images/s and the
    run's ETA after it; :meth:`done` clears the bar and prints the epoch's line. When the
    stream is not a terminal (a log file, a pipe) only :meth:`done`'s line is written, one
    per epoch: nothing per step reaches a file. A closed stream is silenced (:func:`say`).
    """

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None

    def start(self, description: str, total: int, initial: int = 0) -> None:
        """A new bar of ``total`` steps (``initial`` done before a resume); terminal only."""
        if not self.tty:
            return
        self._close()
        try:
            # the terminal's size now (80 x 24 where it reports none, as a pty without a size
            # does: tqdm would draw nothing there)
            size = shutil.get_terminal_size()
            self.bar = tqdm.tqdm(
                total=total, initial=initial, desc=description, unit="step", file=self.stream, leave=False,
                ncols=size.columns, nrows=size.lines, mininterval=0, smoothing=0.1,
            )
        except OSError:
            self._lost()

    def update(self, done: int, text: str) -> None:
        """The bar at ``done`` steps of the epoch, ``text`` after it."""
        if self.bar is None:
            return
        try:
            self.bar.n = done
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        except OSError:
            self._lost()

    def done(self, text: str) -> None:
        """The epoch's line (the bar, if any, cleared first)."""
        self._close()
        if self.enabled:
            say(text, self.stream)

    def _close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            try:
                bar.close()
            except OSError:
                self._lost()

    def _lost(self) -> None:  # the terminal went away: no more bars, the lines go to /dev/null
        self.bar, self.tty = None, False
        _silence(self.stream)
