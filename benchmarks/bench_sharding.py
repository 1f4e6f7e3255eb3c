"""Data-parallel scaling of a jaxdeq training step on 1, 2 and 4 simulated CPU devices.

    python benchmarks/bench_sharding.py [--devices 1,2,4] [--reps 30] [--batch 128]

The workload is W1 of `/work/shared/BENCHMARKS.md` written with jaxdeq layers: the
injection `U x + b` (64 -> 256) computed once, the cell `tanh(W z + inj)` (`W`
256x256, `N(0, (0.5/16)^2)`) solved per sample by `jaxdeq.Anderson` (memory 5, ridge
1e-4, stopping at `||f(z) - z|| / ||f(z)|| <= 1e-4` or 30 evaluations), implicit
backward (fixed-point iteration of the VJP, absolute 1e-6 or 30 steps), a linear head
to 10 classes, softmax cross-entropy on random labels, Adam 1e-3. The batch (128) is
sharded over a 1-D mesh `("batch",)`; parameters and optimizer state are replicated.

Two ways of running the same step are timed, alternating step by step so that load on
the machine hits both alike (wall time, and CPU time of the process):

- `jit`: `jax.jit` of the step on a batch placed with `NamedSharding(mesh,
  P("batch"))`; XLA partitions the per-sample `while_loop`, whose stopping test (any
  sample still running?) becomes one all-reduce of a boolean per iteration.
- `shard_map`: the DEQ applied through `jaxdeq.shard_map_apply`: every device runs its
  own loop over its own samples and stops when its slowest sample has converged.

The device count is fixed when JAX starts, so every count runs in its own subprocess
with `XLA_FLAGS=--xla_force_host_platform_device_count=N`. Simulated CPU devices share
the machine's cores (two on the development machines), so this measures the overhead
and scalability of the partitioned program, not a real speed-up: with more devices than
cores, the ideal is a flat time, not a falling one. On a machine with several real
accelerators, run it with `--real-devices` to use them instead.

Prints a markdown table and writes it to `benchmarks/results/sharding.md`.
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
RESULTS = BENCH_DIR / "results" / "sharding.md"
MODES = ("jit", "shard_map")


def _worker(batch: int, reps: int, rounds: int) -> dict:
    """Time both modes on all of this process's devices; returns one JSON record."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import optimistix as optx
    from jax.nn import initializers
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jaxdeq
    from jaxdeq import nn

    d_in, d_state, classes = 64, 256, 10
    injection = nn.Dense(d_in, d_state)
    cell = nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.Dense(
                d_state,
                d_state,
                use_bias=False,
                kernel_init=initializers.normal(0.5 / np.sqrt(d_state)),
            ),
            nn.NoOpLayer(),
        ),
        nn.WrappedFunction(jnp.tanh),
    )
    solver = jaxdeq.Anderson(
        rtol=1e-4,
        atol=0.0,
        norm=optx.two_norm,
        termination="normwise",
        memory=5,
        ridge=1e-4,
    )
    deq = jaxdeq.DeepEquilibriumNetwork(
        cell,
        solver,
        max_steps=30,
        adjoint=jaxdeq.ImplicitAdjoint(),
    )
    head = nn.Dense(d_state, classes)

    key_x, key_y, key_inj, key_deq, key_head = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(key_x, (batch, d_in), jnp.float32)
    labels = jax.random.randint(key_y, (batch,), 0, classes)
    ps_inj, st_inj = injection.init(key_inj, x)
    h = injection.apply(ps_inj, st_inj, x)[0]
    ps_deq, st_deq = deq.init(key_deq, h)
    ps_head, st_head = head.init(key_head, h)
    params = {"inj": ps_inj, "deq": ps_deq, "head": ps_head}
    optimizer = optax.adam(1e-3)

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    by_batch = NamedSharding(mesh, P("batch"))
    x, labels = jax.device_put((x, labels), by_batch)
    applies = {"jit": deq.apply, "shard_map": jaxdeq.shard_map_apply(deq, mesh)}

    def make_step(apply):
        def loss_fn(params, st_deq, x, labels):
            h = injection.apply(params["inj"], st_inj, x)[0]
            z, st_deq, solution = apply(params["deq"], st_deq, h, return_solution=True)
            logits = head.apply(params["head"], st_head, z)[0]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return loss.mean(), (st_deq, solution.nfe)

        @jax.jit
        def step(params, opt_state, st_deq, x, labels):
            (loss, (st_deq, nfe)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, st_deq, x, labels
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, st_deq, loss, nfe

        return step

    runs, timings, stats = {}, {}, {}
    for mode, apply in applies.items():
        step = make_step(apply)
        state = jax.device_put((params, optimizer.init(params), st_deq), replicated)
        start = time.perf_counter()
        state = jax.block_until_ready(step(*state, x, labels)[:3])
        compile_s = time.perf_counter() - start
        out = jax.block_until_ready(step(*state, x, labels))
        state = out[:3]
        nfe = np.asarray(out[4]).reshape(len(devices), -1)
        stats[mode] = {
            "compile_s": compile_s,
            "nfe_mean": float(nfe.mean()),
            "nfe_max": int(nfe.max()),
            "nfe_max_per_device": nfe.max(axis=1).tolist(),
        }
        runs[mode], timings[mode] = (step, state), []

    # Steps alternate between the modes so that load on the machine hits both alike.
    # CPU time (all threads of this process) is recorded beside wall time: on shared
    # cores it counts the work of the program, not the waiting for other processes.
    cpu_times = {mode: [] for mode in MODES}
    for _ in range(reps * rounds):
        for mode in MODES:
            step, state = runs[mode]
            wall, cpu = time.perf_counter(), time.process_time()
            state = jax.block_until_ready(step(*state, x, labels)[:3])
            timings[mode].append(time.perf_counter() - wall)
            cpu_times[mode].append(time.process_time() - cpu)
            runs[mode] = (step, state)
    for mode in MODES:
        stats[mode]["step_s"] = statistics.median(timings[mode])
        stats[mode]["step_min_s"] = min(timings[mode])
        stats[mode]["cpu_s"] = statistics.median(cpu_times[mode])
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "batch": batch,
        "jax": jax.__version__,
        "modes": stats,
    }


