"""The training loop: ``train_and_evaluate(config, workdir)`` trains, evaluates and writes a run directory.

It trains ``config.num_seeds`` replicas of ``get_model(config.model, config.method, **ODE
knobs)`` with the recipe of Appendix C (:mod:`anodev2_jax.optim`; batch 256, standard CIFAR
augmentation on the device) and returns the summary it writes to ``workdir/summary.json``.
``train.py`` is a thin command-line wrapper around it. It reads top to bottom as
:func:`prepare` (every check and the restore of the latest checkpoint; writes nothing) ->
the run directory's lock (one writer per run directory) -> open the run directory ->
epochs (:class:`Trainer`) -> summary. A finished run (its ``summary.json`` beside its final
checkpoint) is reported and left as it is: nothing is written, not even the lock. The
pieces live beside it, one concern per module: :mod:`~anodev2_jax.run_config`,
:mod:`~anodev2_jax.optim`, :mod:`~anodev2_jax.steps`, :mod:`~anodev2_jax.engine` (the data on the
devices, several steps per call), :mod:`~anodev2_jax.sharding`,
:mod:`~anodev2_jax.rundir`, :mod:`~anodev2_jax.checkpoints`, :mod:`~anodev2_jax.stopping`,
:mod:`~anodev2_jax.errors`.

Determinism: on one machine (CPU), training is bitwise deterministic for a fixed config and
seed: every random choice derives from (seed, epoch, step), XLA:CPU runs the same program in
the same order, and so a run killed (even with SIGKILL) and resumed any number of times ends
with exactly the params, optimizer state and metrics (timings aside) of an uninterrupted one
(``tests/test_reliability.py``). It needs the same jax/jaxlib version, XLA flags, device
count (the gradient all-reduce sums in device order) and ``steps_per_call``: another value,
or another CPU (XLA:CPU compiles for the CPU it runs on), is another compiled program, which
gives every step the same batch, key and learning rate and the numbers to float32 round-off,
not bitwise (:mod:`~anodev2_jax.engine`). On GPU bits do **not** hold by default: XLA:GPU
reductions and scatters may use atomics (the order of float additions varies run to run)
and cuDNN / cuBLAS autotuning may choose different algorithms, so runs differ by round-off
that training amplifies; ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (with
``--xla_gpu_autotune_level=0`` for fixed algorithm choice) makes them reproducible at
some speed cost. A resumed GPU run is still a valid continuation, just not a bitwise copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anodev2_jax import checkpoints, engine, models, optim, rundir, run_config, sharding, steps, stopping
from anodev2_jax import data as data_lib
from anodev2_jax.engine import epoch_indices
from anodev2_jax.errors import (
    ConfigError, NonFiniteError, OutOfMemory, Preempted, WorkdirInUse, WorkdirMismatch, WriteError, is_out_of_memory,
)  # fmt: skip
from anodev2_jax.run_config import RESUMABLE_FIELDS, default_workdir, validate_config
from anodev2_jax.steps import TrainState

__all__ = [
    "ConfigError",
    "WorkdirInUse",
    "WorkdirMismatch",
    "NonFiniteError",
    "Preempted",
    "WriteError",
    "OutOfMemory",
    "RESUMABLE_FIELDS",
    "TrainState",
    "default_workdir",
    "validate_config",
    "epoch_indices",
    "zero_loop",
    "EPOCH_TRANSFER_GUARD",
    "Plan",
    "prepare",
    "Trainer",
    "train_and_evaluate",
]


# The loop's per-seed accumulators, saved with every checkpoint as "loop": float32 sums of the
# step losses and accuracies since the epoch / the last log_every_steps record began
# ("epoch_*" / "window_*"), and int32 counts of skipped (non-finite) steps in the epoch, the
# window and the whole run ("*_skipped"). A checkpoint mid-epoch so resumes to exactly the
# uninterrupted result.
_LOOP_DTYPES = {
    "epoch_loss": np.float32, "epoch_accuracy": np.float32, "window_loss": np.float32, "window_accuracy": np.float32,
    "epoch_skipped": np.int32, "window_skipped": np.int32, "skipped": np.int32,
}  # fmt: skip


def zero_loop(num_seeds: int) -> dict[str, np.ndarray]:
    """The loop's accumulators at the start of a run (see ``_LOOP_DTYPES``)."""
    return {k: np.zeros(num_seeds, dtype) for k, dtype in _LOOP_DTYPES.items()}


# The jax.transfer_guard the epoch's calls, the folds of their metrics and the evaluation
# run under. The tests set "disallow": then any implicit host <-> device copy inside an
# epoch fails, while the explicit placements before it (the data, the epoch's index
# array) and the explicit reads of the calls' metrics are allowed.
EPOCH_TRANSFER_GUARD = "allow"


