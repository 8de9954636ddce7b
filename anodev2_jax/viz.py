"""Figures of the paper from this library: RDA on a Gaussian (Fig. 3), evolved kernels (Figs. 1, 4, 5), curves.

Usage::

    python -m anodev2_jax.viz                                  # Figure 3 -> docs/figure3_gaussian.png
    python -m anodev2_jax.viz gaussian --out fig3.png
    python -m anodev2_jax.viz kernels --model resnet4 --method anodev2_conf1 --init --out k.png
    python -m anodev2_jax.viz kernels --workdir runs/r4-conf1 --out k.png   # latest checkpoint
    python -m anodev2_jax.viz curves runs/r4-base runs/r4-conf1 --out curves.png

Figures (matplotlib, Agg backend; every size is a whole number of pixels at ``DPI``):

* **Figure 3** (:func:`gaussian_figure`): a Gaussian kernel of unit variance in units of
  ``GAUSSIAN_UNIT_PX`` pixels, on a 32x32 periodic grid, evolved by diffusion only,
  advection only, reaction only and all three (rows), at t = 0, 1/4, 1/2, 3/4, 1
  (columns). It uses :func:`anodev2_jax.evolve_weights` with ``nonlinearity=None``: the
  exact solution of the *linear* PDE (Eq. B.3; the evolution is a semigroup, so these are
  the solution's values at those times, not a time-stepping approximation). Coefficients
  are in pixel units (the library's grid has unit spacing). Each row shares one colour
  scale, so the reaction row shows growth and the diffusion row the falling peak.
* **Figures 1, 4, 5** (:func:`kernels_figure`): input channel 0 of the first evolved
  convolution kernel of a model (``layer1_1/conv1`` for the ResNets, ``conv2/conv`` for
  AlexNet, the paper's "first channel of the first convolution kernel") at every entry
  of its weight trajectory ``w(m / steps_w)``, ``m = 0..steps_w``, one row per output filter
  (the first ``--filters``), with the model's own nonlinearity (Eq. B.4) and its learned
  evolution (``rda``: B.4 with the learned ``d, v, rho``; or the operator of ``rda_equation``,
  ``linear``, ``mlp``, read from the param names). Columns that an activation step uses are
  marked with ``*``. A freshly initialized model has ``d = 1e-3, v = rho = 0``, so its
  kernels barely move (the titles print ``max|w(t) - w(0)|``); trained ones do.
* **Curves** (:func:`curves_figure`): test accuracy and train loss per epoch from one or
  more run directories' ``metrics.jsonl`` (records with ``"kind": "epoch"``; records
  without ``kind`` are taken as epoch records), mean over seeds with a min-max band.

Checkpoints accepted by ``kernels --workdir W``: ``W/checkpoints/<step>/`` (or ``W`` itself
holding ``<step>/`` folders) written by orbax's ``CheckpointManager`` with
``StandardSave``; restored without a target (the raw pytree). The tree is the training
state ``{"step", "params", "batch_stats", "opt_state"}`` of :mod:`anodev2_jax.training`,
whose leaves carry a leading seed axis (``--seed-index`` picks one; default 0), or any
dict with a ``"params"`` entry, or a params tree itself, with or without the seed axis
(detected from the kernel's rank: 4 is HWIO, 5 has a seed axis). The method and ODE knobs
come from ``W/config.json`` (written by training) or from ``--method``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "DPI",
    "GAUSSIAN_UNIT_PX",
    "GAUSSIAN_ROWS",
    "gaussian_kernel",
    "gaussian_trajectories",
    "gaussian_figure",
    "find_evolved_kernels",
    "kernel_trajectory",
    "evolution_text",
    "relative_change",
    "init_params",
    "load_checkpoint_params",
    "kernels_figure",
    "read_metrics",
    "curves_figure",
    "save_figure",
    "main",
]

DPI = 100
GAUSSIAN_SIZE = 32
GAUSSIAN_UNIT_PX = 3.0  # one unit of length = 3 pixels, so the unit Gaussian spans a few pixels
GAUSSIAN_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
# (label, d [px^2 per unit time], v [px per unit time, (axis 0, axis 1)], rho [per unit time])
GAUSSIAN_ROWS: tuple[tuple[str, float, tuple[float, float], float], ...] = (
    ("diffusion\nd=8", 8.0, (0.0, 0.0), 0.0),
    ("advection\nv=(4,-7)", 0.0, (4.0, -7.0), 0.0),
    ("reaction\nrho=1.5", 0.0, (0.0, 0.0), 1.5),
    ("all three\nd=4, v=(4,-7), rho=0.8", 4.0, (4.0, -7.0), 0.8),
)
GAUSSIAN_PX = (1000, 820)  # figure size in pixels (width, height)
CURVES_PX = (1200, 450)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path, dpi: int = DPI) -> tuple[int, int]:
    """Save ``fig`` as a PNG (no tight bbox, so the size is exact) and close it; returns ``(width, height)`` px."""
    plt = _plt()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w, h = fig.get_size_inches()
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
    return int(round(w * dpi)), int(round(h * dpi))


def _figure(px: tuple[int, int]):
    return _plt().figure(figsize=(px[0] / DPI, px[1] / DPI), dpi=DPI)


# ----------------------------------------------------------------------------- Figure 3


def gaussian_kernel(size: int = GAUSSIAN_SIZE, unit_px: float = GAUSSIAN_UNIT_PX, dtype=np.float64) -> np.ndarray:
    """A unit-variance Gaussian (std ``unit_px`` pixels, peak 1) centred on a ``size x size`` grid."""
    c = (size - 1) / 2.0
    i = (np.arange(size) - c) / unit_px
    return np.exp(-0.5 * (i[:, None] ** 2 + i[None, :] ** 2)).astype(dtype)


def gaussian_trajectories(
    times: Sequence[float] = GAUSSIAN_TIMES, size: int = GAUSSIAN_SIZE, dtype=None
) -> list[np.ndarray]:
    """Per row of :data:`GAUSSIAN_ROWS`, the exact linear RDA solution at ``times`` (equally spaced from 0).

    Returns a list of arrays of shape ``(len(times), size, size)``.
    """
    import jax.numpy as jnp

    from anodev2_jax.rda import RDACoeffs, evolve_weights

    dt = _uniform_step(times)
    dtype = dtype or jnp.zeros(()).dtype  # float64 under x64, float32 otherwise
    w0 = jnp.asarray(gaussian_kernel(size), dtype)
    out = []
    for _, d, v, rho in GAUSSIAN_ROWS:
        coeffs = RDACoeffs(jnp.asarray(d, dtype), jnp.asarray(v, dtype), jnp.asarray(rho, dtype))
        traj = evolve_weights(w0, coeffs, num_steps=len(times) - 1, dt=dt, nonlinearity=None, trajectory=True)
        out.append(np.asarray(traj, np.float64))
    return out


def _uniform_step(times: Sequence[float]) -> float:
    t = np.asarray(times, np.float64)
    if len(t) < 2 or t[0] != 0.0 or not np.allclose(np.diff(t), t[1] - t[0]) or t[1] <= 0:
        raise ValueError(f"times={list(times)} must start at 0 and be equally spaced and increasing, e.g. 0 0.25 0.5")
    return float(t[1] - t[0])


def gaussian_figure(times: Sequence[float] = GAUSSIAN_TIMES, size: int = GAUSSIAN_SIZE):
    """Figure 3: a unit Gaussian evolved by diffusion, advection, reaction, all three (exact linear PDE)."""
    trajs = gaussian_trajectories(times, size)
    fig = _figure(GAUSSIAN_PX)
    rows, cols = len(GAUSSIAN_ROWS), len(times)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (traj, (label, *_)) in enumerate(zip(trajs, GAUSSIAN_ROWS)):
        vmax = float(np.max(np.abs(traj)))
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(traj[c], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {times[c]:g}", fontsize=10)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(
        f"Figure 3: a unit Gaussian ({size}x{size} grid, std {GAUSSIAN_UNIT_PX:g} px) under the linear RDA PDE\n"
        "exact solution (evolve_weights, nonlinearity=None); coefficients in pixel units; one colour scale per row",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.02, top=0.9, wspace=0.05, hspace=0.08)
    return fig


# ----------------------------------------------------------------------------- Figures 1, 4, 5


def _natural_key(path: tuple[str, ...]):
    return [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)] for part in path]


_RDA_NAMES = ("rda_v", "rda_rho")


def _evolution_names(node: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in node if str(k).startswith(("rda_", "evo_")))


def find_evolved_kernels(params: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Every module of ``params`` holding an evolved kernel: ``kernel`` next to evolution params (``rda_*`` / ``evo_*``).

    Returns ``[(path, module_dict), ...]`` sorted by path in natural order (so ``layer1_1``
    comes before ``layer1_2`` and ``layer2_2``; AlexNet has one, ``conv2/conv``).
    """
    found = []

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        if "kernel" in node and _evolution_names(node):
            if any(str(k).startswith("rda_") for k in node):
                missing = [k for k in _RDA_NAMES if k not in node]
                if "rda_d" not in node and "rda_d_raw" not in node:
                    missing.insert(0, "rda_d (or rda_d_raw)")
                if missing:
                    raise ValueError(f"params/{'/'.join(path)} has RDA coefficients but no {', '.join(missing)}")
            found.append((path, node))
            return
        for key in node:
            walk(node[key], path + (str(key),))

    walk(params, ())
    return sorted(found, key=lambda item: _natural_key(item[0]))


