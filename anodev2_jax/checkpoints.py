"""Orbax checkpoints of the train state: where they live, the latest complete one, save and wait.

Checkpoints live in ``workdir/checkpoints/<step>``, numbered by **global optimizer step**
(after epoch ``e`` that is ``e * steps_per_epoch``). Orbax writes each checkpoint into a
temporary directory and renames it into place only once complete (on a local file system;
a ``commit_success`` marker on object stores), and ``latest_step()`` never lists such
temporaries, so a checkpoint cut off mid-write is never loaded (leftovers are deleted at
the next start, ``cleanup_tmp_directories``). We rely on that rather than writing our own
marker. In multi-process runs orbax coordinates the processes' writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from anodev2_jax.errors import ConfigError, WriteError, os_error_text

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_steps",
    "last_checkpoint",
    "find_checkpoint_dir",
    "quiet_absl",
    "restore_latest",
    "restore_raw",
    "Checkpointer",
]

CHECKPOINT_DIR = "checkpoints"  # under the run directory


@contextlib.contextmanager
def quiet_absl():
    """Silences absl warnings (orbax's, while probing a checkpoint that may be bad: our error says it better)."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def restore_latest(ckpt_dir: Path, target: dict[str, Any]) -> Optional[tuple[int, dict[str, Any]]]:
    """``(step, checkpoint)`` of the latest complete checkpoint in ``ckpt_dir``, or None; writes nothing.

    Raises:
      ConfigError: the checkpoint cannot be read or does not match ``target`` in tree
        structure and shapes (orbax itself returns the stored shapes whatever the target
        says; dtypes it casts to the target's).
    """
    if not ckpt_dir.is_dir():
        return None
    with quiet_absl(), ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        path = ckpt_dir / str(step)
        fix = (
            f"it is corrupt or from another model, run or version: move {path} out of {ckpt_dir} to resume from "
            "the checkpoint before it (if any), or pass a new --workdir"
        )
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax / tensorstore raise many types for unreadable data
            raise ConfigError(f"checkpoint {path} cannot be restored ({os_error_text(e)}); {fix}") from None
    got, want = jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree_util.tree_flatten_with_path(target)[0]
    if [p for p, _ in got] != [p for p, _ in want]:
        raise ConfigError(f"checkpoint {path} holds another tree of arrays than this run's train state; {fix}")
    for (key, a), (_, b) in zip(got, want):
        if np.shape(a) != tuple(b.shape):
            name = jax.tree_util.keystr(key)
            raise ConfigError(f"checkpoint {path} has {name} of shape {np.shape(a)}, this run expects {tuple(b.shape)}; {fix}")
    return step, restored


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``ckpt_dir`` (orbax renames a checkpoint into place when complete)."""
    return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []


def last_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    steps = checkpoint_steps(ckpt_dir)
    return ckpt_dir / str(max(steps)) if steps else None


def find_checkpoint_dir(workdir: Path) -> Optional[Path]:
    """``workdir/checkpoints`` or ``workdir`` itself, whichever holds complete checkpoints (None if neither)."""
    for d in (workdir / CHECKPOINT_DIR, workdir):
        if checkpoint_steps(d):
            return d
    return None


def restore_raw(ckpt_dir: Path, step: Optional[int] = None) -> tuple[Any, int]:
    """The stored pytree of checkpoint ``step`` (default: the latest) without a target, and its step.

    Raises:
      ValueError: no complete checkpoint, or none of that step (the message lists the steps).
    """
    with ocp.CheckpointManager(Path(ckpt_dir).absolute()) as manager:
        steps = manager.all_steps()
        if not steps:
            raise ValueError(f"{ckpt_dir} holds no finished checkpoint; pass a run directory with one")
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise ValueError(f"{ckpt_dir} has no checkpoint {step}; available: {', '.join(map(str, sorted(steps)))}")
        return manager.restore(step, args=ocp.args.StandardRestore()), int(step)


class Checkpointer:
    """Saves the run's checkpoints (asynchronously, orbax) and reports any failure as a :class:`WriteError`.

    ``save(step, tree)`` writes ``checkpoints/<step>``; the last ``keep`` are kept. Saves are
    asynchronous: :meth:`wait` blocks until they are on disk; a failed background write is
    reported by the next :meth:`save` or :meth:`wait` (earlier checkpoints stay intact, the
    temporary directory is removed at the next start).
    """

    def __init__(self, ckpt_dir: Path, keep: int):
        self.dir = Path(ckpt_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.dir.absolute(), options=options)
        except OSError as e:
            raise WriteError(e.filename or f"the checkpoint directory {self.dir}", e, last_checkpoint(self.dir)) from e

    def save(self, step: int, tree: dict[str, Any]) -> Path:
        """Start writing checkpoint ``step`` of ``tree`` (a dict of arrays); returns its directory."""
        try:
            self.manager.save(step, args=ocp.args.StandardSave(tree))
        except Exception as e:  # includes the error of an earlier background write
            raise WriteError(f"a checkpoint in {self.dir}", e, last_checkpoint(self.dir)) from e
        return self.dir / str(step)

    def wait(self) -> None:
        """Block until every save is on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # orbax reports disk errors of a background write as ValueError & co.
            raise WriteError(f"a checkpoint in {self.dir}", e, last_checkpoint(self.dir)) from e

    def last_good(self) -> Optional[Path]:
        """The newest complete checkpoint, after letting a save in flight land (it is of a checked state)."""
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        return last_checkpoint(self.dir)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # an error in flight says more than a failed close
            self.manager.close()
