"""The training system's errors: each message is one line naming the cause and the fix.

``train.py`` maps them to exit statuses: :class:`ConfigError` (and its kinds
:class:`WorkdirInUse`, :class:`WorkdirMismatch`, and :class:`anodev2_jax.data.DataError`) 2,
:class:`NonFiniteError` 3, :class:`WriteError` 4, :class:`OutOfMemory` 5, :class:`Preempted`
``128 + signum``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "ConfigError",
    "WorkdirInUse",
    "WorkdirMismatch",
    "NonFiniteError",
    "Preempted",
    "WriteError",
    "OutOfMemory",
    "is_out_of_memory",
    "os_error_text",
    "resume_text",
]


class ConfigError(ValueError):
    """A bad config or run directory; the message is one line naming the field and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class WorkdirInUse(ConfigError):
    """Another process holds the run directory's lock (it is training there); nothing was written.

    Attributes:
      pid, host: the holder's process id and host name as its lock file says (None: not
        written yet, the holder is just starting).
    """

    def __init__(self, workdir: Path, lock_file: Path, pid: Optional[int], host: Optional[str]):
        self.pid, self.host = pid, host
        if pid is None:
            who, stop = "another run (just starting)", "stop it"
        else:
            who = f"another run (PID {pid} on host {host})"
            stop = f"stop it (kill {pid}: it saves a checkpoint and exits)"
        super().__init__(
            f"workdir {workdir} is in use by {who}, which holds the lock {lock_file}; wait for it to end or {stop}, "
            "then rerun this command to resume the run; or pass another --workdir"
        )


class WorkdirMismatch(ConfigError):
    """The run directory holds a run of another config (field ``field``: ``stored`` there, ``wanted`` here)."""

    def __init__(self, workdir: Path, field: str, stored, wanted):
        self.workdir, self.field, self.stored, self.wanted = workdir, field, stored, wanted
        super().__init__(
            f"workdir {workdir} holds a run with {field}={stored!r}, but this config has {field}={wanted!r}; "
            f"use a new --workdir, or --config.{field}={stored!r} to resume that run"
        )


def resume_text(command: Optional[str]) -> str:
    """How a stopped run is continued: the exact command when known, else "rerun the same command"."""
    return f"resume with: {command}" if command else "rerun the same command to resume"


