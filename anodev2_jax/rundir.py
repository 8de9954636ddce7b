"""The run directory: its checks, config.json, metrics.jsonl, TensorBoard event files and the progress line.

``workdir/config.json`` holds the run's config; a restart compares it with the new one
(:func:`check_workdir`). ``metrics.jsonl`` has one JSON object per seed every
``log_every_steps`` steps (``"kind": "step"``) and every epoch (``"kind": "epoch"``);
TensorBoard event files per seed live under ``workdir/tensorboard/seed<N>`` (tensorboardX,
no TensorFlow); ``summary.json`` is written at the end. Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from anodev2_jax import checkpoints, run_config
from anodev2_jax.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "check_workdir",
    "check_writable",
    "write_text",
    "read_metrics",
    "json_number",
    "MetricsLogger",
    "Progress",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def check_workdir(workdir: Path, cfg: dict[str, Any], steps_per_epoch: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Checks that ``workdir`` is new or holds a run of a compatible config; writes nothing.

    With ``steps_per_epoch``, also that no checkpoint (numbered by global step) lies beyond
    ``cfg["num_epochs"]``. Returns the stored config (a dict) or None for a fresh workdir.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; pass a directory to --workdir")
    stored_path = workdir / CONFIG_FILE
    if not stored_path.exists():
        if (workdir / "checkpoints").exists():
            raise ConfigError(
                f"workdir {workdir} has checkpoints but no {CONFIG_FILE}, so its config is unknown; "
                "use a new --workdir"
            )
        return None
    ckpt_dir = workdir / "checkpoints"
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
            raise ConfigError(
                f"workdir {workdir} holds a run with {name}={old!r}, but this config has {name}={new!r}; "
                f"use a new --workdir, or --config.{name}={old!r} to resume that run"
            )
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
        names = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "checkpoints", "tensorboard")
        paths += [workdir / n for n in names if (workdir / n).exists()]
    for p in paths:
        if not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise ConfigError(
                f"workdir {workdir} is not writable ({p} denies writing); fix the permissions "
                f"(e.g. chmod -R u+w {workdir}) or pass another --workdir"
            )


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


def read_metrics(path: Path, max_step: int) -> list[str]:
    """Lines of ``metrics.jsonl`` up to global step ``max_step`` (drops a crashed run's tail)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except ValueError:  # a line cut off by a crash
            continue
    return keep


def json_number(x):
    """``x``, or None (JSON null) for NaN: the mean of a window whose every step was skipped."""
    return None if isinstance(x, float) and math.isnan(x) else x


class MetricsLogger:
    """metrics.jsonl and TensorBoard (one writer per seed); only process 0 writes."""

    def __init__(self, workdir: Path, seeds: Sequence[int], resume_step: int, active: bool):
        self.active, self.seeds = active, list(seeds)
        if not active:
            return
        path = workdir / METRICS_FILE
        self.path = path
        kept = read_metrics(path, resume_step)
        write_text(path, "".join(line + "\n" for line in kept))  # atomic: a full disk loses no record
        self.file = path.open("a")
        from tensorboardX import SummaryWriter  # imported late: it is only needed once training starts

        self.writers = [SummaryWriter(str(workdir / "tensorboard" / f"seed{s}")) for s in self.seeds]

    def write(self, kind: str, epoch: int, step: int, per_seed: dict[str, np.ndarray], shared: dict[str, float]):
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
        except OSError as e:  # a failing write() does not name its file
            e.filename = e.filename or str(self.path)
            raise

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


class Progress:
    """One line per epoch: rewritten in place on a terminal, printed once otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