def _module_config(module: Mapping[str, Any], config):
    """``config`` with the evolution its params were made by (their names tell ``rda`` / ``linear`` / ``mlp`` and the RDA parameterization)."""
    import dataclasses

    if "evo_generator" in module:
        return dataclasses.replace(config, evolution="linear")
    if "evo_w1" in module:
        return dataclasses.replace(config, evolution="mlp")
    evolution = config.evolution if config.evolution in ("rda", "rda_equation") else "rda"
    parameterization = "softplus" if "rda_d_raw" in module else "abs"
    return dataclasses.replace(config, evolution=evolution, rda_parameterization=parameterization)


def kernel_trajectory(module: Mapping[str, Any], config, seed_index: int = 0):
    """The weight trajectory ``[w(0), ..., w(1)]`` of one evolved kernel module (Eq. 2.3c on the weight grid).

    Args:
      module: ``{"kernel": (kh, kw, cin, cout), <evolution params>}`` (the names of
        :func:`anodev2_jax.layers.declare_evolution`), each optionally with a leading seed
        axis (the kernel then has rank 5).
      config: the resolved :class:`anodev2_jax.methods.ODEConfig` (``steps_w``, ``sigma``,
        ``evolution``; ``rda`` vs ``linear`` vs ``mlp`` and the RDA parameterization are read
        from the param names, so a run written before those knobs replays as it trained).
      seed_index: which replica of a seed axis to draw.

    Returns:
      ``(traj, evolution)``: numpy ``(steps_w + 1, kh, kw, cin, cout)`` and the evolution
      (an ``RDACoeffs`` for ``rda``, else the operator), with numpy leaves.
    """
    import jax
    import jax.numpy as jnp

    from anodev2_jax.layers import conv_evolution
    from anodev2_jax.trajectory import leaf_trajectory

    parts = {k: np.asarray(module[k]) for k in ["kernel", *_evolution_names(module)]}
    if parts["kernel"].ndim == 5:
        n = parts["kernel"].shape[0]
        if not 0 <= seed_index < n:
            raise ValueError(f"seed_index={seed_index} is out of range: the checkpoint holds {n} seed(s); use 0..{n - 1}")
        parts = {k: a[seed_index] for k, a in parts.items()}
    elif parts["kernel"].ndim != 4:
        raise ValueError(f"kernel of shape {parts['kernel'].shape}: expected HWIO (kh, kw, cin, cout), optionally with a seed axis")
    dtype = parts["kernel"].dtype
    w0 = jnp.asarray(parts["kernel"])
    op = conv_evolution({k: jnp.asarray(a, dtype) for k, a in parts.items()}, _module_config(module, config))
    traj = leaf_trajectory(w0, op, num_steps=config.steps_w, dt=1.0 / config.steps_w, nonlinearity=config.sigma)
    return np.asarray(traj), jax.tree.map(np.asarray, op)


