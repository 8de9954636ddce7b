"""Smoke tests of the benchmark scripts: each runs in its tiny ``--quick`` mode and prints its table.

No timing is asserted (timings belong to the scripts' output, not to tests). The scripts
run as subprocesses, as a user runs them (so the suite's x64 and strict promotion settings
do not leak into them), all at once to keep the wall time down; each is cut to the
fewest programs that still cover its code path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

COMMANDS = {
    "step_time": [str(BENCH / "step_time.py"), "--quick", "--methods", "baseline", "conf2"],
    "memory": [str(BENCH / "memory.py"), "--quick", "--remat", "block"],
    "torch_peer": [str(BENCH / "torch_peer.py"), "--quick", "--grid-peer"],
    "conv_kernels": [str(BENCH / "conv_kernels.py"), "--quick"],
    "host_overhead": [str(BENCH / "host_overhead.py"), "--quick"],
    "rda_consistency": [str(BENCH / "rda_consistency.py"), "--quick"],
    "evolution_updates": [str(BENCH / "evolution_updates.py"), "--quick"],
}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run every script once (in parallel); ``{name: (returncode, stdout, stderr, out_file)}``."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JAX_ENABLE_X64", None)
    procs = {}
    for name, cmd in COMMANDS.items():
        if name == "torch_peer" and not (_has("torch") and _has("torchdiffeq")):
            continue
        out = tmp / f"{name}.md"
        procs[name] = (
            subprocess.Popen([sys.executable, *cmd, "--out", str(out)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE),
            out,
        )
    results = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


def _check(outputs, name, must_contain):
    if name not in outputs:
        pytest.skip(f"{name}: torch and torchdiffeq are not installed (pip install -e '.[bench]')")
    code, stdout, stderr, out = outputs[name]
    assert code == 0, f"{name} failed:\n{stderr[-3000:]}"
    assert "|---" in stdout, f"{name} printed no markdown table:\n{stdout}"
    for text in must_contain:
        assert text in stdout, f"{name}: {text!r} missing from\n{stdout}"
    assert out.read_text().strip() == stdout.strip(), f"{name}: --out file differs from the printed tables"


@pytest.mark.slow
def test_step_time_quick(outputs):
    _check(outputs, "step_time", ["ResNet-4", "baseline", "conf. 2 / baseline", "GFLOP/step", "| remat |", "| none |"])


@pytest.mark.slow
def test_memory_quick(outputs):
    _check(outputs, "memory", ["steps_z", "block (MiB)", "Compile seconds", "Best mode at steps_z=2", "Target (<= 1.5x)"])


@pytest.mark.slow
def test_torch_peer_quick(outputs):
    _check(outputs, "torch_peer", [
        "JAX (this project), per_step, remat=block", "JAX (this project), shared, remat=block",
        "PyTorch channels_last, shared, checkpoint", "6-point grid (previous peer)", "by the fastest rounds; same computation checked first",
        "Where the time goes", "convolution backward: input and kernel gradients", "kernel-gradient products",
    ])


@pytest.mark.slow
def test_conv_kernels_quick(outputs):
    must = ["XLA convolution (used)", "Winograd", "kernels.kernel_grad", "closed form, two passes (used)"]
    if _has("torch"):
        must.append("PyTorch convolution_backward, channels_last")
    _check(outputs, "conv_kernels", must)


@pytest.mark.slow
def test_host_overhead_quick(outputs):
    _check(outputs, "host_overhead", ["old loop (one call per step, host gather)", "engine, whole epoch (195 steps per call)",
                                      "train.py loop, engine, steps_per_call=1", "bare jitted step", "jax-ml/jax#12868"])


@pytest.mark.slow
def test_rda_consistency_quick(outputs):
    _check(outputs, "rda_consistency", ["B.4 vs Eq. 2.6 (tanh)", "RK4 x1 vs x64", "ResNet-4 3x3x16x16"])


@pytest.mark.slow
def test_evolution_updates_quick(outputs):
    """The finding behind rda_parameterization: under softplus d's first update barely touches w(1); under abs it does."""
    _check(outputs, "evolution_updates", ["conv1/rda_d_raw", "conv1/rda_d ", "vs the kernel's"])
    ratio = {}
    for line in outputs["evolution_updates"][1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ("conv1/rda_d_raw", "conv1/rda_d"):
            ratio[cells[1]] = float(cells[5])
    assert ratio["conv1/rda_d_raw"] < 1e-4 < 0.1 < ratio["conv1/rda_d"], ratio


def test_profile_split_shares_overlapping_time_and_classifies_hlo():
    """torch_peer's time split: overlapping operations share time evenly; loop control only counts when alone."""
    sys.path.insert(0, str(BENCH))
    import torch_peer

    totals, busy = torch_peer.split_by_kind([("convolution", 0, 10), ("fusion", 5, 15), ("control", 0, 20)])
    assert totals == {"convolution": 7.5, "fusion": 7.5, "control": 5.0} and busy == 20
    hlo = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_move (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %transpose.1 = f32[4,4]{0,1} transpose(%p0.1), dimensions={1,0}
}

%fused_bn (p0.2: f32[4,4]) -> f32[4,4] {
  %p0.2 = f32[4,4]{1,0} parameter(0)
  ROOT %maximum.1 = f32[4,4]{1,0} maximum(%p0.2, %p0.2)
}

ENTRY %main.9 (x: f32[1,8,8,4], k: f32[3,3,4,4]) -> (f32[4,4], s32[]) {
  %x = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %conv_general_dilated.3 = f32[1,8,8,4]{3,2,1,0} convolution(%x, %k), window={size=3x3}, metadata={op_name="a(b)"}
  %ynn_fusion = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %copy_fusion.2 = f32[4,4]{0,1} fusion(%a), kind=kLoop, calls=%fused_move
  %add_maximum_fusion = f32[4,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_bn
  %while.4 = (s32[], f32[4,4]) while(%t), condition=%cond, body=%body
}
"""
    kinds = torch_peer.hlo_kinds(hlo)
    assert {n: kinds[n] for n in ("conv_general_dilated.3", "ynn_fusion", "copy_fusion.2", "add_maximum_fusion", "while.4")} == {
        "conv_general_dilated.3": "convolution", "ynn_fusion": "dot", "copy_fusion.2": "copy",
        "add_maximum_fusion": "fusion", "while.4": "control",
    }


def test_digits_without_scikit_learn_is_one_line(tmp_path):
    """``benchmarks/digits.py`` without scikit-learn (its import blocked): one line naming the extra, exit 2."""
    code = (
        "import runpy, sys; sys.modules['sklearn'] = None; "
        f"sys.argv = ['digits.py', '--out', {str(tmp_path / 'd.npz')!r}]; "
        f"runpy.run_path({str(BENCH / 'digits.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: dataset 'digits' needs scikit-learn") and 'pip install -e ".[digits]"' in proc.stderr
    assert not (tmp_path / "d.npz").exists()
