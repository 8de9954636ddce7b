"""Reproduce Tables 1, 2 and 4 of the paper (and Table 3's parameter counts) with one command.

Usage::

    python -m anodev2_jax.reproduce --model resnet4 --table 1
    python -m anodev2_jax.reproduce --model all --table 1 2 4 --dataset cifar10_local --data-dir ~/data
    # every evolution operator q and time kernel K in configuration 1, beside the paper's methods:
    python -m anodev2_jax.reproduce --table evolution --dataset npz --data-dir /tmp/digits32.npz --epochs 15
    # offline, on real images: scikit-learn's digits without flips, at configs/digits.py's lr and batch
    python -m anodev2_jax.reproduce --table 1 --dataset digits --augment crop --learning-rate 0.01 \
        --batch-size 100 --epochs 15
    # a short run on generated data (seconds to minutes on a CPU):
    python -m anodev2_jax.reproduce --model resnet4 --table 2 --dataset synthetic \
        --epochs 1 --num-train 64 --num-test 64 --batch-size 32 --num-seeds 2 --workdir /tmp/repro

For every model and every method the requested tables need (Table 1: ``baseline``,
``anodev2_conf1``; Table 2: ``baseline``, ``anodev2_conf2``; Table 4: ``baseline``,
``neural_ode``, ``anode``, ``anodev2_conf2``) it trains ``--num-seeds`` replicas in one
vmapped program (``config.num_seeds``) with :func:`anodev2_jax.training.train_and_evaluate`
into ``<workdir>/<model>/<method>/``, then writes a markdown file (``--out``, default
``<workdir>/results.md``, also printed) with each table shaped like the paper's (Min / Max
and Avg test accuracy per method, and the improvement over the baseline) with the paper's
own numbers in parentheses, followed by the Table 3 parameter comparison.

Decisions (where the issue is silent):

* **Configs.** Each run starts from ``configs/<model>.py:get_config(method)``, the
  Appendix C recipe (350 epochs for the ResNets, 120 for AlexNet, batch 256, learning rate
  0.1 with step decay); the flags override single fields. ``configs/`` lives at the
  repository root (it is not part of the installed package), so the command runs from a
  checkout (``pip install -e .``); it finds ``configs`` on ``sys.path`` or next to this
  package.
* **Seeds.** ``--num-seeds`` defaults to 5, the paper's five runs per entry, not to the
  config's 1: a min / max / avg over one run says nothing.
* **Short runs.** ``--epochs E`` below the config's epoch count scales the learning-rate
  boundaries by ``E / num_epochs`` (rounded; boundaries that fall outside ``1..E-1`` are
  dropped), so a shortened run keeps the shape of the schedule instead of never decaying.
* **Resume.** A method whose run directory already holds a ``summary.json`` of the same
  config (every field except where the data lives and how often to log / evaluate /
  checkpoint) is not trained again. Any other existing run directory is handed to
  ``train_and_evaluate``, which resumes it from its latest checkpoint (or extends it when
  only ``num_epochs`` grew). A run directory holding a different config is refused before
  anything trains, with the fix in this command's flags (train.py's ``--config.FIELD`` is
  none of them). That includes a finished short run asked for more ``--epochs``: the
  shortened schedule scales the learning-rate boundaries, so another ``--epochs`` is
  another schedule, not an extension.
* **Improvements** are differences of percentages, field by field (min - min, max - max,
  avg - avg), as in the paper's "Imp." rows; Table 4 also gets the paper's ANODEV2 vs
  ANODE comparison.
* **Table 3** counts come from each run's ``summary.json`` (what was trained) and, for
  methods not run, from the model itself (``jax.eval_shape``, no compute).

The aggregation (:func:`load_results`, :func:`accuracy_stats`, :func:`format_accuracy_table`,
:func:`format_param_table`) reads only ``summary.json`` files and imports no JAX, so it is
tested on fake results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from anodev2_jax.paper import METHOD_TITLES, METHODS, MODEL_TITLES, MODELS, PAPER_ACCURACY, PAPER_PARAMS, PAPER_SEEDS

__all__ = [
    "MODELS",
    "METHODS",
    "TABLES",
    "PAPER_ACCURACY",
    "PAPER_PARAMS",
    "methods_for",
    "run_dir",
    "load_results",
    "accuracy_stats",
    "format_accuracy_table",
    "format_evolution_table",
    "EVOLUTION_ROWS",
    "rows_for",
    "parse_tables",
    "evolution_record",
    "format_param_table",
    "param_counts",
    "base_config",
    "make_config",
    "is_done",
    "own_flags",
    "report",
    "main",
]

# Rows of each table, and the rows whose difference the table reports.
TABLES: dict[int, dict[str, Any]] = {
    1: dict(
        methods=("baseline", "anodev2_conf1"),
        title="Table 1: configuration 1 (N_t = 5 time steps for z and theta)",
        compare=(("anodev2_conf1", "baseline"),),
    ),
    2: dict(
        methods=("baseline", "anodev2_conf2"),
        title="Table 2: configuration 2 (N_t = 2 for z, 10 for theta)",
        compare=(("anodev2_conf2", "baseline"),),
    ),
    4: dict(
        methods=("baseline", "neural_ode", "anode", "anodev2_conf2"),
        title="Table 4: ablation (N_t = 2 for z; theta static for NeuralODE and ANODE)",
        compare=(
            ("neural_ode", "baseline"),
            ("anode", "baseline"),
            ("anodev2_conf2", "baseline"),
            ("anodev2_conf2", "anode"),
        ),
    ),
}

SUMMARY_FILE = "summary.json"
EVOLUTION_FILE = "evolution.json"

# ``--table evolution``: the study of issue 12 (every evolution operator q and time kernel K
# in configuration 1, next to the paper's methods): ``{row: (method, config overrides)}``.
# A row named after a method is that method's run directory, shared with Tables 1, 2, 4.
EVOLUTION_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "neural_ode": ("neural_ode", {}),
    "anode": ("anode", {}),
    "anodev2_conf1": ("anodev2_conf1", {}),
    "anodev2_conf2": ("anodev2_conf2", {}),
    "conf1_rda_equation": ("anodev2_conf1", {"evolution": "rda_equation"}),
    "conf1_linear": ("anodev2_conf1", {"evolution": "linear"}),
    "conf1_mlp": ("anodev2_conf1", {"evolution": "mlp"}),
    "conf1_exponential": ("anodev2_conf1", {"time_kernel": "exponential"}),
}
EVOLUTION_TITLES = {
    "baseline": "Baseline (ResNet)",
    "neural_ode": "Neural ODE",
    "anode": "ANODE",
    "anodev2_conf1": "Conf. 1, q = RDA (B.4), K = Dirac",
    "anodev2_conf2": "Conf. 2, q = RDA (B.4), K = Dirac",
    "conf1_rda_equation": "Conf. 1, q = RDA Eq. 2.6 (RK4)",
    "conf1_linear": "Conf. 1, q = linear (dw/dt = G w)",
    "conf1_mlp": "Conf. 1, q = MLP",
    "conf1_exponential": "Conf. 1, q = RDA (B.4), K = exponential",
}


def _ignored_fields() -> set[str]:
    """Config fields a finished run may differ in and still count as "the same run".

    The fields a restart may change (``run_config.RESUMABLE_FIELDS``: where the data lives,
    how often to log / evaluate / checkpoint, multi-host start-up...) except ``num_epochs``,
    which changes what the finished run is.
    """
    from anodev2_jax import run_config  # lazy: --help and --report-only stay light (no optax, no orbax)

    return set(run_config.RESUMABLE_FIELDS) - {"num_epochs"}


Stats = tuple[float, float, float]


# ----------------------------------------------------------------------------- aggregation


def methods_for(tables: Iterable[int | str]) -> tuple[str, ...]:
    """The methods the given tables need, in the paper's order (Table 4's rows order)."""
    needed = set()
    for t in tables:
        if t == "evolution":
            needed.update(method for method, _ in EVOLUTION_ROWS.values())
            continue
        if t not in TABLES:
            raise ValueError(f"table {t!r} is not reproducible here; choose from {', '.join(map(str, TABLES))} or evolution")
        needed.update(TABLES[t]["methods"])
    return tuple(m for m in METHODS if m in needed)


def rows_for(tables: Iterable[int | str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``[(row, method, config overrides), ...]``: the run directories the tables need, each once.

    Tables 1, 2, 4 need their methods (row = method, no override); ``evolution`` the
    :data:`EVOLUTION_ROWS`.
    """
    tables = list(tables)
    rows = {m: (m, {}) for m in methods_for([t for t in tables if t != "evolution"])}
    if "evolution" in tables:
        rows.update(EVOLUTION_ROWS)
    order = [m for m in METHODS if m in rows] + [r for r in EVOLUTION_ROWS if r in rows and r not in METHODS]
    return [(r, *rows[r]) for r in order]