def evolution_text(op) -> str:
    """One line naming an evolution and its learned parameters (for titles and markdown tables: no ``|``)."""
    if hasattr(op, "d") and hasattr(op, "v") and hasattr(op, "rho"):  # RDACoeffs, RDAEquation
        d, v, rho = np.ravel(op.d), np.reshape(op.v, (-1, 2)), np.ravel(op.rho)
        kind = "B.4" if type(op).__name__ == "RDACoeffs" else "Eq. 2.6"
        if d.size == 1:
            return f"RDA ({kind}): d={d[0]:.3g}, v=({v[0, 0]:.3g}, {v[0, 1]:.3g}), rho={rho[0]:.3g}"
        return (
            f"RDA ({kind}), per filter, mean abs: d={np.mean(np.abs(d)):.3g}, v={np.mean(np.hypot(v[:, 0], v[:, 1])):.3g}, "
            f"rho={np.mean(np.abs(rho)):.3g}"
        )
    if hasattr(op, "generator"):
        g = np.asarray(op.generator)
        return f"linear dw/dt = G w: max abs G={np.max(np.abs(g)):.3g}, Frobenius norm {np.linalg.norm(g):.3g}"
    params = getattr(op, "params", {})
    norms = ", ".join(f"{k}={np.max(np.abs(np.asarray(a))):.3g}" for k, a in sorted(params.items()))
    return f"{type(op).__name__} q, max abs: {norms}"


