"""Orbax checkpoints of the train state: where they live, save and wait, and a verified restore.

Checkpoints live in ``workdir/checkpoints/<step>``, numbered by **global optimizer step**
(after epoch ``e`` that is ``e * steps_per_epoch``). Orbax writes each checkpoint into a
temporary directory and renames it into place only once complete (on a local file system;
a ``commit_success`` marker on object stores), and ``latest_step()`` never lists such
temporaries, so a checkpoint cut off mid-write is never loaded (leftovers are deleted at
the next start, ``cleanup_tmp_directories``). We rely on that rather than writing our own
marker. In multi-process runs orbax coordinates the processes' writes.

Integrity: a checkpoint that is complete can still be damaged later (a flipped bit on
disk or in transit) and decode to other numbers without any error. So each save records
:func:`state_digest` of the exact arrays saved (sha256 over every leaf's key path, dtype,
shape and bytes, in flattened order) in the checkpoint's own metadata (orbax's
``custom_metadata``, stored in ``<step>/_CHECKPOINT_METADATA``, which orbax writes into the
temporary directory before the rename: the digest is part of the atomic checkpoint, and
the state item ``default`` is unchanged, so older checkpoints stay readable). A restore
recomputes it from the arrays read back; a checkpoint that does not match (or cannot be
read, or holds another tree) is skipped for the newest earlier one that verifies
(:func:`restore_latest`). Checkpoints written before digests (no ``custom_metadata``) are
checked for readability, tree, shapes and finite values only. The device count that wrote
each checkpoint is recorded beside the digest.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from anodev2_jax.errors import ConfigError, WriteError

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_steps",
    "last_checkpoint",
    "find_checkpoint_dir",
    "quiet_absl",
    "state_digest",
    "Restored",
    "restore_latest",
    "restore_raw",
    "set_aside",
    "Checkpointer",
]

CHECKPOINT_DIR = "checkpoints"  # under the run directory
DIGEST_KEY = "anodev2_state_sha256"  # custom_metadata of a checkpoint: state_digest of what was saved
DEVICES_KEY = "anodev2_num_devices"  # ... and the device count of the run that saved it


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


def _host(x) -> np.ndarray:
    """A host copy of a leaf; of a replicated global array, one device's full copy (multi-process safe)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def state_digest(tree: Any) -> str:
    """sha256 (hex) over every leaf of ``tree``, in flattened order: key path, dtype, shape and C-order bytes.

    The key path is written ``a/0/b`` whatever the containers (dict, tuple, namedtuple), so a
    tree read back as another container type of the same layout has the same digest.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(_host(leaf))
        h.update(f"{jax.tree_util.keystr(path, simple=True, separator='/')}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Restored(NamedTuple):
    """The checkpoint :func:`restore_latest` resumes from."""

    step: int
    tree: dict[str, Any]
    num_devices: Optional[int]  # the device count of the run that wrote it (None: not recorded, older code)
    verified: bool  # its digest matched (False: written before digests; tree, shapes and finiteness checked)
    rejected: tuple[tuple[Path, str], ...]  # newer checkpoints that cannot be used, newest first, and why


class _Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message says why, after its path."""


def _restore_error_text(e: BaseException) -> str:
    """The cause of a failed orbax restore in a few words, without TensorStore's internals."""
    text = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError) or "NOT_FOUND" in text:
        return "a file of it is missing"
    if any(w in text for w in ("DATA_LOSS", "Error decoding", "error while reading", "Encountered error")):
        return "its data does not decode"
    first = text.split(". ")[0].split(" See full TensorStore")[0]
    return f"{type(e).__name__}: {first[:200]}"


def _check(manager, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores checkpoint ``step`` against ``target`` and verifies it; raises :class:`_Unusable`."""
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax / tensorstore raise many types for unreadable data
        raise _Unusable(f"cannot be restored ({_restore_error_text(e)})") from None
    got, want = jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree_util.tree_flatten_with_path(target)[0]
    if [p for p, _ in got] != [p for p, _ in want]:
        raise _Unusable("holds another tree of arrays than this run's train state")
    for (key, a), (_, b) in zip(got, want):
        if np.shape(a) != tuple(b.shape):
            name = jax.tree_util.keystr(key)
            raise _Unusable(f"has {name} of shape {np.shape(a)}, this run expects {tuple(b.shape)}")
    try:
        meta = dict(manager.metadata(step).custom_metadata or {})
    except Exception:  # no step metadata at all: as old as it gets
        meta = {}
    if DIGEST_KEY in meta:
        if state_digest(restored) != meta[DIGEST_KEY]:
            raise _Unusable("does not match the digest saved with it: its data changed on disk (corrupt)")
    elif not all(np.isfinite(_host(a)).all() for _, a in got if np.issubdtype(np.dtype(a.dtype), np.inexact)):
        # No state is ever saved with NaN / Inf (a non-finite step changes no float leaf).
        raise _Unusable("holds NaN or Inf values, which no saved state has: its data changed on disk (corrupt)")
    return restored, meta


def restore_latest(ckpt_dir: Path, target: dict[str, Any]) -> Optional[Restored]:
    """The newest complete checkpoint in ``ckpt_dir`` that restores and verifies against ``target``; writes nothing.

    A checkpoint that cannot be read, holds another tree or other shapes than ``target``
    (orbax itself returns the stored shapes whatever the target says; dtypes it casts to
    the target's), or fails its integrity check (see the module docstring) is passed over
    for the one before it; the caller reports (and moves aside) those in ``rejected``.

    Returns:
      None for a directory without complete checkpoints.

    Raises:
      ConfigError: no complete checkpoint can be used; names the newest and why.
    """
    if not ckpt_dir.is_dir():
        return None
    rejected: list[tuple[Path, str]] = []
    with quiet_absl(), ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            path = ckpt_dir / str(step)
            try:
                tree, meta = _check(manager, step, target)
            except _Unusable as e:
                rejected.append((path, str(e)))
                continue
            return Restored(step, tree, meta.get(DEVICES_KEY), DIGEST_KEY in meta, tuple(rejected))
    if not rejected:
        return None
    (newest, why), others = rejected[0], len(rejected) - 1
    before = f"nor can the {others} before it" if others else "and there is no earlier checkpoint"
    raise ConfigError(
        f"checkpoint {newest} {why}, {before}; it is corrupt or from another model, run or version: pass a new "
        f"--workdir, or move {ckpt_dir} out of the way to start this run over"
    )


def set_aside(path: Path) -> Path:
    """Renames the unusable checkpoint ``path`` to ``<step>.corrupt[-N]`` beside it (kept for inspection).

    Out of orbax's listing (not a step number), so the run can save that step again.
    """
    aside, n = path.with_name(f"{path.name}.corrupt"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{n}")
    path.rename(aside)
    return aside


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

    def save(self, step: int, tree: dict[str, Any], num_devices: Optional[int] = None) -> Path:
        """Start writing checkpoint ``step`` of ``tree`` (a dict of arrays) with its digest; returns its directory.

        The digest is computed here, on the host, from the arrays handed to orbax (a copy of
        the state to the host, which orbax makes too before writing in the background).
        """
        meta = {DIGEST_KEY: state_digest(tree), DEVICES_KEY: num_devices}
        try:
            self.manager.save(step, args=ocp.args.StandardSave(tree), custom_metadata=meta)
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