def _mean(total, count: np.ndarray) -> np.ndarray:
    """float64 ``total / count`` per seed; NaN where every step was skipped."""
    total = np.asarray(total, np.float64)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything :func:`prepare` worked out for a run; building it wrote nothing."""

    config: ml_collections.ConfigDict
    cfg: dict[str, Any]  # the config as plain JSON data (config.json)
    workdir: Path
    model: Any
    mesh: jax.sharding.Mesh
    ds: data_lib.Dataset
    seeds: list[int]
    seeds_arr: jax.Array  # int32 (num_seeds,), replicated
    batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    steps_per_call: int  # resolved: >= 1, at most steps_per_epoch (engine.resolve_steps_per_call)
    data_on_device: bool  # engine.DeviceEngine (True) or the per-step host gather, engine.HostEngine
    programs: steps.Programs
    num_params: int
    snapshot: tuple  # rundir.snapshot of the workdir before it was read
    finished: Optional[dict[str, Any]] = None  # the summary.json of a finished run (then nothing is restored)
    restored: Optional[tuple[TrainState, dict[str, np.ndarray]]] = None  # the latest usable checkpoint's state and loop
    restored_devices: Optional[int] = None  # the device count that wrote it (None: not recorded)
    rejected: tuple[checkpoints.Rejected, ...] = ()  # newer checkpoints that cannot be used, and why
    metrics: tuple[str, ...] = ()  # the lines of metrics.jsonl up to the restored step
    identity: Optional[checkpoints.RunIdentity] = None  # what ties a checkpoint to this run
    run_record: Optional[dict[str, Any]] = None  # run.json to write (a new run, or one from before run ids)
    metrics_warning: Optional[str] = None  # metrics.jsonl lost records older than the restored checkpoint

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.workdir / checkpoints.CHECKPOINT_DIR

    @property
    def final_step(self) -> int:
        return self.config.num_epochs * self.steps_per_epoch


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, probe: bool = True) -> Plan:
    """Every check of a run, then the restore of its latest usable checkpoint; nothing is created or written.

    ``probe``: first ask whether another run holds the workdir's lock (False when this run
    holds it and reads the directory again).

    Raises:
      ConfigError, anodev2_jax.data.DataError: one line naming the field, file or
        checkpoint and the fix (config fields, model and method knobs, devices, data, the
        workdir's config or metrics, a workdir another run holds, no usable checkpoint, no
        write permission).
    """
    validate_config(config)
    workdir = run_config.resolve_workdir(workdir)
    if probe:
        rundir.check_not_in_use(workdir)  # a busy workdir stops here, before data or checkpoints are read
    cfg = run_config.config_dict(config)
    model = steps.create_model(config)
    mesh = sharding.make_mesh()
    num_devices = mesh.devices.size
    batch_size, eval_batch_size = config.batch_size, config.eval_batch_size or config.batch_size
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value % num_devices:
            raise ConfigError(
                f"config.{name}={value} does not divide over the {num_devices} devices; "
                f"use a multiple of {num_devices} for --config.{name}"
            )
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir, num_train=config.num_train, num_test=config.num_test, seed=config.data_seed
    )
    for name, split, have in (("num_train", "training", len(ds.y_train)), ("num_test", "test", len(ds.y_test))):
        if config[name] is not None and have < config[name]:  # config.json would record images the run never had
            raise ConfigError(
                f"config.{name}={config[name]} exceeds the {have} {split} images of dataset {config.dataset!r}; "
                f"lower --config.{name} to {have} or less, or leave it unset (all of them)"
            )
    num_train = len(ds.y_train)
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={batch_size} exceeds the {num_train} training examples, so an epoch has no "
            "full batch; lower --config.batch_size or raise --config.num_train"
        )
    if config.num_epochs * steps_per_epoch > run_config.MAX_SEED:  # the global step is int32
        raise ConfigError(
            f"config.num_epochs={config.num_epochs} makes {config.num_epochs * steps_per_epoch} steps, beyond int32; "
            "lower --config.num_epochs"
        )
    snapshot = rundir.snapshot(workdir)
    data_on_device = sharding.fits_on_devices(engine.dataset_bytes(ds), mesh)
    steps_per_call = engine.resolve_steps_per_call(config.steps_per_call, steps_per_epoch, data_on_device, jax.default_backend())
    stored = rundir.check_workdir(workdir, cfg, steps_per_epoch)
    legacy = run_config.legacy_defaults(stored)
    if legacy:  # written before a method default changed: resume with the old default, bitwise as before
        model = steps.create_model(config, defaults=legacy)
        cfg = {k: v for k, v in cfg.items() if k in stored or k not in run_config.CHANGED_DEFAULTS}
    rundir.check_writable(workdir)
    seeds = [config.seed + i for i in range(config.num_seeds)]
    progs = steps.programs(model, optim.OptimizerSpec.from_config(config, steps_per_epoch), mesh, len(seeds), config.augment)
    abstract_one = jax.eval_shape(lambda s: steps.init_one(model, progs.tx, s), jnp.zeros((), jnp.int32))
    repl = sharding.replicated(mesh)
    seeds_arr = sharding.put_global(np.asarray(seeds, np.int32), repl)
    plan = Plan(
        config, cfg, workdir, model, mesh, ds, seeds, seeds_arr, batch_size, eval_batch_size, steps_per_epoch,
        steps_per_call, data_on_device, progs, models.count_params(abstract_one.params), snapshot,
    )  # fmt: skip
    finished = rundir.finished_summary(workdir, plan.final_step)
    if finished is not None:
        return dataclasses.replace(plan, finished=finished)
    record = rundir.read_run_record(workdir) if stored is not None else None  # a damaged run.json is bad input
    fixed = run_config.fixed_fields(cfg, legacy)
    if record is not None:
        adopted = {int(step): digest for step, digest in record.get("adopted", {}).items()}
        identity = checkpoints.RunIdentity(record["run_id"], fixed, adopted)
    else:  # a new run, or one written before run ids (it gets its id now)
        identity = checkpoints.RunIdentity(None, fixed, {}, rundir.digest_free_until(workdir))
    plan = dataclasses.replace(plan, identity=identity, run_record=rundir.new_run_record() if stored is None else None)
    restored = _restore(plan)
    if restored is None:
        return plan
    state_and_loop, info = restored
    if record is None:  # adopt the checkpoints it has (those not set aside), vouched for as older than run ids
        adopted = checkpoints.adoptable(plan.ckpt_dir, identity, tuple(r.path for r in info.rejected))
        adopted[info.step] = info.digest  # verified, or (from before digests) read back finite: its digest from now on
        plan = dataclasses.replace(plan, run_record=rundir.new_run_record(adopted))
    metrics = rundir.read_metrics(workdir / rundir.METRICS_FILE, info.step)
    shortfall = rundir.metrics_shortfall(workdir / rundir.METRICS_FILE, metrics, info.metrics_records, info.step)
    return dataclasses.replace(
        plan, restored=state_and_loop, restored_devices=info.num_devices, rejected=info.rejected, metrics=tuple(metrics),
        metrics_warning=shortfall,
    )  # fmt: skip


def _restore(plan: Plan) -> Optional[tuple[tuple[TrainState, dict[str, np.ndarray]], checkpoints.Restored]]:
    """The state and loop accumulators of the latest usable checkpoint (None for a new run); writes nothing."""
    repl = sharding.replicated(plan.mesh)
    abstract = jax.eval_shape(plan.programs.init, plan.seeds_arr)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), _as_checkpoint(abstract))
    restored = checkpoints.restore_latest(plan.ckpt_dir, {**target, "loop": zero_loop(len(plan.seeds))}, plan.identity)
    if restored is None:
        return None
    tree = dict(restored.tree)
    loop = {k: np.asarray(v) for k, v in tree.pop("loop").items()}
    state = TrainState(**tree)
    if int(np.asarray(state.step)[0]) != restored.step:
        raise ConfigError(
            f"checkpoint {plan.ckpt_dir / str(restored.step)} holds global step {int(np.asarray(state.step)[0])}, "
            f"not {restored.step}: it was written by another version; pass a new --workdir"
        )
    return (state, loop), restored


def _as_checkpoint(state: TrainState) -> dict[str, Any]:
    """The checkpoint pytree of a train state (the ``"loop"`` accumulators are added beside it)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def open_run_directory(plan: Plan) -> checkpoints.Checkpointer:
    """Writes ``run.json`` (if new), ``config.json``, a ``sessions.jsonl`` line; sets bad checkpoints aside; opens the manager.

    Process 0 writes; called with the run directory's lock held.
    """
    sharding.sync_processes("anodev2_jax:workdir_checked")  # no process still reads config.json as process 0 writes it
    try:
        if plan.is_main:
            plan.workdir.mkdir(parents=True, exist_ok=True)
            if plan.run_record is not None:  # before config.json: a run directory with a config has its run id
                rundir.write_text(plan.workdir / rundir.RUN_FILE, json.dumps(plan.run_record, indent=2) + "\n")
            text = json.dumps(plan.cfg, indent=2, sort_keys=True) + "\n"
            rundir.write_text(plan.workdir / rundir.CONFIG_FILE, text)
            resumed = plan.ckpt_dir / str(_restored_step(plan))
            for bad in plan.rejected:  # out of the way, so that the run can save those steps again
                aside = checkpoints.set_aside(bad.path, "foreign" if bad.foreign else "corrupt")
                moved = f"resuming from {resumed} instead ({bad.path} moved to {aside})"
                rundir.say(f"warning: checkpoint {bad.path} {bad.why}; {moved}", sys.stderr)
            if plan.metrics_warning:
                rundir.say(plan.metrics_warning, sys.stderr)
            rundir.append_session(plan.workdir, _session(plan))
    except OSError as e:
        raise WriteError(
            e.filename or f"the run directory {plan.workdir}", e, checkpoints.last_checkpoint(plan.ckpt_dir)
        ) from e
    sharding.sync_processes("anodev2_jax:workdir_open")  # every process lists the checkpoints left in place
    run_id = plan.identity.run_id
    if plan.run_record is not None:  # made now: process 0's (each process drew its own uuid)
        run_id = plan.run_record["run_id"] if plan.is_main else rundir.read_run_record(plan.workdir)["run_id"]
    identity = plan.identity._replace(run_id=run_id)
    return checkpoints.Checkpointer(plan.ckpt_dir, plan.config.keep_checkpoints, identity)


