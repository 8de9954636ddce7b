"""Stop signals (before the lock: end at once; after: recorded, then a second ends at once) and the finite flags.

Signals that end the process are tested in a subprocess running :class:`StopSignals` alone
(``_SIGNAL_SCRIPT``, ~2 s: no training), the main thread busy in one long C call that holds
no Python handler back (``numpy.linalg.eigvals`` of a 1200 x 1200 matrix, ~1-3 s here, like
XLA compiling): a Python-level handler would run only after it, and see two signals that
arrived during it as one.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import errors, stopping

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from anodev2_jax import stopping
    armed = sys.argv[1] == "armed"
    with stopping.StopSignals() as stop:
        if armed:
            stop.arm()
        a = np.random.default_rng(0).standard_normal((1200, 1200))
        print("busy", flush=True)
        t0 = time.perf_counter()
        for _ in range(10):  # ~10-30 s of C calls unless a signal ends the process first
            np.linalg.eigvals(a)
        print(f"survived {time.perf_counter() - t0:.1f}s, signum={stop.signum}", flush=True)
    """
)


def _signalled(mode: str, signals) -> tuple[subprocess.CompletedProcess, float]:
    """Runs the script; once it is busy, sends ``signals`` (30 ms apart); returns the result and seconds to the end."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_SCRIPT, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout.readline() == "busy\n"
    time.sleep(0.2)  # inside eigvals
    for i, s in enumerate(signals):
        if i:
            time.sleep(0.03)
        proc.send_signal(s)
    t0 = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.perf_counter() - t0


def test_a_second_signal_ends_the_process_at_once_even_inside_a_long_c_call():
    for _ in range(3):  # the old KeyboardInterrupt path crashed in ~1 of 10 tries; this one has no such path
        result, took = _signalled("armed", [signal.SIGINT, signal.SIGINT])
        assert result.returncode == 130, (result.returncode, result.stderr)
        assert result.stderr.strip() == (
            "received SIGINT again: stopped at once without saving (a checkpoint in flight is abandoned); rerun the "
            "same command to resume from the last complete checkpoint"
        )
        assert "survived" not in result.stdout and took < 1.0, took  # in the middle of the C call, not after it


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_sighup_and_sigusr1_stop_a_run_as_sigterm_does(signum):
    """A closed terminal (SIGHUP) or a scheduler's warning (SIGUSR1) no longer ends a run without a checkpoint."""
    with stopping.StopSignals() as stop:  # the first: recorded, the loop saves a checkpoint and stops
        stop.arm()
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert stop.requested(1) and stop.signum == signum
    result, took = _signalled("armed", [signum, signum])  # the second: at once, 128 + signum
    assert result.returncode == 128 + signum, (result.returncode, result.stderr)
    assert result.stderr.startswith(f"received {signum.name} again: stopped at once without saving") and took < 1.0


def test_a_signal_ignored_at_the_start_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup python train.py ...` starts it
    try:
        with stopping.StopSignals() as stop:
            stop.arm()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            assert not stop.requested(1)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_before_arming_the_first_signal_ends_the_process_at_once():
    result, took = _signalled("unarmed", [signal.SIGTERM])
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip() == (
        "received SIGTERM before this run wrote anything: nothing to save; rerun the same command to run it"
    )
    assert took < 1.0


def test_first_signal_after_arming_is_recorded_and_handlers_are_restored():
    previous = {s: signal.getsignal(s) for s in stopping.StopSignals.SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    with stopping.StopSignals() as stop:
        stop.arm()
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: recorded, no KeyboardInterrupt, the process goes on
        time.sleep(0.05)
        assert stop.requested(2) and stop.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert signal.set_wakeup_fd(wakeup) == wakeup  # the wakeup fd is restored too


def test_finite_flags_stop_naming_the_first_bad_step_and_seed():
    flags = stopping.FiniteFlags("stop", seeds=[3, 4], steps_per_epoch=5)
    for step, ok in ((6, (True, True)), (7, (True, False)), (8, (False, False))):
        flags.add(step, jnp.asarray(ok))
    with pytest.raises(errors.NonFiniteError) as info:
        flags.check(lambda: Path("/w/checkpoints/5"))
    assert (info.value.step, info.value.seeds, info.value.checkpoint) == (7, [4], Path("/w/checkpoints/5"))
    assert "epoch 2, seed 4" in str(info.value)


def test_finite_flags_skip_counts_per_seed():
    flags = stopping.FiniteFlags("skip", seeds=[0, 1], steps_per_epoch=5)
    assert flags.check(lambda: None).tolist() == [0, 0]
    for ok in ((True, False), (False, False), (True, True)):
        flags.add(1, jnp.asarray(ok))
    counts = flags.check(lambda: None)
    assert counts.dtype == np.int32 and counts.tolist() == [1, 2]
    assert flags.check(lambda: None).tolist() == [0, 0]  # read once
