#!/usr/bin/env bash
# GPU benchmarks in one command: short real training runs (synthetic CIFAR-shaped data)
# through train.py of ResNet-4 ANODEV2 configuration 1 (1 seed and 5 vmapped seeds) and
# ResNet-10, on the per-step host path (the loop before the on-device engine: batches
# gathered on the host, one call per step) and on the engine (the data on the GPU, the
# whole epoch in one call), in float32 and bfloat16, with images/s and the projected wall
# time of the paper's 350-epoch schedule; then benchmarks/step_time.py and
# benchmarks/memory.py on the GPU. Every table goes to one markdown file:
# $OUT/gpu_results.md if $OUT is set, else benchmarks/gpu_results.md.
#
#   bash benchmarks/gpu.sh                       # from anywhere; PYTHON=python3.12 to pick the interpreter
#   STAGES=train bash benchmarks/gpu.sh          # only the training runs (at most 9 x 65 s); also: step, memory
#   QUICK=1 ALLOW_CPU=1 bash benchmarks/gpu.sh   # dry run of the plumbing on a CPU (tiny sizes)
#
# Installs nothing: the project runs from this checkout (PYTHONPATH), and its dependencies
# (jax with CUDA, flax, optax, diffrax, ml_collections, orbax, tensorboardX, tqdm) must already be
# importable; the script stops at once, naming what is missing, if they are not.
#
# On a machine with no package index (a lent GPU whose image already has jax, flax, optax,
# diffrax and orbax but not ml_collections or tensorboardX), fetch those two as wheels where
# pip works and copy the folder over (/.whl/ is git-ignored):
#   pip download --no-deps -d .whl ml_collections tensorboardX tqdm       # where pip works (tqdm if missing)
#   pip install --no-index --no-deps .whl/*.whl && bash benchmarks/gpu.sh  # on the GPU machine
#
# Each stage has its own time limit (65 s per training run, 5 minutes for the other stages
# together); a stage that runs out of time is recorded as such in the results file and the
# next one starts. The training runs share a persistent compilation cache.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$(command -v python || command -v python3)}"
[ -n "$PY" ] || { echo "gpu.sh: neither python nor python3 is on PATH; set PYTHON=/path/to/python" >&2; exit 1; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RESULTS_DIR="${OUT:-$REPO/benchmarks}"
RESULTS="$RESULTS_DIR/gpu_results.md"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/anodev2-gpu.XXXXXX")"
mkdir -p "$RESULTS_DIR"
T0=$SECONDS

log() { echo "[gpu.sh +$((SECONDS - T0))s] $*" >&2; }

# Run a stage under a time limit; record a timeout or failure in the results file.
stage() {
  local limit=$1 name=$2
  shift 2
  log "$name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    printf '\n**%s: stopped after its %ss limit; its table (if any) is incomplete.**\n' "$name" "$limit" >>"$RESULTS"
  elif [ $rc -ne 0 ]; then
    printf '\n**%s: failed with exit status %s (see the console output).**\n' "$name" "$rc" >>"$RESULTS"
  fi
  return 0
}

"$PY" - <<'EOF' || exit 1
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "diffrax", "ml_collections", "orbax.checkpoint", "tensorboardX", "tqdm", "absl")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {missing}; install the project's dependencies first "
             "(pip install -e '.[cuda12]'); this script installs nothing")
import jax, os
if jax.default_backend() != "gpu" and not os.environ.get("ALLOW_CPU"):
    sys.exit(f"gpu.sh: JAX sees no GPU (backend {jax.default_backend()!r}, devices {jax.devices()}); "
             "install jax[cuda12] or run on a GPU machine")
print(f"gpu.sh: {jax.devices()}", file=sys.stderr)
EOF

{
  echo "# GPU benchmark results"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  echo
} >"$RESULTS"

QUICK="${QUICK:-}"
STAGES="${STAGES:-train step memory}"
BATCH=256; STEPS=40; EPOCHS=3; LIMIT=65; QFLAG=()
if [ -n "$QUICK" ]; then BATCH=8; STEPS=3; EPOCHS=2; LIMIT=120; QFLAG=(--quick); fi

# ---- 1. training runs: the per-step host path against the engine, float32 and bfloat16
# The host path is what train.py takes when the data does not fit the devices; forced here
# by letting the data take no device memory (anodev2_jax.sharding.DEVICE_DATA_FRACTION).
HOST_PATH="import runpy, sys; from anodev2_jax import sharding; sharding.DEVICE_DATA_FRACTION = 0.0; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"

# run NAME MODEL SEEDS PATH DTYPE, PATH: host (one call per step) or engine (the whole epoch per call)
run() {
  local name=$1 model=$2 seeds=$3 path=$4 dtype=$5 spc=$STEPS prefix=()
  if [ "$path" = host ]; then prefix=(-c "$HOST_PATH"); spc=1; fi
  stage "$LIMIT" "training run $name" env JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache" "$PY" ${prefix[@]+"${prefix[@]}"} \
    train.py --config configs/smoke.py:anodev2_conf1 --config.model="$model" --config.batch_size=$BATCH \
    --config.num_train=$((STEPS * BATCH)) --config.num_test=1024 --config.num_epochs=$EPOCHS \
    --config.learning_rate=0.1 --config.log_every_steps=0 --config.num_seeds="$seeds" \
    --config.steps_per_call=$spc --config.dtype="$dtype" --workdir "$WORK/runs/$name"
}