def run_dir(root: str | Path, model: str, method: str) -> Path:
    """The run directory of one (model, method): ``<root>/<model>/<method>``."""
    return Path(root) / model / method


def _read_summary(path: Path) -> Optional[dict[str, Any]]:
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to rerun that method") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds {type(summary).__name__}, not a JSON object; delete it to rerun that method")
    return summary


def load_results(root: str | Path, models: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Optional[dict]]]:
    """``{model: {row: summary dict or None}}`` from ``<root>/<model>/<row>/summary.json``.

    ``methods`` are the rows (a method's row is named after it). A row's ``evolution.json``
    (:func:`evolution_record`), where there is one, comes as the summary's ``"evolution"``.
    """
    out: dict[str, dict[str, Optional[dict]]] = {}
    for m in models:
        out[m] = {}
        for x in methods:
            summary = _read_summary(run_dir(root, m, x) / SUMMARY_FILE)
            evo = _read_summary(run_dir(root, m, x) / EVOLUTION_FILE) if summary is not None else None
            if evo is not None:
                summary = {**summary, "evolution": evo}
            out[m][x] = summary
    return out


def accuracy_stats(summary: Mapping[str, Any], where: str = "summary") -> Stats:
    """``(min, max, avg)`` test accuracy in percent over the seeds of one run.

    Args:
      summary: a ``summary.json`` dict; ``test_accuracy`` is a list of fractions in [0, 1]
        (one per seed) or a single fraction.
      where: names the file in error messages.

    Raises:
      ValueError: missing, empty or out-of-range accuracies.
    """
    acc = summary.get("test_accuracy")
    if isinstance(acc, (int, float)) and not isinstance(acc, bool):
        acc = [acc]
    if not isinstance(acc, list) or not acc:
        raise ValueError(f"{where}: 'test_accuracy' must be a non-empty list (one value per seed), got {acc!r}")
    for a in acc:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"{where}: test_accuracy value {a!r} is not a fraction in [0, 1]")
    pct = [100.0 * a for a in acc]
    return min(pct), max(pct), sum(pct) / len(pct)


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f}%" if signed else f"{x:.2f}%"


