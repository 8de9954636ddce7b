"""Model and method names, the ODE knobs and each method's defaults (Tables 1-4 rows; no Flax).

``resolve_config(method, **overrides)`` validates the knobs of a model's ODE blocks and
returns an :class:`ODEConfig`; :func:`anodev2_jax.get_model` builds the Flax model from it.
Methods (``method_defaults``; every knob may be overridden):

* ``baseline``: one Euler step, no evolution (the plain residual network).
* ``neural_ode``: ``steps_z=2`` (Table 4's ``N_t = 2``), static weights, gradient by
  diffrax's ``BacksolveAdjoint`` (``adjoint="backsolve"``: the continuous adjoint of Chen
  et al. [8], optimize-then-discretize, so the gradient is only *approximate*).
* ``anode``: ``steps_z=2``, static weights, DTO (exact) gradients through
  :func:`anodev2_jax.coupled_block` without evolution; ``remat="block"`` is ANODE's
  checkpointing, the default ``"auto"`` checkpoints only where memory needs it.
* ``anodev2_conf1``: ``steps_z = steps_w = 5``, ``schedule="aligned"``, RDA evolution.
* ``anodev2_conf2``: ``steps_z = 2, steps_w = 10``, ``schedule="endpoints"``, RDA evolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax import ode
from anodev2_jax.paper import METHODS, MODELS
from anodev2_jax.trajectory import SCHEDULES, trajectory_indices

__all__ = [
    "MODELS",
    "METHODS",
    "EVOLVING_METHODS",
    "ADJOINTS",
    "COEFF_GRANULARITIES",
    "NONLINEARITIES",
    "NORMS",
    "DTYPES",
    "EVOLUTIONS",
    "TIME_KERNELS",
    "RDA_PARAMETERIZATIONS",
    "EVOLUTION_PARAM_PREFIXES",
    "COMPUTE_DTYPES",
    "REMAT_KNOBS",
    "DEFAULT_REMAT_BUDGET_MB",
    "KNOBS",
    "ODEConfig",
    "method_defaults",
    "resolve_config",
]

EVOLVING_METHODS = ("anodev2_conf1", "anodev2_conf2")
ADJOINTS = ("autodiff", "discrete", "backsolve")
COEFF_GRANULARITIES = ("kernel", "filter")
NONLINEARITIES: dict[str, Optional[Callable]] = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "none": None}
NORMS = ("per_step", "shared")
DTYPES = ("float32", "float64")
# The evolution operator q of Eq. 2.3c in the models (layers.conv_evolution builds it):
# "rda" is Eq. B.4 (the paper's), "rda_equation" Eq. 2.6 itself (evolution.RDAEquation),
# "linear" a learnable dw/dt = G w (evolution.LinearEvolution), "mlp" a small MLP on every
# kernel slice (evolution.mlp_evolution).
EVOLUTIONS = ("rda", "rda_equation", "linear", "mlp")
# The time kernel K of Eq. 2.3d (nn.core.time_kernel_from_params): "dirac" is theta = w (the paper's).
TIME_KERNELS = ("dirac", "exponential", "discrete")
# How the models' learnable RDA diffusion maps to d >= 0 (layers.rda_diffusion): "abs"
# (d = |rda_d|, the default: the gradient of d reaches rda_d at full size) or "softplus"
# (d = softplus(rda_d_raw), the parameterization before; at d = 1e-3 it scales d's
# gradient by 1e-3, so d never moved in training: kept for runs written with it).
RDA_PARAMETERIZATIONS = ("abs", "softplus")
# Prefixes of the evolution parameters p (Eq. 2.3c) and time-kernel parameters (Eq. 2.3d) in
# the models' params (layers.declare_evolution, layers.declare_time_kernel): masked off weight
# decay and scaled by evolution_lr_scale (optim.py).
EVOLUTION_PARAM_PREFIXES = ("rda_", "evo_", "time_")
COMPUTE_DTYPES = DTYPES + ("bfloat16",)

# remat: an explicit schedule (ode.REMAT_MODES) or "auto": per ODE block, at trace time, the
# cheapest schedule whose estimated activation memory fits remat_budget_mb (ode.choose_remat;
# layers.block_remat gives it the block's activation). The budget is in MiB (2**20 bytes) per
# ODE block for the activations as the model sees them (steps.create_model converts the run
# config's per-device budget). Default 2048: an eighth of a 16 GB device per block, so
# ResNet-10's three blocks stay under 6 GiB; at CIFAR-10 batch 256 on one device every
# configuration of the paper (steps_z <= 5) runs without remat, also with 5 vmapped seeds.
REMAT_KNOBS = (*ode.REMAT_MODES, "auto")
DEFAULT_REMAT_BUDGET_MB = 2048.0

# The knobs and their values for every method (None = not used). ``steps_z``, ``steps_w``,
# ``schedule``, ``solver`` (``"euler"``, ``"rk2"``, ``"rk4"``) and ``remat`` (see
# ode.REMAT_MODES, or ``"auto"`` with ``remat_budget_mb``, above) as in coupled_block; ``adjoint``: ``"autodiff"``, ``"discrete"`` (the
# hand-written Eq. 2.5 adjoint, Euler only) or ``"backsolve"`` (diffrax continuous
# adjoint, static weights only); ``coeff_granularity``: ``"kernel"`` (one ``(d, v, rho)``
# per kernel) or ``"filter"`` (one per output filter, shape ``(cout,)``); ``nonlinearity``:
# sigma of Eq. 2.6; ``norm``: ``"per_step"`` or ``"shared"`` BatchNorm across time steps
# (layers.StepBatchNorm); ``bn_momentum`` (Flax convention); ``dtype`` of params and
# activations (``"float64"`` for gradient tests); ``compute_dtype``: None (= ``dtype``) or
# ``"bfloat16"``: activations and convolutions in bfloat16, params, BatchNorm statistics
# and arithmetic, and the RDA evolution in ``dtype``. Without evolution (``baseline``,
# ``neural_ode``, ``anode``) ``steps_w``, ``schedule``, ``nonlinearity`` and
# ``coeff_granularity``, ``evolution``, ``time_kernel`` and ``rda_parameterization`` are
# validated but unused; ``evolution`` (``EVOLUTIONS``), ``time_kernel`` (``TIME_KERNELS``) and
# ``rda_parameterization`` (``RDA_PARAMETERIZATIONS``) pick q and K of Eq. 2.3 (see the
# comments there and layers.conv_evolution); ``remat`` is unused by
# ``adjoint="backsolve"`` (diffrax's backsolve keeps O(1) activations by construction).
_COMMON_DEFAULTS: dict[str, Any] = dict(
    steps_z=1,
    steps_w=None,
    schedule="aligned",
    solver="euler",
    remat="none",
    remat_budget_mb=DEFAULT_REMAT_BUDGET_MB,
    adjoint="autodiff",
    coeff_granularity="kernel",
    nonlinearity="tanh",
    norm="per_step",
    bn_momentum=0.9,
    dtype="float32",
    compute_dtype=None,
    evolution="rda",
    time_kernel="dirac",
    rda_parameterization="abs",
)
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "neural_ode": dict(steps_z=2, adjoint="backsolve"),
    "anode": dict(steps_z=2, remat="auto"),
    "anodev2_conf1": dict(steps_z=5, steps_w=5, schedule="aligned", remat="auto"),
    "anodev2_conf2": dict(steps_z=2, steps_w=10, schedule="endpoints", remat="auto"),
}
KNOBS = tuple(_COMMON_DEFAULTS)


def method_defaults(method: str) -> dict[str, Any]:
    """All knob values of ``method`` (a fresh dict; ``steps_w`` is None without evolution)."""
    ode.check_choice("method", method, METHODS)
    return {**_COMMON_DEFAULTS, **_METHOD_DEFAULTS[method]}


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    """The resolved, validated knobs of a model's ODE blocks (hashable: a static Module field)."""

    method: str
    evolve: bool
    steps_z: int
    steps_w: Optional[int]
    schedule: str
    solver: str
    remat: str
    remat_budget_mb: float
    adjoint: str
    coeff_granularity: str
    nonlinearity: str
    norm: str
    bn_momentum: float
    dtype: str
    compute_dtype: str = "float32"
    evolution: str = "rda"
    time_kernel: str = "dirac"
    rda_parameterization: str = "abs"

    @property
    def jnp_dtype(self):
        """The params' dtype (and BatchNorm's, and the RDA evolution's)."""
        return jnp.dtype(self.dtype)

    @property
    def jnp_compute_dtype(self):
        """The activations' and convolutions' dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def sigma(self) -> Optional[Callable]:
        return NONLINEARITIES[self.nonlinearity]


def _normalize_dtype(value, field: str = "dtype", allowed=DTYPES) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = repr(value)
    if name not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")
    return name


def resolve_config(method: str, **overrides) -> ODEConfig:
    """Validate ``overrides`` against ``method``'s defaults; raise ValueError naming the bad field.

    ``None`` values mean "the method's default". Runs no JAX computation.
    """
    defaults = method_defaults(method)
    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise ValueError(
            f"unknown knob(s) {', '.join(map(repr, unknown))} for method={method!r}; "
            f"allowed knobs: {', '.join(KNOBS)}"
        )
    k = {**defaults, **{name: v for name, v in overrides.items() if v is not None}}
    evolve = method in EVOLVING_METHODS

    ode.check_num_steps("steps_z", k["steps_z"])
    if k["steps_w"] is not None:
        ode.check_num_steps("steps_w", k["steps_w"])
    ode.check_choice("schedule", k["schedule"], SCHEDULES)
    ode.check_choice("solver", k["solver"], ode.SOLVERS)
    ode.check_choice("remat", k["remat"], REMAT_KNOBS)
    b = k["remat_budget_mb"]
    if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not 0 < b < float("inf"):
        raise ValueError(f"remat_budget_mb={b!r} must be a positive number of MiB (per ODE block; used by remat='auto')")
    k["remat_budget_mb"] = float(b)
    ode.check_choice("adjoint", k["adjoint"], ADJOINTS)
    ode.check_choice("coeff_granularity", k["coeff_granularity"], COEFF_GRANULARITIES)
    ode.check_choice("nonlinearity", k["nonlinearity"], tuple(NONLINEARITIES))
    ode.check_choice("norm", k["norm"], NORMS)
    ode.check_choice("evolution", k["evolution"], EVOLUTIONS)
    ode.check_choice("time_kernel", k["time_kernel"], TIME_KERNELS)
    ode.check_choice("rda_parameterization", k["rda_parameterization"], RDA_PARAMETERIZATIONS)
    if evolve and k["evolution"] == "mlp" and k["coeff_granularity"] != "kernel":
        raise ValueError(
            f"coeff_granularity={k['coeff_granularity']!r} with evolution='mlp': the MLP is shared by every kernel "
            "slice (it has no per-filter form); use coeff_granularity='kernel' or another evolution"
        )
    m = k["bn_momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float, np.floating)) or not 0.0 <= m <= 1.0:
        raise ValueError(f"bn_momentum={m!r} must be a float in [0, 1] (Flax convention: 0.9 keeps 90% of the old value)")
    k["bn_momentum"] = float(m)
    k["dtype"] = _normalize_dtype(k["dtype"])
    compute = k["dtype"] if k["compute_dtype"] is None else _normalize_dtype(k["compute_dtype"], "compute_dtype", COMPUTE_DTYPES)
    if compute not in (k["dtype"], "bfloat16"):
        raise ValueError(
            f"compute_dtype={compute!r} with dtype={k['dtype']!r}: compute in the params' dtype "
            "(compute_dtype=None) or in 'bfloat16'"
        )
    k["compute_dtype"] = compute

    if evolve:
        k["steps_w"] = k["steps_z"] if k["steps_w"] is None else k["steps_w"]
        trajectory_indices(k["steps_z"], k["steps_w"], k["schedule"])  # e.g. 'aligned' divisibility
    if k["adjoint"] == "discrete" and k["solver"] != "euler":
        raise ValueError(
            f"adjoint='discrete' implements Eq. 2.5 for forward Euler only, got solver={k['solver']!r}; "
            "use solver='euler' or adjoint='autodiff'"
        )
    if k["adjoint"] == "backsolve" and evolve:
        raise ValueError(
            f"adjoint='backsolve' (diffrax continuous adjoint) needs static weights, but method={method!r} "
            "evolves them; use adjoint='autodiff' or 'discrete', or method='neural_ode'"
        )
    if k["adjoint"] == "backsolve" and k["solver"] != "euler" and k["norm"] == "per_step":
        # odeint_diffrax picks step n's args from the stage time alone, round(t * N): rk2/rk4
        # stages at t_n + h/2 (round half to even) and t_n + h get step n+1's BatchNorm.
        raise ValueError(
            f"adjoint='backsolve' with solver={k['solver']!r} and norm='per_step' would give the inner "
            "Runge-Kutta stages the wrong step's BatchNorm; use solver='euler', norm='shared' or "
            "adjoint='autodiff'"
        )
    return ODEConfig(method=method, evolve=evolve, **k)

