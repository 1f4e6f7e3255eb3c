"""Forward nfe to a relative residual of 1e-4, per sample, for every solver.

Solvers (same cell parameters and inputs for all, max 100 cell evaluations):

- `jaxdeq.Anderson(memory=5, ridge=1e-4, damping=1)` and `jaxdeq.Broyden(memory=20)`,
  both `norm=optx.two_norm, rtol=1e-4, atol=0, termination="normwise"`;
- `optx.FixedPointIteration` and `optx.Newton` (a root-finder on `f(z) - z`) with
  tolerances of 1e-30, so that their own (elementwise) tests never stop them first;
  Newton's linear solve is dense LU, so it runs only where the per-sample state has
  <= 4096 entries (W1; W2's 49152 would need a 9.7 GB Jacobian per sample, and a
  matrix-free `lx.GMRES(rtol=1e-5, restart=40, max_steps=400)` tried here failed its
  first linear solve on every sample after ~10 min);
- with `--with-torch`: torchdeq's `anderson` (m=5, lam=1e-4, tau=1) and `broyden`
  (its defaults), run by `bench_nfe_torch.py` in .venv-torch.

**Counting.** Every cell evaluation is wrapped to compute each sample's relative
residual `r = ||f(z) - z||_2 / ||f(z)||_2` at the state `z` it was given. A sample's
nfe is the 1-based index of the first evaluation with `r <= 1e-4`, counting every
evaluation of `f` (the one at `z0 = 0` included); a sample that never gets there
within 100 counts as 100 in the mean and max (so those are lower bounds) and not in
the "reached" fraction. The JAX solvers run per sample (`vmap`) from their own
`init`/`step`/`terminate`, as jaxdeq's models do, and each sample stops at its first
`r <= 1e-4`, or when its solver reports a failure (divergence, failed linear solve).
A solver's own "converged" that comes before `r <= 1e-4` (Broyden measures
`||g|| < rtol ||z||`) does not stop the count. torchdeq runs the whole batch (see
`bench_nfe_torch.py`); its per-sample counts come from the same wrapper, and its own
`rel_trace` gives the same numbers (checked here). As a cross-check of the library
path, jaxdeq's Anderson and Broyden also run inside a `jaxdeq.DeepEquilibriumNetwork`
(per-sample solves, `max_steps=100`), whose `solution.nfe` is their own stopping step.

Newton's nfe counts Newton steps (one primal evaluation each); every step also solves
with the Jacobian (256 JVPs to materialise it on W1), which nfe does not count.

    python benchmarks/bench_nfe.py [--workloads w1,w2] [--tiny] [--with-torch]
        [--solvers anderson,broyden,fpi,newton] [--out benchmarks/results]

Writes `<out>/nfe.md` (also printed) and `<out>/nfe_residuals.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

import bench_jaxdeq
import jaxdeq
import run_all
import workloads

TOL = 1e-4
MAX_ITER = 100
BATCH = {"w1": 128, "w2": 32}
TINY_BATCH = 8
DENSE_NEWTON_MAX_SIZE = 4096
TORCH_PYTHON = run_all.REPO_ROOT / ".venv-torch" / "bin" / "python"
LABELS = {
    "anderson": "jaxdeq.Anderson",
    "broyden": "jaxdeq.Broyden",
    "fpi": "optx.FixedPointIteration",
    "newton": "optx.Newton",
    "torch_anderson": "torchdeq anderson",
    "torch_broyden": "torchdeq broyden",
}
COLORS = {
    "anderson": "tab:blue",
    "broyden": "tab:orange",
    "fpi": "tab:green",
    "newton": "tab:red",
    "torch_anderson": "tab:purple",
    "torch_broyden": "tab:brown",
}
NOTES = {
    "anderson": "m=5, ridge 1e-4, normwise two_norm rtol 1e-4",
    "broyden": "memory 20, no line search, normwise two_norm rtol 1e-4",
    "fpi": "tolerance 1e-30 (never stops itself)",
    "newton": "tolerance 1e-30; nfe = Newton steps (Jacobian solves not counted)",
    "torch_anderson": "m=5, lam 1e-4, tau 1; stops when the batch max < 1e-4",
    "torch_broyden": "defaults (memory = max_iter, ls off); batch stop",
}


def deq_solver(name: str):
    common = dict(rtol=TOL, atol=0.0, norm=optx.two_norm, termination="normwise")
    if name == "anderson":
        return jaxdeq.Anderson(memory=5, ridge=1e-4, damping=1.0, **common)
    # memory 20: W2 needs 17-18 steps; with 10 it restarts mid-solve (mean nfe +0.12)
    return jaxdeq.Broyden(memory=20, **common)


def make_solver(name: str, state_size: int):
    """(solver, is_root_finder)."""
    if name in ("anderson", "broyden"):
        return deq_solver(name), name == "broyden"
    if name == "fpi":
        return optx.FixedPointIteration(rtol=1e-30, atol=1e-30), False
    del state_size
    linear_solver = lx.AutoLinearSolver(well_posed=None)  # dense LU
    return optx.Newton(rtol=1e-30, atol=1e-30, linear_solver=linear_solver), True


def residual_traces(name, cell, cell_params, injection, z0):
    """(batch, MAX_ITER) relative residual of each evaluation, NaN after a sample
    stopped; and (batch,) whether the solver itself ever reported "done"."""
    solver, is_root = make_solver(name, z0[0].size)

    def fn(z, inj):
        fz = cell(cell_params, z[None], inj[None])[0]
        diff = fz - z
        rel = jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(fz.ravel())
        return (diff if is_root else fz), rel

    def solve_one(z0, inj):
        f_struct, aux_struct = jax.eval_shape(fn, z0, inj)
        tags = frozenset()
        state = solver.init(fn, z0, inj, {}, f_struct, aux_struct, tags)
        trace = jnp.full((MAX_ITER,), jnp.nan, jnp.float32)
        init = (z0, state, jnp.array(0), trace, jnp.array(False), jnp.array(False))
        init += (jnp.array(-1),)

        def cond(carry):
            _, _, k, _, reached, failed, _ = carry
            return (k < MAX_ITER) & ~reached & ~failed

        def body(carry):
            z, state, k, trace, _, _, own_stop = carry
            z, state, rel = solver.step(fn, z, inj, {}, state, tags)
            done, result = solver.terminate(fn, z, inj, {}, state, tags)
            failed = done & (result != optx.RESULTS.successful)
            own_stop = jnp.where((own_stop < 0) & done, k + 1, own_stop)
            trace = trace.at[k].set(rel)
            return z, state, k + 1, trace, rel <= TOL, failed, own_stop

        _, _, _, trace, _, failed, own_stop = jax.lax.while_loop(cond, body, init)
        return trace, failed, own_stop

    return jax.jit(jax.vmap(solve_one))(z0, injection)


def deq_nfe(name, workload, cell_params, injection, z0):
    """jaxdeq's own per-sample stopping step inside a DeepEquilibriumNetwork."""
    model = jaxdeq.DeepEquilibriumNetwork(
        bench_jaxdeq.WorkloadCell(workload.cell, jax.eval_shape(lambda: cell_params)),
        deq_solver(name),
        init=jaxdeq.nn.WrappedFunction(jnp.zeros_like),
        max_steps=MAX_ITER,
    )
    _, st = model.init(jax.random.key(0), injection)

    @jax.jit
    def run(cell_params):
        _, _, solution = model.apply(
            {"model": cell_params, "init": {}}, st, injection, return_solution=True
        )
        return solution.nfe, solution.result, solution.relative_residual_norm

    del z0
    return run(cell_params)