def relative_change(traj: np.ndarray) -> float:
    """``max |w(1) - w(0)| / max |w(0)|`` of a trajectory (how far the evolution moves a kernel)."""
    traj = np.asarray(traj, np.float64)
    return float(np.max(np.abs(traj[-1] - traj[0])) / max(float(np.max(np.abs(traj[0]))), 1e-30))


@functools.lru_cache(maxsize=8)
def _jitted_init(model: str, method: str, knobs: tuple):
    # Cached: compiling a model's init (its forward pass) takes seconds on a CPU.
    import jax

    from anodev2_jax.models import get_model

    return jax.jit(get_model(model, method, **dict(knobs)).init)


def init_params(model: str, method: str, seed: int = 0, **knobs) -> dict:
    """Params of a freshly initialized ``get_model(model, method, **knobs)`` (float32)."""
    import jax
    import jax.numpy as jnp

    variables = _jitted_init(model, method, tuple(sorted(knobs.items())))(
        jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32)
    )
    return jax.tree.map(np.asarray, variables["params"])


def load_checkpoint_params(workdir: str | Path, step: Optional[int] = None) -> tuple[dict, int]:
    """The params subtree of the checkpoint ``step`` (default: latest) under ``workdir``.

    Restores the raw pytree with orbax (:func:`anodev2_jax.checkpoints.restore_raw`, no
    target); see the module docstring for the layouts accepted. Returns ``(params, step)``.
    """
    import jax

    from anodev2_jax import checkpoints

    workdir = Path(workdir)
    ckpt_dir = checkpoints.find_checkpoint_dir(workdir)
    if ckpt_dir is None:
        raise ValueError(
            f"no orbax checkpoint under {workdir} (looked for {workdir}/checkpoints/<step>/ and {workdir}/<step>/); "
            "pass a training run directory, or use --model M --method X --init"
        )
    tree, step = checkpoints.restore_raw(ckpt_dir, step)
    params = tree["params"] if isinstance(tree, Mapping) and "params" in tree else tree
    if not isinstance(params, Mapping):
        raise ValueError(f"checkpoint {ckpt_dir.absolute()}/{step} is not a dict of params (got {type(params).__name__})")
    return jax.tree.map(np.asarray, dict(params)), int(step)


def _resolved(method: str, knobs: Mapping[str, Any]):
    from anodev2_jax.methods import KNOBS, resolve_config

    return resolve_config(method, **{k: knobs.get(k) for k in KNOBS if knobs.get(k) is not None})


