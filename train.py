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

* 0: finished (``workdir/summary.json`` written), or the workdir already holds this run,
  finished (nothing is written).
* 2: bad input, found before anything is written: a config file that does not load, an
  unknown or ill-typed config field, a bad model / method / ODE knob or batch size, bad
  data, a JAX platform that cannot start, a workdir holding another config's run, damaged
  metrics or no usable checkpoint, a workdir that is not writable or that another run
  holds (the line names its PID).
* 3: the loss or gradients became NaN / Inf (``config.nonfinite="stop"``); the line names
  the step and the last good checkpoint, left intact.
* 4: writing the run directory failed (disk full, quota, EIO), TensorBoard's event files
  included; earlier checkpoints are intact.
* 5: out of memory (host or device) where it can be caught; the line says what to lower.
  An allocation failing inside XLA's compiler aborts the process instead (134, a C++
  dump), as the kernel's OOM killer does (137).
* 130 / 143 / 129 / 138: stopped by SIGINT (Ctrl-C) / SIGTERM / SIGHUP / SIGUSR1 after
  saving a checkpoint of the current step (or, after the last step, once the run
  finished); the line prints the exact command that resumes the run (this command with
  ``--workdir`` set to the run directory: a default workdir carries the start time, so the
  bare command would start a new run). A second signal ends the run at once without
  saving (also 128 + signum).
"""

import contextlib
import faulthandler
import inspect
import logging as std_logging
import os
import re
import shlex
import signal
import sys
import traceback
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet4.py:anodev2_conf1.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: a new one under runs/).")
flags.DEFINE_bool("verbose", False, "Log INFO messages and show tracebacks of bad-input errors.")

_EXIT_BAD_INPUT, _EXIT_NONFINITE, _EXIT_WRITE, _EXIT_OUT_OF_MEMORY = 2, 3, 4, 5


def _fail(message: str, status: int = _EXIT_BAD_INPUT, prefix: str = "error: ") -> None:
    print(f"{prefix}{' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _config_path(argv) -> str | None:
    """The file part of the ``--config FILE.py[:ARG]`` argument, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _config_file_error(e: BaseException, path: str | None) -> str | None:
    """One line if ``e`` came from loading the config file ``path`` (its code, or its lack of get_config)."""
    if not path:
        return None
    full = os.path.abspath(path)
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == full:
        return f"config file {path} has a syntax error at line {e.lineno} ({e.msg}); fix it (python -m py_compile {path})"
    if isinstance(e, AttributeError) and "'get_config'" in str(e):
        return (
            f"config file {path} has no get_config(); define get_config(arg=None) returning an "
            "ml_collections.ConfigDict, as configs/smoke.py does"
        )
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == full]
    if lines:
        return f"config file {path} raised {type(e).__name__} at line {lines[-1]} while loading ({e}); fix the file"
    return None


def _parse_flags(argv):
    """absl flag parsing, but a bad flag or config file is one line and exit status 2."""
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    path = _config_path(argv)
    try:
        rest = FLAGS(argv)
    except Exception as e:
        if verbose:
            raise
        message = _config_file_error(e, path)
        if message:
            _fail(message)
        if isinstance(e, flags.Error):
            _fail(f"{e} (run python train.py --helpfull for the flags; config fields are in configs/default.py)")
        if not isinstance(e, (AttributeError, KeyError)):
            raise
        detail = e  # config_flags: an override of a field the config lacks
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]
        # ml_collections' text: "'metod'\nDid you mean \"method\" instead of \"metod\"?"
        field, _, hint = str(detail).partition("\n")
        guess = re.search(r'Did you mean "(\w+)"', hint)
        fix = f"did you mean --config.{guess.group(1)}? The fields are those of" if guess else "use a field of"
        _fail(f"unknown config field {field} (in a --config.FIELD override); {fix} configs/default.py")
    if FLAGS.config is None:
        _fail("--config is required, e.g. --config configs/smoke.py")
    try:  # config_flags defers a config file that fails to load until the config is used
        FLAGS.config.keys()
    except Exception as e:  # a missing file, or any error raised while importing it
        if verbose:
            raise
        message = _config_file_error(e, path)
        if message is None and isinstance(e, AttributeError) and path:
            got = type(FLAGS.config).__name__
            message = f"config file {path}: get_config() returned {got}, not an ml_collections.ConfigDict; return one"
        message = message or f"cannot load --config ({type(e).__name__}: {e})"
        _fail(f"{message}; pass an existing config file, e.g. configs/smoke.py" if message.startswith("cannot") else message)
    return rest


