"""anodev2_jax: ANODEV2 coupled neural ODEs in JAX (weights evolve in time with activations).

Numerics (pure functions, no Flax): :mod:`rda`, :mod:`ode`, :mod:`evolution`, :mod:`time_kernels`,
:mod:`trajectory`, :mod:`adjoint`, :mod:`coupled`.
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
from anodev2_jax.adjoint import discrete_adjoint as discrete_adjoint

__version__ = "0.1.0"


def __getattr__(name):
    # get_model lives in the only Flax module; import it lazily so the numerics stay Flax-free.
    if name == "get_model":
        from anodev2_jax.models import get_model

        return get_model
    raise AttributeError(f"module 'anodev2_jax' has no attribute {name!r}")