def _cells(ours: Optional[Stats], paper: Optional[Stats], signed: bool = False) -> tuple[str, str]:
    """``("min / max (paper min / max)", "avg (paper avg)")``."""
    o = ours or (None, None, None)
    p = paper or (None, None, None)
    minmax = f"{_pct(o[0], signed)} / {_pct(o[1], signed)} ({_pct(p[0], signed)} / {_pct(p[1], signed)})"
    avg = f"{_pct(o[2], signed)} ({_pct(p[2], signed)})"
    return minmax, avg


def _diff(a: Optional[Stats], b: Optional[Stats]) -> Optional[Stats]:
    if a is None or b is None:
        return None
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _setting(results: Mapping[str, Mapping[str, Optional[dict]]], models: Sequence[str], methods: Sequence[str]) -> str:
    """One line saying what our numbers are (dataset, epochs, seeds), from the summaries."""
    datasets, epochs, seeds = set(), set(), set()
    for model in models:
        for method in methods:
            s = results.get(model, {}).get(method)
            if s is None:
                continue
            cfg = s.get("config") or {}
            datasets.add(str(cfg.get("dataset", "?")))
            epochs.add(str(s.get("epochs", cfg.get("num_epochs", "?"))))
            acc = s.get("test_accuracy")
            seeds.add(str(len(acc) if isinstance(acc, list) else 1))
    if not datasets:
        return "Ours: no finished runs yet (— marks a missing run)."
    j = lambda xs: "/".join(sorted(xs))
    return (
        f"Ours: dataset {j(datasets)}, {j(epochs)} epoch(s), {j(seeds)} seed(s) per entry; "
        f"paper: CIFAR-10, full schedule, 5 runs. Cells: ours (paper); — marks a missing run."
    )


