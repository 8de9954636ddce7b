"""Stopping a run: stop signals (SIGTERM from a scheduler, SIGINT from Ctrl-C, SIGHUP, SIGUSR1) and non-finite steps.

A stop signal during the training loop is only recorded; the loop finishes the current
call (``config.steps_per_call`` steps), saves a checkpoint at its last step (and waits for
it) and raises :class:`anodev2_jax.errors.Preempted`. A non-finite step (NaN / Inf loss, gradients or
update) is flagged on the device; the host reads the flags only where it syncs anyway and
then stops (:class:`anodev2_jax.errors.NonFiniteError`) or counts the skipped steps.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from anodev2_jax.errors import NonFiniteError

__all__ = ["StopSignals", "FiniteFlags"]


class StopSignals:
    """Stop signals over a whole run: what each one does depends on what the run has written.

    The stop signals are SIGTERM (schedulers, ``kill``), SIGINT (Ctrl-C), SIGHUP (the
    terminal closed, an ssh session dropped: left to its default it would end the run
    without a checkpoint) and SIGUSR1 (the advance warning of schedulers such as Slurm's
    ``--signal=USR1@60`` and of preemptible-VM agents); each is handled alike and the exit
    status names it (``128 + signum``: 143, 130, 129, 138). A signal ignored when the run
    starts (``nohup`` ignores SIGHUP, a shell's background job SIGINT) stays ignored.

    * Before :meth:`arm` (the run directory is not locked yet: nothing of the run is written)
      a signal ends the process at once, ``128 + signum``, with one line on stderr.
    * After it, the first signal is recorded: the loop asks :meth:`requested` after every
      call (``steps_per_call`` steps; one on CPU), finishes that call, saves a checkpoint at
      its last step (and waits for it) and raises
      ``Preempted``; ``train.py`` prints that line and exits ``128 + signum`` (143 for
      SIGTERM, 130 for SIGINT); the command that line names (``train.py``'s own command line
      with ``--workdir`` set to the run directory) resumes. A signal during set-up
      or the first compile is acted on after the first call; one after the last step lets
      the run finish (last checkpoint and ``summary.json``) and then stops it.
    * A second signal ends the process at once (``128 + signum``, one line; the checkpoint in
      flight is abandoned, the previous complete one stays valid), even in the middle of a
      compile.

    "At once" is ``os._exit`` from a watcher thread, not an exception in the main thread: a
    ``KeyboardInterrupt`` raised inside orbax's wait would unwind while its writer threads
    still run, into an interpreter shutdown that tears down the modules those threads use
    (the SIGSEGV this replaces); ``os._exit`` runs no shutdown at all. Orbax writes into a
    temporary directory renamed only when complete, ``metrics.jsonl`` gets whole flushed
    lines and every other file is replaced atomically, so nothing is left half-written that
    a restart would read. The thread learns of each signal from ``signal.set_wakeup_fd``
    (one byte per signal, written by the C-level handler), so it counts two signals that
    arrive during one long C++ call (XLA compiling) as two; Python-level handlers run only
    between bytecodes and would see them as one. XLA releases the GIL while compiling, so the
    thread runs then.

    Handlers are installed only in the main thread of a single-process run and the
    previous ones (and wakeup fd) are restored on exit. With several processes no handler is
    installed: ``requested`` asks JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``) instead, so all processes agree on
    the step to stop at and save the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self, resume_command: Optional[str] = None):
        """``resume_command``: the exact command that resumes the run, named by the second signal's line."""
        self.resume_command = resume_command
        self.signum: Optional[int] = None
        self.armed = False
        self._seen = 0  # stop signals the watcher has counted
        self._closing = False
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._pipe: Optional[tuple[int, int]] = None
        self._watcher: Optional[threading.Thread] = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> "StopSignals":
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)  # set_wakeup_fd needs it
            self._pipe = (r, w)
            self._watcher = threading.Thread(target=self._watch, name="anodev2-stop-signals", daemon=True)
            self._watcher.start()
            self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def arm(self) -> None:
        """From now on a first signal is recorded (save and stop), not the end of the process."""
        self.armed = True

    def __exit__(self, *exc) -> None:
        self._closing = True
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            r, w = self._pipe
            os.write(w, b"\0")  # wakes the watcher, which ends
            self._watcher.join(timeout=5)
            os.close(r)
            os.close(w)
            self._pipe = None

    def _handle(self, signum, frame) -> None:  # main thread, between bytecodes
        if self.signum is None:
            self.signum = signum

    def _watch(self) -> None:  # the watcher thread: one byte per signal, as it arrives
        r = self._pipe[0]
        while True:
            data = os.read(r, 64)
            if not data or self._closing:
                return
            for signum in (b for b in data if b in self._previous):
                self._seen += 1
                if not self.armed:
                    _end_now(signum, _BEFORE_ARMED)
                if self._seen >= 2:
                    _end_now(signum, _again(self.resume_command))

    def requested(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (called by every process after every call)."""
        if self.signum is None and self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
            except RuntimeError:  # the preemption service is off (jax.distributed initialized without it)
                self._multiprocess = False
        return self.signum is not None


_BEFORE_ARMED = "before this run wrote anything: nothing to save; rerun the same command to run it"


def _again(resume_command: Optional[str]) -> str:
    how = f"resume with {resume_command}" if resume_command else "rerun the same command to resume"
    return f"again: stopped at once without saving (a checkpoint in flight is abandoned); {how} from the last complete checkpoint"


def _end_now(signum: int, why: str) -> None:
    """One line on stderr (unbuffered: no Python stream lock held by another thread), then ``os._exit``."""
    try:
        os.write(2, f"received {signal.Signals(signum).name} {why}\n".encode())
    except OSError:
        pass
    os._exit(128 + signum)


class FiniteFlags:
    """The step's ``finite`` flags, kept on the device and read only at the loop's sync points.

    The jitted step computes one flag per replica: loss, gradients and the updated params
    and BatchNorm statistics all finite (a non-finite step changes no float leaf of the
    state, see ``steps.train_step_one``). The host reads the flags only where it syncs
    anyway: at each ``log_every_steps`` record, at the end of each epoch and before every
    checkpoint, so no state is saved before its flags are checked. Mode ``"stop"`` (the
    default of ``config.nonfinite``) then raises :class:`NonFiniteError` naming the first
    bad step and the last good checkpoint, which is left intact (nothing newer is written,
    metrics included); ``"skip"`` returns the skipped steps per seed for the loop to count.
    """

    def __init__(self, mode: str, seeds: Sequence[int], steps_per_epoch: int):
        self.mode, self.seeds, self.steps_per_epoch = mode, list(seeds), steps_per_epoch
        self.pending: list[tuple[int, jax.Array]] = []  # (global step, flags (num_seeds,))

    def add(self, step: int, flags: jax.Array) -> None:
        self.pending.append((step, flags))

    def check(self, last_checkpoint: Callable[[], Optional[Path]]) -> np.ndarray:
        """Skipped steps per seed (int32) since the last check; raises :class:`NonFiniteError` in "stop" mode."""
        if not self.pending:
            return np.zeros(len(self.seeds), np.int32)
        bad = ~np.asarray(jax.device_get([f for _, f in self.pending]), bool)  # (steps, seeds); one sync
        steps = [s for s, _ in self.pending]
        self.pending = []
        if self.mode == "stop" and bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            seeds = [self.seeds[j] for j in np.flatnonzero(bad[row])]
            step = steps[row]
            raise NonFiniteError(step, (step - 1) // self.steps_per_epoch + 1, seeds, last_checkpoint())
        return bad.sum(axis=0).astype(np.int32)
