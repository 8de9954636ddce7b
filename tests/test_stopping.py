"""Stop signals (recorded, then abort) and the device-side finite flags (stop or count)."""

import os
import signal
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax import errors, stopping


def test_first_stop_signal_is_recorded_and_a_second_aborts():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stopping.StopSignals() as stop:
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: recorded, no KeyboardInterrupt
        time.sleep(0.01)
        assert stop.requested(2) and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second stop signal"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in previous} == previous


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
