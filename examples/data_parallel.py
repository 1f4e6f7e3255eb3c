"""Data-parallel DEQ training on N devices: scikit-learn's digits, batch sharded.

The network is the one of `examples/digits.py`,

    x -> Dense(64 -> 128, relu) -> DEQ[ z* = tanh(W z* + x) ] -> Dense(128 -> 10),

trained with Adam. Every global batch is split over a 1-D device mesh `("batch",)`
(`NamedSharding(mesh, P("batch"))`); parameters and optimizer state are replicated
(`NamedSharding(mesh, P())`). Each sample's fixed point is solved on the device that
holds it, the loop's stopping test and the gradient sum are collectives that XLA
compiles into the step (no host round-trip), and `--mode shard_map` runs the DEQ
through `jaxdeq.shard_map_apply` so that every device stops its own loop as soon as
its own samples have converged (see `docs/sharding.md`).

One machine, 4 CPU devices simulated by XLA (for trying it out without accelerators):

    python examples/data_parallel.py --simulate-cpu-devices 4 --epochs 5

One machine with accelerators, using the first 2 of them:

    python examples/data_parallel.py --devices 2

**Several hosts.** Start the same command on every host, one process per host, with
the coordinator's address (host 0, any free port), the number of processes and each
process's index:

    # on host 0                                   # on host 1
    python examples/data_parallel.py \\            python examples/data_parallel.py \\
      --coordinator 10.0.0.1:1234 \\                --coordinator 10.0.0.1:1234 \\
      --num-processes 2 --process-id 0              --num-processes 2 --process-id 1

Those flags become `jax.distributed.initialize(coordinator_address, num_processes,
process_id)`, which must run before anything else touches JAX; on Cloud TPU and under
SLURM or Open MPI `jax.distributed.initialize()` finds all three by itself (pass
`--coordinator auto`). Afterwards `jax.devices()` lists the devices of every host and
the mesh spans them all. Each process shuffles with the same seed, keeps its own
contiguous slice of every global batch and hands it to
`jax.make_array_from_process_local_data`, which assembles the global sharded array
without copying data between hosts; everything else is the single-host program. Only
process 0 prints.

Per epoch it prints train and test accuracy, the mean solver steps per sample (nfe),
the largest nfe on each device in the last batch, and the wall time.
"""