def first_reached(residuals: np.ndarray) -> np.ndarray:
    """(batch,) 1-based index of the first evaluation with r <= TOL; 0 if none.
    `residuals` is (batch, evaluations)."""
    below = np.nan_to_num(residuals, nan=np.inf) <= TOL
    return np.where(below.any(axis=1), below.argmax(axis=1) + 1, 0)


def summarize(residuals: np.ndarray) -> dict:
    nfe = first_reached(residuals)
    reached = nfe > 0
    counted = np.where(reached, nfe, MAX_ITER)
    return {
        "mean": float(counted.mean()),
        "max": int(counted.max()),
        "reached": float(reached.mean()),
        "all_reached": bool(reached.all()),
    }


def median_curve(residuals: np.ndarray) -> np.ndarray:
    """Median over samples per evaluation; a stopped sample keeps its last value."""
    filled = residuals.copy()
    for k in range(1, filled.shape[1]):
        gap = np.isnan(filled[:, k])
        filled[gap, k] = filled[gap, k - 1]
    return np.median(filled, axis=0)


def problem(name: str, tiny: bool):
    workload = workloads.get_workload(name, tiny)
    batch = TINY_BATCH if tiny else BATCH[name]
    params = workload.init(jax.random.PRNGKey(0))
    x, _ = workloads.make_batch(workload, batch, jax.random.PRNGKey(1))
    injection = workload.inject(params["inject"], x)
    return workload, params, x, injection


