"""Stopping a run: stop signals (SIGTERM from a scheduler, SIGINT from Ctrl-C) and non-finite steps.

A stop signal during the training loop is only recorded; the loop finishes the current
call (``config.steps_per_call`` steps), saves a checkpoint at its last step (and waits for
it) and raises :class:`anodev2_jax.errors.Preempted`. A non-finite step (NaN / Inf loss, gradients or
update) is flagged on the device; the host reads the flags only where it syncs anyway and
then stops (:class:`anodev2_jax.errors.NonFiniteError`) or counts the skipped steps.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from anodev2_jax.errors import NonFiniteError

__all__ = ["StopSignals", "FiniteFlags"]


class StopSignals:
    """SIGTERM / SIGINT during the training loop: the first is recorded (the loop saves and stops), a second aborts.

    The loop asks :meth:`requested` after every call (``steps_per_call`` steps; one on CPU); on
    a first signal it finishes the current call, saves a checkpoint at its last step (and
    waits for it), restores the previous handlers and raises ``Preempted`` naming the signal, step and checkpoint; ``train.py``
    prints that line and exits with ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), and
    rerunning the same command resumes. A second signal aborts at once (``KeyboardInterrupt``,
    nothing saved; the previous checkpoint stays valid). A signal arriving during the last
    epoch's evaluation lets the run finish; one arriving before the loop (while loading data
    or compiling the init) ends the process as usual, and the restart resumes from the last
    checkpoint.

    Handlers are installed only in the main thread of a single-process run and the
    previous ones are restored on exit. With several processes no Python handler is
    installed: ``requested`` asks JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``) instead, so all processes agree on
    the step to stop at and save the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> "StopSignals":
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop waiting for the save
            self._restore()
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name}): aborted without saving")
        self.signum = signum

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
