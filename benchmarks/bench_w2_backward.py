"""Where W2's CPU train step goes, jaxdeq beside torchdeq: cell evaluations and cell
VJPs, how many of each a train step runs, and what one costs.

    python benchmarks/bench_w2_backward.py [--reps N] [--tiny]

JAX side (this interpreter): jaxdeq's W2 model of `bench_jaxdeq.py`: its train step
and inference (medians), its forward nfe (`solution.nfe`, the batch pays the
slowest sample) and backward products (`ImplicitAdjoint(callback=...)`, the
slowest sample); the W2 cell's evaluation and its VJP alone (10 in a `fori_loop`,
the VJP with jaxdeq's canonical convolutions, as its backward runs them). Also the
same two ops with `XLA_FLAGS=--xla_cpu_use_onednn=true` (a subprocess). PyTorch
side (`.venv-torch`): torchdeq's train step, inference and backward iterations
(its `bench_torchdeq.py` record), and the cell and its VJP (`autograd.grad`) alone.
Writes `benchmarks/results/w2_backward.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "w2_backward.md"
TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
LOOP = 10

_TORCH_OPS = """
import sys, time, statistics, json, torch
sys.path.insert(0, {bench!r})
import workloads_torch as wt
w = wt.get_workload("w2", tiny={tiny})
size = 8 if {tiny} else 32
x = torch.randn({batch}, 3, size, size)
with torch.no_grad():
    inj = w.inject(x)
    z = 0.1 * torch.randn_like(inj)
def cells():
    with torch.no_grad():
        v = z
        for _ in range({loop}):
            v = w.cell(v, inj)
zr = z.clone().requires_grad_(True)
out = w.cell(zr, inj)
u = torch.randn_like(out)
def vjps():
    v = u
    for _ in range({loop}):
        (v,) = torch.autograd.grad(out, zr, v, retain_graph=True)
def median(fn):
    fn()
    times = []
    for _ in range({reps}):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times) / {loop}
print(json.dumps({{"t_f": median(cells), "t_vjp": median(vjps),
                  "threads": torch.get_num_threads()}}))