def kernels_figure(
    params: Mapping[str, Any],
    method: str,
    knobs: Optional[Mapping[str, Any]] = None,
    *,
    filters: int = 4,
    seed_index: int = 0,
    title: str = "",
):
    """Figures 1/4/5: input channel 0 of the first evolved kernel at every step of its weight trajectory (any operator q).

    Args:
      params: a model's params tree (see :func:`find_evolved_kernels`).
      method: ``anodev2_conf1`` or ``anodev2_conf2`` (sets ``steps_w`` and the schedule).
      knobs: ODE knob overrides (``steps_w``, ``nonlinearity``, ...); None values ignored.
      filters: how many output filters (rows) to draw.
      seed_index: which replica when the params carry a seed axis.
      title: a prefix of the figure title (model, source).

    Returns:
      The figure: ``filters`` rows x ``steps_w + 1`` columns, size
      ``(120 * columns + 140, 120 * rows + 130)`` pixels.
    """
    from anodev2_jax.trajectory import trajectory_indices

    config = _resolved(method, knobs or {})
    if not config.evolve:
        raise ValueError(f"method={method!r} does not evolve its kernels; use anodev2_conf1 or anodev2_conf2")
    kernels = find_evolved_kernels(params)
    if not kernels:
        raise ValueError(
            "these params hold no evolved kernel (no 'kernel' next to rda_* / evo_* params); they are not from an "
            "anodev2_* model"
        )
    path, module = kernels[0]
    traj, op = kernel_trajectory(module, config, seed_index)
    used = set(trajectory_indices(config.steps_z, config.steps_w, config.schedule))
    rows = max(1, min(int(filters), traj.shape[-1]))
    cols = traj.shape[0]
    width, height = 120 * cols + 140, 120 * rows + 130
    fig = _figure((width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        row = traj[:, :, :, 0, r]  # (steps_w + 1, kh, kw): input channel 0, output filter r
        vmax = float(np.max(np.abs(row))) or 1.0
        for m in range(cols):
            ax = axes[r, m]
            ax.imshow(row[m], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            change = float(np.max(np.abs(row[m] - row[0])))
            ax.set_title(f"t={m / config.steps_w:.2g}{'*' if m in used else ''}\n{change:.1e}", fontsize=7)
            if m == 0:
                ax.set_ylabel(f"filter {r}", fontsize=8)
    fig.suptitle(
        f"{title}\n{'/'.join(path)} kernel[:, :, 0, j] over its weight trajectory: {method}, "
        f"steps_w={config.steps_w}, time kernel {config.time_kernel}\n{evolution_text(op)}; "
        "* = used by an activation step; 2nd title line = max|w(t) - w(0)|",
        fontsize=8,
    )
    fig.subplots_adjust(left=70 / width, right=1 - 20 / width, bottom=10 / height, top=1 - 95 / height, wspace=0.1, hspace=0.45)
    return fig


# ----------------------------------------------------------------------------- curves


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The epoch records of ``run_dir/metrics.jsonl`` (or of that file itself)."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass a training run directory (it holds metrics.jsonl)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut off by a crash
        if isinstance(rec, dict) and rec.get("kind", "epoch") == "epoch" and "epoch" in rec:
            records.append(rec)
    if not records:
        raise ValueError(f"{path} has no epoch records (JSON lines with an 'epoch' key)")
    return records


def _run_label(run_dir: Path) -> str:
    for name in ("summary.json", "config.json"):
        p = run_dir / name
        if p.exists():
            try:
                d = json.loads(p.read_text())
                if "method" in d:
                    return f"{d.get('model', '')} {d['method']}".strip()
            except ValueError:
                pass
    return run_dir.name


def _per_epoch(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs and the mean, min and max over seeds of ``key`` (epochs lacking it are skipped)."""
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_epoch.setdefault(int(r["epoch"]), []).append(float(v))
    epochs = np.asarray(sorted(by_epoch), np.float64)
    vals = [by_epoch[int(e)] for e in epochs]
    return (
        epochs,
        np.asarray([np.mean(v) for v in vals]),
        np.asarray([np.min(v) for v in vals]),
        np.asarray([np.max(v) for v in vals]),
    )


def curves_figure(run_dirs: Sequence[str | Path], labels: Optional[Sequence[str]] = None):
    """Test accuracy and train loss vs epoch for several runs (mean over seeds, min-max band)."""
    if not run_dirs:
        raise ValueError("pass at least one run directory")
    fig = _figure(CURVES_PX)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, run in enumerate(run_dirs):
        run = Path(run)
        records = read_metrics(run)
        label = labels[i] if labels else _run_label(run if run.is_dir() else run.parent)
        for ax, key, scale in ((ax_acc, "test_accuracy", 100.0), (ax_loss, "train_loss", 1.0)):
            e, mean, lo, hi = _per_epoch(records, key)
            if not len(e):
                continue
            (line,) = ax.plot(e, scale * mean, marker="o" if len(e) < 30 else None, ms=3, label=label)
            if np.any(hi > lo):
                ax.fill_between(e, scale * lo, scale * hi, color=line.get_color(), alpha=0.2, lw=0)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (mean over seeds, min-max band)")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="train loss (epoch mean)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.9, wspace=0.2)
    return fig


# ----------------------------------------------------------------------------- command line


def _knobs_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from anodev2_jax.methods import KNOBS

    return {k: cfg.get(k) for k in KNOBS if cfg.get(k) is not None and k != "dtype"}


def _kernels_command(args) -> tuple[Any, str]:
    from anodev2_jax.methods import METHODS, MODELS

    if args.init == (args.workdir is not None):
        raise ValueError("kernels: give either --workdir W (a trained run) or --model M --method X --init")
    if args.init:
        if args.model not in MODELS or args.method not in METHODS:
            raise ValueError(
                f"kernels --init needs --model ({', '.join(MODELS)}) and --method (anodev2_conf1 or anodev2_conf2)"
            )
        if not _resolved(args.method, {}).evolve:  # before the (slow) init
            raise ValueError(f"method={args.method!r} does not evolve its kernels; use anodev2_conf1 or anodev2_conf2")
        params = init_params(args.model, args.method, seed=args.seed)
        method, knobs, title = args.method, {}, f"{args.model}, freshly initialized (seed {args.seed})"
    else:
        workdir = Path(args.workdir).expanduser()
        if not workdir.is_dir():
            state = "is a file, not a directory" if workdir.exists() else "does not exist"
            raise ValueError(f"--workdir {workdir} {state}; pass a training run directory (train.py's --workdir)")
        cfg_path = workdir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        method = args.method or cfg.get("method")
        if method is None:
            raise ValueError(f"{cfg_path} not found: pass --method (anodev2_conf1 or anodev2_conf2)")
        knobs = _knobs_from_config(cfg) if cfg.get("method", method) == method else {}
        if not _resolved(method, knobs).evolve:  # before restoring the checkpoint
            raise ValueError(f"method={method!r} does not evolve its kernels; use a run of anodev2_conf1 or anodev2_conf2")
        params, step = load_checkpoint_params(workdir, args.step)
        model = cfg.get("model", "model")
        title = f"{model}, checkpoint {step} of {workdir} (seed index {args.seed_index})"
    fig = kernels_figure(params, method, knobs, filters=args.filters, seed_index=args.seed_index, title=title)
    default = f"docs/kernels_{args.model}_init.png" if args.init else str(Path(args.workdir) / "kernels.png")
    return fig, args.out or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anodev2_jax.viz", description="Draw the paper's figures as PNGs.")
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("gaussian", help="Figure 3: a unit Gaussian under diffusion / advection / reaction / all")
    g.add_argument("--out", default="docs/figure3_gaussian.png")
    g.add_argument("--times", type=float, nargs="+", default=list(GAUSSIAN_TIMES), help="equally spaced, from 0")
    k = sub.add_parser("kernels", help="Figures 1/4/5: the first evolved kernel over its weight trajectory (any operator q)")
    k.add_argument("--workdir", default=None, help="training run directory (latest orbax checkpoint)")
    k.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    k.add_argument("--seed-index", type=int, default=0, help="replica of a multi-seed checkpoint (default 0)")
    k.add_argument("--model", default="resnet4")
    k.add_argument("--method", default=None, help="anodev2_conf1 | anodev2_conf2 (default: the run's config.json)")
    k.add_argument("--init", action="store_true", help="a freshly initialized model instead of a checkpoint")
    k.add_argument("--seed", type=int, default=0, help="init seed with --init")
    k.add_argument("--filters", type=int, default=4, help="output filters to draw (rows)")
    k.add_argument("--out", default=None, help="default: docs/kernels_<model>_init.png or <workdir>/kernels.png")
    c = sub.add_parser("curves", help="test accuracy and train loss vs epoch from metrics.jsonl files")
    c.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    c.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    c.add_argument("--out", default="curves.png")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; with no subcommand draws Figure 3 into docs/. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in (None, "gaussian"):
            fig = gaussian_figure(tuple(args.times) if args.command else GAUSSIAN_TIMES)
            out = args.out if args.command else "docs/figure3_gaussian.png"
        elif args.command == "kernels":
            fig, out = _kernels_command(args)
        else:
            if args.labels and len(args.labels) != len(args.runs):
                raise ValueError(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs; give one per run")
            fig, out = curves_figure(args.runs, args.labels), args.out
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    w, h = save_figure(fig, out)
    print(f"wrote {out} ({w}x{h} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