def save_problem(path: Path, name: str, tiny: bool, params, x, injection) -> None:
    arrays = {
        f"param:{group}/{'/'.join(str(k.key) for k in key_path)}": np.asarray(leaf)
        for group in ("inject", "cell", "head")
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(params[group])
    }
    np.savez(
        path,
        workload=name,
        tiny=tiny,
        tol=TOL,
        max_iter=MAX_ITER,
        x=np.asarray(x),
        injection=np.asarray(injection),
        **arrays,
    )


def run_torch(paths: list[Path], out: Path) -> dict:
    if not TORCH_PYTHON.exists():
        print(f"[bench_nfe] {TORCH_PYTHON} not found; skipping torchdeq", flush=True)
        return {}
    command = [str(TORCH_PYTHON), str(run_all.BENCH_DIR / "bench_nfe_torch.py")]
    command += [*map(str, paths), "--out", str(out)]
    print(f"[bench_nfe] {' '.join(command)}", flush=True)
    completed = subprocess.run(
        command, cwd=run_all.REPO_ROOT, capture_output=True, text=True
    )
    if completed.returncode != 0:
        print(completed.stdout + completed.stderr[-4000:], file=sys.stderr)
        raise SystemExit("bench_nfe_torch.py failed")
    data = np.load(out)
    return {key: data[key] for key in data.files}


