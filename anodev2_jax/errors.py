"""The training system's errors: each message is one line naming the cause and the fix.

``train.py`` maps them to exit statuses: :class:`ConfigError` (and
:class:`anodev2_jax.data.DataError`) 2, :class:`NonFiniteError` 3, :class:`WriteError` 4,
:class:`Preempted` ``128 + signum``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ConfigError", "NonFiniteError", "Preempted", "WriteError", "os_error_text"]


class ConfigError(ValueError):
    """A bad config or run directory; the message is one line naming the field and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; rerun to resume.

    Attributes:
      signum: the signal received (``signal.SIGTERM`` or ``signal.SIGINT``).
      step: the global step saved.
      checkpoint: the checkpoint directory written (``workdir/checkpoints/<step>``).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, steps_per_epoch: int):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        epoch, i = divmod(self.step, steps_per_epoch)
        where = f"end of epoch {epoch}" if i == 0 else f"step {i}/{steps_per_epoch} of epoch {epoch + 1}"
        super().__init__(
            f"received {signal.Signals(self.signum).name} at step {self.step} ({where}): saved checkpoint "
            f"{checkpoint}; rerun the same command to resume"
        )


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
    """Writing the run directory failed (disk full, quota, permissions); earlier checkpoints are intact."""

    def __init__(self, what: str, cause: BaseException, last_checkpoint: Optional[Path]):
        self.cause = cause
        resume = (
            f"it resumes from the last complete checkpoint {last_checkpoint}"
            if last_checkpoint is not None
            else "it starts over (no complete checkpoint yet)"
        )
        super().__init__(
            f"writing {what} failed: {os_error_text(cause)}; free disk space or fix the permissions there, then "
            f"rerun the same command: {resume}"
        )


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
