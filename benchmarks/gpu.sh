#!/usr/bin/env bash
# GPU benchmarks in one command (under 8 minutes): a short real training run of ResNet-4
# ANODEV2 configuration 1 on generated CIFAR-shaped data (one seed and 5 vmapped seeds, with
# the projected wall time of the paper's 350-epoch schedule), then benchmarks/step_time.py
# and benchmarks/memory.py on the GPU. Every table goes to one markdown file:
# $OUT/gpu_results.md if $OUT is set, else benchmarks/gpu_results.md.
#
#   bash benchmarks/gpu.sh            # from anywhere; PYTHON=python3.12 to pick the interpreter
#   QUICK=1 ALLOW_CPU=1 bash benchmarks/gpu.sh   # dry run of the plumbing on a CPU (tiny sizes)
#
# Installs nothing: the project runs from this checkout (PYTHONPATH), and its dependencies
# (jax with CUDA, flax, optax, diffrax, ml_collections, orbax, tensorboardX) must already be
# importable; the script stops at once, naming what is missing, if they are not.
#
# On a machine with no package index (a lent GPU whose image already has jax, flax, optax,
# diffrax and orbax but not ml_collections or tensorboardX), fetch those two as wheels where
# pip works and copy the folder over (/.whl/ is git-ignored):
#   pip download --no-deps -d .whl ml_collections tensorboardX            # where pip works
#   pip install --no-index --no-deps .whl/*.whl && bash benchmarks/gpu.sh  # on the GPU machine
#
# Each stage has its own time limit so the whole stays under 8 minutes; a stage that runs
# out of time is recorded as such in the results file and the next one starts.
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
missing = [m for m in ("jax", "flax", "optax", "diffrax", "ml_collections", "orbax.checkpoint", "tensorboardX", "absl")
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

# ---- 1. a real training run: ResNet-4 conf. 1, synthetic CIFAR-shaped data, fixed step count
QUICK="${QUICK:-}"
BATCH=256; STEPS1=100; STEPS5=40; QFLAG=()
if [ -n "$QUICK" ]; then BATCH=8; STEPS1=4; STEPS5=3; QFLAG=(--quick); fi
TRAIN=("$PY" train.py --config configs/smoke.py:anodev2_conf1 --config.model=resnet4 --config.method=anodev2_conf1
  --config.batch_size=$BATCH --config.num_test=1024 --config.num_epochs=1 --config.learning_rate=0.1
  --config.log_every_steps=0)
stage 80 "training run, 1 seed, $STEPS1 steps" "${TRAIN[@]}" --config.num_seeds=1 \
  --config.num_train=$((STEPS1 * BATCH)) --workdir "$WORK/seed1"
stage 90 "training run, 5 vmapped seeds, $STEPS5 steps" "${TRAIN[@]}" --config.num_seeds=5 \
  --config.num_train=$((STEPS5 * BATCH)) --workdir "$WORK/seeds5"

"$PY" - "$WORK/seed1/summary.json" "$WORK/seeds5/summary.json" "$BATCH" >>"$RESULTS" <<'EOF'
import json, os, sys

EPOCHS, TRAIN, TEST = 350, 50_000, 10_000  # the paper's ResNet schedule on CIFAR-10

def load(path):
    return json.load(open(path)) if os.path.exists(path) else None

one, five = (load(p) for p in sys.argv[1:3])
print(f"### Training run: ResNet-4, ANODEV2 configuration 1, synthetic CIFAR-shaped data, batch {sys.argv[3]}\n")
rows = []
for name, s, seeds in (("1 seed", one, 1), ("5 vmapped seeds", five, 5)):
    if not s or not s.get("images_per_s"):
        rows.append(f"| {name} | not measured | | | |")
        continue
    ips = s["images_per_s"]  # images of all replicas per second, first (compiling) step left out
    lo = EPOCHS * seeds * TRAIN / ips / 3600  # evaluation free
    hi = EPOCHS * seeds * (TRAIN + TEST) / ips / 3600  # evaluation images at the training rate
    rows.append(f"| {name} | {s['steps']} | {ips:,.0f} | {s['wall_time_s']:.0f} | {lo:.2f} - {hi:.2f} |")
print("| run | steps | images/s (all seeds) | wall time of the run (s, incl. compile) | projected 350 epochs (h) |")
print("|---|---:|---:|---:|---:|")
print("\n".join(rows))
print("\nProjection: 350 epochs x seeds x 50,000 training images at the measured rate; the upper end also "
      "counts the 10,000 test images per epoch at the training rate (evaluation is forward-only, so "
      "cheaper). 5 sequential single-seed runs would take 5x the 1-seed figure.\n")
EOF

# ---- 2. step times of every method (ResNet-4 first: the headline comparison)
stage 120 "step_time.py ResNet-4" "$PY" benchmarks/step_time.py --models resnet4 ${QFLAG[@]+"${QFLAG[@]}"} --out "$RESULTS"
# ---- 3. memory against steps_z (compile only)
if [ -n "$QUICK" ]; then
  stage 80 "memory.py (quick)" "$PY" benchmarks/memory.py --quick --remat block step --out "$RESULTS"
else
  stage 100 "memory.py ResNet-10" "$PY" benchmarks/memory.py --steps-z 1 20 --remat step binomial --out "$RESULTS"
fi
# ---- 4. the larger models, the rows of the paper's two ratios
if [ -z "$QUICK" ]; then
  stage 80 "step_time.py ResNet-10 and AlexNet" "$PY" benchmarks/step_time.py --models resnet10 alexnet \
    --methods baseline anode_z5 conf1 conf2 --steps 20 --out "$RESULTS"
fi

rm -rf "$WORK"
log "done in $((SECONDS - T0)) s; results in $RESULTS"
cat "$RESULTS"