def _session(plan: Plan) -> dict[str, Any]:
    """The ``sessions.jsonl`` record of this start: where it resumed and what it ran on."""
    return {
        "start_step": _restored_step(plan),
        "num_devices": plan.num_devices,
        "num_processes": jax.process_count(),
        "platform": plan.mesh.devices.flat[0].platform,
        "jax": jax.__version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class Trainer:
    """The epoch loop of one run, with its state explicit: train state, global step, accumulators, timers.

    An epoch is a few calls of the engine (:mod:`anodev2_jax.engine`), each running
    ``plan.steps_per_call`` steps on the device (the last call of an epoch may be shorter).
    A call returns its per-step metrics, which stay on the device until the loop needs
    them: at a ``log_every_steps`` boundary, a progress update, a stop and the epoch's end,
    :meth:`fold` reads every pending call's metrics in one copy and adds them, step by step
    in order, to ``tally`` (the :func:`zero_loop` accumulators), writing each step record
    as its step passes. So the sums, records and checkpoints are exactly those of one
    call per step; only when they are written moves to the end of the call. ``tally`` is
    numpy (float32 sums, as the checkpoints hold them).
    """

    def __init__(self, plan: Plan, ckpt: checkpoints.Checkpointer, logger: Optional[rundir.MetricsLogger]):
        """``logger`` may be None when there is nothing left to train (the restored checkpoint is final)."""
        self.plan, self.ckpt, self.logger = plan, ckpt, logger
        config = plan.config
        if plan.restored is None:
            self.state, self.tally = plan.programs.init(plan.seeds_arr), zero_loop(len(plan.seeds))
        else:
            self.state, self.tally = plan.restored
        self.step = self.start_step = int(np.asarray(self.state.step)[0])
        # resume at batch start_i + 1 of epoch start_epoch + 1
        self.start_epoch, self.start_i = divmod(self.start_step, plan.steps_per_epoch)
        self.saved_step = self.start_step if plan.restored is not None else None
        self.flags = stopping.FiniteFlags(config.nonfinite, plan.seeds, plan.steps_per_epoch)
        self.progress = rundir.Progress(plan.is_main)
        self.progress_every = max(1, plan.steps_per_epoch // 50)  # each update syncs with the device
        self.rate_mark: Optional[tuple[float, int]] = None  # (time, step) after the session's first call: the ETA's origin
        self.images_per_step = len(plan.seeds) * plan.batch_size
        self.train_time, self.train_images = 0.0, 0  # for images_per_s, without each session's first call
        self.last_train = {"train_loss": None, "train_accuracy": None}
        self.logged_images_per_s: Optional[float] = None  # the last epoch record's, for a summary rebuilt below
        if plan.restored is not None and self.start_step == plan.final_step:
            self._last_epoch_from_metrics()
        self.test: Optional[tuple[np.ndarray, np.ndarray]] = None  # (loss, accuracy) per seed
        self.pending: list[tuple[int, int, dict[str, jax.Array]]] = []  # (step before the call, its length, metrics)
        self.t_window = self.t_mark = 0.0  # start of the log window; time of the last fold (at step step_mark)
        self.step_mark = self.step
        args = (plan.programs, plan.mesh, plan.ds, plan.seeds, plan.batch_size, plan.eval_batch_size)
        if plan.data_on_device:  # places the splits on the devices, explicitly, once per run
            self.engine = engine.DeviceEngine(*args, plan.steps_per_call, plan.seeds_arr)
        else:
            self.engine = engine.HostEngine(*args, plan.seeds_arr)

    def _last_epoch_from_metrics(self) -> None:
        """The last epoch's train metrics from its metrics.jsonl records (the run stopped after its last checkpoint).

        They are the numbers the uninterrupted run put in its summary (the same float64
        values, written by the same json); the epoch's throughput stands in for the
        session's, which died with it.
        """
        records = [json.loads(line) for line in self.plan.metrics]
        last = {r.get("seed"): r for r in records if r.get("kind") == "epoch" and r.get("step") == self.start_step}
        if all(s in last for s in self.plan.seeds):
            self.last_train = {k: [last[s].get(k) for s in self.plan.seeds] for k in ("train_loss", "train_accuracy")}
            self.logged_images_per_s = last[self.plan.seeds[0]].get("images_per_s")

    # ---- the host's view of the device-side flags and sums

    def count_skipped(self) -> None:
        """Reads the pending finite flags (a sync); raises NonFiniteError in "stop" mode."""
        bad = self.flags.check(self.ckpt.last_good)
        for k in ("epoch_skipped", "window_skipped", "skipped"):
            self.tally[k] = self.tally[k] + bad

    def save(self, loop: dict[str, Any]) -> Path:
        """Checkpoint of the current step with ``loop`` as its accumulators (asynchronous; syncs ``loop``)."""
        loop = {k: np.asarray(jax.device_get(loop[k]), dtype) for k, dtype in _LOOP_DTYPES.items()}
        records = self.logger.records if self.logger is not None else None
        return self.ckpt.save(self.step, {**_as_checkpoint(self.state), "loop": loop}, self.plan.num_devices, records)

    def stop(self, signum: int, loop: dict[str, Any]) -> None:
        """Saves the current step (unless just saved), waits for it and raises :class:`Preempted`."""
        path = self.plan.ckpt_dir / str(self.step) if self.saved_step == self.step else self.save(loop)
        self.ckpt.wait()
        raise Preempted(signum, self.step, path, self.plan.steps_per_epoch)

    # ---- one epoch

    def train_epoch(self, epoch: int, stop: stopping.StopSignals) -> None:
        """Epoch ``epoch`` (0-based): its calls, its record, evaluation and checkpoint as configured."""
        plan, every = self.plan, self.plan.config.log_every_steps
        first = self.start_i if epoch == self.start_epoch else 0  # batches of this epoch done before the restart
        if not first:
            self.tally = {**zero_loop(len(plan.seeds)), "skipped": self.tally["skipped"]}
        t_epoch = self.t_window = self.t_mark = time.perf_counter()
        self.step_mark = self.step
        first_call_done = None
        self.engine.begin_epoch(epoch)  # the epoch's index array, placed explicitly
        self.progress.start(f"epoch {epoch + 1}/{plan.config.num_epochs}", plan.steps_per_epoch, first)
        i = first
        for n in engine.call_lengths(first, plan.steps_per_epoch, plan.steps_per_call):
            with jax.transfer_guard(EPOCH_TRANSFER_GUARD):
                self.state, metrics = self.engine.train(self.state, i, n)
                self.pending.append((self.step, n, metrics))
                self.step, i = self.step + n, i + n
                if first_call_done is None and epoch == self.start_epoch:
                    jax.block_until_ready(metrics)
                    first_call_done = (time.perf_counter(), n)
                    self.rate_mark = (first_call_done[0], self.step)
                show = self.progress.tty and (i // self.progress_every > (i - n) // self.progress_every or i == plan.steps_per_epoch)
                if show or (every and self.step // every > (self.step - n) // every):
                    self.fold(epoch)
                if show:
                    self.show_progress(i)
            # Asked after every call (a collective sync point with several processes); acted on
            # here mid-epoch, and after the epoch's record and checkpoint at its end.
            if stop.requested(self.step) and i < plan.steps_per_epoch:
                with jax.transfer_guard(EPOCH_TRANSFER_GUARD):
                    self.fold(epoch)
                self.count_skipped()  # never save an unchecked state
                self.stop(stop.signum, self.tally)
        if epoch + 1 < plan.config.num_epochs:  # host work while the device runs the last call
            self.engine.prefetch(epoch + 1)
        with jax.transfer_guard(EPOCH_TRANSFER_GUARD):
            self.fold(epoch)
        self.end_epoch(epoch, first, t_epoch, first_call_done, stop)

    def fold(self, epoch: int) -> None:
        """Adds the pending calls' per-step metrics to ``tally`` in step order, writing each step record as it passes.

        One device-to-host copy for all pending calls (it waits for them). A record's
        window time is interpolated over the calls folded (the host sees call ends only).
        """
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        fetched = jax.device_get([m for _, _, m in pending])
        t_now, step_now = time.perf_counter(), self.step
        every, num_seeds = self.plan.config.log_every_steps, len(self.plan.seeds)
        for (before, n, _), metrics in zip(pending, fetched):
            rows = {k: np.reshape(metrics[k], (n, num_seeds)) for k in ("loss", "accuracy", "finite")}
            for j in range(n):
                t = before + j + 1  # the global step after this step
                self.flags.add(t, rows["finite"][j])
                for k in ("loss", "accuracy"):  # float32 sums in step order, as one call per step makes them
                    self.tally[f"epoch_{k}"] = self.tally[f"epoch_{k}"] + rows[k][j]
                    self.tally[f"window_{k}"] = self.tally[f"window_{k}"] + rows[k][j]
                if every and t % every == 0:
                    done = self.t_mark + (t_now - self.t_mark) * (t - self.step_mark) / max(step_now - self.step_mark, 1)
                    self.log_window(epoch, t, done)
        self.t_mark, self.step_mark = t_now, step_now

    def show_progress(self, i: int) -> None:
        """The terminal's progress bar (after a fold: at call boundaries): the run's ETA and the epoch's numbers.

        tqdm itself shows the epoch's steps, rate and ETA; the run's ETA comes first after
        it so that a narrow terminal cuts the loss, not the ETA.
        """
        loss, accuracy = (float(np.mean(self.tally[f"epoch_{k}"])) / i for k in ("loss", "accuracy"))
        eta = self.eta_s()
        run = "" if eta is None else f"run ETA {rundir.duration(eta)}, "
        self.progress.update(i, f"{run}loss {loss:.4f} acc {accuracy:.4f}")

    def eta_s(self) -> Optional[float]:
        """Seconds until the run's last step, at this session's measured pace (None before it is measured).

        The pace is wall time per step since the session's first call (which compiles, so it is
        left out), evaluations and checkpoints between epochs included: what the rest of the
        run will also spend.
        """
        if self.rate_mark is None or self.step <= self.rate_mark[1]:
            return None
        t0, step0 = self.rate_mark
        per_step = (time.perf_counter() - t0) / (self.step - step0)
        return per_step * (self.plan.final_step - self.step)

    def log_window(self, epoch: int, step: int, t_done: float) -> None:
        """The ``"step"`` record of the ``log_every_steps`` steps up to global ``step`` (done at ``t_done``); resets the window."""
        plan, every = self.plan, self.plan.config.log_every_steps
        i = step - epoch * plan.steps_per_epoch  # in-epoch position: windows restart with each epoch
        self.count_skipped()
        n_ok = min(every, i) - self.tally["window_skipped"]
        window = {f"train_{k}": _mean(self.tally[f"window_{k}"], n_ok) for k in ("loss", "accuracy")}
        ips = min(every, i) * self.images_per_step / max(t_done - self.t_window, 1e-9)
        lr = optim.learning_rate_at(plan.config, plan.steps_per_epoch, step - 1)
        self.logger.write("step", epoch + 1, step, window, {"learning_rate": lr, "images_per_s": ips})
        zero, self.t_window = zero_loop(len(plan.seeds)), t_done
        self.tally.update({k: zero[k] for k in ("window_loss", "window_accuracy", "window_skipped")})

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        with jax.transfer_guard(EPOCH_TRANSFER_GUARD):
            return self.engine.evaluate(self.state)

    def end_epoch(
        self, epoch: int, first: int, t_epoch: float, first_call_done: Optional[tuple[float, int]], stop: stopping.StopSignals
    ) -> None:
        """The epoch's record, progress line, evaluation and checkpoint; acts on a stop signal."""
        plan, config = self.plan, self.plan.config
        lr = optim.learning_rate_at(config, plan.steps_per_epoch, epoch * plan.steps_per_epoch)
        self.count_skipped()  # before anything of this epoch is logged or saved
        n_ok = plan.steps_per_epoch - self.tally["epoch_skipped"]
        train = {f"train_{k}": _mean(self.tally[f"epoch_{k}"], n_ok) for k in ("loss", "accuracy")}
        t_end = time.perf_counter()
        epoch_time = t_end - t_epoch
        steps_run = plan.steps_per_epoch - first
        if first_call_done is not None:  # leave out the session's first (compiling) call
            t_done, n_first = first_call_done
            self.train_time += t_end - t_done
            self.train_images += (steps_run - n_first) * self.images_per_step
        else:
            self.train_time += epoch_time
            self.train_images += steps_run * self.images_per_step
        self.last_train = {k: v.tolist() for k, v in train.items()}
        per_seed = dict(train)
        done = epoch + 1
        if done % config.eval_every_epochs == 0 or done == config.num_epochs:
            self.test = self.evaluate()
            per_seed.update(test_loss=self.test[0], test_accuracy=self.test[1])
        if config.nonfinite == "skip":
            per_seed["nonfinite_skipped"] = np.asarray(self.tally["skipped"])
        ips = steps_run * self.images_per_step / max(epoch_time, 1e-9)
        self.logger.write("epoch", done, self.step, per_seed, {"learning_rate": lr, "images_per_s": ips, "epoch_time_s": epoch_time})
        text = f"epoch {done}/{config.num_epochs} loss {train['train_loss'].mean():.4f} acc {train['train_accuracy'].mean():.4f}"
        if "test_accuracy" in per_seed:
            text += f" test_loss {per_seed['test_loss'].mean():.4f} test_acc {per_seed['test_accuracy'].mean():.4f}"
        text += f" lr {lr:.4g} {ips:.0f} img/s {epoch_time:.1f}s"
        eta, left = self.eta_s(), config.num_epochs - done
        if left and eta is not None:  # a person plans by this line; a log file gets one per epoch
            text += f", ETA {rundir.duration(eta)} ({left} epoch{'s' if left > 1 else ''} left)"
        self.progress.done(text)
        boundary = {**zero_loop(len(plan.seeds)), "skipped": self.tally["skipped"]}  # the next epoch starts from zero
        if done % config.checkpoint_every_epochs == 0 or done == config.num_epochs:
            self.save(boundary)
            self.saved_step = self.step
        if stop.signum is not None and done < config.num_epochs:  # between epochs
            self.stop(stop.signum, boundary)

    def final_test(self) -> tuple[np.ndarray, np.ndarray]:
        """The last evaluation, or one of the restored state when a finished run was resumed."""
        if self.test is None:
            self.test = self.evaluate()
        return self.test


def summarize(plan: Plan, trainer: Trainer, wall_time_s: float) -> dict[str, Any]:
    """The run's ``summary.json``: test accuracy and loss per seed, parameter count, timing, config."""
    config = plan.config
    test_loss, test_acc = trainer.final_test()
    acc = np.asarray(test_acc, np.float64)
    ode_config = plan.model.config  # resolved knobs (method defaults filled in)
    return {
        "model": config.model,
        "method": config.method,
        "seeds": plan.seeds,
        "test_accuracy": acc.tolist(),
        "test_loss": np.asarray(test_loss, np.float64).tolist(),
        "test_accuracy_min": float(acc.min()),
        "test_accuracy_max": float(acc.max()),
        "test_accuracy_avg": float(acc.mean()),
        **trainer.last_train,
        "num_params": plan.num_params,
        "num_devices": plan.num_devices,
        "steps_per_call": plan.steps_per_call,
        "data_on_device": plan.data_on_device,
        "epochs": config.num_epochs,
        "steps": trainer.step,
        "resumed_from_epoch": trainer.start_epoch,
        "resumed_from_step": trainer.start_step,
        "nonfinite_skipped": np.asarray(trainer.tally["skipped"]).tolist(),
        "wall_time_s": wall_time_s,
        "images_per_s": (trainer.train_images / trainer.train_time) if trainer.train_time > 0 else trainer.logged_images_per_s,
        "ode": {
            **{k: getattr(ode_config, k) for k in run_config.KNOB_FIELDS},
            "remat_budget_mb": config.remat_budget_mb,
            "remat_per_block": _remat_plan(plan),  # what remat="auto" chose, per ODE block
        },
        "config": plan.cfg,
    }


def _remat_plan(plan: Plan) -> dict[str, str]:
    """The remat schedule of each ODE block in the train step (one replica's global batch, as the model sees it)."""
    return models.remat_plan(plan.model, (plan.batch_size, *plan.ds.x_train.shape[1:]))


def _print_header(plan: Plan, trainer: Trainer, resume_command: Optional[str] = None) -> None:
    config, resumed = plan.config, ""
    if trainer.start_step == plan.final_step:
        rundir.say(
            f"{config.model} {config.method} seeds {plan.seeds}: the last checkpoint "
            f"{plan.ckpt_dir / str(trainer.start_step)} is final, but summary.json is missing or older (the run "
            f"stopped after its last checkpoint): evaluating it and writing the summary, workdir {plan.workdir}"
        )
    else:
        if trainer.start_step:
            where = f", step {trainer.start_i}/{plan.steps_per_epoch} of epoch {trainer.start_epoch + 1}" if trainer.start_i else ""
            resumed = f" (resumed from step {trainer.start_step}{where})"
        rundir.say(
            f"{config.model} {config.method} seeds {plan.seeds}: {plan.num_params:,} params, {plan.num_devices} device(s), "
            f"{plan.steps_per_epoch} steps/epoch ({plan.steps_per_call} per call), "
            f"epochs {trainer.start_epoch + 1}..{config.num_epochs}, "
            f"workdir {plan.workdir}" + resumed
        )
    if plan.restored_devices is not None and plan.restored_devices != plan.num_devices:
        rundir.say(
            f"note: checkpoint {plan.ckpt_dir / str(trainer.start_step)} was written on {plan.restored_devices} "
            f"device(s), this session has {plan.num_devices}: the run resumes, but not bitwise as it would on "
            f"{plan.restored_devices} (the gradient all-reduce sums in another order)"
        )
    steps_z, steps_w = (getattr(plan.model.config, k, None) or 0 for k in ("steps_z", "steps_w"))
    if max(steps_z, steps_w) > _MANY_STEPS and trainer.start_step < plan.final_step:
        rundir.say(
            f"note: steps_z={steps_z}, steps_w={steps_w}: every step is unrolled into the compiled program, so the "
            "first step compiles for minutes"
        )
    if plan.model.config.remat == "auto" and trainer.start_step < plan.final_step:
        blocks = ", ".join(f"{name} {mode}" for name, mode in _remat_plan(plan).items())
        rundir.say(f"remat auto (budget {config.remat_budget_mb:g} MiB per device and block): {blocks}")
    ode_config = plan.model.config
    if ode_config.evolve and trainer.start_step < plan.final_step:
        q = {"rda": "rda (Eq. B.4)", "rda_equation": "rda_equation (Eq. 2.6)"}.get(ode_config.evolution, ode_config.evolution)
        if ode_config.evolution.startswith("rda"):
            q += ", d = |rda_d|" if ode_config.rda_parameterization == "abs" else ", d = softplus(rda_d_raw)"
        rundir.say(
            f"evolution q = {q}, time kernel K = {ode_config.time_kernel}, "
            f"evolution_lr_scale {config.get('evolution_lr_scale', 1.0):g}"
        )
    if resume_command and trainer.start_step < plan.final_step:
        rundir.say(f"if stopped, resume with: {resume_command}")


# Beyond this many ODE steps the header warns that compiling takes minutes (run_config.MAX_ODE_STEPS).
_MANY_STEPS = 64


def _print_finished(plan: Plan) -> None:
    acc = 100 * np.asarray(plan.finished.get("test_accuracy") or [np.nan], np.float64)
    rundir.say(
        f"{plan.workdir} holds this run, finished (epoch {plan.config.num_epochs}/{plan.config.num_epochs}, step "
        f"{plan.final_step}): test accuracy min {acc.min():.2f}% max {acc.max():.2f}% avg {acc.mean():.2f}%; nothing "
        f"to do, every file left as it was (summary in {plan.workdir / rundir.SUMMARY_FILE}; a larger "
        "--config.num_epochs trains on)"
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume_command: Optional[str] = None
) -> dict[str, Any]:
    """Trains ``config.num_seeds`` replicas, evaluates them, and writes the run directory.

    Args:
      config: a ConfigDict with the fields of ``configs/default.py``.
      workdir: run directory; created if new, resumed from its latest usable checkpoint if
        it holds a run of a compatible config (:data:`RESUMABLE_FIELDS` may differ); a
        finished run of this config is left as it is.
      resume_command: the exact command that resumes this run (``train.py`` passes its own
        command line with ``--workdir``): printed in the header and named by the stop and
        write-failure messages (:class:`Preempted`, :class:`WriteError`, a second signal).
        None: they say "rerun the same command", which is right when ``workdir`` is fixed.

    Returns:
      The summary written to ``workdir/summary.json``: ``test_accuracy`` and ``test_loss``
      (lists, one per seed), ``test_accuracy_min / max / avg``, ``num_params``,
      ``wall_time_s`` (this invocation), ``images_per_s`` (every replica's images, without
      each session's first, compiling, step), ``model``, ``method``, ``seeds``, ``config``...
      For a finished run, the summary it wrote then.

    Raises:
      ConfigError, anodev2_jax.data.DataError: bad input (config, data, a workdir holding
        another config or in use by another run, no usable checkpoint, no write
        permission), raised before anything is written.
      Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved (or,
        after the last step, the run finished).
      NonFiniteError: ``config.nonfinite="stop"`` and a step was NaN / Inf; nothing newer
        than the last good checkpoint was written.
      WriteError: writing the run directory failed (disk full...); the checkpoints
        written before are intact.
      OutOfMemory: the host or a device ran out of memory (a ``MemoryError`` or XLA's
        ``RESOURCE_EXHAUSTED``); the message says what to lower.
    """
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed(config)
    sharding.check_backend()  # before StopSignals asks JAX for the process count
    # Until the lock, a signal ends the process at once: nothing is written yet.
    with stopping.StopSignals(resume_command) as stop, _naming_out_of_memory(config, workdir):
        plan = prepare(config, workdir)  # writes nothing
        if plan.finished is None:
            lock, plan = _lock(plan, config)
            try:
                if plan.finished is None:
                    stop.arm()  # from here on a signal saves a checkpoint and stops
                    return _run(plan, stop, t_start, resume_command)
            except (Preempted, WriteError) as e:  # the message names the command that resumes
                e.resume_command = resume_command
                raise
            finally:
                lock.release()
        if plan.is_main:
            _print_finished(plan)
        return plan.finished


@contextlib.contextmanager
def _naming_out_of_memory(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Out of memory anywhere in a run (data, compile, a step, the host copy of a checkpoint) as one :class:`OutOfMemory`."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        last = checkpoints.last_checkpoint(run_config.resolve_workdir(workdir) / checkpoints.CHECKPOINT_DIR)
        raise OutOfMemory(e, config.batch_size, config.num_seeds, last, jax.default_backend()) from e


def _lock(plan: Plan, config: ml_collections.ConfigDict) -> tuple[rundir.RunLock, Plan]:
    """The run directory's lock (process 0 takes it), and the plan made again if the directory changed meanwhile."""
    lock, busy = rundir.RunLock(plan.workdir, active=plan.is_main), None
    try:
        lock.acquire()
    except WorkdirInUse as e:
        busy = e
    except OSError as e:  # creating the workdir or its lock file
        raise WriteError(e.filename or str(lock.path), e, checkpoints.last_checkpoint(plan.ckpt_dir)) from e
    try:
        changed = plan.is_main and busy is None and rundir.snapshot(plan.workdir) != plan.snapshot
        is_busy, changed = sharding.process_0_says([busy is not None, changed])
        if is_busy:
            raise busy or ConfigError(
                f"workdir {plan.workdir} is in use by another run (process 0 found its lock held); pass another --workdir"
            )
        if changed:  # another run wrote the directory between prepare's reading and the lock (it ended): read it again
            plan = prepare(config, plan.workdir, probe=False)
    except BaseException:
        lock.release()
        raise
    return lock, plan


def _run(plan: Plan, stop: stopping.StopSignals, t_start: float, resume_command: Optional[str] = None) -> dict[str, Any]:
    """Opens the run directory and trains the epochs left, then evaluates and writes the summary (lock held)."""
    ckpt = open_run_directory(plan)
    logger = None
    try:
        if _restored_step(plan) < plan.final_step:  # a final checkpoint needs no logger (no empty TensorBoard file)
            logger = rundir.MetricsLogger(plan.workdir, plan.seeds, plan.metrics, plan.is_main)
        trainer = Trainer(plan, ckpt, logger)
        if plan.is_main:
            _print_header(plan, trainer, resume_command)
        for epoch in range(trainer.start_epoch, plan.config.num_epochs):
            trainer.train_epoch(epoch, stop)
        trainer.final_test()
        ckpt.wait()
        summary = summarize(plan, trainer, time.perf_counter() - t_start)
        if plan.is_main:
            rundir.write_text(plan.workdir / rundir.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    except OSError as e:  # metrics, TensorBoard or summary.json: a full disk, a quota, permissions
        # The checkpoint in flight (of a checked state, its records written) lands first: the
        # line names the one the rerun resumes from.
        raise WriteError(e.filename or f"the run directory {plan.workdir}", e, ckpt.last_good()) from e
    finally:
        if logger is not None:
            with contextlib.suppress(Exception):  # an error in flight says more than a failed close
                logger.close()
        ckpt.close()
    if plan.is_main:
        acc = np.asarray(summary["test_accuracy"])
        rundir.say(
            f"test accuracy over {len(plan.seeds)} seed(s): min {100 * acc.min():.2f}% max {100 * acc.max():.2f}% "
            f"avg {100 * acc.mean():.2f}% ({plan.config.model} {plan.config.method}; summary in "
            f"{plan.workdir / rundir.SUMMARY_FILE})"
        )
    if stop.signum is not None:  # it came after the last step: the run finished anyway
        raise Preempted(stop.signum, trainer.step, plan.ckpt_dir / str(trainer.step), plan.steps_per_epoch, finished=True)
    return summary


def _restored_step(plan: Plan) -> int:
    return 0 if plan.restored is None else int(np.asarray(plan.restored[0].step)[0])
