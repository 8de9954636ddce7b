"""JAX vs. PyTorch + torchdiffeq: one ResNet-4 ANODE training step, the same computation in both.

The peer is PyTorch at its best for what the ANODE code base does: the ODE block solved by
torchdiffeq's Euler ``odeint(func, z0, torch.tensor([0., 1.]), method="euler",
options={"step_size": 1 / steps_z})`` inside ``torch.utils.checkpoint`` (block
checkpointing: only the block input is stored, the block is recomputed in the backward
pass). The ODE function picks step ``n``'s BatchNorm with a step counter that the block
resets at the start of each solve, so the checkpoint's recomputation picks the same ones
(``norm="per_step"``, our default); ``norm="shared"`` calls one BatchNorm at every step,
as ANODE's code does. Ours: ``get_model("resnet4", "anode", steps_z=5, remat="block",
norm=...)`` (static weights, Euler).

Why this form of the peer: asking torchdiffeq for the solution on the whole 6-point grid
(``torch.linspace(0, 1, steps_z + 1)``) and picking the BatchNorm from ``float(t)``, as this
script did before, made torchdiffeq write every step into a stacked ``(6, B, C, H, W)``
solution tensor (and differentiate those copies) and read the time back to Python at every
step: 420 ms against 333 ms per step for the form above (batch 128, 2 threads, quiet
machine). ``--grid-peer`` times that old form next to the new one.

Same work in both: the same float32 batch (no augmentation in either), cross-entropy,
backward, and one SGD step with momentum 0.9 and coupled weight decay 5e-4 (optax chain
as ``optim.create_optimizer`` builds it / ``torch.optim.SGD(weight_decay=5e-4)``).
Before timing, for every BatchNorm variant and remat mode timed, the JAX weights are copied
into the torch model and the script asserts that the logits and every parameter gradient
agree (float32 tolerances), so the comparison is of the same computation. PyTorch runs with
``torch.set_num_threads(--threads)`` (default: the number of CPU cores, which is what
XLA:CPU uses) in both memory formats, contiguous NCHW and channels_last; the faster one is
"PyTorch at its best". ``--remat none`` adds the pair without checkpointing (our
``remat="none"``, which ``remat="auto"`` picks at this size, against plain autograd).

All timings are medians of rounds that run every contender once (interleaved), in one
process; the summary also gives the ratio of the fastest rounds. Run it on a quiet machine:
other jobs stall PyTorch's OpenMP threads at every parallel region (measured here: its
median reached 7x its fastest round while JAX's stayed near 2x), and the script says so
when a median exceeds 1.5x its fastest round. Then (unless ``--no-profile``) one profiled step of each framework splits the
time by operation: XLA's per-thunk trace (``jax.profiler``) and ``torch.profiler``'s self
CPU time, summed by kind (convolutions, kernel-gradient products, element-wise fusions
...), to say where the remaining difference goes.

Known difference that does not touch the comparison: ``torch.utils.checkpoint``
recomputes the block in the backward pass with the BatchNorm modules in train mode, so
torch updates each ODE-block running statistic twice per step (a quirk of checkpointing
BatchNorm in PyTorch); ours are updated once. Running statistics are not compared.

Run: ``python benchmarks/torch_peer.py`` (``--batch 128 --steps 20 --norm per_step shared
--remat block``; ``--quick``: batch 8, 2 rounds).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from anodev2_jax import optim, steps  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
NORMS = ("per_step", "shared")
REMATS = ("block", "none")  # the modes with a PyTorch equivalent (torch.utils.checkpoint or none)


def torch_model(steps_z: int, norm: str = "per_step", checkpointed: bool = True, grid: bool = False):
    """ResNet-4 ANODE in PyTorch: stem, an ODE block (torchdiffeq Euler, in a checkpoint), pool, fc.

    ``grid=True`` is the previous, slower form of the peer (solution on the whole time grid,
    BatchNorm picked by ``round(float(t) * steps_z)``); see the module docstring.
    """
    import torch
    import torch.nn as tnn
    from torch.utils.checkpoint import checkpoint
    from torchdiffeq import odeint

    per_step = norm == "per_step"

    class ODEFunc(tnn.Module):
        """``f(t, z) = relu(bn2_n(conv2(relu(bn1_n(conv1(z))))))``, ``n`` the step (per-step BN) or 0 (shared)."""

        def __init__(self, c: int):
            super().__init__()
            self.conv1 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
            self.conv2 = tnn.Conv2d(c, c, 3, padding=1, bias=False)
            n_bn = steps_z if per_step else 1
            self.bn1 = tnn.ModuleList(tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5) for _ in range(n_bn))
            self.bn2 = tnn.ModuleList(tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5) for _ in range(n_bn))
            self.calls = 0  # Euler steps taken in the current solve (reset by ODEBlock.solve)

        def forward(self, t, z):
            if grid:
                n = min(int(round(float(t) * steps_z)), steps_z - 1)
            else:
                n = self.calls
            self.calls += 1
            n = n if per_step else 0
            h = torch.relu(self.bn1[n](self.conv1(z)))
            return torch.relu(self.bn2[n](self.conv2(h)))

    class ODEBlock(tnn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.func = ODEFunc(c)
            t = torch.linspace(0.0, 1.0, steps_z + 1) if grid else torch.tensor([0.0, 1.0])
            self.register_buffer("t", t, persistent=False)

        def solve(self, z):
            self.func.calls = 0  # a checkpoint's recomputation starts again at step 0
            options = None if grid else {"step_size": 1.0 / steps_z}
            z1 = odeint(self.func, z, self.t, method="euler", options=options)[-1]
            # torchdiffeq builds its grid from step_size in float32: make sure it took steps_z steps
            assert self.func.calls == steps_z, f"torchdiffeq took {self.func.calls} steps, not {steps_z}"
            return z1

        def forward(self, z):
            return checkpoint(self.solve, z, use_reentrant=False) if checkpointed else self.solve(z)

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


def parameter_pairs(params, tmodel, steps_z: int, norm: str = "per_step"):
    """(jax array, torch tensor, to_torch) for every parameter; ``to_torch`` maps JAX's layout to torch's."""
    conv = lambda a: np.transpose(a, (3, 2, 0, 1))  # noqa: E731 - HWIO -> OIHW
    ident = lambda a: a  # noqa: E731
    # fc: JAX flattens (h, w, c) of the 4x4x16 pooled map, torch flattens (c, h, w)
    fc = lambda a: a.reshape(4, 4, 16, 10).transpose(3, 2, 0, 1).reshape(10, 256)  # noqa: E731
    blk, func = params["layer1_1"], tmodel.layer1_1.func
    pairs = [
        (params["conv1"]["kernel"], tmodel.conv1.weight, conv),
        (params["bn1"]["scale"], tmodel.bn1.weight, ident),
        (params["bn1"]["bias"], tmodel.bn1.bias, ident),
        (blk["conv1"]["kernel"], func.conv1.weight, conv),
        (blk["conv2"]["kernel"], func.conv2.weight, conv),
        (params["fc"]["kernel"], tmodel.fc.weight, fc),
        (params["fc"]["bias"], tmodel.fc.bias, ident),
    ]
    for bn in ("bn1", "bn2"):
        mods = getattr(func, bn)
        if norm == "shared":
            pairs += [(blk[bn]["scale"], mods[0].weight, ident), (blk[bn]["bias"], mods[0].bias, ident)]
            continue
        for n in range(steps_z):
            pairs.append((blk[bn]["scale"], mods[n].weight, lambda a, n=n: a[n]))
            pairs.append((blk[bn]["bias"], mods[n].bias, lambda a, n=n: a[n]))
    return pairs


def copy_weights(params, tmodel, steps_z: int, norm: str = "per_step") -> None:
    import torch

    with torch.no_grad():
        for a, t, to_torch in parameter_pairs(params, tmodel, steps_z, norm):
            t.copy_(torch.from_numpy(np.array(to_torch(np.asarray(a)), dtype=np.float32)))


def check_same_computation(model, variables, tmodel, x, y, steps_z: int, norm: str = "per_step") -> dict[str, float]:
    """Assert logits and all parameter gradients agree; returns the largest errors found."""
    import optax
    import torch

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
    for i, (g, t, to_torch) in enumerate(parameter_pairs(grads, tmodel, steps_z, norm)):
        ours = np.asarray(to_torch(np.asarray(g)))
        theirs = t.grad.numpy()
        np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-4, err_msg=f"gradient of parameter #{i} differs")
        worst_grad = max(worst_grad, float(np.max(np.abs(theirs - ours)) / max(np.max(np.abs(ours)), 1e-12)))
    tmodel.zero_grad(set_to_none=True)
    return {"max |logit diff|": float(f"{worst_logit:.1e}"), "max rel grad diff": float(f"{worst_grad:.1e}")}


# --- where the time goes: one profiled step of each framework, summed by kind of operation

_HLO_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_MOVES = {"copy", "transpose", "pad", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "bitcast",
          "reshape", "broadcast", "parameter", "constant", "tuple", "get-tuple-element", "iota"}
JAX_KINDS = {
    "convolution": "convolutions (forward, recomputation, input gradients)",
    "dot": "kernel-gradient products (kernels.kernel_grad's dots)",
    "fusion": "element-wise fusions and reductions (BatchNorm, ReLU, Euler steps, loss, SGD)",
    "copy": "copies, transposes, pads, slices",
    "control": "loop control (the kernel-gradient scans' while)",
}
TORCH_KINDS = {
    "conv": "convolution forward (oneDNN)",
    "conv_bwd": "convolution backward: input and kernel gradients (oneDNN)",
    "bn": "BatchNorm forward and backward",
    "relu": "ReLU forward and backward",
    "other": "other operators (element-wise, copies, SGD, loss, pool)",
}


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """``{instruction name: kind}`` (:data:`JAX_KINDS`) of every instruction in a compiled module's text.

    A fusion (or custom call) is a convolution or a product if its computation holds one,
    a copy if it only moves data, otherwise an element-wise fusion.
    """
    comp_ops: dict[str, set[str]] = {}
    insts, current = [], None
    for line in hlo_text.splitlines():
        s = line.strip()
        if s.endswith("{") and " = " not in s:
            current = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", s).group(1)
            comp_ops[current] = set()
            continue
        m = _HLO_OP.match(line)
        if m and current is not None:
            comp_ops[current].add(m.group(2))
            insts.append((m.group(1), m.group(2), _CALLS.findall(line)))
    kinds = {}
    for name, opcode, calls in insts:
        ops = {opcode}.union(*(comp_ops.get(c, set()) for c in calls)) if opcode in ("fusion", "custom-call") else {opcode}
        if "convolution" in ops:
            kinds[name] = "convolution"
        elif "dot" in ops:
            kinds[name] = "dot"
        elif opcode in ("while", "call", "conditional"):
            kinds[name] = "control"
        elif ops - {"fusion"} <= _MOVES:
            kinds[name] = "copy"
        else:
            kinds[name] = "fusion"
    return kinds


def split_by_kind(intervals) -> tuple[dict[str, float], float]:
    """Time by kind from ``(kind, start, end)`` intervals that may overlap, and the time any was running.

    Where several intervals overlap, each gets an equal share of that time; loop control
    gets time only where nothing else runs (its body's operations run inside it).
    """
    edges = sorted({t for _, a, b in intervals for t in (a, b)})
    starts = sorted(intervals, key=lambda iv: iv[1])
    totals, busy, active, i = {}, 0.0, [], 0
    for t0, t1 in zip(edges[:-1], edges[1:]):
        while i < len(starts) and starts[i][1] <= t0:
            active.append(starts[i])
            i += 1
        active = [iv for iv in active if iv[2] > t0]
        if not active:
            continue
        work = [iv for iv in active if iv[0] != "control"] or active
        for kind, _, _ in work:
            totals[kind] = totals.get(kind, 0.0) + (t1 - t0) / len(work)
        busy += t1 - t0
    return totals, busy


def jax_profile(compiled, call, reps: int) -> tuple[dict[str, float], float, float]:
    """Seconds per step by kind (:data:`JAX_KINDS`) for ``call()`` (which runs ``compiled``), busy and wall seconds.

    From XLA:CPU's per-thunk trace (``jax.profiler``): an operation runs from its thunk's
    start to its completion event (convolutions complete asynchronously, on the thread pool).
    """
    from jax.profiler import ProfileData

    text = compiled.as_text()
    kinds = hlo_kinds(text)
    module = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t = time.perf_counter()
        for _ in range(reps):
            call()
        wall = (time.perf_counter() - t) / reps
        jax.profiler.stop_trace()
        data = ProfileData.from_file(sorted(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True))[-1])
    ops, done = {}, {}
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if e.name.startswith("end: ") and "_c" in stats:
                    done[stats["_c"]] = e.start_ns + e.duration_ns
                elif stats.get("hlo_module") == module and "hlo_op" in stats:
                    ops[stats.get("_p", id(e))] = (kinds.get(str(stats["hlo_op"]), "fusion"), e.start_ns, e.start_ns + e.duration_ns)
    intervals = [(k, a, max(b, done.get(key, b))) for key, (k, a, b) in ops.items()]
    totals, busy = split_by_kind(intervals)
    return {k: totals.get(k, 0.0) * 1e-9 / reps for k in JAX_KINDS}, busy * 1e-9 / reps, wall


def torch_kind(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "conv_bwd" if "backward" in n else "conv"
    if "batch_norm" in n or "batchnorm" in n:
        return "bn"
    if "relu" in n or "threshold" in n:
        return "relu"
    return "other"


def torch_profile(call, reps: int) -> tuple[dict[str, float], float, float]:
    """Seconds per step by kind (:data:`TORCH_KINDS`) of torch.profiler's self CPU time for ``call()``, their sum and the wall time.

    PyTorch runs one operator at a time (each on all threads), so the sum is the busy time.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    walls, averages = [], []  # the first, untraced step pays for the profiler's start-up
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=reps),
                 on_trace_ready=lambda prof: averages.extend(prof.key_averages())) as prof:
        for _ in range(reps + 1):
            t = time.perf_counter()
            call()
            walls.append(time.perf_counter() - t)
            prof.step()
    wall = sum(walls[1:]) / reps
    totals = dict.fromkeys(TORCH_KINDS, 0.0)
    for evt in averages:
        totals[torch_kind(evt.key)] += evt.self_cpu_time_total * 1e-6 / reps
    return totals, sum(totals.values()), wall


