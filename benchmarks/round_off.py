"""How far two compiled programs of the same run differ: the round-off the exact tests allow for.

XLA:CPU generates code for the CPU it runs on, and two programs of the same math (one step
per call against a ``lax.scan`` over steps) may round float32 differently. This script
trains the run of ``tests/test_engine.py``'s steps_per_call test (ResNet-4 baseline, 32
synthetic images, batch 8, 2 epochs: 8 SGD steps at lr 0.01; in float32, and in float64 as
the test runs it) and the resume of the
committed pre-layout fixture (``tests/test_checkpoints.py``: ResNet-4 configuration 2,
steps 3-4), each in a fresh process per instruction set (``XLA_FLAGS=--xla_cpu_max_isa=...``:
the native one, AVX2, AVX, SSE4_2, which emulate older CPUs), and prints the largest
relative difference, in the measure the test uses (the engine runs: ``max |x - y| / max |y|``
over every float leaf of the final state, against the native one-step-per-call run; the
fixture: every record's numbers and each leaf's sum, absolute sum and first entry over its
L1 norm, against what was recorded), and of the test loss, next to what a real change does
(the learning rate 1% higher; the fixture continued with lr 1% higher). Both XLA optimization
levels are measured: the default (what ``train.py`` runs) and 0 (what the test suite runs)::

    python benchmarks/round_off.py            # ~5-10 minutes on 2 CPU cores
    python benchmarks/round_off.py --isas native AVX --levels 0

The tolerances of ``tests/test_engine.py`` (``_ROUND_OFF``) and ``tests/test_checkpoints.py``
(``RTOL``) are read off this table: well above every round-off row, well below every
"real change" row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "run_before_layout"

_WORKER = """
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import numpy as np
import jax
from configs import default
from anodev2_jax import checkpoints, training

out = Path({out!r})

def engine_config(k, lr, dtype):
    config = default.get_config("baseline")
    config.dataset, config.num_train, config.num_test, config.batch_size = "synthetic", 32, 12, 8
    config.num_epochs, config.lr_boundaries_epochs, config.learning_rate = 2, (1,), lr
    config.log_every_steps, config.steps_per_call, config.dtype = 3, k, dtype
    return config

def fixture_config(lr):
    config = default.get_config("anodev2_conf2")
    config.dataset, config.num_train, config.num_test, config.batch_size = "synthetic", 16, 16, 8
    config.num_epochs, config.lr_boundaries_epochs, config.learning_rate, config.log_every_steps = 2, (1,), lr, 1
    return config

def save(name, workdir, step, summary):
    tree, _ = checkpoints.restore_raw(workdir / "checkpoints", step)
    leaves = {{jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}}
    np.savez(out / f"{{name}}.npz", test_loss=np.asarray(summary["test_loss"]), **leaves)

for name, k, lr, dtype in {engine_runs!r}:
    summary = training.train_and_evaluate(engine_config(k, lr, dtype), out / name)
    save(name, out / name, 8, summary)
for name, lr in {fixture_runs!r}:
    shutil.copytree({fixture!r}, out / name)
    stored = json.loads((out / name / "config.json").read_text())
    stored["learning_rate"] = lr  # the continuation's learning rate (a real change where it differs)
    (out / name / "config.json").write_text(json.dumps(stored))
    summary = training.train_and_evaluate(fixture_config(lr), out / name)
    tree, _ = checkpoints.restore_raw(out / name / "checkpoints", 4)
    digest = {{
        jax.tree_util.keystr(p): [float(np.sum(v, dtype=np.float64)), float(np.sum(np.abs(v), dtype=np.float64)), float(np.ravel(v)[0])]
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0] if np.issubdtype(np.asarray(v).dtype, np.floating)
    }}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    (out / f"{{name}}.json").write_text(json.dumps({{"test_loss": summary["test_loss"], "digest": digest, "metrics": records}}))