import argparse
import os
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, default=128, help="global, over all devices"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=("jit", "shard_map"),
        default="shard_map",
        help="jit: XLA partitions the step; shard_map: per-device solves "
        "(jaxdeq.shard_map_apply)",
    )
    parser.add_argument(
        "--devices", type=int, default=None, help="use the first N devices (all)"
    )
    parser.add_argument(
        "--simulate-cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="run on N simulated CPU devices (sets XLA_FLAGS before JAX starts)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        help="multi-host: host:port of process 0, or 'auto' (TPU, SLURM, MPI)",
    )
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.simulate_cpu_devices is not None:
        # XLA reads this once, when JAX starts its backends: set it before importing.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.simulate_cpu_devices}"
        ).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import jaxdeq
    from jaxdeq import nn

    if args.coordinator == "auto":
        jax.distributed.initialize()
    elif args.coordinator is not None:
        jax.distributed.initialize(
            args.coordinator, args.num_processes, args.process_id
        )
    devices = jax.devices()
    if args.devices is not None:
        if jax.process_count() > 1:
            raise ValueError("--devices: not supported with several processes")
        devices = devices[: args.devices]
    mesh = jax.make_mesh(
        (len(devices),), ("batch",), axis_types=(AxisType.Auto,), devices=devices
    )
    replicated = NamedSharding(mesh, P())
    by_batch = NamedSharding(mesh, P("batch"))
    if args.batch_size % len(devices):
        raise ValueError(
            f"--batch-size: {args.batch_size} is not divisible by the number of "
            f"devices, {len(devices)}"
        )
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *_, **__: None)

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x_all, y_all, test_size=0.2, random_state=args.seed, stratify=y_all
    )
    log(
        f"digits: {len(x_train)} train / {len(x_test)} test; {len(devices)} "
        f"{devices[0].platform} devices over {jax.process_count()} process(es); "
        f"global batch {args.batch_size}; mode {args.mode}"
    )

    # The model of examples/digits.py, with the DEQ kept separate so that its apply
    # can be swapped for the shard_map one.
    width = args.width
    small = jax.nn.initializers.normal(0.5 / np.sqrt(width))
    embed = nn.Dense(64, width, activation=jax.nn.relu)
    deq = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(
            nn.Parallel(
                jnp.add,
                nn.Dense(width, width, use_bias=False, kernel_init=small),
                nn.NoOpLayer(),
            ),
            nn.WrappedFunction(jnp.tanh),
        ),
        jaxdeq.Anderson(rtol=1e-4, atol=1e-6),
        max_steps=30,
    )
    head = nn.Dense(width, 10)
    deq_apply = deq.apply if args.mode == "jit" else jaxdeq.shard_map_apply(deq, mesh)

    keys = jax.random.split(jax.random.key(args.seed), 3)
    sample = jnp.zeros((args.batch_size, 64), jnp.float32)
    ps_embed, st_embed = embed.init(keys[0], sample)
    hidden = embed.apply(ps_embed, st_embed, sample)[0]
    ps_deq, st_deq = deq.init(keys[1], hidden)
    ps_head, st_head = head.init(keys[2], hidden)
    params = {"embed": ps_embed, "deq": ps_deq, "head": ps_head}
    optimizer = optax.adam(args.lr)
    params, opt_state, st_deq = jax.device_put(
        (params, optimizer.init(params), st_deq), replicated
    )

    def forward(params, st_deq, x):
        h = embed.apply(params["embed"], st_embed, x)[0]
        z, st_deq, solution = deq_apply(params["deq"], st_deq, h, return_solution=True)
        return head.apply(params["head"], st_head, z)[0], st_deq, solution

    def loss_fn(params, st_deq, x, y):
        logits, st_deq, solution = forward(params, st_deq, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (st_deq, logits, solution.nfe)

    @jax.jit
    def train_step(params, opt_state, st_deq, x, y):
        grads, (st_deq, logits, nfe) = jax.grad(loss_fn, has_aux=True)(
            params, st_deq, x, y
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        stats = (
            jnp.sum(jnp.argmax(logits, -1) == y),
            jnp.sum(nfe),
            jnp.max(nfe.reshape(len(devices), -1), axis=1),  # slowest per device
        )
        stats = jax.lax.with_sharding_constraint(stats, replicated)
        return optax.apply_updates(params, updates), opt_state, st_deq, stats

    @jax.jit
    def count_correct(params, st_deq, x, y):
        hits = jnp.sum(jnp.argmax(forward(params, st_deq, x)[0], -1) == y)
        return jax.lax.with_sharding_constraint(hits, replicated)

    def to_host(replicated_array):
        """A replicated result as NumPy (with several hosts, arrays are global and
        only their local copies can be read)."""
        return np.asarray(replicated_array.addressable_data(0))

    def global_batch(x, y):
        """This process's contiguous share of a global batch, assembled into global
        arrays sharded over the batch axis."""
        share = len(x) // jax.process_count()
        start = jax.process_index() * share
        local = (x[start : start + share], y[start : start + share])
        return tuple(
            jax.make_array_from_process_local_data(by_batch, part) for part in local
        )

    rng = np.random.default_rng(args.seed)  # same seed, same order on every host
    steps = len(x_train) // args.batch_size
    test_size = len(x_test) - len(x_test) % args.batch_size
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(len(x_train))
        correct = nfe = 0
        for i in range(steps):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = global_batch(x_train[idx], y_train[idx])
            params, opt_state, st_deq, stats = train_step(
                params, opt_state, st_deq, x, y
            )
            batch_correct, batch_nfe, per_device = (to_host(a) for a in stats)
            correct += int(batch_correct)
            nfe += int(batch_nfe)
        hits = 0
        for i in range(0, test_size, args.batch_size):
            x, y = global_batch(
                x_test[i : i + args.batch_size], y_test[i : i + args.batch_size]
            )
            hits += int(to_host(count_correct(params, st_deq, x, y)))
        seen = steps * args.batch_size
        log(
            f"epoch {epoch:2d}  train acc {correct / seen:.3f}  "
            f"test acc {hits / test_size:.3f}  nfe {nfe / seen:5.1f}  "
            f"max nfe per device {per_device.tolist()}  "
            f"{time.perf_counter() - start:5.1f}s"
        )


if __name__ == "__main__":
    main()
