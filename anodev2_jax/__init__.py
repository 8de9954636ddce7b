"""anodev2_jax: ANODEV2 coupled neural ODEs in JAX (weights evolve in time with activations).

The system of Eq. 2.3: activations ``dz/dt = f(z, theta(t))`` (Eq. 2.3b, fixed steps),
weights ``dw/dt = q(w; p)`` (Eq. 2.3c, an evolution operator or the RDA map of Eq. B.4)
and ``theta(t) = int_0^t K(t - tau) w(tau) dtau`` (Eq. 2.3d, a time kernel), with
discretize-then-optimize gradients (``jax.grad`` or the hand-written Eq. 2.5 adjoint).

Numerics (pure functions, no Flax): :mod:`~anodev2_jax.rda`, :mod:`~anodev2_jax.ode`,
:mod:`~anodev2_jax.evolution`, :mod:`~anodev2_jax.time_kernels`, :mod:`~anodev2_jax.trajectory`,
:mod:`~anodev2_jax.adjoint`, :mod:`~anodev2_jax.coupled`. The models (Flax linen):
``anodev2_jax.get_model(name, method, **overrides)``, imported on first use so that
``import anodev2_jax`` (and ``from anodev2_jax import *``, which leaves it out) stays Flax-free.

Training the parameters of operators and kernels with optax under
``jax.numpy_dtype_promotion("strict")``: ``optax.adam`` (and every optimizer with Adam's
bias correction) computes ``1 - b1 ** count``, a Python float to the power of its int32
step count, which strict promotion refuses, whatever the parameters' dtype (optax's code,
not ours). Run the optimizer update alone under standard promotion, inside the jitted step
(the setting is read while tracing)::

    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)

Examples:
    >>> import anodev2_jax
    >>> w = jnp.ones((3, 3, 2, 4))
    >>> anodev2_jax.evolve_weights(w, anodev2_jax.RDACoeffs(0.1, jnp.zeros(2), 0.0), num_steps=2, dt=0.5).shape
    (3, 3, 2, 4)
"""

from anodev2_jax.rda import RDACoeffs as RDACoeffs
from anodev2_jax.rda import evolve_weights as evolve_weights
from anodev2_jax.rda import linear_step as linear_step
from anodev2_jax.rda import spectral_symbol as spectral_symbol
from anodev2_jax.ode import odeint_fixed as odeint_fixed
from anodev2_jax.ode import odeint_diffrax as odeint_diffrax
from anodev2_jax.evolution import RDAEquation as RDAEquation
from anodev2_jax.evolution import LinearEvolution as LinearEvolution
from anodev2_jax.evolution import ODEEvolution as ODEEvolution
from anodev2_jax.evolution import mlp_evolution as mlp_evolution
from anodev2_jax.time_kernels import DiracKernel as DiracKernel
from anodev2_jax.time_kernels import ExponentialKernel as ExponentialKernel
from anodev2_jax.time_kernels import DiscreteKernel as DiscreteKernel
from anodev2_jax.coupled import coupled_block as coupled_block
from anodev2_jax.coupled import coupled_odeint_diffrax as coupled_odeint_diffrax
from anodev2_jax.trajectory import trajectory_indices as trajectory_indices
from anodev2_jax.adjoint import AdjointGradients as AdjointGradients
from anodev2_jax.adjoint import discrete_adjoint as discrete_adjoint

__version__ = "0.1.0"

# Everything importable from the package, in the order above; get_model (lazy, Flax) is not
# in it, so `from anodev2_jax import *` imports no Flax: import it by name.
__all__ = [
    "RDACoeffs",
    "evolve_weights",
    "linear_step",
    "spectral_symbol",
    "odeint_fixed",
    "odeint_diffrax",
    "RDAEquation",
    "LinearEvolution",
    "ODEEvolution",
    "mlp_evolution",
    "DiracKernel",
    "ExponentialKernel",
    "DiscreteKernel",
    "coupled_block",
    "coupled_odeint_diffrax",
    "trajectory_indices",
    "AdjointGradients",
    "discrete_adjoint",
]

_LAZY = ("get_model",)


def __getattr__(name):
    # get_model lives in the only Flax module; import it lazily so the numerics stay Flax-free.
    if name == "get_model":
        from anodev2_jax.models import get_model

        return get_model
    raise AttributeError(f"module 'anodev2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
