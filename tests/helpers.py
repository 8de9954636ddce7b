"""Shared test helpers: one tolerance helper with per-dtype defaults (STYLE.md 8), small models, tiny runs, fake CIFAR files."""

import dataclasses
import functools
import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import flax
import jax
import jax.numpy as jnp
import numpy as np
from configs import default
from flax import nnx

# Defaults per dtype: float64 results of the same computation differ only by round-off.
_RTOL = {np.dtype("float64"): 1e-10, np.dtype("float32"): 1e-5}
_ATOL = {np.dtype("float64"): 1e-12, np.dtype("float32"): 1e-6}


def tree_allclose(x, y, *, rtol=None, atol=None) -> bool:
    """True when two pytrees have the same structure and allclose leaves."""
    lx, tx = jax.tree_util.tree_flatten(x)
    ly, ty = jax.tree_util.tree_flatten(y)
    if tx != ty:
        return False
    for a, b in zip(lx, ly):
        a, b = np.asarray(a), np.asarray(b)
        dt = np.result_type(a.dtype, b.dtype)
        r = _RTOL.get(dt, 1e-5) if rtol is None else rtol
        t = _ATOL.get(dt, 1e-6) if atol is None else atol
        if a.shape != b.shape or not np.allclose(a, b, rtol=r, atol=t):
            return False
    return True


def max_rel_err(x, y) -> float:
    """Largest leafwise ``max|x - y| / max|y|`` over two pytrees of the same structure."""
    errs = []
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.max(np.abs(b)), 1e-300)
        errs.append(np.max(np.abs(a - b)) / scale)
    return float(max(errs))