def profile_table(splits) -> str:
    """Markdown: ms per step by kind for each framework (each with its own kinds), busy and wall time.

    ``splits``: ``[(framework, {kind: s}, busy s, wall s, {kind: label})]``.
    """
    rows = []
    for who, totals, busy, wall, kinds in splits:
        for kind, label in kinds.items():
            rows.append([who, label, f"{1e3 * totals[kind]:.1f}", f"{100 * totals[kind] / wall:.0f}%"])
        idle = max(wall - busy, 0.0)
        rows.append([who, "between operations (dispatch, Python, idle threads)", f"{1e3 * idle:.1f}", f"{100 * idle / wall:.0f}%"])
        rows.append([who, "**wall time of a profiled step**", f"**{1e3 * wall:.1f}**", "100%"])
    return common.markdown_table(["framework", "operations", "ms / step", "share"], rows, "llrr")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed rounds (median reported)")
    p.add_argument("--steps-z", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads (default: all cores, as XLA:CPU)")
    p.add_argument("--norm", nargs="+", default=list(NORMS), choices=NORMS, help="BatchNorm variants to time")
    p.add_argument("--remat", nargs="+", default=["block"], choices=REMATS,
                   help="block: both checkpoint the ODE block (ANODE); none: neither does")
    p.add_argument("--grid-peer", action="store_true", help="also time the previous peer (6-point output grid, BN by float(t))")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step (where the time goes)")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 rounds")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 8, 2
    for name in ("batch", "steps", "steps_z", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sz, b = args.steps_z, args.batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, b).astype(np.int32))
    tx_nchw = torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())
    ty = torch.from_numpy(np.array(y)).long()

    groups = [(norm, remat) for norm in args.norm for remat in args.remat]
    contenders, group_of, compiled_of, checks = {}, {}, {}, {}
    for norm, remat in groups:
        # --- JAX: the project's model and optimizer, no augmentation
        config = common.make_config("resnet4", "anode", batch=b, steps_z=sz, remat=remat, norm=norm)
        tx, _ = optim.create_optimizer(config, steps_per_epoch=195)
        model = steps.create_model(config)
        variables = model.init(jax.random.key(0), x[:1], train=False)
        peers = {"PyTorch contiguous": dict(fmt=torch.contiguous_format),
                 "PyTorch channels_last": dict(fmt=torch.channels_last)}
        if args.grid_peer and remat == "block":
            peers["PyTorch channels_last, 6-point grid (previous peer)"] = dict(fmt=torch.channels_last, grid=True)

        # --- torch: same weights; check that it is the same computation, for every peer
        errs = {}
        for label, kw in peers.items():
            tm = torch_model(sz, norm, checkpointed=remat == "block", grid=kw.get("grid", False))
            copy_weights(variables["params"], tm, sz, norm)
            errs[label] = check_same_computation(model, variables, tm, x, y, sz, norm)
        checks[norm, remat] = max(errs.values(), key=lambda e: e["max rel grad diff"])
        common.log(f"{norm}, remat={remat}: same computation: {errs}")

        step = common.plain_train_step(model, tx)
        st = [jax.tree.map(jnp.copy, variables["params"]), jax.tree.map(jnp.copy, variables["batch_stats"])]
        st.append(tx.init(st[0]))
        compiled = step.lower(*st, x, y).compile()

        def run(compiled=compiled, st=st):
            out = compiled(st[0], st[1], st[2], x, y)
            st[:] = out[:3]
            jax.block_until_ready(out)

        name = f"JAX (this project), {norm}, remat={remat}"
        contenders[name], group_of[name], compiled_of[name] = run, (norm, remat), compiled

        for label, kw in peers.items():
            tm = torch_model(sz, norm, checkpointed=remat == "block", grid=kw.get("grid", False))
            copy_weights(variables["params"], tm, sz, norm)
            tm = tm.to(memory_format=kw["fmt"]).train()
            opt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            xin = tx_nchw.contiguous(memory_format=kw["fmt"])

            def run(tm=tm, opt=opt, xin=xin):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(tm(xin), ty)
                loss.backward()
                opt.step()

            name = f"{label}, {norm}, {'checkpoint' if remat == 'block' else 'no checkpoint'}"
            contenders[name], group_of[name] = run, (norm, remat)

    load_before = os.getloadavg()
    common.log("warm-up...")
    for fn in contenders.values():
        fn()
        fn()
    times = common.interleaved_times(contenders, args.steps, progress="torch_peer")
    load_after = os.getloadavg()
    med = {k: common.median(v) for k, v in times.items()}

    def best_torch(group):  # the new peer's formats only: the previous peer is a reference row
        return min((k for k in med if k.startswith("PyTorch") and group_of[k] == group and "previous" not in k), key=med.get)

    rows, summary = [], []
    for group in groups:
        norm, remat = group
        ref = best_torch(group)
        for name in (k for k in med if group_of[k] == group):
            rows.append([name, f"{1e3 * med[name]:.1f}", f"{1e3 * min(times[name]):.1f}", f"{b / med[name]:.0f}",
                         f"{med[name] / med[ref]:.2f}"])
        jax_name = next(k for k in med if k.startswith("JAX") and group_of[k] == group)
        fastest = min(times[jax_name]) / min(min(times[k]) for k in med if k.startswith("PyTorch") and group_of[k] == group
                                                  and "previous" not in k)
        summary.append(
            f"- {norm} BatchNorm, {'block checkpointing' if remat == 'block' else 'no checkpointing'}: JAX takes "
            f"**{med[jax_name] / med[ref]:.2f}x** the time of PyTorch at its best ({ref.split(',')[0]}) by medians, "
            f"{fastest:.2f}x by the fastest rounds; same computation checked first: {checks[group]}"
        )
    # A loaded machine hurts PyTorch's OpenMP threads far more than XLA (every parallel region waits for a
    # descheduled thread): measured here, its median reached 7x its fastest round while JAX's stayed near 2x.
    spread = {k: med[k] / min(times[k]) for k in med}
    if max(spread.values()) > 1.5:
        worst = max(spread, key=spread.get)
        summary.append(
            f"- **The medians are unreliable**: {worst}'s median is {spread[worst]:.1f}x its fastest round (other "
            "jobs on the machine); compare the fastest rounds and the profiled steps below, or rerun when it is quiet."
        )
    text = [
        f"### ResNet-4 ANODE training step (steps_z={sz}, Euler), batch {b}, float32\n",
        common.machine() + f"; torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"Median and fastest of {args.steps} interleaved rounds (every row once per round); load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after. Last column: this row's median over the median of "
        "the fastest PyTorch row of its BatchNorm / checkpointing group.\n",
        common.markdown_table(["implementation", "median ms / step", "min ms", "images / s", "time / PyTorch best"], rows),
        "",
        *summary,
    ]
    if not args.no_profile:
        group = groups[0]
        jax_name = next(k for k in med if k.startswith("JAX") and group_of[k] == group)
        ref = best_torch(group)
        reps = 1 if args.quick else 3
        common.log("profiling one step of each...")
        jax_split = jax_profile(compiled_of[jax_name], contenders[jax_name], reps)
        torch_split = torch_profile(contenders[ref], reps)
        text += [
            f"\n#### Where the time goes ({group[0]} BatchNorm, remat={group[1]}; {reps} profiled step(s) each)\n",
            "JAX: XLA:CPU's per-thunk trace (jax.profiler); each HLO instruction runs from its start to its "
            "completion event, time when several run at once (XLA runs independent thunks side by side) is split "
            "evenly among them. PyTorch: torch.profiler's self CPU time of each operator (one at a time, each on "
            "all threads). Profiling adds some overhead to both.\n",
            profile_table([("JAX", *jax_split, JAX_KINDS), (ref.split(",")[0], *torch_split, TORCH_KINDS)]),
        ]
    common.emit("\n".join(text) + "\n", args.out)


if __name__ == "__main__":
    main()