"""


def _median(fn, reps):
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_ops(reps: int, tiny: bool) -> dict:
    """The W2 cell and its canonical VJP alone, seconds per call."""
    import jax
    import jax.numpy as jnp

    import workloads
    from jaxdeq._conv_canon import canonicalize_convolutions

    workload = workloads.get_workload("w2", tiny=tiny)
    batch = 4 if tiny else 32
    params = workload.init(jax.random.PRNGKey(0))
    x, _ = workloads.make_batch(workload, batch, jax.random.PRNGKey(1))
    injection = workload.inject(params["inject"], x)
    z = 0.1 * jax.random.normal(jax.random.PRNGKey(2), injection.shape)
    cell = params["cell"]

    @jax.jit
    def cells(z):
        return jax.lax.fori_loop(
            0, LOOP, lambda _, v: workload.cell(cell, v, injection), z
        )

    _, vjp = jax.vjp(lambda v: workload.cell(cell, v, injection), z)
    vjp = canonicalize_convolutions(vjp)

    @jax.jit
    def vjps(u):
        return jax.lax.fori_loop(0, LOOP, lambda _, v: vjp(v)[0], u)

    u = jnp.ones_like(z)
    return {
        "t_f": _median(lambda: cells(z), reps) / LOOP,
        "t_vjp": _median(lambda: vjps(u), reps) / LOOP,
    }


def jaxdeq_step(reps: int, tiny: bool) -> dict:
    """jaxdeq's W2 train step and inference (seconds), forward nfe and backward
    products (the slowest sample)."""
    import dataclasses
    import functools

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import bench_jaxdeq
    import workloads

    workload = workloads.get_workload("w2", tiny=tiny)
    batch = 4 if tiny else 32
    params = workload.init(jax.random.PRNGKey(0))
    x, labels = workloads.make_batch(workload, batch, jax.random.PRNGKey(1))
    reports = []

    def make_model(cell, cell_params, z0):
        model = original(cell, cell_params, z0)
        adjoint = dataclasses.replace(model.config.adjoint, callback=reports.append)
        return eqx.tree_at(lambda m: m.config.adjoint, model, adjoint)

    original = bench_jaxdeq.make_model
    bench_jaxdeq.make_model = make_model
    try:
        optimizer = optax.adam(workloads.LEARNING_RATE)
        opt_state = optimizer.init(params)

        @jax.jit
        def train_step(params, opt_state):
            (loss, _), grads = jax.value_and_grad(
                functools.partial(workloads._loss, workload, bench_jaxdeq.solve),
                has_aux=True,
            )(params, x, labels)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        infer = jax.jit(
            functools.partial(workloads.logits_and_stats, workload, bench_jaxdeq.solve)
        )
        train_s = _median(lambda: train_step(params, opt_state), reps)
        infer_s = _median(lambda: infer(params, x), reps)
        _, stats = infer(params, x)
        reports.clear()
        jax.block_until_ready(train_step(params, opt_state))
    finally:
        bench_jaxdeq.make_model = original
    steps = [int(jnp.max(r.steps)) for r in reports]
    return {
        "train_s": train_s,
        "infer_s": infer_s,
        "fwd_nfe": int(stats["fwd_nfe"]),
        "bwd_nfe": max(steps) if steps else None,
    }


def torch_side(reps: int, tiny: bool) -> dict | None:
    if not TORCH_PYTHON.exists():
        return None
    batch = 4 if tiny else 32
    code = _TORCH_OPS.format(
        bench=str(BENCH_DIR), tiny=tiny, batch=batch, loop=LOOP, reps=reps
    )
    ops = subprocess.run(
        [str(TORCH_PYTHON), "-c", code], capture_output=True, text=True, check=True
    )
    record = subprocess.run(
        [str(TORCH_PYTHON), str(BENCH_DIR / "bench_torchdeq.py"), "--workloads", "w2"]
        + (["--tiny"] if tiny else [])
        + ["--reps", str(reps)],
        capture_output=True,
        text=True,
        check=True,
    )
    step = [
        json.loads(line) for line in record.stdout.splitlines() if line.startswith("{")
    ][0]
    return {
        **json.loads(ops.stdout.strip().splitlines()[-1]),
        "train_s": step["train_step_s"],
        "infer_s": step["infer_s"],
        "fwd_nfe": step["fwd_nfe"],
        "bwd_nfe": step["bwd_nfe"],
    }


def _count(row: dict, key: str) -> str:
    return "—" if row.get(key) is None else str(row[key])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ops-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR))
    if args.ops_only:
        print(json.dumps(jax_ops(args.reps, args.tiny)))
        return 0
    import run_all

    loads = [os.getloadavg()[0]]
    jax_step = jaxdeq_step(args.reps, args.tiny)
    loads.append(os.getloadavg()[0])
    ops = jax_ops(args.reps, args.tiny)
    onednn = subprocess.run(
        [sys.executable, __file__, "--ops-only", "--reps", str(args.reps)]
        + (["--tiny"] if args.tiny else []),
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS="--xla_cpu_use_onednn=true"),
    )
    onednn = (
        json.loads(onednn.stdout.strip().splitlines()[-1])
        if onednn.returncode == 0
        else None
    )
    loads.append(os.getloadavg()[0])
    torch = torch_side(args.reps, args.tiny)
    loads.append(os.getloadavg()[0])

    def ms(value):
        return "—" if value is None else f"{1e3 * value:.1f}"

    rows = [
        ("jaxdeq", {**jax_step, **ops}),
        ("jaxdeq ops, XLA oneDNN flag", onednn or {}),
        ("torchdeq", torch or {}),
    ]
    lines = [
        "## W2 on CPU: where the train step goes, jaxdeq beside torchdeq",
        "",
        f"`python benchmarks/bench_w2_backward.py{' --tiny' if args.tiny else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{run_all.cpu_model()}, {os.cpu_count()} cores, 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f}, medians of {args.reps}. *fwd nfe*: "
        "cell evaluations of the batch's forward solve; *bwd nfe*: cell VJPs of "
        "the backward solve (jaxdeq: products with J of the slowest sample, from "
        "`ImplicitAdjoint(callback=...)`, its default `auto` solver to 2.4e-5 "
        "relative; torchdeq: fixed-point iterations to 1e-6 absolute, cap 30); "
        f"*t_f*, *t_vjp*: one cell evaluation / one cell VJP (w.r.t. the state) on "
        f"the batch, alone, {LOOP} in a loop (JAX: `fori_loop`, the VJP with "
        "jaxdeq's canonical convolutions; PyTorch: `autograd.grad` on one graph); "
        "*estimate*: fwd nfe x t_f + bwd nfe x t_vjp.",
        "",
        "| lib | train step (ms) | inference (ms) | fwd nfe | bwd nfe | t_f (ms) | "
        "t_vjp (ms) | estimate (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows:
        estimate = None
        if all(row.get(k) is not None for k in ("fwd_nfe", "bwd_nfe", "t_f", "t_vjp")):
            estimate = row["fwd_nfe"] * row["t_f"] + row["bwd_nfe"] * row["t_vjp"]
        lines.append(
            f"| {name} | {ms(row.get('train_s'))} | {ms(row.get('infer_s'))} | "
            f"{_count(row, 'fwd_nfe')} | {_count(row, 'bwd_nfe')} | "
            f"{ms(row.get('t_f'))} | "
            f"{ms(row.get('t_vjp'))} | {ms(estimate)} |"
        )
    ours, theirs = rows[0][1], rows[2][1]
    if all(ours.get(k) and theirs.get(k) for k in ("train_s", "t_f", "t_vjp")):
        lines += [
            "",
            "jaxdeq / torchdeq: train step "
            f"{ours['train_s'] / theirs['train_s']:.2f}x, "
            f"cell evaluation {ours['t_f'] / theirs['t_f']:.2f}x, cell VJP "
            f"{ours['t_vjp'] / theirs['t_vjp']:.2f}x, backward VJPs "
            f"{ours['bwd_nfe']} vs {theirs['bwd_nfe']}.",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
