"""The cost of one solver iteration on W1, at a fixed number of iterations.

Every variant runs exactly 30 forward iterations (tolerance 0, so no sample stops),
side by side in one process, interleaved, medians:

- **floor**: 30 applications of the cell `tanh(z W + inj)` in a `fori_loop` (one
  128x256x256 matmul and a tanh each): the compute floor of any W1 solver; its
  train step adds 30 VJPs of the cell (an implicit backward of fixed length).
- **bare_jax**: the hand-written Anderson loop of `bench_bare_jax.py` (whole-batch
  algebra, per-sample residuals), its forward tolerance set to 0.
- **jaxdeq per-sample**: `DeepEquilibriumNetwork` with `jaxdeq.Anderson` as in
  `bench_jaxdeq.py` (each sample its own stopping rule, nfe and best iterate),
  `rtol=0`.
- **jaxdeq joint**: the same with `joint_solve=True` (one problem for the batch).

Train steps differentiate `sum(z*^2)` with respect to `W` and the injection; the
backward solves are each library's own (bare: fixed-point iteration of the VJP to
1e-6 absolute or 30 steps; jaxdeq: its default implicit backward). Writes
`results/loop.md`, which `run_all.py` includes in RESULTS.md.

    python benchmarks/bench_loop.py [--reps N] [--out benchmarks]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import bench_bare_jax
import bench_jaxdeq
import jaxdeq
import run_all
import workloads
from jaxdeq import nn

ITERATIONS = 30
BATCH = 128


def _cell(W, z, inj):
    return jnp.tanh(z @ W + inj)


@jax.custom_vjp
def _floor_solve(W, inj):
    z = jnp.zeros_like(inj)
    return jax.lax.fori_loop(0, ITERATIONS, lambda _, z: _cell(W, z, inj), z)


def _floor_fwd(W, inj):
    z = _floor_solve(W, inj)
    return z, (W, inj, z)


def _floor_bwd(saved, g):
    W, inj, z = saved
    _, vjp_z = jax.vjp(lambda z: _cell(W, z, inj), z)
    u = jax.lax.fori_loop(0, ITERATIONS, lambda _, u: vjp_z(u)[0] + g, g)
    _, vjp_params = jax.vjp(lambda W, inj: _cell(W, z, inj), W, inj)
    return vjp_params(u)


_floor_solve.defvjp(_floor_fwd, _floor_bwd)


def _bare_solve(W, inj):
    bench_bare_jax.FORWARD_RTOL = 0.0  # read when traced: every sample runs 30
    z, _ = bench_bare_jax.fixed_point(
        lambda p, z, i: _cell(p, z, i), W, inj, jnp.zeros_like(inj)
    )
    return z


def _jaxdeq_solve(joint: bool):
    model = jaxdeq.DeepEquilibriumNetwork(
        bench_jaxdeq.WorkloadCell(
            lambda p, z, i: _cell(p["W"], z, i),
            {"W": jax.ShapeDtypeStruct((256, 256), jnp.float32)},
        ),
        jaxdeq.Anderson(
            rtol=0.0,
            atol=0.0,
            norm=optx.two_norm,
            termination="normwise",
            memory=5,
            ridge=1e-4,
        ),
        init=nn.WrappedFunction(jnp.zeros_like),
        max_steps=ITERATIONS,
        joint_solve=joint,
    )

    def solve(W, inj):
        _, st = model.init(jax.random.key(0), inj)
        z, _, sol = model.apply(
            {"model": {"W": W}, "init": {}}, st, inj, return_solution=True
        )
        return z, sol.nfe

    return solve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)

    workload = workloads.get_workload("w1")
    params = workload.init(jax.random.PRNGKey(0))
    x, _ = workloads.make_batch(workload, BATCH, jax.random.PRNGKey(1))
    W = params["cell"]["W"]
    inj = workload.inject(params["inject"], x)

    jaxdeq_per_sample, jaxdeq_joint = _jaxdeq_solve(False), _jaxdeq_solve(True)
    solves = {
        "floor (matmul + tanh)": _floor_solve,
        "bare_jax": _bare_solve,
        "jaxdeq per-sample": lambda W, inj: jaxdeq_per_sample(W, inj)[0],
        "jaxdeq joint": lambda W, inj: jaxdeq_joint(W, inj)[0],
    }
    for name, solve in (("per-sample", jaxdeq_per_sample), ("joint", jaxdeq_joint)):
        nfe = np.asarray(jax.jit(solve)(W, inj)[1])
        assert (nfe == ITERATIONS).all(), (name, nfe)

    def train(solve):
        return jax.jit(jax.grad(lambda W, inj: jnp.sum(solve(W, inj) ** 2), (0, 1)))

    calls = {}
    for name, solve in solves.items():
        calls[(name, "infer")] = jax.jit(solve)
        calls[(name, "train")] = train(solve)
    for call in calls.values():  # compile and warm up
        jax.block_until_ready(call(W, inj))
        jax.block_until_ready(call(W, inj))
    times = {key: [] for key in calls}
    load_before = os.getloadavg()[0]
    for _ in range(args.reps):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call(W, inj))
            times[key].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    ms = {key: 1e3 * float(np.median(t)) for key, t in times.items()}

    def ratio(name, mode, reference):
        return ms[(name, mode)] / ms[(reference, mode)]

    floor, bare = "floor (matmul + tanh)", "bare_jax"
    lines = [
        "## W1 at a fixed 30 iterations: cost per solver iteration",
        "",
        f"`python benchmarks/bench_loop.py --reps {args.reps}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{run_all.cpu_model()}, {os.cpu_count()} cores, {platform.system()}, "
        f"jax {jax.__version__}; 1-min load {load_before:.1f} before, "
        f"{load_after:.1f} after. Batch {BATCH}, state 256, Anderson memory 5, "
        "tolerance 0 (all 30 steps run; per-sample nfe checked). Medians of "
        f"{args.reps} interleaved calls. Variants: see the docstring of "
        "`benchmarks/bench_loop.py`; the floor's train step is 30 cell "
        "evaluations and 30 cell VJPs.",
        "",
        "| variant | inference (ms) | ms / iteration | / floor | / bare_jax | "
        "train step (ms) | train / bare_jax |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in solves:
        lines.append(
            f"| {name} | {ms[(name, 'infer')]:.2f} | "
            f"{ms[(name, 'infer')] / ITERATIONS:.3f} | "
            f"{ratio(name, 'infer', floor):.2f}x | "
            f"{ratio(name, 'infer', bare):.2f}x | {ms[(name, 'train')]:.2f} | "
            f"{ratio(name, 'train', bare):.2f}x |"
        )
    per_sample, joint = "jaxdeq per-sample", "jaxdeq joint"
    lines += [
        "",
        f"Per-sample / joint, same solver: inference "
        f"{ratio(per_sample, 'infer', joint):.2f}x, train "
        f"{ratio(per_sample, 'train', joint):.2f}x (target <= 1.10x).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = args.out / "results" / "loop.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
