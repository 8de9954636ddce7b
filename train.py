"""Train and evaluate an ANODEV2 / ANODE / Neural ODE / baseline model on CIFAR-10.

Usage::

    python train.py --config configs/resnet4.py:anodev2_conf1 --workdir runs/r4-conf1
    python train.py --config configs/smoke.py --config.method=anode --config.seed=3
    python train.py --config configs/alexnet.py --config.num_seeds=5   # Table 1's min/max/avg

``--config`` is an ml_collections config file (``FILE.py[:METHOD]``) whose fields can be
overridden (``--config.FIELD=VALUE``); ``--workdir`` defaults to a new directory
``runs/<model>-<method>-seed<N>-<time>``; a workdir holding a run of the same config is
resumed from its latest checkpoint. All the work is ``anodev2_jax.training.train_and_evaluate``.

Bad input (unknown or ill-typed config field, bad model / method / ODE knob, batch size,
data, or a workdir holding another config's run) exits with status 2 and one line on
stderr naming the field and the fix, before anything is written; ``--verbose`` shows the
traceback instead.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet4.py:anodev2_conf1.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: a new one under runs/).")
flags.DEFINE_bool("verbose", False, "Log INFO messages and show tracebacks of bad-input errors.")

_EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(_EXIT_BAD_INPUT)


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


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])!r}; pass options as --flag=value")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
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


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