def format_accuracy_table(
    table: int, results: Mapping[str, Mapping[str, Optional[dict]]], models: Sequence[str]
) -> str:
    """A markdown table shaped like the paper's Table ``table``: ours with the paper's in parentheses.

    Args:
      table: 1, 2 or 4.
      results: ``{model: {method: summary or None}}`` (:func:`load_results`).
      models: the model columns, in order.

    Returns:
      Markdown text: a title line, the table (rows = methods, then the "Imp." rows; per
      model a "Min / Max" and an "Avg" column), and a line describing our runs.
    """
    spec = TABLES[table]
    stats: dict[tuple[str, str], Optional[Stats]] = {}
    for model in models:
        for method in spec["methods"]:
            s = results.get(model, {}).get(method)
            stats[model, method] = None if s is None else accuracy_stats(s, f"{model}/{method}/{SUMMARY_FILE}")

    header = "| |" + "".join(f" {MODEL_TITLES[m]} Min / Max | {MODEL_TITLES[m]} Avg |" for m in models)
    lines = [f"**{spec['title']}**: test accuracy, ours (paper)", "", header, "|---|" + "---|---|" * len(models)]
    for method in spec["methods"]:
        cells = []
        for model in models:
            cells += _cells(stats[model, method], PAPER_ACCURACY[model][method])
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cells) + " |")
    for a, b in spec["compare"]:
        label = "Imp." if len(spec["compare"]) == 1 else f"Imp. {METHOD_TITLES[a]} vs {METHOD_TITLES[b]}"
        cells = []
        for model in models:
            ours = _diff(stats[model, a], stats[model, b])
            paper = _diff(PAPER_ACCURACY[model][a], PAPER_ACCURACY[model][b])
            cells += _cells(ours, paper, signed=True)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", _setting(results, models, spec["methods"])]
    return "\n".join(lines)


def format_evolution_table(results: Mapping[str, Mapping[str, Optional[dict]]], models: Sequence[str]) -> str:
    """The evolution study: test accuracy per :data:`EVOLUTION_ROWS` row, and what the evolution learned.

    Args:
      results: ``{model: {row: summary or None}}`` (:func:`load_results` with the rows);
        a summary may carry ``"evolution"`` (the row's ``evolution.json``, see
        :func:`evolution_record`).
      models: the model columns, in order.

    Returns:
      Markdown: the accuracy table (Min / Max / Avg and Avg minus the baseline's), then per
      evolving row and model the learned evolution of the first evolved kernel (seed 0) and
      ``max |w(1) - w(0)| / max |w(0)|`` over every evolved kernel (min / max over seeds).
    """
    header = "| |" + "".join(f" {MODEL_TITLES[m]} Min / Max | {MODEL_TITLES[m]} Avg | vs baseline |" for m in models)
    lines = ["**Evolution study**: test accuracy (q: evolution operator, Eq. 2.3c; K: time kernel, Eq. 2.3d)", "", header,
             "|---|" + "---|---|---|" * len(models)]  # fmt: skip
    learned = []
    baseline = {}
    for model in models:
        base = results.get(model, {}).get("baseline")
        baseline[model] = None if base is None else accuracy_stats(base, f"{model}/baseline/{SUMMARY_FILE}")
    for row in EVOLUTION_ROWS:
        cells = []
        for model in models:
            s = results.get(model, {}).get(row)
            stats = None if s is None else accuracy_stats(s, f"{model}/{row}/{SUMMARY_FILE}")
            diff = _diff(stats, baseline[model])
            o = stats or (None, None, None)
            cells += [f"{_pct(o[0])} / {_pct(o[1])}", _pct(o[2]), "" if row == "baseline" else _pct(diff and diff[2], signed=True)]
            evo = (s or {}).get("evolution")
            if evo:
                kernels = evo.get("kernels", [])
                if kernels:
                    change = [c for k in kernels for c in k["relative_change"]]
                    learned.append(
                        f"| {EVOLUTION_TITLES[row]} | {MODEL_TITLES[model]} | {kernels[0]['evolution']} | "
                        f"{min(change):.3f} / {max(change):.3f} | {evo.get('time_kernel') or '—'} |"
                    )
        lines.append(f"| {EVOLUTION_TITLES[row]} | " + " | ".join(cells) + " |")
    lines += ["", _setting(results, models, list(EVOLUTION_ROWS))]
    if learned:
        lines += [
            "",
            "**What the evolution learned** (final checkpoint; first evolved kernel, seed 0; change: "
            "max|w(1) - w(0)| / max|w(0)| over every evolved kernel and seed, min / max)",
            "",
            "| row | model | learned q (first kernel, seed 0) | change min / max | learned K (seed 0) |",
            "|---|---|---|---|---|",
            *learned,
        ]
    return "\n".join(lines)


