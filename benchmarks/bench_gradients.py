"""Gradient modes side by side on W1 and W2: how close each gradient is to the exact
one, what its backward pass costs, and how its training memory grows with the
forward step budget.

For each mode (implicit by its default and by fixed-point iteration, phantom
gradient, Neumann-series phantom gradient, SHINE with and without refinement,
reversible, one-step/Jacobian-free, unrolled backprop) on the W1/W2 cells of
BENCHMARKS.md, solved per sample by jaxdeq's Anderson (memory 5, ridge 1e-4,
relative residual 1e-4, 30 steps; SHINE by jaxdeq's Broyden, the reversible mode by
jaxdeq's Reversible, same tolerance and cap):

- **cosine**: cosine similarity of the full training gradient (injection, cell and
  head parameters) with the exact gradient, from a forward solve run to 100 steps
  at relative tolerance 1e-10 and a GMRES backward solve to 1e-10;
- **backward VJPs**: cell VJPs the backward pass evaluates, counted at run time by a
  host callback in the cell's `custom_vjp` (per sample; the batched loop runs until
  its slowest sample stops);
- **train step**: median wall time of a jitted step (forward, backward, Adam);
- **temp memory at max_steps 10 / 30 / 100**: XLA's temporary buffer size of the
  compiled train step, `jax.jit(step).lower(...).compile().memory_analysis()` — a
  property of the compiled program, deterministic on CPU, unlike RSS.

    python benchmarks/bench_gradients.py [--w2-batch 4] [--reps 5] [--w2-reps 2]
        [--modes shine,reversible]

On CPU, W2's implicit and unrolled backward passes run convolution VJPs inside
loops, which XLA:CPU executes far slower than unrolled (BENCHMARKS.md), so W2
dominates the runtime.

Writes a markdown table to stdout and to `benchmarks/results/gradients.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
import optimistix as optx

import jaxdeq
import workloads
from jaxdeq import nn

RESULTS = Path(__file__).resolve().parent / "results" / "gradients.md"
MAX_STEPS = 30
MEMORY_BUDGETS = (10, 30, 100)
EXACT = jaxdeq.ImplicitAdjoint(rtol=1e-7, max_steps=500, throw=False)


def _anderson(rtol: float) -> jaxdeq.Anderson:
    return jaxdeq.Anderson(
        rtol=rtol, atol=0.0, norm=optx.two_norm, termination="normwise", ridge=1e-4
    )


def _broyden(rtol: float) -> jaxdeq.Broyden:
    return jaxdeq.Broyden(
        rtol=rtol, atol=0.0, norm=optx.two_norm, termination="normwise"
    )


def _reversible(rtol: float) -> jaxdeq.Reversible:
    return jaxdeq.Reversible(
        rtol=rtol, atol=0.0, relaxation=0.8, norm=optx.two_norm, termination="normwise"
    )


# mode -> (gradient mode, forward solver at a relative tolerance)
MODES: dict[str, tuple[jaxdeq.AbstractAdjoint, Callable[[float], Any]]] = {
    "implicit (auto, default)": (jaxdeq.ImplicitAdjoint(), _anderson),
    "implicit (fixed point, 30)": (
        jaxdeq.ImplicitAdjoint("fixed_point", rtol=1e-6, max_steps=30, throw=False),
        _anderson,
    ),
    "phantom (5 steps, 0.8)": (jaxdeq.PhantomGradient(5, 0.8), _anderson),
    "Neumann (5 terms, 0.8)": (jaxdeq.NeumannGradient(5, 0.8), _anderson),
    "SHINE (Broyden fwd)": (jaxdeq.ShineGradient(), _broyden),
    "SHINE + 5 refine (Broyden fwd)": (jaxdeq.ShineGradient(5), _broyden),
    "reversible (Reversible fwd, 0.8)": (jaxdeq.ReversibleAdjoint(), _reversible),
    "one-step (JFB)": (jaxdeq.OneStepGradient(), _anderson),
    "unrolled": (jaxdeq.UnrolledAdjoint(), _anderson),
}
# Modes that report their own backward products through `callback` (a custom_vjp
# counter around the cell would stop the JVP rule of the first three, and the
# reversible mode's own count is per sample). The Neumann and SHINE callbacks
# make one extra product for the true residual: not counted in the table.
CALLBACK_EXTRA_PRODUCTS = {
    jaxdeq.ImplicitAdjoint: 0,
    jaxdeq.NeumannGradient: 1,
    jaxdeq.ShineGradient: 1,
    jaxdeq.ReversibleAdjoint: 0,
}


_VJP_CALLS = [0]


def _count_vjp() -> None:
    _VJP_CALLS[0] += 1


class WorkloadCell(nn.AbstractLayer):
    """A benchmark workload's cell `cell(params, z, injection)` as a jaxdeq layer
    applied to `(z, injection)`; with `count_vjps`, each VJP of the cell bumps a
    host-side counter."""

    workload: workloads.Workload = eqx.field(static=True)
    count_vjps: bool = eqx.field(default=False, static=True)

    def init(self, key, x):
        return self.workload.init(key)["cell"], {}

    def apply(self, ps, st, x):
        z, injection = x
        cell = self.workload.cell
        if self.count_vjps:
            cell = _counted(cell)
        return cell(ps, z, injection), st


def _counted(cell: Callable) -> Callable:
    @jax.custom_vjp
    def counted(params, z, injection):
        return cell(params, z, injection)

    def fwd(params, z, injection):
        return jax.vjp(cell, params, z, injection)

    def bwd(vjp, cotangent):
        jax.debug.callback(_count_vjp)  # no batched operands: once per batched call
        return vjp(cotangent)

    counted.defvjp(fwd, bwd)
    return counted


def _setup(workload, adjoint, max_steps, rtol=1e-4, count_vjps=False, solver=None):
    model = jaxdeq.DeepEquilibriumNetwork(
        WorkloadCell(workload, count_vjps),
        (solver or _anderson)(rtol),
        adjoint=adjoint,
        max_steps=max_steps,
    )

    def loss(params, st, x, labels):
        injection = workload.inject(params["inject"], x)
        z, _, solution = model.apply(
            params["model"], st, injection, return_solution=True
        )
        head = params["head"]
        logits = workload.features(z) @ head["w"] + head["b"]
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return value, solution.nfe

    return model, loss


def _initial(workload, model, batch):
    raw = workload.init(jax.random.PRNGKey(0))
    x, labels = workloads.make_batch(workload, batch, jax.random.PRNGKey(1))
    injection = workload.inject(raw["inject"], x)
    ps, st = model.init(jax.random.key(0), injection)
    ps = dict(ps, model=raw["cell"])
    params = {"inject": raw["inject"], "model": ps, "head": raw["head"]}
    return params, st, x, labels


def _train_step(loss, optimizer):
    def step(params, opt_state, st, x, labels):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(
            params, st, x, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)  # (lowered and compiled ahead of time below)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_workload(
    name: str, batch: int, reps: int, modes: set[str] | None = None
) -> list[dict]:
    workload = workloads.get_workload(name)
    optimizer = optax.adam(workloads.LEARNING_RATE)
    model, loss = _setup(workload, EXACT, 100, rtol=1e-10)
    params, st, x, labels = _initial(workload, model, batch)
    exact, nfe = jax.jit(jax.grad(loss, has_aux=True))(params, st, x, labels)
    exact_nfe = int(nfe.max())
    rows = []
    for mode, (adjoint, solver) in MODES.items():
        if modes is not None and not any(m in mode.lower() for m in modes):
            continue
        row = {"workload": name, "batch": batch, "mode": mode}
        # The counting callback changes no value: this is the mode's gradient (the
        # extra residual product of Neumann/SHINE is not counted); the batch pays
        # the per-sample maximum.
        reports = []
        extra = CALLBACK_EXTRA_PRODUCTS.get(type(adjoint))
        if extra is not None:
            counted = dataclasses.replace(adjoint, callback=reports.append)
        else:
            counted = adjoint
        _, counted_loss = _setup(
            workload, counted, MAX_STEPS, count_vjps=extra is None, solver=solver
        )
        _VJP_CALLS[0] = 0
        grads, nfe = jax.block_until_ready(
            jax.jit(jax.grad(counted_loss, has_aux=True))(params, st, x, labels)
        )
        jax.effects_barrier()
        if extra is None:
            row["vjps"] = _VJP_CALLS[0]
        else:
            row["vjps"] = max(int(r.steps) for r in reports) - extra
        row["cosine"] = _cosine(grads, exact)
        row["fwd_nfe"] = int(nfe.max())
        opt_state = optimizer.init(params)
        row["temp_mib"] = {}
        for budget in MEMORY_BUDGETS:
            _, loss = _setup(workload, adjoint, budget, solver=solver)
            compiled = (
                _train_step(loss, optimizer)
                .lower(params, opt_state, st, x, labels)
                .compile()
            )
            row["temp_mib"][budget] = (
                compiled.memory_analysis().temp_size_in_bytes / 2**20
            )
            if budget == MAX_STEPS:
                step = compiled
        jax.block_until_ready(step(params, opt_state, st, x, labels))
        row["train_ms"] = 1e3 * _median_seconds(
            lambda step=step, opt_state=opt_state: step(
                params, opt_state, st, x, labels
            ),
            reps,
        )
        row["exact_nfe"] = exact_nfe
        rows.append(row)
        print(f"  {name} {mode}: done", flush=True)
    return rows


def render(rows: list[dict], command: str, elapsed: float) -> str:
    device = jax.devices()[0]
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# Gradient modes: accuracy, backward cost, memory",
        "",
        f"`{command}` on {device.platform} ({device.device_kind}), jax "
        f"{jax.__version__}, float32, {elapsed:.0f} s, load average {load}. "
        "Forward: jaxdeq.Anderson (memory 5, ridge 1e-4; SHINE: jaxdeq.Broyden, "
        "memory 10; reversible: jaxdeq.Reversible, relaxation 0.8), per-sample "
        "relative residual 1e-4, max 30 steps. "
        "Exact gradient: forward at relative tolerance 1e-10 (in float32 it runs to "
        "its 100-step cap, near 1e-7), backward by GMRES to 1e-10. Backward VJPs: "
        "cell VJPs of the backward pass, counted at "
        "run time (per sample; a batched loop runs until its slowest sample stops). "
        "Train step: median of jitted steps (forward + backward + Adam). Temp memory: "
        "XLA's temporary buffers of the compiled train step "
        "(`compile().memory_analysis().temp_size_in_bytes`), deterministic on CPU; "
        "every mode but unrolled backprop keeps it flat as max_steps grows. The "
        "reversible mode's backward VJPs equal its forward steps (it reverses "
        "them); its forward counts one evaluation per half-step of the paper's "
        "coupled iteration.",
        "",
        "| workload | batch | mode | cosine vs exact | backward VJPs | forward nfe | "
        "train step (ms) | temp MiB @10 | @30 | @100 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mem = row["temp_mib"]
        lines.append(
            f"| {row['workload']} | {row['batch']} | {row['mode']} | "
            f"{row['cosine']:.6f} | {row['vjps']} | {row['fwd_nfe']} | "
            f"{row['train_ms']:.1f} | {mem[10]:.1f} | {mem[30]:.1f} | {mem[100]:.1f} |"
        )
    exact_nfe = {row["workload"]: row["exact_nfe"] for row in rows}
    lines += [
        "",
        "Forward steps of the exact-gradient solves (float32 stalls near 1e-7): "
        + ", ".join(f"{k} {v}" for k, v in exact_nfe.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w1-batch", type=int, default=128)
    parser.add_argument("--w2-batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed W1 steps")
    parser.add_argument(
        "--w2-reps", type=int, default=2, help="timed W2 steps (seconds each on CPU)"
    )
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument(
        "--modes",
        default=None,
        help="comma-separated words: run the modes whose name contains one",
    )
    args = parser.parse_args(argv)
    modes = None if args.modes is None else set(args.modes.lower().split(","))
    start = time.perf_counter()
    rows = []
    batches = {"w1": args.w1_batch, "w2": args.w2_batch}
    reps = {"w1": args.reps, "w2": args.w2_reps}
    for name in args.workloads.split(","):
        rows += bench_workload(name, batches[name], reps[name], modes)
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/bench_gradients.py " + " ".join(argv)
    table = render(rows, command.strip(), time.perf_counter() - start)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)


if __name__ == "__main__":
    main()
