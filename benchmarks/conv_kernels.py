"""Where a CPU training step's time goes: one ResNet-4 ODE layer, computed every way we tried.

The layer: a 3x3, stride-1, SAME convolution from 16 to 16 channels on 32x32 images (batch
128, float32), followed by train-mode BatchNorm and ReLU: the ODE function of ResNet-4's
block. Nearly all of a ResNet-4 ANODE step's FLOPs are this convolution, evaluated 40 times
per layer position at ``steps_z = 5`` with block checkpointing (forward, the checkpoint's
recomputation, input gradient, kernel gradient). Each row is one way to compute one of
those pieces; the first row of each piece is the reference, the row marked "(used)" is
what :mod:`anodev2_jax.models` runs on CPU.

* forward: XLA's convolution (used); im2col (a ``(B*H*W, 9*16)`` patch matrix times the
  ``(144, 16)`` kernel); nine shifted matrix products (one per tap, summed); Winograd
  F(2x2, 3x3) written in ``jnp`` (2.25x fewer multiplies; 4 images per chunk, the fastest
  chunking measured).
* input gradient: autodiff's transposed convolution (used).
* kernel gradient: autodiff's (XLA lowers it to a convolution with a 3x3 output over a
  32x32 window); ``kernels.kernel_grad`` (used: shifted copies times cotangents, a few
  images per ``lax.scan`` step so the working set stays in cache); the same product over
  the whole batch at once (no chunking).
* BatchNorm+ReLU: forward (used); backward, autodiff's vs the closed form (used).
* With PyTorch installed (``pip install -e '.[bench]'``), the same pieces through
  ``torch.nn.functional.conv2d`` and ``aten.convolution_backward`` (oneDNN), channels_last
  and contiguous NCHW, with ``torch.set_num_threads(os.cpu_count())``.

Before timing, every row's result is compared with its piece's reference (max |difference|
/ max |reference|, printed; the script stops if any exceeds 1e-4). Timings are medians of
interleaved rounds (every row once per round); each timing is two back-to-back calls,
halved (a row's first call can pay for the previous row's freed memory). GFLOP/s counts the
convolution's 2*B*H*W*9*16*16 multiply-adds, whatever the method does.

Run: ``python benchmarks/conv_kernels.py`` (``--batch 128 --rounds 20``; ``--quick``: batch
8, 2 rounds; ``--no-torch`` leaves PyTorch out).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from anodev2_jax import kernels  # noqa: E402

H = W = 32
C = 16
PAD = ((1, 1), (1, 1))


def xla_conv(x, k):
    return kernels.lax_conv(x, k, (1, 1), PAD)


def im2col_conv(x, k):
    b = x.shape[0]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i: i + H, j: j + W, :] for i in range(3) for j in range(3)], axis=-1)
    return (patches.reshape(-1, 9 * C) @ k.reshape(9 * C, -1)).reshape(b, H, W, -1)


def shifted_matmuls(x, k):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(jnp.einsum("bhwc,co->bhwo", xp[:, i: i + H, j: j + W, :], k[i, j]) for i in range(3) for j in range(3))


def _winograd_tiles(x, k):
    """Winograd F(2x2, 3x3) (Lavin & Gray 2016): B^T d B per 4x4 tile, G g G^T, 16 products, A^T m A."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    bt = lambda d: [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]  # noqa: E731
    at = lambda m: [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]  # noqa: E731
    gt = lambda r: [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]]  # noqa: E731
    d = [[xp[:, a: a + 2 * th: 2, e: e + 2 * tw: 2, :] for e in range(4)] for a in range(4)]
    rows = [bt([d[a][e] for a in range(4)]) for e in range(4)]  # rows[e][a']
    v = [bt([rows[e][a] for e in range(4)]) for a in range(4)]  # v[a'][e']
    u = [gt(r) for r in gt([k[0], k[1], k[2]])]  # (4, 4) of (cin, cout)
    vs = jnp.stack([v[i][j] for i in range(4) for j in range(4)]).reshape(16, -1, c)
    us = jnp.stack([u[i][j] for i in range(4) for j in range(4)])
    m = jnp.einsum("ptc,pco->pto", vs, us).reshape(4, 4, b, th, tw, -1)
    y = [at([mr[j] for j in range(4)]) for mr in at([m[i] for i in range(4)])]  # y[a][e]
    return jnp.stack([jnp.stack(y[0], axis=3), jnp.stack(y[1], axis=3)], axis=2).reshape(b, h, w, -1)