if [[ " $STAGES " == *" train "* ]]; then
  run r4-1-host resnet4 1 host float32
  run r4-1-engine resnet4 1 engine float32
  run r4-1-engine-bf16 resnet4 1 engine bfloat16
  run r4-5-host resnet4 5 host float32
  run r4-5-engine resnet4 5 engine float32
  run r4-5-engine-bf16 resnet4 5 engine bfloat16
  run r10-1-host resnet10 1 host float32
  run r10-1-engine resnet10 1 engine float32
  run r10-1-engine-bf16 resnet10 1 engine bfloat16

  "$PY" - "$WORK/runs" "$BATCH" "$STEPS" >>"$RESULTS" <<'EOF'
import json, os, sys

EPOCHS, TRAIN, TEST = 350, 50_000, 10_000  # the paper's ResNet schedule on CIFAR-10
TARGETS = {("ResNet-4", 1): 2, ("ResNet-4", 5): 5}  # minutes for 350 epochs on one H100-class GPU
root, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ENGINE, HOST = "engine, whole epoch per call", "per-step host path"
ROWS = [  # run name, model, seeds, path, dtype
    ("r4-1-host", "ResNet-4", 1, HOST, "float32"),
    ("r4-1-engine", "ResNet-4", 1, ENGINE, "float32"),
    ("r4-1-engine-bf16", "ResNet-4", 1, ENGINE, "bfloat16"),
    ("r4-5-host", "ResNet-4", 5, HOST, "float32"),
    ("r4-5-engine", "ResNet-4", 5, ENGINE, "float32"),
    ("r4-5-engine-bf16", "ResNet-4", 5, ENGINE, "bfloat16"),
    ("r10-1-host", "ResNet-10", 1, HOST, "float32"),
    ("r10-1-engine", "ResNet-10", 1, ENGINE, "float32"),
    ("r10-1-engine-bf16", "ResNet-10", 1, ENGINE, "bfloat16"),
]


def steady_rate(name):
    """(summary, images/s of every seed over the epochs after the first, compiling, one), or None."""
    try:
        summary = json.load(open(os.path.join(root, name, "summary.json")))
        records = [json.loads(line) for line in open(os.path.join(root, name, "metrics.jsonl"))]
    except OSError:
        return None
    seconds = {r["epoch"]: r["epoch_time_s"] for r in records if r["kind"] == "epoch" and r["epoch"] > 1}
    if not seconds:
        return None
    return summary, len(summary["seeds"]) * batch * steps * len(seconds) / sum(seconds.values())


print(f"### Training runs through train.py: ANODEV2 configuration 1, synthetic CIFAR-shaped data, batch {batch}, "
      f"{steps} steps per epoch; rates over the epochs after the first (compiling) one\n")
print("| model | seeds | path | dtype | steps per call | images/s (all seeds) | vs per-step | "
      "projected 350 epochs (min) | target (min) |")
print("|---|---:|---|---|---:|---:|---:|---:|---:|")
base = {}
for name, model, seeds, path, dtype in ROWS:
    got = steady_rate(name)
    if got is None:
        print(f"| {model} | {seeds} | {path} | {dtype} | | not measured | | | |")
        continue
    summary, ips = got
    if path == HOST:
        base[(model, seeds)] = ips
    ratio = f"{ips / base[(model, seeds)]:.2f}x" if (model, seeds) in base else ""
    lo = EPOCHS * seeds * TRAIN / ips / 60  # evaluation free
    hi = EPOCHS * seeds * (TRAIN + TEST) / ips / 60  # the test images at the training rate (evaluation is cheaper)
    print(f"| {model} | {seeds} | {path} | {dtype} | {summary['steps_per_call']} | {ips:,.0f} | {ratio} | "
          f"{lo:.1f} - {hi:.1f} | {TARGETS.get((model, seeds), '')} |")
print("\nProjection: 350 epochs x seeds x 50,000 training images at the measured rate; the upper end also "
      "counts the 10,000 test images of every epoch at the training rate. Targets: ResNet-4 configuration 1's "
      "350 epochs in under 2 minutes with one seed, under 5 with 5 vmapped seeds. The synthetic epoch has "
      f"{steps} steps, so a call's fixed cost is shared by fewer steps than in CIFAR-10's 195-step epoch.\n")
EOF
fi

# ---- 2. step times of every method (ResNet-4 first: the headline comparison)
if [[ " $STAGES " == *" step "* ]]; then
  stage 120 "step_time.py ResNet-4" "$PY" benchmarks/step_time.py --models resnet4 ${QFLAG[@]+"${QFLAG[@]}"} --out "$RESULTS"
fi
# ---- 3. memory against steps_z (compile only)
if [[ " $STAGES " == *" memory "* ]]; then
  if [ -n "$QUICK" ]; then
    stage 80 "memory.py (quick)" "$PY" benchmarks/memory.py --quick --remat block step --out "$RESULTS"
  else
    stage 100 "memory.py ResNet-10" "$PY" benchmarks/memory.py --steps-z 1 20 --remat step binomial --out "$RESULTS"
  fi
fi
# ---- 4. the larger models, the rows of the paper's two ratios
if [ -z "$QUICK" ] && [[ " $STAGES " == *" step "* ]]; then
  stage 80 "step_time.py ResNet-10 and AlexNet" "$PY" benchmarks/step_time.py --models resnet10 alexnet \
    --methods baseline anode_z5 conf1 conf2 --steps 20 --out "$RESULTS"
fi

rm -rf "$WORK"
log "done in $((SECONDS - T0)) s; results in $RESULTS"
cat "$RESULTS"