"""


def run_worker(isa: str, level: str, out: Path, engine_runs, fixture_runs) -> None:
    flags = [] if isa == "native" else [f"--xla_cpu_max_isa={isa}"]
    if level != "default":
        flags.append(f"--xla_backend_optimization_level={level}")
    # x64 on, as the test suite runs (tests/conftest.py): the augmentation's flip draws take
    # the default float type, so a run's numbers depend on it (the fixture was recorded so)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "JAX_ENABLE_X64": "1"}
    script = _WORKER.format(
        repo=str(REPO), out=str(out), engine_runs=engine_runs, fixture_runs=fixture_runs, fixture=str(FIXTURE)
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"worker ({isa}, level {level}) failed:\n{proc.stderr[-3000:]}")


def max_rel(a: dict, b: dict) -> tuple[float, float]:
    """Largest relative difference over the float leaves of the state, and of the test loss."""
    import numpy as np

    state = 0.0
    for key in b:
        if key == "test_loss" or not np.issubdtype(b[key].dtype, np.floating):
            continue
        scale = max(float(np.max(np.abs(b[key]))), 1e-30)
        state = max(state, float(np.max(np.abs(a[key].astype(np.float64) - b[key]))) / scale)
    loss = float(np.max(np.abs(a["test_loss"] - b["test_loss"]) / np.abs(b["test_loss"])))
    return state, loss


def fixture_deviation(got: dict, expected: dict) -> tuple[float, float, float]:
    """In the terms of tests/test_checkpoints.py, the largest relative deviation of: each leaf's sum,
    absolute sum and first entry (over the leaf's L1 norm); the records' numbers; the test loss."""
    leaves = 0.0
    for key, (total, abs_total, first) in got["digest"].items():
        want = expected["checkpoint_4"][key]
        scale = max(want["abs_sum"], 1e-30)
        leaves = max(leaves, abs(abs_total - want["abs_sum"]) / scale, abs(total - want["sum"]) / scale, abs(first - want["first"]) / scale)
    records = 0.0
    for rec, want in zip(got["metrics"], expected["metrics"]):
        for k, v in want.items():
            if isinstance(v, float) and k not in ("images_per_s", "epoch_time_s"):
                records = max(records, abs(rec[k] - v) / max(abs(v), 1e-30))
    loss = abs(got["test_loss"][0] - expected["test_loss"][0]) / abs(expected["test_loss"][0])
    return leaves, records, loss


def main(argv=None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isas", nargs="+", default=["native", "AVX2", "AVX", "SSE4_2"])
    p.add_argument("--levels", nargs="+", default=["default", "0"], help="XLA backend optimization levels")
    args = p.parse_args(argv)
    engine_runs = [(f"{name}_{dtype}", k, 0.01, dtype) for dtype in ("float32", "float64") for name, k in (("k1", 1), ("k3", 3), ("epoch", 4))]
    fixture_runs = [("fixture", 0.01)]
    root = Path(tempfile.mkdtemp(prefix="round_off-"))
    rows = []
    try:
        for level in args.levels:
            results = {}
            for isa in args.isas:
                out = root / f"{level}-{isa}"
                out.mkdir()
                native = isa == args.isas[0]
                extra_e = [(f"k1_{d}_lr+1%", 1, 0.0101, d) for d in ("float32", "float64")] if native else []
                extra_f = [("fixture_lr+1%", 0.0101)] if native else []
                run_worker(isa, level, out, engine_runs + extra_e, fixture_runs + extra_f)
                results[isa] = {f.stem: dict(np.load(f)) for f in out.glob("*.npz")}
                results[isa].update({f.stem: json.loads(f.read_text()) for f in out.glob("*.json")})
            ref = results[args.isas[0]]
            for dtype in ("float32", "float64"):
                for isa in args.isas:
                    for name in ("k1", "k3", "epoch"):
                        if isa == args.isas[0] and name == "k1":
                            continue
                        state, loss = max_rel(results[isa][f"{name}_{dtype}"], ref[f"k1_{dtype}"])
                        rows.append((level, dtype, f"steps_per_call {name} on {isa}", "k1 native", state, None, loss))
                state, loss = max_rel(ref[f"k1_{dtype}_lr+1%"], ref[f"k1_{dtype}"])
                rows.append((level, dtype, "k1, lr 0.0101 (a real change)", "k1 native", state, None, loss))
            expected = json.loads((REPO / "tests" / "fixtures" / "run_before_layout_expected.json").read_text())
            for isa in args.isas:
                rows.append((level, "float32", f"fixture resume on {isa}", "the recorded result", *fixture_deviation(results[isa]["fixture"], expected)))
            rows.append((level, "float32", "fixture resume, lr 0.0101 (a real change)", "the recorded result", *fixture_deviation(ref["fixture_lr+1%"], expected)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| XLA level | dtype | run | against | state (largest leaf rel. diff; fixture: sums over L1 norm) | records | test loss |")
    print("|---|---|---|---|---:|---:|---:|")
    for level, dtype, run, against, state, records, loss in rows:
        rec = "" if records is None else f"{records:.2e}"
        print(f"| {level} | {dtype} | {run} | {against} | {state:.2e} | {rec} | {loss:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