def check_torch_trace(torch_data: dict, prefix: str, nfe: np.ndarray) -> int:
    """Samples whose count from torchdeq's own rel_trace differs from the wrapper's."""
    rel = torch_data[f"{prefix}:rel_trace"][:, 1:]
    untraced = int(torch_data[f"{prefix}:untraced_calls"])
    own = first_reached(rel.astype(np.float64))
    own = np.where(own > 0, own + untraced, 0)
    return int(((own != nfe) & (nfe > untraced)).sum())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Forward nfe to relative residual 1e-4",
        "",
        f"Generated by `python benchmarks/bench_nfe.py {meta['argv']}` "
        f"({meta['versions']}).",
        "",
        "Per-sample nfe: the 1-based index of the first cell evaluation whose state "
        "`z` has `||f(z) - z||_2 / ||f(z)||_2 <= 1e-4` (every evaluation counted, the "
        "one at `z0 = 0` included), max 100; samples that never reach it count as 100 "
        "(mean/max then are lower bounds). Same parameters and inputs for every "
        "solver (JAX init, saved to .npz, loaded into the torch twin). `batch evals`: "
        "cell evaluations of the batched run (JAX: per-sample `vmap` solves run until "
        "the slowest sample stops = max; torchdeq: its actual call count on the "
        "batch). `DEQ nfe`: jaxdeq's own `solution.nfe` (mean/max) from a "
        "`DeepEquilibriumNetwork` with the same solver, `max_steps=100`. See the "
        "module docstring of `bench_nfe.py` for details.",
        "",
        "| workload | batch | solver | nfe mean | nfe max | reached 1e-4 | "
        "batch evals | DEQ nfe | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['batch']} | {LABELS[r['solver']]} | "
            f"{r['mean']:.2f} | {r['max']} | {r['reached']:.0%} | "
            f"{r['batch_evals']} | {r.get('deq', '')} | {NOTES[r['solver']]} |"
        )
    lines += ["", *meta["notes"], ""]
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        longest = 1
        for solver, curve in curves[name].items():
            longest = max(longest, len(curve))
            ax.semilogy(
                np.arange(1, len(curve) + 1),
                curve,
                label=LABELS[solver],
                color=COLORS[solver],
                linestyle="--" if solver.startswith("torch") else "-",
                marker=".",
            )
        ax.axhline(TOL, color="gray", linestyle=":", linewidth=1)
        ax.set_xlim(1, longest + 1)
        ax.set_title(f"{name}: median over samples")
        ax.set_xlabel("cell evaluation")
        ax.set_ylabel("||f(z)-z|| / ||f(z)||")
        ax.legend(fontsize=8)
    fig.suptitle(
        "relative residual per cell evaluation, up to the batched run's last "
        "evaluation (a sample stops at its first <= 1e-4 and keeps that value)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--solvers", default="anderson,broyden,fpi,newton")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--with-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=run_all.BENCH_DIR / "results")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    solvers = args.solvers.split(",")
    args.out.mkdir(parents=True, exist_ok=True)

    rows, curves, notes, problems = [], {}, [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_nfe_"))
    for name in names:
        workload, params, x, injection = problem(name, args.tiny)
        path = tmp / f"{name}.npz"
        save_problem(path, name, args.tiny, params, x, injection)
        problems[name] = (workload, params, injection, path)

    torch_data = {}
    if args.with_torch:
        torch_data = run_torch([p[3] for p in problems.values()], tmp / "torch.npz")

    for name, (workload, params, injection, _) in problems.items():
        batch = injection.shape[0]
        z0 = workload.initial_state(injection)
        curves[name] = {}
        for solver in solvers:
            if solver == "newton" and z0[0].size > DENSE_NEWTON_MAX_SIZE:
                notes.append(
                    f"- {name} {LABELS[solver]}: not run (per-sample state of "
                    f"{z0[0].size} entries; dense Newton only, see the docstring)."
                )
                continue
            print(f"[bench_nfe] {name} {solver}", file=sys.stderr, flush=True)
            trace, failed, _ = residual_traces(
                solver, workload.cell, params["cell"], injection, z0
            )
            trace = np.asarray(trace, np.float64)
            row = {"workload": name, "batch": batch, "solver": solver}
            row |= summarize(trace)
            row["batch_evals"] = int(np.isfinite(trace).sum(axis=1).max())
            if int(np.asarray(failed).sum()):
                notes.append(
                    f"- {name} {LABELS[solver]}: {int(np.asarray(failed).sum())} "
                    "sample(s) stopped on a solver failure before reaching 1e-4."
                )
            if solver in ("anderson", "broyden"):
                nfe, result, rel = deq_nfe(
                    solver, workload, params["cell"], injection, z0
                )
                nfe = np.asarray(nfe)
                row["deq"] = f"{nfe.mean():.2f} / {nfe.max()}"
                ok = np.asarray(result) == jaxdeq.RESULTS.successful
                notes.append(
                    f"- {name} {LABELS[solver]} in a DeepEquilibriumNetwork: "
                    f"{ok.mean():.0%} successful, max relative residual "
                    f"{float(np.max(rel)):.2e}."
                )
            rows.append(row)
            curves[name][solver] = median_curve(trace)[: row["batch_evals"]]
        for solver in ("anderson", "broyden") if torch_data else ():
            prefix = f"{name}:{solver}"
            residuals = torch_data[f"{prefix}:residuals"].T.astype(np.float64)
            row = {"workload": name, "batch": batch, "solver": f"torch_{solver}"}
            row |= summarize(residuals)
            row["batch_evals"] = residuals.shape[1]
            rows.append(row)
            mismatch = check_torch_trace(torch_data, prefix, first_reached(residuals))
            notes.append(
                f"- {name} torchdeq {solver}: {residuals.shape[1]} calls on the "
                f"batch; per-sample counts from its own rel_trace differ from the "
                f"wrapper's for {mismatch} sample(s)."
            )
            padded = np.full((batch, MAX_ITER), np.nan)
            padded[:, : residuals.shape[1]] = residuals[:, :MAX_ITER]
            curves[name][f"torch_{solver}"] = median_curve(padded)[: row["batch_evals"]]
        if torch_data:
            err = float(torch_data[f"{name}:injection_max_abs_err"])
            notes.append(f"- {name}: torch twin injection max |diff| {err:.1e}.")

    versions = workloads.jax_versions(jaxdeq=jaxdeq.__version__)
    if torch_data:
        versions |= json.loads(str(torch_data["versions"]))
    versions["device"] = workloads.device_description()[1]
    shown_argv = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "argv": shown_argv,
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "notes": notes,
    }
    text = markdown(rows, meta)
    print(text)
    (args.out / "nfe.md").write_text(text)
    plot(curves, args.out / "nfe_residuals.png")
    summary = {f"{r['workload']}:{r['solver']}": r for r in rows}
    (tmp / "summary.json").write_text(json.dumps(summary))
    assert not any(math.isnan(r["mean"]) for r in rows)


if __name__ == "__main__":
    main()