class Preempted(Exception):
    """Training stopped on a stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) after saving a checkpoint; rerun to resume.

    A signal after the last step lets the run finish (``finished``): its last checkpoint and
    ``summary.json`` are written, and a rerun says the run is finished.

    Attributes:
      signum: the signal received (``signal.SIGTERM``, ``SIGINT``, ``SIGHUP`` or ``SIGUSR1``).
      step: the global step saved.
      checkpoint: the checkpoint directory written (``workdir/checkpoints/<step>``).
      finished: whether the run had finished (the signal came after its last step).
      resume_command: the exact command that continues the run (``train.py`` passes it, with
        ``--workdir``, so a run in a time-stamped default workdir is resumed, not restarted);
        None: the message says "rerun the same command". The message is built from it.
    """

    def __init__(
        self, signum: int, step: int, checkpoint: Path, steps_per_epoch: int, finished: bool = False,
        resume_command: Optional[str] = None,
    ):
        self.signum, self.step, self.checkpoint, self.finished = int(signum), int(step), checkpoint, finished
        self.steps_per_epoch, self.resume_command = steps_per_epoch, resume_command
        super().__init__(self.message())

    def message(self) -> str:
        epoch, i = divmod(self.step, self.steps_per_epoch)
        where = f"end of epoch {epoch}" if i == 0 else f"step {i}/{self.steps_per_epoch} of epoch {epoch + 1}"
        name = signal.Signals(self.signum).name
        if self.finished:
            again = f"running {self.resume_command}" if self.resume_command else "rerunning the same command"
            return (
                f"received {name} after the last step ({self.step}, {where}): the run finished anyway (checkpoint "
                f"{self.checkpoint} and summary.json written); {again} says so and changes nothing"
            )
        return (
            f"received {name} at step {self.step} ({where}): saved checkpoint {self.checkpoint}; "
            f"{resume_text(self.resume_command)}"
        )

    def __str__(self) -> str:
        return self.message()


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN / Inf (``config.nonfinite="stop"``); nothing newer was saved.

    Attributes:
      step: the first global step whose loss, gradients or update was not finite.
      seeds: the seeds of the replicas it happened in.
      checkpoint: the last good checkpoint (left intact), or None if none was written yet.
    """

    def __init__(self, step: int, epoch: int, seeds: Sequence[int], checkpoint: Optional[Path]):
        self.step, self.seeds, self.checkpoint = int(step), list(seeds), checkpoint
        last = (
            f"the last good checkpoint {checkpoint} is left intact"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"non-finite loss or gradients at step {self.step} (epoch {epoch}, seed {', '.join(map(str, self.seeds))}); "
            f"training stopped and wrote nothing newer: {last}; lower --config.learning_rate (in a new --workdir) "
            "or check the data, or rerun with --config.nonfinite=skip to skip such steps"
        )


class WriteError(RuntimeError):
    """Writing the run directory failed (disk full, quota, permissions); earlier checkpoints are intact.

    ``resume_command`` (settable; ``train.py`` sets it) is the exact command that resumes the
    run, named in the message instead of "the same command".
    """

    def __init__(self, what: str, cause: BaseException, last_checkpoint: Optional[Path], resume_command: Optional[str] = None):
        self.what, self.cause, self.last_checkpoint, self.resume_command = what, cause, last_checkpoint, resume_command
        super().__init__(self.message())

    def message(self) -> str:
        resume = (
            f"it resumes from the last complete checkpoint {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "it starts over (no complete checkpoint yet)"
        )
        again = f"run {self.resume_command}" if self.resume_command else "rerun the same command"
        return (
            f"writing {self.what} failed: {os_error_text(self.cause)}; free disk space or fix the permissions there, "
            f"then {again}: {resume}"
        )

    def __str__(self) -> str:
        return self.message()


class OutOfMemory(RuntimeError):
    """The host or an accelerator ran out of memory (a ``MemoryError``, or XLA's ``RESOURCE_EXHAUSTED``).

    What can be caught is: numpy / Python allocations (``MemoryError``) and XLA's failed
    buffer allocations, raised as ``jax.errors.JaxRuntimeError`` with ``RESOURCE_EXHAUSTED``
    (on GPU and TPU, and on CPU where XLA's allocator reports it). An allocation that fails
    inside XLA's compiler or LLVM aborts the process (a C++ abort and its dump, exit 134,
    or the kernel's OOM killer, 137): no Python code runs then.

    Attributes:
      checkpoint: the last complete checkpoint (the rerun resumes there), or None.
    """

    def __init__(
        self, cause: BaseException, batch_size: int, num_seeds: int, checkpoint: Optional[Path], platform: str = "cpu"
    ):
        self.cause, self.checkpoint = cause, checkpoint
        where = f"the {platform} device" if "RESOURCE_EXHAUSTED" in str(cause) else "the host"
        detail = " ".join(str(cause).split()).split(". ")[0].rstrip(".")[:160] or type(cause).__name__
        resume = f"it resumes from {checkpoint}" if checkpoint is not None else "no checkpoint yet: it starts over"
        seeds = f" or --config.num_seeds (now {num_seeds})" if num_seeds > 1 else ""
        super().__init__(
            f"out of memory on {where} ({detail}); rerun the command with a smaller --config.remat_budget_mb "
            f"(remat=auto then recomputes more) or --config.eval_batch_size ({resume}), or start a new --workdir "
            f"with a smaller --config.batch_size (now {batch_size}){seeds} or --config.remat=binomial"
        )


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error: ``MemoryError`` or XLA's ``RESOURCE_EXHAUSTED`` (``JaxRuntimeError``)."""
    if isinstance(e, MemoryError):
        return True
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(e)


def os_error_text(e: BaseException) -> str:
    """``"No space left on device (ENOSPC)"`` for an OSError or an orbax / tensorstore write error."""
    code = getattr(e, "errno", None)
    if not isinstance(code, int):  # tensorstore: "... [os_error_code='28']"
        found = re.search(r"os_error_code='?(\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