def _run_config(devices: int, args) -> dict:
    env = dict(os.environ)
    if not args.real_devices:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={devices}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--batch={args.batch}",
        f"--reps={args.reps}",
        f"--rounds={args.rounds}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{devices} devices failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(records: list[dict], command: str) -> str:
    base = {mode: records[0]["modes"][mode]["step_s"] for mode in MODES}
    first = records[0]
    lines = [
        "# Data-parallel scaling of a jaxdeq training step",
        "",
        f"W1-like DEQ (state 256, input 64), batch {first['batch']}, "
        f"platform `{first['platform']}`, jax {first['jax']}; "
        f"`{command}`, {time.strftime('%Y-%m-%d')}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Median train-step wall "
        "times (minimum in brackets) and median CPU time per step (all threads of the "
        "process: the work done, whatever else loads the machine); "
        "speed-up is relative to the same mode on 1 device; `shard_map / jit` < 1 "
        "means shard_map is faster. nfe: forward evaluations per sample (mean, and "
        "the slowest sample on each device, which is how long that device's loop "
        "runs under shard_map; under jit every device runs to the global maximum).",
        "",
        "| devices | jit step ms (min) | jit speed-up | jit CPU ms "
        "| shard_map step ms (min) | shard_map speed-up | shard_map CPU ms "
        "| shard_map / jit | nfe mean | nfe max per device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        jit, smap = record["modes"]["jit"], record["modes"]["shard_map"]
        lines.append(
            f"| {record['devices']} "
            f"| {jit['step_s'] * 1e3:.1f} ({jit['step_min_s'] * 1e3:.1f}) "
            f"| {base['jit'] / jit['step_s']:.2f}x | {jit['cpu_s'] * 1e3:.1f} "
            f"| {smap['step_s'] * 1e3:.1f} ({smap['step_min_s'] * 1e3:.1f}) "
            f"| {base['shard_map'] / smap['step_s']:.2f}x | {smap['cpu_s'] * 1e3:.1f} "
            f"| {smap['step_s'] / jit['step_s']:.2f} "
            f"| {jit['nfe_mean']:.1f} "
            f"| {', '.join(str(n) for n in jit['nfe_max_per_device'])} |"
        )
    if first["platform"] == "cpu":
        lines += [
            "",
            "Simulated CPU devices (`--xla_force_host_platform_device_count`) share "
            f"this machine's {os.cpu_count()} cores (and colleagues' processes), so "
            "these numbers show the overhead and scalability of the partitioned "
            "program, not a real speed-up: with more devices than cores a flat time "
            "is the ideal.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4", help="comma-separated counts")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--reps", type=int, default=10, help="steps per round, per mode"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--real-devices",
        action="store_true",
        help="use the machine's accelerators instead of simulated CPU devices",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.batch, args.reps, args.rounds)))
        return 0
    counts = [int(n) for n in args.devices.split(",")]
    records = [_run_config(n, args) for n in counts]
    table = render(
        records, "python benchmarks/bench_sharding.py " + " ".join(argv or sys.argv[1:])
    )
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
