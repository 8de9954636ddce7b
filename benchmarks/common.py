"""Helpers shared by the benchmark scripts: configs, train steps, interleaved timing, tables.

Not a library module: the scripts in this folder import it as ``common`` (they put their
own folder on ``sys.path``). Everything here runs the project's real training code
(:mod:`anodev2_jax.steps`) or, where a benchmark must leave out the augmentation
(``torch_peer.py``), the same model, loss and optimizer without it.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the configs package lives at the repository root
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import default as default_config  # noqa: E402

from anodev2_jax import optim, run_config, sharding, steps  # noqa: E402

# The rows of the benchmark tables: (label, method, ODE knob overrides).
METHOD_ROWS = {
    "baseline": ("baseline", {}),
    "neural_ode": ("neural_ode", {}),
    "anode_z2": ("anode", {"steps_z": 2}),
    "anode_z5": ("anode", {"steps_z": 5}),
    "conf1": ("anodev2_conf1", {}),
    "conf2": ("anodev2_conf2", {}),
}
# Optional rows (``--methods``): explicit schedules instead of the default remat="auto" (which
# picks one per block): without checkpointing, as the paper counts FLOPs, and with ANODE's
# block checkpointing (the models' default before remat="auto").
EXTRA_ROWS = {
    "conf1_none": ("anodev2_conf1", {"remat": "none"}),
    "conf2_none": ("anodev2_conf2", {"remat": "none"}),
    "anode_z5_none": ("anode", {"steps_z": 5, "remat": "none"}),
    "conf1_block": ("anodev2_conf1", {"remat": "block"}),
    "conf2_block": ("anodev2_conf2", {"remat": "block"}),
    "anode_z5_block": ("anode", {"steps_z": 5, "remat": "block"}),
}
# Evolution operators and time kernels (Eq. 2.3c-d) in configuration 1, and the hand-written
# adjoint against autodiff (``--methods`` picks them; step_time.py prints their ratios to
# ANODE steps_z=5 and to conf. 1 with autodiff).
EVOLUTION_ROWS = {
    "conf1_rda_equation": ("anodev2_conf1", {"evolution": "rda_equation"}),
    "conf1_linear": ("anodev2_conf1", {"evolution": "linear"}),
    "conf1_mlp": ("anodev2_conf1", {"evolution": "mlp"}),
    "conf1_exponential": ("anodev2_conf1", {"time_kernel": "exponential"}),
    "conf1_discrete_kernel": ("anodev2_conf1", {"time_kernel": "discrete"}),
    "conf1_adjoint": ("anodev2_conf1", {"adjoint": "discrete"}),
    "conf1_mlp_exponential_adjoint": ("anodev2_conf1", {"evolution": "mlp", "time_kernel": "exponential", "adjoint": "discrete"}),
    "conf1_mlp_exponential": ("anodev2_conf1", {"evolution": "mlp", "time_kernel": "exponential"}),
}
ALL_ROWS = {**METHOD_ROWS, **EXTRA_ROWS, **EVOLUTION_ROWS}
MODEL_TITLES = {"resnet4": "ResNet-4", "resnet10": "ResNet-10", "alexnet": "AlexNet"}


def log(*parts) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(*parts, file=sys.stderr, flush=True)


def make_config(model: str, method: str, *, batch: int, **knobs):
    """``configs/default.py`` with ``model``, ``method``, ``batch_size`` and ODE knob overrides."""
    config = default_config.get_config(method)
    config.model = model
    config.batch_size = batch
    for name, value in knobs.items():
        config[name] = value
    run_config.validate_config(config)
    return config


def train_step_program(config, *, steps_per_epoch: int = 195):
    """The training system's own jitted step (augmentation, forward, backward, SGD update).

    Returns ``(step, state, batch)`` where ``step(state, *batch) -> (state, metrics)``
    donates ``state``; ``batch`` is uint8 images ``(1, B, 32, 32, 3)``, int32 labels
    ``(1, B)`` and the seeds ``(1,)``, as :func:`anodev2_jax.steps.make_train_step` takes.
    """
    model = steps.create_model(config)
    tx, _ = optim.create_optimizer(config, steps_per_epoch)
    mesh = sharding.make_mesh()
    state = steps.init_train_state(model, tx, [config.seed], mesh)
    step = steps.make_train_step(model, tx, mesh, 1)
    rng = np.random.default_rng(0)
    b = config.batch_size
    images = jnp.asarray(rng.integers(0, 256, (1, b, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (1, b), dtype=np.int32))
    seeds = jnp.asarray([config.seed], jnp.int32)
    return step, state, (images, labels, seeds)


def plain_train_step(model, tx):
    """A jitted SGD step without augmentation, on float32 images (as ``training`` does it otherwise).

    ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``;
    the first three arguments are donated.
    """

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def cost_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program by XLA's cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost model
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, *, progress: str = "") -> dict[str, list[float]]:
    """Seconds per call of each thunk, timed in ``rounds`` rounds that call every thunk once.

    Interleaving makes ratios between entries robust to a machine whose load drifts (other
    processes on a shared CPU): each round sees the same conditions for every entry. Each
    thunk must block until its result is ready. Summarize with :func:`median` / ``min``.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if progress:
            log(f"  {progress} round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * v[-1]:.0f} ms" for n, v in times.items()))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column (``l`` or ``r``, default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line naming the hardware and software the numbers come from."""
    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else (platform.processor() or platform.machine())
    flags = os.environ.get("XLA_FLAGS", "")
    return (
        f"{dev.platform}: {kind}, {len(jax.devices())} device(s), {os.cpu_count()} CPU cores; "
        f"jax {jax.__version__}, python {platform.python_version()}" + (f"; XLA_FLAGS={flags}" if flags else "")
    )


def emit(text: str, out: str | None) -> None:
    """Print ``text`` and, if ``out`` is given, append it to that file."""
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(text + "\n")