def conv(z, w, stride=1):
    return jax.lax.conv_general_dilated(z, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def small_conv_f(z, theta):
    """A small two-conv ODE function (tanh keeps every derivative smooth for finite differences)."""
    y = jnp.tanh(conv(z, theta["w1"]) + theta["b"].reshape(1, 1, 1, -1))
    return jnp.tanh(conv(y, theta["w2"]))


def small_problem(key, dtype=jnp.float64, batch=2, hw=6, c=3, sizes=(3, 4)):
    """Inputs of a small coupled block: odd and even kernel sizes, scalar and per-filter coeffs."""
    from anodev2_jax import RDACoeffs

    k1, k2, k3, k4 = jax.random.split(key, 4)
    theta = {
        "w1": 0.4 * jax.random.normal(k1, (sizes[0], sizes[0], c, c), dtype),
        "w2": 0.4 * jax.random.normal(k2, (sizes[1], sizes[1], c, c), dtype),
        "b": 0.1 * jax.random.normal(k4, (c,), dtype),
    }
    coeffs = {
        "w1": RDACoeffs(jnp.asarray(0.15, dtype), jnp.asarray([0.3, -0.2], dtype), jnp.asarray(0.05, dtype)),
        "w2": RDACoeffs(
            jnp.linspace(0.05, 0.3, c, dtype=dtype),
            jnp.stack([jnp.linspace(-0.4, 0.4, c, dtype=dtype), jnp.linspace(0.2, -0.1, c, dtype=dtype)], -1),
            jnp.linspace(-0.2, 0.1, c, dtype=dtype),
        ),
        "b": None,
    }
    z0 = jax.random.normal(k3, (batch, hw, hw, c), dtype)
    return z0, theta, coeffs


# ----------------------------------------------------------------------------- tiny training runs


def tiny_config(model="resnet4", method="baseline", **overrides):
    """A config of a two-step run: 16 synthetic training images, batch 8, one epoch.

    The tests share it (only seeds, epochs and logging vary; the learning rate drops
    after epoch 1), so they share compiled programs.
    """
    config = default.get_config(method)
    config.model = model
    config.dataset = "synthetic"
    config.num_train = 16
    config.num_test = 16
    config.batch_size = 8
    config.num_epochs = 1
    config.lr_boundaries_epochs = (1,)
    config.learning_rate = 0.01
    config.log_every_steps = 0
    for name, value in overrides.items():
        config[name] = value
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def restore_state(workdir, step):
    """The raw checkpoint of global step ``step`` (nested dicts of arrays, no target needed)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute()) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore())


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in records]


# ---- the operator x kernel grid (evolution operators and time kernels of Eq. 2.3c-d) ------

OPERATORS = ("rda_coeffs", "rda_equation", "linear", "ode_user_q", "mlp")
KERNELS = ("none", "dirac", "exponential", "discrete")


def user_q(w, p):
    """A user weight ODE: a nonlinear reaction plus a learnable shift along the first spatial axis."""
    return p["a"] * jnp.tanh(w) + p["b"] * (jnp.roll(w, 1, axis=0) - w)


def make_operator(name, key, kernel_shape, dtype=jnp.float64):
    """An evolution of ``name`` for kernels of ``kernel_shape`` with generic (non-zero, non-special) parameters.

    The solvers are spread over the operators (RDAEquation rk4, user q rk2, MLP euler), so
    the adjoint grid checks each solver's formulas once without paying rk4 everywhere.
    """
    from anodev2_jax import LinearEvolution, ODEEvolution, RDACoeffs, RDAEquation, mlp_evolution

    cout = kernel_shape[-1]
    k = kernel_shape[0] * kernel_shape[1]
    a = lambda x: jnp.asarray(x, dtype)
    if name == "rda_coeffs":
        return RDACoeffs(a(0.2), a([0.4, -0.3]), a(0.1))
    if name == "rda_equation":  # per-filter coefficients
        return RDAEquation(jnp.linspace(0.1, 0.3, cout, dtype=dtype), 0.5 * jnp.ones((cout, 2), dtype), a([0.2, -0.1][:cout]))
    if name == "linear":
        return LinearEvolution(0.3 * jax.random.normal(key, (cout, k, k), dtype))
    if name == "ode_user_q":
        return ODEEvolution(user_q, {"a": a(0.7), "b": a(0.4)}, solver="rk2")
    if name == "mlp":  # the last layer moved off its zero init so every parameter matters
        op = mlp_evolution(key, kernel_shape, 3, solver="euler", dtype=dtype)
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
        params = dict(op.params, w2=0.3 * jax.random.normal(k1, op.params["w2"].shape, dtype),
                      b2=0.1 * jax.random.normal(k2, op.params["b2"].shape, dtype))
        return ODEEvolution(op.q, params, solver=op.solver, substeps=op.substeps)
    raise ValueError(name)


def make_kernel(name, dtype=jnp.float64):
    """A time kernel of ``name`` with generic parameters (None for ``"none"``)."""
    from anodev2_jax import DiracKernel, DiscreteKernel, ExponentialKernel

    return {
        "none": lambda: None,
        "dirac": DiracKernel,
        "exponential": lambda: ExponentialKernel(jnp.asarray(1.7, dtype)),
        "discrete": lambda: DiscreteKernel(jnp.asarray([0.6, 0.3, -0.2], dtype)),
    }[name]()


# ---- every pytree kind is an operator: the same q, one Euler step of user_q, in five containers -----

OPERATOR_KINDS = ("namedtuple", "dataclass", "equinox", "flax_struct", "nnx")


def user_q_euler(a, b, w, dt):
    """One Euler step of :func:`user_q`: the ``step`` every operator kind below shares."""
    return w + dt * user_q(w, {"a": a, "b": b})


class NamedTupleOp(NamedTuple):
    """An operator as a ``typing.NamedTuple`` (the most common JAX parameter container; RDACoeffs is one)."""

    a: jax.Array
    b: jax.Array

    def step(self, w, dt):
        return user_q_euler(self.a, self.b, w, dt)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["substeps"])
@dataclasses.dataclass(frozen=True)
class DataclassOp:
    """A dataclass registered with ``jax.tree_util.register_dataclass``; ``substeps`` is static metadata."""

    a: jax.Array
    b: jax.Array
    substeps: int = 1

    def step(self, w, dt):
        for _ in range(self.substeps):  # a Python loop: substeps must be static, not a traced leaf
            w = user_q_euler(self.a, self.b, w, dt / self.substeps)
        return w


class EquinoxOp(eqx.Module):
    a: jax.Array
    b: jax.Array

    def step(self, w, dt):
        return user_q_euler(self.a, self.b, w, dt)


@flax.struct.dataclass
class FlaxStructOp:
    a: jax.Array
    b: jax.Array
    substeps: int = flax.struct.field(pytree_node=False, default=1)

    def step(self, w, dt):
        for _ in range(self.substeps):
            w = user_q_euler(self.a, self.b, w, dt / self.substeps)
        return w


class NNXOp(nnx.Module):
    """A Flax NNX module: a JAX pytree since Flax 0.11, its ``nnx.Param`` values the leaves."""

    def __init__(self, a, b):
        self.a = nnx.Param(a)
        self.b = nnx.Param(b)

    def step(self, w, dt):
        return user_q_euler(self.a[...], self.b[...], w, dt)


def make_operator_kind(kind, dtype=jnp.float64, a=0.7, b=0.4):
    """The operator ``w -> user_q_euler(a, b, w, dt)`` as a pytree of ``kind`` (:data:`OPERATOR_KINDS`)."""
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    return {"namedtuple": NamedTupleOp, "dataclass": DataclassOp, "equinox": EquinoxOp, "flax_struct": FlaxStructOp,
            "nnx": NNXOp}[kind](a, b)  # fmt: skip


def tiny_f(z, theta):
    """The ODE function of :func:`tiny_problem`: one conv, bias, tanh (w2 adds a second conv when present)."""
    y = conv(z, theta["w1"]) + theta["b"].reshape(1, 1, 1, -1)
    if "w2" in theta:
        y = y + conv(jnp.tanh(y), theta["w2"])
    return jnp.tanh(y)


def tiny_problem(key, operator, dtype=jnp.float64, batch=1, hw=4, c=2, mixed=False):
    """A tiny coupled block for :func:`tiny_f`: ``w1`` evolved by ``operator``, bias ``b`` static.

    ``mixed=True`` adds a second kernel ``w2`` evolved by per-filter ``RDACoeffs`` (a tree
    mixing an operator with Eq. B.4, two evolved leaves under one time kernel).
    """
    from anodev2_jax import RDACoeffs

    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    theta = {"w1": 0.5 * jax.random.normal(k1, (3, 3, c, c), dtype), "b": 0.1 * jax.random.normal(k3, (c,), dtype)}
    evolution = {"w1": make_operator(operator, k5, (3, 3, c, c), dtype), "b": None}
    if mixed:
        theta["w2"] = 0.4 * jax.random.normal(k2, (3, 3, c, c), dtype)
        evolution["w2"] = RDACoeffs(
            jnp.linspace(0.05, 0.2, c, dtype=dtype), jnp.full((c, 2), 0.3, dtype), jnp.linspace(-0.1, 0.1, c, dtype=dtype)
        )
    z0 = jax.random.normal(k4, (batch, hw, hw, c), dtype)
    return z0, theta, evolution


# ----------------------------------------------------------------------------- damaged checkpoints


def array_data_file(step_dir: Path) -> Path:
    """The largest file of a checkpoint's OCDBT store: its compressed array chunks."""
    return max((step_dir / "default" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def flip_bit(path: Path, fraction: float) -> None:
    """Flips one bit of ``path`` at ``fraction`` of its length."""
    data = bytearray(path.read_bytes())
    data[int(fraction * len(data))] ^= 0x10
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- fake CIFAR-10 files

CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray, label: bytes, legacy: bool) -> bytes:
    """One batch exactly as in cifar-10-batches-py: rows of 3072 bytes in CHW order."""
    n = len(images)
    batch = {
        b"batch_label": label,
        b"labels": [int(v) for v in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
    }
    raw = pickle.dumps(batch, protocol=2)
    # The real files were pickled by numpy 1 (Python 2): their ndarray global is
    # numpy.core.multiarray._reconstruct. A protocol-2 GLOBAL is plain text, so rename it.
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if legacy else raw


def fake_cifar_batches(seed: int = 0, n_per_batch: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{batch name: (uint8 (n, 32, 32, 3) images, int (n,) labels)}`` for the six CIFAR-10 batches."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (n_per_batch,)))
        for name in CIFAR_BATCHES
    }


def write_cifar_tarball(path: Path, members: dict[str, bytes]) -> Path:
    """A ``cifar-10-python.tar.gz`` layout: ``members`` under ``cifar-10-batches-py/``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path
