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

Damage of any kind to a checkpoint's directory (emptied, its ``default/`` item or its
metadata missing, a file where the directory should be) makes that checkpoint unusable,
never the others: the restore reads each step on its own (orbax's manager, asked for a step
whose ``default/`` item is missing, would otherwise switch to multi-item mode and refuse
every step).

Provenance (:class:`RunIdentity`): each save also records the run's id (a uuid4 made when
the run directory was created, ``run.json``), the config fields a restart may not change,
and how many ``metrics.jsonl`` records had been written. A restore given the run's identity
passes over, like a corrupt one, a checkpoint of another run (another run id, or other
config values: copied in from another run directory) and one whose metadata lacks the run
id or the digest, unless it is vouched for as older than them: a checkpoint the run
directory's ``run.json`` lists as adopted (present when code with run ids first opened a
run written before them, with the digest it had then), or, in a run directory not yet
adopted, a checkpoint without run id that has a digest, or that has none and predates
digests (``digest_free_until``: no ``sessions.jsonl``, which code writing digests keeps, or
a step at most the first session's start). Everything else without metadata (a deleted or
damaged ``_CHECKPOINT_METADATA``) is unusable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from anodev2_jax.errors import ConfigError, WriteError, is_out_of_memory

__all__ = [
    "CHECKPOINT_DIR",
    "checkpoint_steps",
    "last_checkpoint",
    "find_checkpoint_dir",
    "quiet_absl",
    "state_digest",
    "RunIdentity",
    "Rejected",
    "Restored",
    "read_metadata",
    "adoptable",
    "restore_latest",
    "restore_raw",
    "set_aside",
    "Checkpointer",
]

CHECKPOINT_DIR = "checkpoints"  # under the run directory
DIGEST_KEY = "anodev2_state_sha256"  # custom_metadata of a checkpoint: state_digest of what was saved
DEVICES_KEY = "anodev2_num_devices"  # ... and the device count of the run that saved it
RUN_ID_KEY = "anodev2_run_id"  # ... the id of the run that saved it (run.json)
CONFIG_KEY = "anodev2_config"  # ... its config fields a restart may not change (run_config.fixed_fields)
METRICS_KEY = "anodev2_metrics_records"  # ... and the number of metrics.jsonl records written before it
METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's per-step metadata file (it holds custom_metadata)
ITEM = "default"  # the state item of a checkpoint (orbax's single unnamed item)


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


class RunIdentity(NamedTuple):
    """What ties a checkpoint to the run resuming from it (see the module docstring).

    Example: ``RunIdentity("3f2a...", {"model": "resnet4", ...})`` for a run created with run ids.
    """

    run_id: Optional[str]  # this run's id; None: a run written before run ids, not adopted yet (no run.json)
    config: dict[str, Any]  # the fields a restart may not change, ODE knobs resolved (run_config.fixed_fields)
    adopted: Mapping[int, Optional[str]] = {}  # run.json: steps from before run ids -> digest (None: before digests)
    digest_free_until: float = -1  # without run id: the highest step that may lack a digest (math.inf: any)


class Rejected(NamedTuple):
    """A checkpoint :func:`restore_latest` passed over: its path, why (after the path, one line), and whose."""

    path: Path
    why: str
    foreign: bool = False  # another run's (set aside as <step>.foreign), not damaged (<step>.corrupt)


class Restored(NamedTuple):
    """The checkpoint :func:`restore_latest` resumes from."""

    step: int
    tree: dict[str, Any]
    num_devices: Optional[int]  # the device count of the run that wrote it (None: not recorded, older code)
    verified: bool  # its digest matched (False: written before digests; tree, shapes and finiteness checked)
    rejected: tuple[Rejected, ...]  # newer checkpoints that cannot be used, newest first, and why
    digest: str = ""  # state_digest of the tree restored
    metrics_records: Optional[int] = None  # metrics.jsonl records written before it (None: not recorded, older code)