def winograd_conv(x, k, chunk=4):
    b = x.shape[0]
    chunk = chunk if b % chunk == 0 else b
    out = jax.lax.map(lambda xs: _winograd_tiles(xs, k), x.reshape((b // chunk, chunk) + x.shape[1:]))
    return out.reshape((b,) + out.shape[2:])


def autodiff_kernel_grad(x, g, k):
    return jax.vjp(lambda k_: xla_conv(x, k_), k)[1](g)[0]


def input_grad(g, k):
    return kernels.conv_input_grad(g, k, (1, 1), PAD, g.shape[:3] + (k.shape[2],))


def ours_kernel_grad(x, g, chunk_bytes):
    old = kernels.CHUNK_BYTES
    kernels.CHUNK_BYTES = chunk_bytes  # read at trace time
    try:
        return kernels.kernel_grad(x, g, (3, 3), (1, 1), PAD)
    finally:
        kernels.CHUNK_BYTES = old


def bn_relu_forward(y, scale, shift):
    return kernels.bn_relu_forward(y, scale, shift)[0]


def bn_relu_backward_autodiff(y, scale, shift, g):
    return jax.vjp(lambda y_: bn_relu_forward(y_, scale, shift), y)[1](g)[0]


def bn_relu_backward_ours(y, scale, shift, g):
    _, mean, var = kernels.bn_relu_forward(y, scale, shift)
    zero = jnp.zeros_like(mean)
    return kernels.bn_relu_bwd(y, scale, shift, mean, var, g, zero, zero)[0]


def torch_rows(x, k, g, threads: int):
    """``{(piece, label): (thunk, result as NHWC / HWIO numpy)}`` for PyTorch's conv pieces."""
    import torch

    torch.set_num_threads(threads)
    rows = {}
    weight = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(k), (3, 2, 0, 1))))
    for fmt_name, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
        tx = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))).contiguous(memory_format=fmt)
        tg = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(g), (0, 3, 1, 2)))).contiguous(memory_format=fmt)
        tw = weight.contiguous(memory_format=fmt)
        conv_bwd = functools.partial(
            torch.ops.aten.convolution_backward, tg, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1
        )

        def fwd(tx=tx, tw=tw):
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, padding=1)

        def dx(conv_bwd=conv_bwd):
            with torch.no_grad():
                return conv_bwd([True, False, False])[0]

        def dw(conv_bwd=conv_bwd):
            with torch.no_grad():
                return conv_bwd([False, True, False])[1]

        nhwc = lambda t: np.transpose(t.numpy(), (0, 2, 3, 1))  # noqa: E731
        rows[("forward", f"PyTorch conv2d, {fmt_name}")] = (fwd, nhwc(fwd()))
        rows[("input gradient", f"PyTorch convolution_backward, {fmt_name}")] = (dx, nhwc(dx()))
        rows[("kernel gradient", f"PyTorch convolution_backward, {fmt_name}")] = (dw, np.transpose(dw().numpy(), (2, 3, 1, 0)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads (default: all cores, as XLA:CPU)")
    p.add_argument("--no-torch", action="store_true", help="leave the PyTorch rows out")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 8, 2 rounds")
    p.add_argument("--out", default=None, help="also append the markdown table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 8, 2
    if args.batch < 4 or args.batch % 4:
        p.error(f"--batch {args.batch}: must be a positive multiple of 4 (Winograd's chunk); use e.g. --batch 128")
    if args.rounds < 1 or args.threads < 1:
        p.error(f"--rounds {args.rounds} / --threads {args.threads}: both must be at least 1")

    rng = np.random.default_rng(0)
    b = args.batch
    x = jnp.asarray(rng.normal(size=(b, H, W, C)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(b, H, W, C)).astype(np.float32))
    k = jnp.asarray((0.1 * rng.normal(size=(3, 3, C, C))).astype(np.float32))
    scale = jnp.asarray((1.0 + 0.1 * rng.normal(size=C)).astype(np.float32))
    shift = jnp.asarray((0.1 * rng.normal(size=C)).astype(np.float32))
    flops = 2.0 * b * H * W * 9 * C * C

    # (piece, label) -> (jitted function, arguments); the first row of a piece is its reference
    jax_rows = {
        ("forward", "XLA convolution (used)"): (xla_conv, (x, k)),
        ("forward", "im2col: patches x kernel matrix"): (im2col_conv, (x, k)),
        ("forward", "9 shifted matrix products"): (shifted_matmuls, (x, k)),
        ("forward", "Winograd F(2x2,3x3) in jnp, 4 images/chunk"): (winograd_conv, (x, k)),
        ("input gradient", "autodiff: XLA transposed convolution (used)"): (input_grad, (g, k)),
        ("kernel gradient", "autodiff: XLA convolution, 3x3 output"): (autodiff_kernel_grad, (x, g, k)),
        ("kernel gradient", "kernels.kernel_grad, 2 MiB chunks (used)"): (
            functools.partial(ours_kernel_grad, chunk_bytes=kernels.CHUNK_BYTES), (x, g)),
        ("kernel gradient", "the same product, whole batch at once"): (
            functools.partial(ours_kernel_grad, chunk_bytes=1 << 40), (x, g)),
        ("BatchNorm+ReLU forward", "batch moments, normalize, ReLU (used)"): (bn_relu_forward, (g, scale, shift)),
        ("BatchNorm+ReLU backward", "autodiff"): (bn_relu_backward_autodiff, (g, scale, shift, x)),
        ("BatchNorm+ReLU backward", "closed form, two passes (used)"): (bn_relu_backward_ours, (g, scale, shift, x)),
    }
    contenders, results, torch_version = {}, {}, None
    for key, (fn, fargs) in jax_rows.items():
        fn = jax.jit(fn)

        def run(fn=fn, fargs=fargs):
            return jax.block_until_ready(fn(*fargs))

        contenders[key] = run
        results[key] = np.asarray(run())
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            common.log("conv_kernels: torch not installed; PyTorch rows left out (pip install -e '.[bench]')")
        else:
            torch_version = torch.__version__
            for key, (fn, res) in torch_rows(x, k, g, args.threads).items():
                contenders[key], results[key] = fn, res

    refs, errors = {}, {}
    for (piece, label), res in results.items():
        ref = refs.setdefault(piece, res)
        errors[(piece, label)] = float(np.max(np.abs(res - ref)) / max(np.max(np.abs(ref)), 1e-30))
    bad = {k_: e for k_, e in errors.items() if e > 1e-4}
    if bad:
        raise SystemExit(f"conv_kernels: results differ from their piece's reference: {bad}")

    common.log("warm-up...")
    for fn in contenders.values():
        fn()

    def twice(fn):
        return lambda: (fn(), fn())

    times = common.interleaved_times({k_: twice(fn) for k_, fn in contenders.items()}, args.rounds)
    pieces = list(dict.fromkeys(piece for piece, _ in times))  # each piece's rows together, PyTorch's last
    rows = []
    for (piece, label), ts in sorted(times.items(), key=lambda item: pieces.index(item[0][0])):
        t = common.median(ts) / 2  # two calls per timing
        conv_piece = piece in ("forward", "input gradient", "kernel gradient")
        rows.append([piece, label, f"{1e3 * t:.1f}", f"{flops / t / 1e9:.0f}" if conv_piece else "-",
                     f"{errors[(piece, label)]:.0e}"])
    text = [
        f"### One ResNet-4 ODE layer (3x3 conv 16->16 on 32x32, BatchNorm, ReLU), batch {b}, float32\n",
        common.machine() + (f"; torch {torch_version}, {args.threads} threads" if torch_version else ""),
        f"Median of {args.rounds} interleaved rounds; GFLOP/s counts the convolution's {flops / 1e9:.2f} GFLOP. "
        "Difference: max |result - first row of its piece| / max |first row|.\n",
        common.markdown_table(["piece", "method", "ms", "GFLOP/s", "difference"], rows, "llrrr"),
    ]
    common.emit("\n".join(text) + "\n", args.out)


if __name__ == "__main__":
    main()