def format_param_table(counts: Mapping[str, Mapping[str, Optional[int]]], models: Sequence[str]) -> str:
    """Table 3: parameter counts per method (rows) and model (columns), ``ours (paper)``.

    Args:
      counts: ``{method: {model: count or None}}``.
      models: the model columns, in order.
    """
    lines = [
        "**Table 3: parameters** (BN scale and shift counted, running statistics not), ours (paper)",
        "",
        "| method | " + " | ".join(MODEL_TITLES[m] for m in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for method in METHODS:
        row = counts.get(method, {})
        cells = []
        for model in models:
            n = row.get(model)
            cells.append(f"{'—' if n is None else f'{n:,}'} ({PAPER_PARAMS[method][model]})")
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def param_counts(
    results: Mapping[str, Mapping[str, Optional[dict]]],
    models: Sequence[str],
    compute_missing: Optional[Mapping[str, Any]] = None,
) -> dict[str, dict[str, Optional[int]]]:
    """``{method: {model: count}}`` for every method: ``num_params`` of a run, else computed.

    Args:
      results: ``{model: {method: summary or None}}``.
      models: models to count.
      compute_missing: None to leave methods without a run as None, or the ODE knobs
        (``{knob: value or None}``) to count their models with ``jax.eval_shape``.
    """
    counts: dict[str, dict[str, Optional[int]]] = {}
    for method in METHODS:
        counts[method] = {}
        for model in models:
            s = results.get(model, {}).get(method)
            n = None if s is None else s.get("num_params")
            if n is None and compute_missing is not None:
                n = _count_model_params(model, method, compute_missing)
            counts[method][model] = n
    return counts


def _count_model_params(model: str, method: str, knobs: Mapping[str, Any]) -> int:
    import jax
    import jax.numpy as jnp

    from anodev2_jax import models as models_lib

    net = models_lib.get_model(model, method, **knobs)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(net.init, jax.random.key(0), x)  # shapes only: no compute
    return models_lib.count_params(shapes["params"])


def report(
    root: str | Path,
    models: Sequence[str],
    tables: Sequence[int | str],
    compute_missing_params: Optional[Mapping[str, Any]] = None,
) -> str:
    """The whole markdown report for ``tables`` from the runs under ``root``."""
    methods_for(tables)  # validates the table numbers
    results = load_results(root, models, [r for r, _, _ in rows_for([*TABLES, "evolution"])])
    parts = [format_accuracy_table(t, results, models) for t in sorted({t for t in tables if t != "evolution"})]
    if "evolution" in tables:
        parts.append(format_evolution_table(results, models))
    parts.append(format_param_table(param_counts(results, models, compute_missing_params), models))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- configs and runs


def _import_configs() -> None:
    """Make the repository's ``configs`` package importable (on sys.path, or next to this package)."""
    try:
        import configs  # noqa: F401
    except ImportError:
        repo = Path(__file__).resolve().parents[1]
        if not (repo / "configs" / "default.py").exists():
            raise ImportError(
                "cannot find the configs package (configs/*.py at the repository root); run from a "
                "checkout installed with pip install -e ., or from the repository root"
            ) from None
        sys.path.insert(0, str(repo))


def base_config(model: str, method: str):
    """``configs/<model>.py:get_config(method)``."""
    import importlib

    _import_configs()
    return importlib.import_module(f"configs.{model}").get_config(method)


def _scaled_boundaries(boundaries: Sequence[int], old_epochs: int, new_epochs: int) -> tuple[int, ...]:
    if new_epochs >= old_epochs:
        return tuple(boundaries)
    scaled = sorted({int(round(b * new_epochs / old_epochs)) for b in boundaries})
    return tuple(b for b in scaled if 1 <= b < new_epochs)


def make_config(model: str, method: str, overrides: Mapping[str, Any]):
    """The run config: ``configs/<model>.py:get_config(method)`` with ``overrides`` applied.

    ``overrides`` holds config fields (None values are ignored). A ``num_epochs`` below the
    config's scales the learning-rate boundaries (see the module docstring).
    """
    config = base_config(model, method)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    epochs = overrides.get("num_epochs")
    if epochs is not None and "lr_boundaries_epochs" not in overrides:
        config.lr_boundaries_epochs = _scaled_boundaries(config.lr_boundaries_epochs, config.num_epochs, epochs)
    for name, value in overrides.items():
        if name not in config:
            raise ValueError(f"config has no field {name!r}; the fields are those of configs/default.py")
        config[name] = value
    return config


def _plain(config) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def is_done(workdir: str | Path, config) -> bool:
    """True if ``workdir/summary.json`` exists and records the same run as ``config``.

    A summary without a ``config`` record (e.g. written by hand) counts as done.
    """
    summary = _read_summary(Path(workdir) / SUMMARY_FILE)
    if summary is None:
        return False
    stored = summary.get("config")
    if not isinstance(stored, dict):
        return True
    from anodev2_jax.run_config import ADDED_FIELDS  # a field added since: the value such runs had

    wanted = _plain(config)
    keys = (set(stored) | set(wanted)) - _ignored_fields()
    return all(stored.get(k, ADDED_FIELDS.get(k)) == wanted.get(k) for k in keys)


# The flag of this command that sets each config field (train.py's --config.FIELD is none of them).
_FLAGS = {
    "num_epochs": "--epochs", "lr_boundaries_epochs": "--epochs", "dataset": "--dataset", "num_seeds": "--num-seeds",
    "seed": "--seed", "num_train": "--num-train", "num_test": "--num-test", "batch_size": "--batch-size",
    "learning_rate": "--learning-rate", "data_dir": "--data-dir", "augment": "--augment",
}  # fmt: skip
_CONFIG_FLAG = re.compile(r"--config\.(\w+)(=\S*)?")


def own_flags(message: str) -> str:
    """``message`` (written for train.py) with each ``--config.FIELD[=VALUE]`` in this command's flags.

    A field this command has no flag for is named as a field of ``configs/<model>.py``.
    """

    def swap(m: re.Match) -> str:
        flag = _FLAGS.get(m.group(1))
        if flag is None or m.group(1) == "lr_boundaries_epochs":
            return f"{m.group(1)} (a field of configs/<model>.py; this command has no flag for it)"
        value = (m.group(2) or "")[1:]
        return f"{flag} {value}" if value else flag

    return _CONFIG_FLAG.sub(swap, " ".join(str(message).split()))


def _mismatch_text(e) -> str:
    """A :class:`anodev2_jax.errors.WorkdirMismatch` in this command's terms."""
    flag = _FLAGS.get(e.field)
    why = (
        " (--epochs shortens the schedule by scaling its learning-rate boundaries, so a run of another --epochs "
        "has another schedule and cannot be extended)"
        if e.field == "lr_boundaries_epochs"
        else ""
    )
    same = f"rerun with the {flag} that run was made with, or " if flag else ""
    return (
        f"{e.workdir} holds a run with {e.field}={e.stored!r}, this sweep asks for {e.field}={e.wanted!r}{why}; "
        f"{same}pass another --workdir (or delete {e.workdir}) to train it anew"
    )


def _knob_overrides(config) -> dict[str, Any]:
    from anodev2_jax import models as models_lib

    return {k: config.get(k) for k in models_lib.KNOBS if k in config}


def evolution_record(workdir: str | Path, config) -> Optional[dict[str, Any]]:
    """What the evolution of a finished evolving run learned, from its latest checkpoint (None without evolution).

    ``{"step", "evolution", "time_kernel", "kernels": [{"path", "evolution", "relative_change"}]}``:
    per evolved kernel the learned evolution of seed 0 (:func:`anodev2_jax.viz.evolution_text`)
    and ``max |w(1) - w(0)| / max |w(0)|`` per seed (:func:`anodev2_jax.viz.relative_change`);
    the time kernel's learned parameter of seed 0 (``rate = exp(time_log_rate)`` or the
    per-lag ``values``) where the run has one.
    """
    import numpy as np

    from anodev2_jax import run_config, viz
    from anodev2_jax.methods import resolve_config

    knobs = run_config.resolved_knobs(run_config.config_dict(config))
    cfg = resolve_config(config.method, **knobs)
    if not cfg.evolve:
        return None
    params, step = viz.load_checkpoint_params(workdir)
    kernels = []
    for path, module in viz.find_evolved_kernels(params):
        seeds = np.asarray(module["kernel"]).shape[0] if np.ndim(module["kernel"]) == 5 else 1
        changes, text = [], ""
        for i in range(seeds):
            traj, op = viz.kernel_trajectory(module, cfg, i)
            changes.append(round(viz.relative_change(traj), 6))
            text = text or viz.evolution_text(op)
        kernels.append({"path": "/".join(path), "evolution": text, "relative_change": changes})
    time_kernel = None
    for name, node in sorted(params.items()):
        if isinstance(node, dict) and "time_log_rate" in node:
            log_rate = float(np.ravel(np.asarray(node["time_log_rate"]))[0])
            time_kernel = f"{name}: exponential, rate={float(np.exp(log_rate)):.4g}"
        elif isinstance(node, dict) and "time_values" in node:
            values = np.asarray(node["time_values"])
            values = values[0] if values.ndim == 2 else values
            time_kernel = f"{name}: discrete, values=({', '.join(f'{v:.3g}' for v in values)})"
        if time_kernel:
            break
    return {"step": step, "evolution": cfg.evolution, "time_kernel": time_kernel, "kernels": kernels}


# ----------------------------------------------------------------------------- command line


def parse_tables(values: Sequence[str]) -> list[int | str]:
    """The ``--table`` values: the table numbers (sorted, ``"all"`` is every table), then ``"evolution"`` if asked for."""
    out: list[int | str] = []
    for v in values:
        if v == "all":
            out += list(TABLES)
            continue
        if v == "evolution":
            out.append(v)
            continue
        try:
            t = int(v)
        except ValueError:
            t = -1
        if t not in TABLES:
            raise argparse.ArgumentTypeError(f"--table {v!r}: choose from {', '.join(map(str, TABLES))}, evolution or all")
        out.append(t)
    return sorted({t for t in out if t != "evolution"}) + (["evolution"] if "evolution" in out else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anodev2_jax.reproduce",
        description="Train the methods of the paper's Tables 1, 2, 4 and write them beside the paper's numbers.",
    )
    p.add_argument("--model", default="resnet4", help="alexnet, resnet4, resnet10 or all (default resnet4)")
    p.add_argument(
        "--table", nargs="+", default=["1"],
        help="1, 2, 4, evolution (every q and K in configuration 1, beside the paper's methods; several allowed) "
        "or all (= 1 2 4; default 1)",
    )
    p.add_argument("--workdir", default="runs/reproduce", help="root of the run directories <workdir>/<model>/<method>")
    p.add_argument("--out", default=None, help="markdown output (default <workdir>/results.md)")
    p.add_argument("--epochs", type=int, default=None, help="num_epochs (default: the config's Appendix C schedule)")
    p.add_argument(
        "--dataset", default=None,
        help="cifar10 | cifar10_local | npz | synthetic | digits (default: the config's cifar10; see anodev2_jax/data.py)",
    )
    p.add_argument("--data-dir", default=None, help="data_dir of the dataset")
    p.add_argument("--num-seeds", type=int, default=PAPER_SEEDS, help="seeds per method, trained vmapped (default 5)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: the config's 0)")
    p.add_argument("--num-train", type=int, default=None, help="keep only the first N training images")
    p.add_argument("--num-test", type=int, default=None, help="keep only the first N test images")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the config's 256)")
    p.add_argument("--learning-rate", type=float, default=None, help="initial learning rate (default: the config's 0.1)")
    p.add_argument(
        "--augment", default=None,
        help="crop_flip | crop | none: the training augmentation (default: the config's crop_flip; use crop for digits)",
    )
    p.add_argument(
        "--only", nargs="+", default=None, metavar="ROW",
        help="train only these rows of the tables, in this order (methods, or the evolution table's rows: "
        + ", ".join(EVOLUTION_ROWS) + "); the report still shows every row",
    )
    p.add_argument("--report-only", action="store_true", help="train nothing; tabulate the runs that exist")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input; 3, 4, 130, 143 as train.py)."""
    args = build_parser().parse_args(argv)
    # the sweep's own command line continues it: finished rows are skipped, a stopped one resumes
    again = shlex.join([os.path.basename(sys.executable), "-m", "anodev2_jax.reproduce", *(sys.argv[1:] if argv is None else argv)])
    try:
        tables = parse_tables(args.table)
    except argparse.ArgumentTypeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.model == "all":
        models = list(MODELS)
    elif args.model in MODELS:
        models = [args.model]
    else:
        print(f"error: --model {args.model!r}: choose from {', '.join(MODELS)} or all", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    out = Path(args.out) if args.out else root / "results.md"
    overrides = dict(
        num_epochs=args.epochs,
        dataset=args.dataset,
        data_dir=args.data_dir,
        num_seeds=args.num_seeds,
        seed=args.seed,
        num_train=args.num_train,
        num_test=args.num_test,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        augment=args.augment,
    )
    rows = rows_for(tables)
    if args.only:
        known = {r: (r, m, extra) for r, m, extra in rows}
        unknown = [r for r in args.only if r not in known]
        if unknown:
            print(f"error: --only {' '.join(unknown)}: not a row of --table {' '.join(map(str, tables))}; "
                  f"choose from {', '.join(known)}", file=sys.stderr)  # fmt: skip
            return 2
        rows = [known[r] for r in dict.fromkeys(args.only)]

    from anodev2_jax import data as data_lib
    from anodev2_jax import rundir, run_config, steps, training

    try:
        # Every config is built and validated, and checked against its run directory, before anything trains.
        runs = []
        for model in models:
            for row, method, extra in rows:
                config = make_config(model, method, {**overrides, **extra})
                training.validate_config(config)
                steps.create_model(config)
                workdir = run_dir(root, model, row)
                if not args.report_only and workdir.is_dir() and not is_done(workdir, config):
                    rundir.check_workdir(workdir, run_config.config_dict(config))
                runs.append((model, row, config, workdir))
        knobs = _knob_overrides(make_config(models[0], "baseline", overrides))
        if not args.report_only:
            for i, (model, row, config, workdir) in enumerate(runs, start=1):
                tag = f"[{i}/{len(runs)}] {model} {row}"
                if is_done(workdir, config):
                    print(f"{tag}: done already ({workdir / SUMMARY_FILE}), skipped", flush=True)
                else:
                    print(f"{tag}: training {config.num_seeds} seed(s) for {config.num_epochs} epoch(s) in {workdir}", flush=True)
                    training.train_and_evaluate(config, workdir, resume_command=again)
                if "evolution" in tables and not (workdir / EVOLUTION_FILE).exists():
                    record = evolution_record(workdir, config)
                    if record is not None:
                        (workdir / EVOLUTION_FILE).write_text(json.dumps(record, indent=1) + "\n")
        text = report(root, models, tables, compute_missing_params=knobs)
    except training.WorkdirMismatch as e:
        print(f"error: {_mismatch_text(e)}", file=sys.stderr)
        return 2
    except (training.ConfigError, data_lib.DataError, ValueError) as e:
        print(f"error: {own_flags(e)}", file=sys.stderr)
        return 2
    except training.Preempted as e:  # checkpoint saved: rerunning the sweep resumes this run, skips finished ones
        print(f"{e} (the same command continues the sweep: finished rows are skipped)", file=sys.stderr)
        return 128 + e.signum
    except (training.NonFiniteError, training.WriteError, training.OutOfMemory) as e:  # train.py's exit codes
        print(f"error: {own_flags(e)}", file=sys.stderr)
        return {training.NonFiniteError: 3, training.WriteError: 4}.get(type(e), 5)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text + f"\n(written to {out})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