class _Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message says why, after its path."""

    def __init__(self, why: str, foreign: bool = False):
        super().__init__(why)
        self.foreign = foreign


def _restore_error_text(e: BaseException) -> str:
    """The cause of a failed orbax restore in a few words, without TensorStore's internals."""
    text = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError) or "NOT_FOUND" in text:
        return "a file of it is missing"
    if any(w in text for w in ("DATA_LOSS", "Error decoding", "error while reading", "Encountered error")):
        return "its data does not decode"
    first = text.split(". ")[0].split(" See full TensorStore")[0]
    return f"{type(e).__name__}: {first[:200]}"


def read_metadata(step_dir: Path) -> Optional[dict[str, Any]]:
    """The custom metadata saved with the checkpoint ``step_dir`` (digest, run id, ...); None if missing or unreadable.

    Read from orbax's ``_CHECKPOINT_METADATA`` JSON directly: orbax logs an error for a
    damaged file and returns empty metadata, which would look like a checkpoint from
    before digests.
    """
    try:
        meta = json.loads((step_dir / METADATA_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    custom = meta.get("custom_metadata") or {}  # {} (or absent): saved without any, as before digests
    return dict(custom) if isinstance(custom, dict) else None


def _config_difference(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> Optional[str]:
    """``"learning_rate=0.1 (this run has 0.01)"`` for the first field both record that differs, or None.

    Fields one side lacks (added to the config after that checkpoint was written) are not compared.
    """
    for name in sorted(set(theirs) & set(ours)):
        if theirs[name] != ours[name]:
            return f"{name}={theirs[name]!r} (this run has {ours[name]!r})"
    return None


def _vouch(step: int, meta: Optional[dict[str, Any]], identity: RunIdentity) -> Optional[str]:
    """The digest checkpoint ``step`` must match, or None where none is required (before digests); raises _Unusable.

    Checked before any array is read: a checkpoint of another run is passed over without reading it.
    """
    if meta is None:
        if identity.run_id is not None and identity.adopted.get(step) is not None:
            return identity.adopted[step]  # adopted with its digest: still verifiable
        raise _Unusable(f"has no readable {METADATA_FILE} (its digest and run id): it is damaged")
    run_id, digest = meta.get(RUN_ID_KEY), meta.get(DIGEST_KEY)
    if run_id is not None:
        difference = _config_difference(meta.get(CONFIG_KEY) or {}, identity.config)
        if run_id != identity.run_id:
            who = (
                f"this run's is {identity.run_id}"
                if identity.run_id
                else "the run directory has no run.json naming its run: if that was deleted, restore it as "
                f'{{"run_id": "{run_id}"}}'
            )
            detail = f", with {difference}" if difference else ""
            raise _Unusable(f"was written by another run (run id {run_id}{detail}; {who})", foreign=True)
        if difference:
            raise _Unusable(f"records {difference}: it is another run's, or its metadata was changed", foreign=True)
        if digest is None:
            raise _Unusable("has no digest in its metadata, which this run writes with every checkpoint: it is damaged")
        return digest
    # Written before run ids (or its metadata lost them).
    if identity.run_id is not None:
        if step not in identity.adopted:
            raise _Unusable(
                "carries no run id, so this run did not write it (every checkpoint this run writes carries its id, "
                "and run.json lists the older ones it adopted): it is another run's, or its metadata was damaged"
            )
        adopted = identity.adopted[step]
        if adopted is not None and digest is not None and digest != adopted:
            raise _Unusable("has another digest than when this run adopted it: its metadata changed (corrupt)")
        return adopted if adopted is not None else digest
    if digest is not None:
        return digest
    if step > identity.digest_free_until:
        raise _Unusable(
            "has no digest, but sessions.jsonl shows this run was trained by code that saves one with every "
            "checkpoint: its metadata was deleted or damaged (or it is another run's)"
        )
    return None


def _check(
    step_dir: Path, step: int, target: dict[str, Any], identity: Optional[RunIdentity]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Restores checkpoint ``step`` against ``target`` and verifies it; raises :class:`_Unusable`.

    Returns the tree, its custom metadata and its digest.
    """
    if not step_dir.is_dir():
        raise _Unusable("is not a directory (a checkpoint is a folder)")
    if not (step_dir / ITEM).is_dir():
        what = "is empty" if not any(step_dir.iterdir()) else f"has no {ITEM}/ item (its arrays)"
        raise _Unusable(f"{what}: it is incomplete or damaged")
    meta = read_metadata(step_dir)
    if identity is not None:
        expected = _vouch(step, meta, identity)
    else:  # no run to tie it to: the digest it carries, if any
        expected = (meta or {}).get(DIGEST_KEY)
    try:
        # A manager of its own per step: orbax locks a manager into default- or multi-item mode
        # at its first restore; one damaged step must not decide it for the others.
        with ocp.CheckpointManager(
            step_dir.parent.absolute(),
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers=ocp.StandardCheckpointHandler(),
        ) as manager:
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
    digest = state_digest(restored)
    if expected is not None:
        if digest != expected:
            raise _Unusable("does not match the digest saved with it: its data changed on disk (corrupt)")
    elif not all(np.isfinite(_host(a)).all() for _, a in got if np.issubdtype(np.dtype(a.dtype), np.inexact)):
        # No state is ever saved with NaN / Inf (a non-finite step changes no float leaf).
        raise _Unusable("holds NaN or Inf values, which no saved state has: its data changed on disk (corrupt)")
    return restored, {**(meta or {}), DIGEST_KEY: expected}, digest


def restore_latest(ckpt_dir: Path, target: dict[str, Any], identity: Optional[RunIdentity] = None) -> Optional[Restored]:
    """The newest complete checkpoint in ``ckpt_dir`` that restores and verifies against ``target``; writes nothing.

    A checkpoint that cannot be read (damaged in any way: emptied, an item or its metadata
    missing), holds another tree or other shapes than ``target`` (orbax itself returns the
    stored shapes whatever the target says; dtypes it casts to the target's), fails its
    integrity check, or, given the run's ``identity``, belongs to another run or is not
    vouched for (see the module docstring) is passed over for the one before it; the caller
    reports (and moves aside) those in ``rejected``. Without ``identity`` a checkpoint is
    verified against the digest it carries, if any.

    Returns:
      None for a directory without complete checkpoints.

    Raises:
      ConfigError: no complete checkpoint can be used; names the newest and why.
    """
    if not ckpt_dir.is_dir():
        return None
    rejected: list[Rejected] = []
    with quiet_absl():
        for step in sorted(checkpoint_steps(ckpt_dir, directories_only=False), reverse=True):
            path = ckpt_dir / str(step)
            try:
                tree, meta, digest = _check(path, step, target, identity)
            except _Unusable as e:
                rejected.append(Rejected(path, str(e), e.foreign))
                continue
            verified = meta.get(DIGEST_KEY) is not None
            return Restored(step, tree, meta.get(DEVICES_KEY), verified, tuple(rejected), digest, meta.get(METRICS_KEY))
    if not rejected:
        return None
    (newest, why, _), others = rejected[0], len(rejected) - 1
    before = f"nor can the {others} before it" if others else "and there is no earlier checkpoint"
    raise ConfigError(
        f"checkpoint {newest} {why}, {before}; it is corrupt or from another model, run or version: pass a new "
        f"--workdir, or move {ckpt_dir} out of the way to start this run over"
    )


def adoptable(ckpt_dir: Path, identity: RunIdentity, skip: tuple[Path, ...] = ()) -> dict[int, Optional[str]]:
    """The checkpoints of a run written before run ids that it may keep resuming from, with their digests.

    For ``run.json``'s ``adopted`` when code with run ids first opens such a run: every
    complete checkpoint (but those in ``skip``, set aside) without a run id that has a
    digest or predates digests (``identity.digest_free_until``); None for the digest of the
    latter. Reads only metadata.
    """
    out: dict[int, Optional[str]] = {}
    for step in sorted(checkpoint_steps(ckpt_dir)):
        meta = read_metadata(ckpt_dir / str(step))
        if ckpt_dir / str(step) in skip or meta is None or meta.get(RUN_ID_KEY) is not None:
            continue
        if meta.get(DIGEST_KEY) is not None or step <= identity.digest_free_until:
            out[step] = meta.get(DIGEST_KEY)
    return out


def set_aside(path: Path, kind: str = "corrupt") -> Path:
    """Renames the unusable checkpoint ``path`` to ``<step>.<kind>[-N]`` beside it (kept for inspection).

    ``kind``: ``"corrupt"`` (damaged) or ``"foreign"`` (another run's). Out of orbax's
    listing (not a step number), so the run can save that step again.
    """
    aside, n = path.with_name(f"{path.name}.{kind}"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.{kind}-{n}")
    path.rename(aside)
    return aside


def checkpoint_steps(ckpt_dir: Path, directories_only: bool = True) -> list[int]:
    """Steps of the complete checkpoints in ``ckpt_dir`` (orbax renames a checkpoint into place when complete).

    ``directories_only=False`` also lists entries named by a step that are not folders (damage, for the restore to name).
    """
    if not ckpt_dir.is_dir():
        return []
    return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and (p.is_dir() or not directories_only)]


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
    with ocp.CheckpointManager(Path(ckpt_dir).absolute(), item_handlers=ocp.StandardCheckpointHandler()) as manager:
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

    def __init__(self, ckpt_dir: Path, keep: int, identity: Optional[RunIdentity] = None):
        """``identity``: the run whose checkpoints these are (its id and fixed config go into each one's metadata)."""
        self.dir = Path(ckpt_dir)
        self.identity = {} if identity is None else {RUN_ID_KEY: identity.run_id, CONFIG_KEY: identity.config}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.dir.absolute(), options=options)
        except OSError as e:
            raise WriteError(e.filename or f"the checkpoint directory {self.dir}", e, last_checkpoint(self.dir)) from e

    def save(
        self, step: int, tree: dict[str, Any], num_devices: Optional[int] = None, metrics_records: Optional[int] = None
    ) -> Path:
        """Start writing checkpoint ``step`` of ``tree`` (a dict of arrays) with its digest; returns its directory.

        The digest is computed here, on the host, from the arrays handed to orbax (a copy of
        the state to the host, which orbax makes too before writing in the background). The
        run's identity (``identity`` of the constructor) and ``metrics_records`` (the
        ``metrics.jsonl`` records written so far) are saved beside it.
        """
        meta = {DIGEST_KEY: state_digest(tree), DEVICES_KEY: num_devices, **self.identity}
        if metrics_records is not None:
            meta[METRICS_KEY] = int(metrics_records)
        try:
            self.manager.save(step, args=ocp.args.StandardSave(tree), custom_metadata=meta)
        except Exception as e:  # includes the error of an earlier background write
            if is_out_of_memory(e):  # the host copy of the state: not a write that failed
                raise
            raise WriteError(f"a checkpoint in {self.dir}", e, last_checkpoint(self.dir)) from e
        return self.dir / str(step)

    def wait(self) -> None:
        """Block until every save is on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # orbax reports disk errors of a background write as ValueError & co.
            if is_out_of_memory(e):
                raise
            raise WriteError(f"a checkpoint in {self.dir}", e, last_checkpoint(self.dir)) from e

    def last_good(self) -> Optional[Path]:
        """The newest complete checkpoint, after letting a save in flight land (it is of a checked state)."""
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        return last_checkpoint(self.dir)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # an error in flight says more than a failed close
            self.manager.close()
