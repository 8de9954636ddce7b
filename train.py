"""Train and evaluate an ANODEV2 / ANODE / Neural ODE / baseline model on CIFAR-10.

Usage::

    python train.py --config configs/resnet4.py:anodev2_conf1 --workdir runs/r4-conf1
    python train.py --config configs/smoke.py --config.method=anode --config.seed=3
    python train.py --config configs/alexnet.py --config.num_seeds=5   # Table 1's min/max/avg

``--config`` is an ml_collections config file (``FILE.py[:METHOD]``) whose fields can be
overridden (``--config.FIELD=VALUE``); ``--workdir`` defaults to a new directory
``runs/<model>-<method>-seed<N>-<time>``; a workdir holding a run of the same config is
resumed from its latest checkpoint. All the work is ``anodev2_jax.training.train_and_evaluate``.

Exit status, each failure with one line on stderr naming the cause and the fix (``--verbose``
shows the traceback instead):

* 0: finished (``workdir/summary.json`` written).
* 2: bad input, found before anything is written: an unknown or ill-typed config field,
  a bad model / method / ODE knob or batch size, bad data, a workdir holding another
  config's run or an unreadable checkpoint, a workdir that is not writable.
* 3: the loss or gradients became NaN / Inf (``config.nonfinite="stop"``); the line names
  the step and the last good checkpoint, left intact.
* 4: writing the run directory failed (disk full, quota); earlier checkpoints are intact.
* 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM after saving a checkpoint of the current
  step; rerun the same command to resume. A second Ctrl-C aborts without saving (130).
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet4.py:anodev2_conf1.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: a new one under runs/).")
flags.DEFINE_bool("verbose", False, "Log INFO messages and show tracebacks of bad-input errors.")

_EXIT_BAD_INPUT, _EXIT_NONFINITE, _EXIT_WRITE = 2, 3, 4


def _fail(message: str, status: int = _EXIT_BAD_INPUT, prefix: str = "error: ") -> None:
    print(f"{prefix}{' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _parse_flags(argv):
    """absl flag parsing, but a bad flag or config file is one line and exit status 2."""
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        if verbose:
            raise
        _fail(f"{e} (run python train.py --helpfull for the flags; config fields are in configs/default.py)")
    except (AttributeError, KeyError) as e:  # config_flags: an override of a field the config lacks
        if verbose:
            raise
        detail = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]
        _fail(f"unknown config field {detail} (in a --config.FIELD override); use a field of configs/default.py")
    if FLAGS.config is None:
        _fail("--config is required, e.g. --config configs/smoke.py")
    try:  # config_flags defers a config file that fails to load until the config is used
        FLAGS.config.keys()
    except Exception as e:  # a missing file, or any error raised while importing it
        if verbose:
            raise
        _fail(f"cannot load --config ({type(e).__name__}: {e}); pass an existing config file, e.g. configs/smoke.py")
    return rest


def _quiet_checkpoint_errors() -> None:
    """Without --verbose, a failed checkpoint write is one line (training.WriteError), not three dozen.

    Orbax logs its background writer's failure itself, asyncio logs the failures of orbax's
    other pending writes ("exception was never retrieved", at exit), and tensorstore's
    callbacks into the event loop orbax has already closed print "Event loop is closed"
    tracebacks as unraisable exceptions; all are hidden here (orbax's and asyncio's log
    lines altogether: nothing else here uses asyncio, and orbax's failures reach the user
    as training errors).
    """
    logging.get_absl_logger().addFilter(lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            default_hook(unraisable)

    sys.unraisablehook = hook


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])!r}; pass options as --flag=value")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
    if not FLAGS.verbose:
        _quiet_checkpoint_errors()
    from anodev2_jax import data, training  # after flag parsing: --help stays fast

    config = FLAGS.config
    if config.get("distributed") is True and not FLAGS.workdir:
        _fail("config.distributed=True needs an explicit --workdir (each host would time-stamp its own default)")
    try:
        workdir = FLAGS.workdir or training.default_workdir(config)
        training.train_and_evaluate(config, workdir)
    except (training.ConfigError, data.DataError) as e:
        if FLAGS.verbose:
            raise
        _fail(e)
    except training.Preempted as e:  # not an error: the checkpoint is saved
        _fail(e, 128 + e.signum, prefix="")
    except training.NonFiniteError as e:
        if FLAGS.verbose:
            raise
        _fail(e, _EXIT_NONFINITE)
    except training.WriteError as e:
        if FLAGS.verbose:
            raise
        _fail(e, _EXIT_WRITE)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one while saving
        if FLAGS.verbose:
            raise
        _fail("interrupted: stopped without saving; rerun the same command to resume from the last checkpoint", 130)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
