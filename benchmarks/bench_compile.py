"""Compile times per model family: `init`, the first `apply` and the first train step,
each in a fresh process (empty compilation caches), beside the bare JAX loop of
`bench_bare_jax.py` where one exists (W1 and W2).

    python benchmarks/bench_compile.py [--cases w1,deq_mlp,...] [--repeats N]

Each case runs in its own subprocess (`--case NAME` prints one JSON line); the
driver writes `benchmarks/results/compile.md` (appended to RESULTS.md by
`run_all.py`). Times are wall seconds of the first call, compilation included:
*init* `model.init` (parameters ready); *first apply* a jitted forward pass, traced,
compiled and run once; *first train step* a jitted `value_and_grad` + Adam step,
traced, compiled and run once, and of that the XLA compilation alone (the summed
`backend_compile` events of `jax.monitoring`). With `--repeats N` every case runs in
N fresh processes and the median is reported.
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
RESULTS = BENCH_DIR / "results" / "compile.md"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

CASES = {
    "w1_jaxdeq": "W1 mlp DEQ (jaxdeq, batch 128)",
    "w1_bare_jax": "W1 mlp DEQ (bare JAX loop, batch 128)",
    "w2_jaxdeq": "W2 conv DEQ (jaxdeq, batch 32)",
    "w2_bare_jax": "W2 conv DEQ (bare JAX loop, batch 32)",
    "deq_mlp": "DEQ mlp (DeepEquilibriumNetwork, Dense 64, batch 32)",
    "skip_deq": "Skip DEQ (SkipDeepEquilibriumNetwork, Dense 64, batch 32)",
    "multiscale_deq": "multiscale DEQ (the seed's 4-scale model, Newton, batch 12)",
    "multiscale_node": "multiscale neural ODE (the seed's 4 scales, Tsit5, batch 12)",
    "mdeq_classifier": "MDEQ classifier (jaxdeq.mdeq_image_classifier, 32x32, batch 8)",
}


# ---------------------------------------------------------------------------------
# One case, in this process.


def _timed(fn):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


class _CompileClock:
    """Seconds of XLA compilation (all programs) while active."""

    def __enter__(self):
        import jax

        self.seconds = 0.0

        def listener(event, duration, **kwargs):
            if event == _COMPILE_EVENT:
                self.seconds += duration

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


def _model_case(name: str) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    import optax
    import optimistix as optx

    import jaxdeq
    from jaxdeq import nn

    key = jax.random.key(0)
    t = jnp.tanh
    sizes = (4, 3, 2, 1)
    main = (
        nn.Parallel(
            jnp.add,
            nn.Dense(4, 4, t, use_bias=False),
            nn.Dense(4, 4, t, use_bias=False),
        ),
        nn.Dense(3, 3, t),
        nn.Dense(2, 2, t),
        nn.Dense(1, 1, t),
    )
    mapping = tuple(
        tuple(
            nn.NoOpLayer() if i == j else nn.Dense(a, b, t) for j, b in enumerate(sizes)
        )
        for i, a in enumerate(sizes)
    )
    scales = ((4,), (3,), (2,), (1,))
    cell = nn.Parallel(jnp.add, nn.Dense(64, 64, t), nn.Dense(64, 64))
    if name == "deq_mlp":
        model = jaxdeq.DeepEquilibriumNetwork(
            cell, jaxdeq.Anderson(rtol=1e-4, atol=1e-6)
        )
        x = jax.random.normal(key, (32, 64))
    elif name == "skip_deq":
        model = jaxdeq.SkipDeepEquilibriumNetwork(
            cell, nn.Dense(64, 64), jaxdeq.Anderson(rtol=1e-4, atol=1e-6)
        )
        x = jax.random.normal(key, (32, 64))
    elif name == "multiscale_deq":
        model = jaxdeq.MultiScaleDeepEquilibriumNetwork(
            main, mapping, None, optx.Newton(rtol=1e-5, atol=1e-5), scales
        )
        x = jax.random.uniform(key, (12, 4))
    elif name == "multiscale_node":
        model = jaxdeq.MultiScaleNeuralODE(main, mapping, None, diffrax.Tsit5(), scales)
        x = jax.random.uniform(key, (12, 4))
    elif name == "mdeq_classifier":
        model = jaxdeq.mdeq_image_classifier()
        x = jax.random.normal(key, (8, 32, 32, 3))
    else:
        raise ValueError(name)

    (ps, st), init_s = _timed(lambda: model.init(jax.random.key(1), x))

    def loss(ps, st):
        out, st = model.apply(ps, st, x)
        return sum(jnp.mean(jnp.square(o)) for o in jax.tree.leaves(out)), st

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(ps)

    @jax.jit
    def train_step(ps, st, opt_state):
        (value, st), grads = jax.value_and_grad(loss, has_aux=True)(ps, st)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        return optax.apply_updates(ps, updates), st, opt_state, value

    apply = jax.jit(lambda ps, st: model.apply(ps, st, x))
    _, apply_s = _timed(lambda: apply(ps, st))
    with _CompileClock() as clock:
        _, train_s = _timed(lambda: train_step(ps, st, opt_state))
    return {
        "init_s": init_s,
        "apply_s": apply_s,
        "train_s": train_s,
        "train_compile_s": clock.seconds,
    }


def _workload_case(name: str) -> dict:
    import functools

    import jax
    import optax

    import workloads

    workload_name, lib = name.split("_", 1)
    if lib == "jaxdeq":
        import bench_jaxdeq as peer
    else:
        import bench_bare_jax as peer
    solve = peer.solve if lib == "jaxdeq" else peer.fixed_point
    workload = workloads.get_workload(workload_name)
    batch = {"w1": 128, "w2": 32}[workload_name]
    params = workload.init(jax.random.PRNGKey(0))
    x, labels = workloads.make_batch(workload, batch, jax.random.PRNGKey(1))
    optimizer = optax.adam(workloads.LEARNING_RATE)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        (value, _), grads = jax.value_and_grad(
            functools.partial(workloads._loss, workload, solve), has_aux=True
        )(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    infer = jax.jit(functools.partial(workloads.logits_and_stats, workload, solve))
    _, apply_s = _timed(lambda: infer(params, x))
    with _CompileClock() as clock:
        _, train_s = _timed(lambda: train_step(params, opt_state))
    return {
        "init_s": None,
        "apply_s": apply_s,
        "train_s": train_s,
        "train_compile_s": clock.seconds,
    }


def run_case(name: str) -> dict:
    sys.path.insert(0, str(BENCH_DIR))
    import run_all

    load_before = os.getloadavg()[0]
    if name.startswith(("w1_", "w2_")):
        record = _workload_case(name)
    else:
        record = _model_case(name)
    return {
        "case": name,
        **record,
        "load": round(max(load_before, os.getloadavg()[0]), 2),
        "cpu": run_all.cpu_model(),
    }


# ---------------------------------------------------------------------------------
# The driver: one fresh process per case and repeat, then the markdown table.


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value):
    return "—" if value is None else f"{value:.2f}"


def render(rows: dict[str, list[dict]], command: str) -> str:
    loads = [r["load"] for runs in rows.values() for r in runs]
    cpu = next((r["cpu"] for runs in rows.values() for r in runs), "?")
    import jax

    lines = [
        "## Compile times per model family",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}; 1-minute load "
        f"average {min(loads):.1f}-{max(loads):.1f} during the runs (other jobs "
        "share the machine: compare rows measured together). Each case runs in a "
        "fresh process (empty compilation caches); medians over the processes. "
        "Wall seconds of the first call, compilation included: *init* "
        "`model.init`; *first apply* a jitted forward pass; *first train step* a "
        "jitted `value_and_grad` + Adam step, and of that the XLA compilation "
        "alone. W1/W2 rows are the benchmark workloads (params from "
        "`workloads.py`, so no init), jaxdeq beside the bare JAX loop; their "
        "first train step includes one step's run time (W2's bare loop runs its "
        "conv VJPs in XLA:CPU's slow path, about 20 s).",
        "",
        "| model | init (s) | first apply (s) | first train step (s) | "
        "of which XLA compile (s) | processes | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        lines.append(
            f"| {CASES[name]} | {_fmt(_median([r['init_s'] for r in runs]))} | "
            f"{_fmt(_median([r['apply_s'] for r in runs]))} | "
            f"{_fmt(_median([r['train_s'] for r in runs]))} | "
            f"{_fmt(_median([r['train_compile_s'] for r in runs]))} | {len(runs)} | "
            f"{_median([r['load'] for r in runs]):.1f} |"
        )
    ratios = []
    for workload in ("w1", "w2"):
        ours, bare = rows.get(f"{workload}_jaxdeq"), rows.get(f"{workload}_bare_jax")
        if ours and bare:
            for key, label in (
                ("apply_s", "first apply"),
                ("train_s", "first train step"),
                ("train_compile_s", "train-step XLA compile"),
            ):
                a = _median([r[key] for r in ours])
                b = _median([r[key] for r in bare])
                ratios.append(f"{workload.upper()} {label} {a / b:.2f}x")
    if ratios:
        lines += ["", "jaxdeq / bare JAX loop: " + "; ".join(ratios) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process, print JSON")
    parser.add_argument(
        "--cases",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=list(CASES),
        help=f"comma-separated, from {list(CASES)}",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name in args.cases:
            completed = subprocess.run(
                [sys.executable, __file__, "--case", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                cwd=BENCH_DIR.parent,
            )
            if completed.returncode != 0:
                print(f"[bench_compile] {name} failed:\n{completed.stderr[-3000:]}")
                continue
            record = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"[bench_compile] {json.dumps(record)}", flush=True)
            rows.setdefault(name, []).append(record)
    if not rows:
        return 1
    command = (
        "python benchmarks/bench_compile.py"
        + (" " + " ".join(argv) if argv else " ".join([""] + sys.argv[1:])).rstrip()
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, command.strip()))
    print(f"[bench_compile] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
