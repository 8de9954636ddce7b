"""JAX vs. PyTorch + torchdiffeq: one ResNet-4 ANODE training step, the same computation in both.

The peer is what the ANODE code base does: the ODE block solved by torchdiffeq's
fixed-grid Euler ``odeint(func, z0, torch.linspace(0, 1, steps_z + 1), method="euler")``
inside ``torch.utils.checkpoint`` (block checkpointing: only the block input is stored,
the block is recomputed in the backward pass). Ours: ``get_model("resnet4", "anode",
steps_z=5)`` (static weights, Euler, ``remat="block"``, per-step BatchNorm). The torch ODE
function picks step ``n``'s BatchNorm from the time, ``n = round(t * steps_z)``, as our
default ``norm="per_step"`` does.

Same work in both: the same float32 batch (no augmentation in either), cross-entropy,
backward, and one SGD step with momentum 0.9 and coupled weight decay 5e-4 (optax chain
as ``optim.create_optimizer`` builds it / ``torch.optim.SGD(weight_decay=5e-4)``).
Before timing, the JAX weights are copied into the torch model and the script asserts that
the logits and every parameter gradient agree (float32 tolerances), so the comparison is of
the same computation. PyTorch runs with ``torch.set_num_threads(--threads)`` (default: the
number of CPU cores, which is what XLA:CPU uses) in both memory formats, contiguous NCHW
and channels_last; the faster one is reported as "PyTorch at its best". All timings are
medians of rounds that run every contender once (interleaved), in one process.

Known difference that does not touch the comparison: ``torch.utils.checkpoint``
recomputes the block in the backward pass with the BatchNorm modules in train mode, so
torch updates each ODE-block running statistic twice per step (a quirk of checkpointing
BatchNorm in PyTorch); ours are updated once. Running statistics are not compared.

Run: ``python benchmarks/torch_peer.py`` (``--batch 128 --steps 20``; ``--quick``: batch 8,
2 rounds).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from anodev2_jax import optim, steps  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def torch_model(steps_z: int):
    """ResNet-4 ANODE in PyTorch: stem, an ODE block (torchdiffeq Euler in a checkpoint), pool, fc."""
    import torch
    import torch.nn as tnn
    from torch.utils.checkpoint import checkpoint
    from torchdiffeq import odeint

    class ODEFunc(tnn.Module):
        """``f(t, z) = relu(bn2_n(conv2(relu(bn1_n(conv1(z))))))`` with ``n = round(t * steps_z)``."""

        def __init__(self, c: int):
            super().__init__()
            self.conv1 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
            self.conv2 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = tnn.ModuleList(tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5) for _ in range(steps_z))
            self.bn2 = tnn.ModuleList(tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5) for _ in range(steps_z))

        def forward(self, t, z):
            n = min(int(round(float(t) * steps_z)), steps_z - 1)
            h = torch.relu(self.bn1[n](self.conv1(z)))
            return torch.relu(self.bn2[n](self.conv2(h)))

    class ODEBlock(tnn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.func = ODEFunc(c)
            self.register_buffer("t", torch.linspace(0.0, 1.0, steps_z + 1), persistent=False)

        def solve(self, z):
            return odeint(self.func, z, self.t, method="euler")[-1]

        def forward(self, z):
            return checkpoint(self.solve, z, use_reentrant=False)

    class ResNet4(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(16, momentum=0.1, eps=1e-5)
            self.layer1_1 = ODEBlock(16)
            self.fc = tnn.Linear(256, 10)

        def forward(self, x):
            z = torch.relu(self.bn1(self.conv1(x)))
            z = self.layer1_1(z)
            z = torch.nn.functional.max_pool2d(z, 8, 8)
            return self.fc(torch.flatten(z, 1))

    return ResNet4()


def _pairs(params, tmodel, steps_z: int):
    """(jax array, torch tensor, to_torch, to_jax) for every parameter; converters map layouts."""
    conv = (lambda a: np.transpose(a, (3, 2, 0, 1)), lambda a: np.transpose(a, (2, 3, 1, 0)))  # HWIO <-> OIHW
    ident = (lambda a: a, lambda a: a)
    # fc: JAX flattens (h, w, c) of the 4x4x16 pooled map, torch flattens (c, h, w)
    fc = (
        lambda a: a.reshape(4, 4, 16, 10).transpose(3, 2, 0, 1).reshape(10, 256),
        lambda a: a.reshape(10, 16, 4, 4).transpose(2, 3, 1, 0).reshape(256, 10),
    )
    blk, func = params["layer1_1"], tmodel.layer1_1.func
    pairs = [
        (params["conv1"]["kernel"], tmodel.conv1.weight, *conv),
        (params["bn1"]["scale"], tmodel.bn1.weight, *ident),
        (params["bn1"]["bias"], tmodel.bn1.bias, *ident),
        (blk["conv1"]["kernel"], func.conv1.weight, *conv),
        (blk["conv2"]["kernel"], func.conv2.weight, *conv),
        (params["fc"]["kernel"], tmodel.fc.weight, *fc),
        (params["fc"]["bias"], tmodel.fc.bias, *ident),
    ]
    for bn in ("bn1", "bn2"):
        for n in range(steps_z):
            mods = getattr(func, bn)
            pairs.append((blk[bn]["scale"], mods[n].weight, lambda a, n=n: a[n], None))
            pairs.append((blk[bn]["bias"], mods[n].bias, lambda a, n=n: a[n], None))
    return pairs


def copy_weights(params, tmodel, steps_z: int) -> None:
    import torch

    with torch.no_grad():
        for a, t, to_torch, _ in _pairs(params, tmodel, steps_z):
            t.copy_(torch.from_numpy(np.array(to_torch(np.asarray(a)), dtype=np.float32)))


def check_same_computation(model, variables, tmodel, x, y, steps_z: int) -> dict[str, float]:
    """Assert logits and all parameter gradients agree; returns the largest errors found."""
    import torch
    import optax

    def loss_fn(p):
        logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    tx_ = torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())
    tmodel.train()
    tmodel.zero_grad(set_to_none=True)
    tlogits = tmodel(tx_)
    torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(np.asarray(y)).long()).backward()
    np.testing.assert_allclose(tlogits.detach().numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4, err_msg="logits differ")
    worst_logit = float(np.max(np.abs(tlogits.detach().numpy() - np.asarray(logits))))
    worst_grad = 0.0
    grad_pairs = _pairs(grads, tmodel, steps_z)
    for name, (g, t, to_torch, _) in enumerate(grad_pairs):
        ours = np.asarray(to_torch(np.asarray(g)))
        theirs = t.grad.numpy()
        np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-4, err_msg=f"gradient of parameter #{name} differs")
        worst_grad = max(worst_grad, float(np.max(np.abs(theirs - ours)) / max(np.max(np.abs(ours)), 1e-12)))
    tmodel.zero_grad(set_to_none=True)
    return {"max |logit diff|": worst_logit, "max rel grad diff": worst_grad}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed rounds (median reported)")
    p.add_argument("--steps-z", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores, as XLA:CPU)")
    p.add_argument("--remat", nargs="+", default=["block"], choices=["none", "block", "step"], help="JAX remat modes to time")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 rounds")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 8, 2

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sz, b = args.steps_z, args.batch

    # --- JAX: the project's model and optimizer, no augmentation
    config = common.make_config("resnet4", "anode", batch=b, steps_z=sz)
    tx, _ = optim.create_optimizer(config, steps_per_epoch=195)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, b).astype(np.int32))
    models = {r: steps.create_model(common.make_config("resnet4", "anode", batch=b, steps_z=sz, remat=r)) for r in args.remat}
    variables = models[args.remat[0]].init(jax.random.key(0), x[:1], train=False)

    # --- torch: same weights; check that it is the same computation
    tmodel = torch_model(sz)
    copy_weights(variables["params"], tmodel, sz)
    errs = check_same_computation(models[args.remat[0]], variables, tmodel, x, y, sz)
    common.log(f"same computation: {errs}")

    # --- contenders
    contenders = {}
    for remat, model in models.items():
        step = common.plain_train_step(model, tx)
        st = [jax.tree.map(jnp.copy, variables["params"]), jax.tree.map(jnp.copy, variables["batch_stats"])]
        st.append(tx.init(st[0]))

        def run(step=step, st=st):
            out = step(st[0], st[1], st[2], x, y)
            st[:] = out[:3]
            jax.block_until_ready(out)

        contenders[f"JAX remat={remat}"] = run

    tx_nchw = torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())
    ty = torch.from_numpy(np.asarray(y)).long()
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        tm = torch_model(sz)
        copy_weights(variables["params"], tm, sz)
        tm = tm.to(memory_format=fmt).train()
        opt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        xin = tx_nchw.contiguous(memory_format=fmt)

        def run(tm=tm, opt=opt, xin=xin):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(tm(xin), ty)
            loss.backward()
            opt.step()

        contenders[f"PyTorch {fmt_name}"] = run

    common.log("warm-up (compiles the JAX steps)...")
    for fn in contenders.values():
        fn()
        fn()
    times = common.interleaved_times(contenders, args.steps, progress="torch_peer")
    med = {k: common.median(v) for k, v in times.items()}

    torch_best = min((k for k in med if k.startswith("PyTorch")), key=med.get)
    rows = []
    for name, t in med.items():
        rows.append([name, f"{1e3 * t:.1f}", f"{1e3 * min(times[name]):.1f}", f"{b / t:.0f}", f"{t / med[torch_best]:.2f}"])
    text = [
        f"### ResNet-4 ANODE training step (steps_z={sz}, Euler, block checkpointing, per-step BN), batch {b}, float32\n",
        common.machine() + f"; torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"Median of {args.steps} interleaved rounds. Same computation checked first: {errs}.\n",
        common.markdown_table(["implementation", "median ms / step", "min ms", "images / s", f"time / {torch_best}"], rows),
    ]
    jax_best = min((k for k in med if k.startswith("JAX")), key=med.get)
    text.append(
        f"\nJAX ({jax_best}) / PyTorch at its best ({torch_best}): {med[jax_best] / med[torch_best]:.2f}x the time "
        f"({med[torch_best] / med[jax_best]:.2f}x the speed)"
    )
    common.emit("\n".join(text) + "\n", args.out)


if __name__ == "__main__":
    main()
