"""The implicit backward solve on W1 and W2: "auto" (the default: fixed-point
iteration while it contracts fast, then GMRES), GMRES alone, and fixed-point
iteration of the VJP alone (torchdeq's backward: 30 steps, as in BENCHMARKS.md).

For each workload and backward solver: products with the cell's Jacobian per sample
(max and mean, from `ImplicitAdjoint(callback=...)`, residual check included), the
relative residual reached, the cosine of the gradient with a tight reference
(GMRES to 1e-6 relative, 300 products), and the median train-step time.

    python benchmarks/bench_backward.py [--workloads w1,w2] [--tiny]

Writes `benchmarks/results/backward.md`.
"""

import argparse
import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxdeq
import workloads
from bench_gradients import _cosine, _initial, _setup, _train_step

RESULTS = Path(__file__).resolve().parent / "results" / "backward.md"
SOLVERS = {
    "auto (default)": jaxdeq.ImplicitAdjoint(),
    "GMRES": jaxdeq.ImplicitAdjoint("gmres"),
    "fixed point, 30 steps, rtol 1e-6": jaxdeq.ImplicitAdjoint(
        "fixed_point", rtol=1e-6, max_steps=30
    ),
}
REFERENCE = jaxdeq.ImplicitAdjoint(rtol=1e-6, max_steps=300)
BATCH = {"w1": 128, "w2": 32}
REPS = {"w1": 20, "w2": 3}


def _stats(reports):
    steps = np.array([int(r.steps) for r in reports])
    relative = np.array([float(r.relative_residual_norm) for r in reports])
    return steps, relative


def bench(name: str, tiny: bool) -> list[dict]:
    workload = workloads.get_workload(name, tiny=tiny)
    batch = 4 if tiny else BATCH[name]
    reps = 2 if tiny else REPS[name]
    optimizer = optax.adam(workloads.LEARNING_RATE)
    model, loss = _setup(workload, REFERENCE, 30)
    params, st, x, labels = _initial(workload, model, batch)
    reference, _ = jax.jit(jax.grad(loss, has_aux=True))(params, st, x, labels)
    rows = []
    for label, adjoint in SOLVERS.items():
        reports = []
        _, counted = _setup(
            workload, dataclasses.replace(adjoint, callback=reports.append), 30
        )
        grads, _ = jax.block_until_ready(
            jax.jit(jax.grad(counted, has_aux=True))(params, st, x, labels)
        )
        jax.effects_barrier()
        steps, relative = _stats(reports)
        _, timed = _setup(workload, adjoint, 30)
        step = _train_step(timed, optimizer)
        opt_state = optimizer.init(params)
        jax.block_until_ready(step(params, opt_state, st, x, labels))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(step(params, opt_state, st, x, labels))
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "workload": name,
                "solver": label,
                "max_products": int(steps.max()),
                "mean_products": float(steps.mean()),
                "max_rel_residual": float(relative.max()),
                "cosine": _cosine(grads, reference),
                "train_ms": 1e3 * float(np.median(times)),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    rows = [r for name in args.workloads.split(",") for r in bench(name, args.tiny)]
    load = os.getloadavg()[0]
    lines = [
        "## Implicit backward solve: auto vs GMRES vs fixed-point iteration",
        "",
        f"`python benchmarks/bench_backward.py`, 1-min load {load:.1f} at the end. "
        "Products: JVP/VJP products with the cell's Jacobian per sample (GMRES: "
        "one more per restart cycle, its true residual); the batch pays the "
        "per-sample maximum. Cosine: with GMRES "
        "to 1e-6 relative.",
        "",
        "| workload | backward solver | products max / mean | max rel. residual "
        "| cosine | train step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['max_products']} / "
            f"{r['mean_products']:.1f} | {r['max_rel_residual']:.1e} | "
            f"{r['cosine']:.6f} | {r['train_ms']:.1f} |"
        )
    if not args.tiny:
        RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