def _quiet_checkpoint_errors() -> None:
    """Without --verbose, a failed checkpoint write is one line (training.WriteError), not three dozen.

    Orbax logs its background writer's failure itself, asyncio logs the failures of orbax's
    other pending writes ("exception was never retrieved", at exit), tensorstore's
    callbacks into the event loop orbax has already closed print "Event loop is closed"
    tracebacks as unraisable exceptions, and orbax's reads abandoned after a failed restore
    print "Exception ignored in: <coroutine ...>" and "coroutine ... was never awaited"; all
    are hidden here (orbax's and asyncio's log lines altogether: nothing else here uses
    asyncio, and orbax's failures reach the user as training errors).
    """
    logging.get_absl_logger().addFilter(lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    default_hook = sys.unraisablehook

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
        if not (closed_loop or inspect.iscoroutine(unraisable.object)):  # orbax's abandoned reads and writes
            default_hook(unraisable)

    sys.unraisablehook = hook


def resume_command(argv: list[str], workdir: str) -> str:
    """This command line with ``--workdir=<workdir>`` (any ``--workdir`` given replaced): what resumes the run.

    Quoted for a POSIX shell (``shlex.join``); the interpreter is named by its file name
    (``python`` in a virtual environment), the script and the other flags as given.
    """
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("--workdir", "-workdir"):
            skip = True  # its value is the next argument
        elif not arg.startswith(("--workdir=", "-workdir=")):
            args.append(arg)
    python = os.path.basename(sys.executable) or "python"
    return shlex.join([python, argv[0], *args, f"--workdir={workdir}"])


def _stopped(signum, frame):
    """A stop signal where the run has no handler of its own (start-up, or on the way out after a stop): end at once.

    ``os._exit`` rather than ``KeyboardInterrupt``: nothing of the run is in flight then, and an
    exception unwinding into interpreter shutdown while orbax's threads run can crash it
    (see ``anodev2_jax.stopping.StopSignals``).
    """
    with contextlib.suppress(OSError):
        name = signal.Signals(signum).name
        os.write(2, f"received {name}: stopped at once; rerun the same command to resume (from the last checkpoint)\n".encode())
    os._exit(128 + signum)


def main(argv):
    # train_and_evaluate installs its own handlers while it runs. With several processes JAX's
    # preemption notifier takes SIGTERM: leave it alone there. A signal ignored at the start
    # (nohup: SIGHUP) stays ignored.
    stop_signals = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    if FLAGS.config.get("distributed") is not True:
        stop_signals += (signal.SIGTERM,)
    for s in stop_signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _stopped)
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])!r}; pass options as --flag=value")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
    if not FLAGS.verbose:
        _quiet_checkpoint_errors()
        # absl turns faulthandler on: a C++ abort (XLA out of memory while compiling:
        # std::bad_alloc) would dump every thread's stack, 25-60 lines; without it the C++
        # runtime's two lines remain (exit 134). --verbose keeps the dump.
        faulthandler.disable()
    from anodev2_jax import data, training  # after flag parsing: --help stays fast

    config = FLAGS.config
    if config.get("distributed") is True and FLAGS.workdir is None:
        _fail("config.distributed=True needs an explicit --workdir (each host would time-stamp its own default)")
    command = None
    try:
        workdir = FLAGS.workdir if FLAGS.workdir is not None else training.default_workdir(config)
        command = resume_command(sys.argv, workdir) if workdir.strip() else None
        training.train_and_evaluate(config, workdir, resume_command=command)  # an empty --workdir= is a ConfigError there
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
    except training.OutOfMemory as e:
        if FLAGS.verbose:
            raise
        _fail(e, _EXIT_OUT_OF_MEMORY)
    except KeyboardInterrupt:  # a KeyboardInterrupt raised by other code (SIGINT itself is handled above)
        if FLAGS.verbose:
            raise
        how = f"resume with {command}" if command else "rerun the same command to resume"
        _fail(f"interrupted: stopped without saving; {how} from the last checkpoint", 130)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
