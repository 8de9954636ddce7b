"""The training loop: ``train_and_evaluate(config, workdir)`` trains, evaluates and writes a run directory.

It trains ``config.num_seeds`` replicas of ``get_model(config.model, config.method, **ODE
knobs)`` with the recipe of Appendix C (:mod:`anodev2_jax.optim`; batch 256, standard CIFAR
augmentation on the device) and returns the summary it writes to ``workdir/summary.json``.
``train.py`` is a thin command-line wrapper around it. It reads top to bottom as
:func:`prepare` (every check and the restore of the latest checkpoint; writes nothing) ->
open the run directory -> epochs (:class:`Trainer`) -> summary. The pieces live beside it,
one concern per module: :mod:`~anodev2_jax.run_config`, :mod:`~anodev2_jax.optim`,
:mod:`~anodev2_jax.steps`, :mod:`~anodev2_jax.sharding`, :mod:`~anodev2_jax.rundir`,
:mod:`~anodev2_jax.checkpoints`, :mod:`~anodev2_jax.stopping`, :mod:`~anodev2_jax.errors`.

Determinism: on CPU, training is bitwise deterministic for a fixed config and seed: every
random choice derives from (seed, epoch, step), XLA:CPU runs the same program in the same
order, and so a run killed (even with SIGKILL) and resumed any number of times ends with
exactly the params, optimizer state and metrics (timings aside) of an uninterrupted one
(``tests/test_reliability.py``). It needs the same jax/jaxlib version, XLA flags and device
count (the gradient all-reduce sums in device order). On GPU this does **not** hold by
default: XLA:GPU reductions and scatters may use atomics (the order of float additions
varies run to run) and cuDNN / cuBLAS autotuning may choose different algorithms, so runs
differ by round-off that training amplifies; ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``
(with ``--xla_gpu_autotune_level=0`` for fixed algorithm choice) makes them reproducible at
some speed cost. A resumed GPU run is still a valid continuation, just not a bitwise copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anodev2_jax import checkpoints, models, optim, rundir, run_config, sharding, steps, stopping
from anodev2_jax import data as data_lib
from anodev2_jax.errors import ConfigError, NonFiniteError, Preempted, WriteError
from anodev2_jax.run_config import RESUMABLE_FIELDS, default_workdir, validate_config
from anodev2_jax.steps import TrainState

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "Preempted",
    "WriteError",
    "RESUMABLE_FIELDS",
    "TrainState",
    "default_workdir",
    "validate_config",
    "epoch_indices",
    "zero_loop",
    "Plan",
    "prepare",
    "Trainer",
    "train_and_evaluate",
]


def epoch_indices(num_train: int, batch_size: int, seeds: Sequence[int], epoch: int):
    """Index batches ``(num_seeds, batch)`` of epoch ``epoch`` (0-based): each seed its own order.

    Seed ``s``'s order is ``numpy.random.default_rng([s, epoch])``'s permutation: nothing
    random lives outside (seed, epoch, step), which is what makes resuming exact. The last
    partial batch of an epoch is dropped (one compiled shape).
    """
    streams = [data_lib.epoch_batches(num_train, batch_size, np.random.default_rng([s, epoch])) for s in seeds]
    for idx in zip(*streams):
        yield np.stack(idx)


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
    programs: steps.Programs
    num_params: int
    restored: Optional[tuple[TrainState, dict[str, np.ndarray]]]  # the latest checkpoint's state and loop

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.workdir / checkpoints.CHECKPOINT_DIR


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Plan:
    """Every check of a run, then the restore of its latest checkpoint; nothing is created or written.

    Raises:
      ConfigError, anodev2_jax.data.DataError: one line naming the field, file or
        checkpoint and the fix (config fields, model and method knobs, devices, data, the
        workdir's config, an unreadable or foreign checkpoint, no write permission).
    """
    validate_config(config)
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
    num_train = len(ds.y_train)
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size={batch_size} exceeds the {num_train} training examples, so an epoch has no "
            "full batch; lower --config.batch_size or raise --config.num_train"
        )
    workdir = Path(workdir)
    stored = rundir.check_workdir(workdir, cfg, steps_per_epoch)
    legacy = run_config.legacy_defaults(stored)
    if legacy:  # written before a method default changed: resume with the old default, bitwise as before
        model = steps.create_model(config, defaults=legacy)
        cfg = {k: v for k, v in cfg.items() if k in stored or k not in run_config.CHANGED_DEFAULTS}
    rundir.check_writable(workdir)
    seeds = [config.seed + i for i in range(config.num_seeds)]
    progs = steps.programs(model, optim.OptimizerSpec.from_config(config, steps_per_epoch), mesh, len(seeds))
    abstract_one = jax.eval_shape(lambda s: steps.init_one(model, progs.tx, s), jnp.zeros((), jnp.int32))
    repl = sharding.replicated(mesh)
    seeds_arr = sharding.put_global(np.asarray(seeds, np.int32), repl)
    plan = Plan(
        config, cfg, workdir, model, mesh, ds, seeds, seeds_arr, batch_size, eval_batch_size, steps_per_epoch,
        progs, models.count_params(abstract_one.params), restored=None,
    )  # fmt: skip
    return dataclasses.replace(plan, restored=_restore(plan))


def _restore(plan: Plan) -> Optional[tuple[TrainState, dict[str, np.ndarray]]]:
    """The state and loop accumulators of the latest checkpoint (None for a new run); writes nothing."""
    repl = sharding.replicated(plan.mesh)
    abstract = jax.eval_shape(plan.programs.init, plan.seeds_arr)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), _as_checkpoint(abstract))
    restored = checkpoints.restore_latest(plan.ckpt_dir, {**target, "loop": zero_loop(len(plan.seeds))})
    if restored is None:
        return None
    ckpt_step, tree = restored
    loop = {k: np.asarray(v) for k, v in tree.pop("loop").items()}
    state = TrainState(**tree)
    if int(np.asarray(state.step)[0]) != ckpt_step:
        raise ConfigError(
            f"checkpoint {plan.ckpt_dir / str(ckpt_step)} holds global step {int(np.asarray(state.step)[0])}, not "
            f"{ckpt_step}: it was written by another version; pass a new --workdir"
        )
    return state, loop


def _as_checkpoint(state: TrainState) -> dict[str, Any]:
    """The checkpoint pytree of a train state (the ``"loop"`` accumulators are added beside it)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def open_run_directory(plan: Plan) -> checkpoints.Checkpointer:
    """Creates the run directory with its ``config.json`` (process 0) and the checkpoint manager."""
    sharding.sync_processes("anodev2_jax:workdir_checked")  # no process still reads config.json as process 0 writes it
    try:
        if plan.is_main:
            plan.workdir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(plan.cfg, indent=2, sort_keys=True) + "\n"
            rundir.write_text(plan.workdir / rundir.CONFIG_FILE, text)
    except OSError as e:
        raise WriteError(
            e.filename or f"the run directory {plan.workdir}", e, checkpoints.last_checkpoint(plan.ckpt_dir)
        ) from e
    return checkpoints.Checkpointer(plan.ckpt_dir, plan.config.keep_checkpoints)


class Trainer:
    """The epoch loop of one run, with its state explicit: train state, global step, accumulators, timers.

    ``tally`` holds the :func:`zero_loop` accumulators: on the device while training (the
    step's metrics are added there, no host sync per step), numpy in checkpoints.
    """

    def __init__(self, plan: Plan, ckpt: checkpoints.Checkpointer, logger: rundir.MetricsLogger):
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
        self.train_sharding = sharding.batch_sharding(plan.mesh)
        self.images_per_step = len(plan.seeds) * plan.batch_size
        self.train_time, self.train_images = 0.0, 0  # for images_per_s, without each session's first step
        self.last_train = {"train_loss": None, "train_accuracy": None}
        self.test: Optional[tuple[np.ndarray, np.ndarray]] = None  # (loss, accuracy) per seed
        self.t_window = 0.0

    # ---- the host's view of the device-side flags and sums

    def count_skipped(self) -> None:
        """Reads the pending finite flags (a sync); raises NonFiniteError in "stop" mode."""
        bad = self.flags.check(self.ckpt.last_good)
        for k in ("epoch_skipped", "window_skipped", "skipped"):
            self.tally[k] = self.tally[k] + bad

    def save(self, loop: dict[str, Any]) -> Path:
        """Checkpoint of the current step with ``loop`` as its accumulators (asynchronous; syncs ``loop``)."""
        loop = {k: np.asarray(jax.device_get(loop[k]), dtype) for k, dtype in _LOOP_DTYPES.items()}
        return self.ckpt.save(self.step, {**_as_checkpoint(self.state), "loop": loop})

    def stop(self, signum: int, loop: dict[str, Any]) -> None:
        """Saves the current step (unless just saved), waits for it and raises :class:`Preempted`."""
        path = self.plan.ckpt_dir / str(self.step) if self.saved_step == self.step else self.save(loop)
        self.ckpt.wait()
        raise Preempted(signum, self.step, path, self.plan.steps_per_epoch)

    # ---- one epoch

    def train_epoch(self, epoch: int, stop: stopping.StopSignals) -> None:
        """Epoch ``epoch`` (0-based): its steps, its record, evaluation and checkpoint as configured."""
        plan, config = self.plan, self.plan.config
        first = self.start_i if epoch == self.start_epoch else 0  # batches of this epoch done before the restart
        if not first:
            self.tally = {**zero_loop(len(plan.seeds)), "skipped": self.tally["skipped"]}
        t_epoch = self.t_window = time.perf_counter()
        first_step_done = None
        batches = epoch_indices(len(plan.ds.y_train), plan.batch_size, plan.seeds, epoch)
        for i, idx in enumerate(batches, start=1):
            if i <= first:
                continue
            metrics = self.train_step(idx)
            if first_step_done is None and epoch == self.start_epoch:
                jax.block_until_ready(metrics)
                first_step_done = time.perf_counter()
            if self.progress.tty and (i % self.progress_every == 0 or i == plan.steps_per_epoch):
                self.show_progress(epoch, i, first, t_epoch)
            if config.log_every_steps and self.step % config.log_every_steps == 0:
                self.log_window(epoch, i)
            # Asked every step (a collective sync point with several processes); acted on here
            # mid-epoch, and after the epoch's record and checkpoint at its end.
            if stop.requested(self.step) and i < plan.steps_per_epoch:
                self.count_skipped()  # never save an unchecked state
                self.stop(stop.signum, self.tally)
        self.end_epoch(epoch, first, t_epoch, first_step_done, stop)

    def train_step(self, idx: np.ndarray) -> dict[str, jax.Array]:
        """One optimizer step of every replica on the index batch ``idx`` ``(num_seeds, batch)``; its metrics."""
        ds = self.plan.ds
        images = sharding.put_global(ds.x_train[idx], self.train_sharding)
        labels = sharding.put_global(ds.y_train[idx], self.train_sharding)
        self.state, metrics = self.plan.programs.train_step(self.state, images, labels, self.plan.seeds_arr)
        self.step += 1
        self.flags.add(self.step, metrics["finite"])
        for k in ("loss", "accuracy"):  # device-side sums: no host sync per step
            self.tally[f"epoch_{k}"] = self.tally[f"epoch_{k}"] + metrics[k]
            self.tally[f"window_{k}"] = self.tally[f"window_{k}"] + metrics[k]
        return metrics

    def show_progress(self, epoch: int, i: int, first: int, t_epoch: float) -> None:
        """The terminal's progress line (syncs)."""
        loss, accuracy = (float(np.mean(self.tally[f"epoch_{k}"])) / i for k in ("loss", "accuracy"))
        speed = (i - first) * self.images_per_step / max(time.perf_counter() - t_epoch, 1e-9)
        self.progress.update(
            f"epoch {epoch + 1}/{self.plan.config.num_epochs} step {i}/{self.plan.steps_per_epoch} "
            f"loss {loss:.4f} acc {accuracy:.4f} {speed:.0f} img/s"
        )

    def log_window(self, epoch: int, i: int) -> None:
        """The ``"step"`` record of the last ``log_every_steps`` steps; resets the window's sums."""
        every = self.plan.config.log_every_steps
        self.count_skipped()
        n_ok = min(every, i) - self.tally["window_skipped"]
        window = {f"train_{k}": _mean(self.tally[f"window_{k}"], n_ok) for k in ("loss", "accuracy")}
        now = time.perf_counter()
        ips = min(every, i) * self.images_per_step / max(now - self.t_window, 1e-9)
        shared = {"learning_rate": float(self.plan.programs.schedule(self.step - 1)), "images_per_s": ips}
        self.logger.write("step", epoch + 1, self.step, window, shared)
        zero, self.t_window = zero_loop(len(self.plan.seeds)), now
        self.tally.update({k: zero[k] for k in ("window_loss", "window_accuracy", "window_skipped")})

    def end_epoch(
        self, epoch: int, first: int, t_epoch: float, first_step_done: Optional[float], stop: stopping.StopSignals
    ) -> None:
        """The epoch's record, progress line, evaluation and checkpoint; acts on a stop signal."""
        plan, config = self.plan, self.plan.config
        lr = float(plan.programs.schedule(epoch * plan.steps_per_epoch))
        self.count_skipped()  # before anything of this epoch is logged or saved
        n_ok = plan.steps_per_epoch - self.tally["epoch_skipped"]
        train = {f"train_{k}": _mean(self.tally[f"epoch_{k}"], n_ok) for k in ("loss", "accuracy")}
        t_end = time.perf_counter()
        epoch_time = t_end - t_epoch
        steps_run = plan.steps_per_epoch - first
        if first_step_done is not None:  # leave out the session's first (compiling) step
            self.train_time += t_end - first_step_done
            self.train_images += (steps_run - 1) * self.images_per_step
        else:
            self.train_time += epoch_time
            self.train_images += steps_run * self.images_per_step
        self.last_train = {k: v.tolist() for k, v in train.items()}
        per_seed = dict(train)
        done = epoch + 1
        if done % config.eval_every_epochs == 0 or done == config.num_epochs:
            self.test = steps.evaluate(plan.programs.eval_step, self.state, plan.ds, plan.eval_batch_size, plan.mesh)
            per_seed.update(test_loss=self.test[0], test_accuracy=self.test[1])
        if config.nonfinite == "skip":
            per_seed["nonfinite_skipped"] = np.asarray(self.tally["skipped"])
        ips = steps_run * self.images_per_step / max(epoch_time, 1e-9)
        self.logger.write("epoch", done, self.step, per_seed, {"learning_rate": lr, "images_per_s": ips, "epoch_time_s": epoch_time})
        text = f"epoch {done}/{config.num_epochs} loss {train['train_loss'].mean():.4f} acc {train['train_accuracy'].mean():.4f}"
        if "test_accuracy" in per_seed:
            text += f" test_loss {per_seed['test_loss'].mean():.4f} test_acc {per_seed['test_accuracy'].mean():.4f}"
        self.progress.done(text + f" lr {lr:.4g} {ips:.0f} img/s {epoch_time:.1f}s")
        boundary = {**zero_loop(len(plan.seeds)), "skipped": self.tally["skipped"]}  # the next epoch starts from zero
        if done % config.checkpoint_every_epochs == 0 or done == config.num_epochs:
            self.save(boundary)
            self.saved_step = self.step
        if stop.signum is not None and done < config.num_epochs:  # between epochs
            self.stop(stop.signum, boundary)

    def final_test(self) -> tuple[np.ndarray, np.ndarray]:
        """The last evaluation, or one of the restored state when a finished run was resumed."""
        if self.test is None:
            plan = self.plan
            self.test = steps.evaluate(plan.programs.eval_step, self.state, plan.ds, plan.eval_batch_size, plan.mesh)
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
        "epochs": config.num_epochs,
        "steps": trainer.step,
        "resumed_from_epoch": trainer.start_epoch,
        "resumed_from_step": trainer.start_step,
        "nonfinite_skipped": np.asarray(trainer.tally["skipped"]).tolist(),
        "wall_time_s": wall_time_s,
        "images_per_s": trainer.train_images / trainer.train_time if trainer.train_time > 0 else None,
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


def _print_header(plan: Plan, trainer: Trainer) -> None:
    config, resumed = plan.config, ""
    if trainer.start_step:
        where = f", step {trainer.start_i}/{plan.steps_per_epoch} of epoch {trainer.start_epoch + 1}" if trainer.start_i else ""
        resumed = f" (resumed from step {trainer.start_step}{where})"
    print(
        f"{config.model} {config.method} seeds {plan.seeds}: {plan.num_params:,} params, {plan.num_devices} device(s), "
        f"{plan.steps_per_epoch} steps/epoch, epochs {trainer.start_epoch + 1}..{config.num_epochs}, "
        f"workdir {plan.workdir}" + resumed,
        flush=True,
    )
    if plan.model.config.remat == "auto":
        blocks = ", ".join(f"{name} {mode}" for name, mode in _remat_plan(plan).items())
        print(f"remat auto (budget {config.remat_budget_mb:g} MiB per device and block): {blocks}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``config.num_seeds`` replicas, evaluates them, and writes the run directory.

    Args:
      config: a ConfigDict with the fields of ``configs/default.py``.
      workdir: run directory; created if new, resumed from its latest checkpoint if it
        holds a run of a compatible config (:data:`RESUMABLE_FIELDS` may differ).

    Returns:
      The summary written to ``workdir/summary.json``: ``test_accuracy`` and ``test_loss``
      (lists, one per seed), ``test_accuracy_min / max / avg``, ``num_params``,
      ``wall_time_s`` (this invocation), ``images_per_s`` (every replica's images, without
      each session's first, compiling, step), ``model``, ``method``, ``seeds``, ``config``...

    Raises:
      ConfigError, anodev2_jax.data.DataError: bad input (config, data, a workdir holding
        another config, an unreadable checkpoint, no write permission), raised before
        anything is written.
      Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved.
      NonFiniteError: ``config.nonfinite="stop"`` and a step was NaN / Inf; nothing newer
        than the last good checkpoint was written.
      WriteError: writing the run directory failed (disk full...); the checkpoints
        written before are intact.
    """
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed(config)
    plan = prepare(config, workdir)  # writes nothing
    ckpt = open_run_directory(plan)
    logger = None
    try:
        logger = rundir.MetricsLogger(plan.workdir, plan.seeds, _restored_step(plan), plan.is_main)
        trainer = Trainer(plan, ckpt, logger)
        with stopping.StopSignals() as stop:
            if plan.is_main:  # after the handlers are in place: a signal from here on saves a checkpoint
                _print_header(plan, trainer)
            for epoch in range(trainer.start_epoch, config.num_epochs):
                trainer.train_epoch(epoch, stop)
        trainer.final_test()
        ckpt.wait()
        summary = summarize(plan, trainer, time.perf_counter() - t_start)
        if plan.is_main:
            rundir.write_text(plan.workdir / rundir.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    except OSError as e:  # metrics, TensorBoard or summary.json: a full disk, a quota, permissions
        raise WriteError(e.filename or f"the run directory {plan.workdir}", e, checkpoints.last_checkpoint(plan.ckpt_dir)) from e
    finally:
        if logger is not None:
            with contextlib.suppress(Exception):  # an error in flight says more than a failed close
                logger.close()
        ckpt.close()
    if plan.is_main:
        acc = np.asarray(summary["test_accuracy"])
        print(
            f"test accuracy over {len(plan.seeds)} seed(s): min {100 * acc.min():.2f}% max {100 * acc.max():.2f}% "
            f"avg {100 * acc.mean():.2f}% ({config.model} {config.method}; summary in "
            f"{plan.workdir / rundir.SUMMARY_FILE})",
            flush=True,
        )
    return summary


def _restored_step(plan: Plan) -> int:
    return 0 if plan.restored is None else int(np.asarray(plan.restored[0].step)[0])
