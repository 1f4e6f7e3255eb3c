"""Benchmark `jaxdeq._conv_canon.canonicalize_convolutions` on a W2-like cell.

The cell is BENCHMARKS.md's W2 conv cell,
`gn(relu(z + gn(inj + conv3x3_b(gn(relu(conv3x3_a(z)))))))` with conv_a 48->64,
conv_b 64->48, no bias, weights ~ N(0, 0.01^2), GroupNorm(8 groups) without affine,
batch 32, 32x32. A DEQ's implicit backward pass iterates `u -> vjp_z(u) + g`; here
10 such iterations run

- in a `lax.fori_loop` with the plain VJP (*before*),
- in a `lax.fori_loop` with `canonicalize_convolutions(vjp)` (*after*),
- unrolled in Python with the plain VJP (*unrolled*, the reference speed).

Prints a markdown table of medians (after one warm-up call) and the ratios.

```
.venv/bin/python benchmarks/conv_canon_bench.py            # NHWC, batch 32
.venv/bin/python benchmarks/conv_canon_bench.py --layout NCHW --reps 3
```
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from jaxdeq._conv_canon import canonicalize_convolutions


def group_norm(x, groups, channel_axis):
    x = jnp.moveaxis(x, channel_axis, -1)
    shape = x.shape
    x = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    axes = (*range(1, x.ndim - 2), x.ndim - 1)
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    x = ((x - mean) * lax.rsqrt(var + 1e-5)).reshape(shape)
    return jnp.moveaxis(x, -1, channel_axis)


def make_w2(layout, batch, size=32, width=48, hidden=64, seed=0):
    """W2 cell `f(z)` (with `inj` closed over) and a state `z` of that layout."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    if layout == "NHWC":
        dn, ch = ("NHWC", "HWIO", "NHWC"), -1
        wa = jax.random.normal(k1, (3, 3, width, hidden)) * 0.01
        wb = jax.random.normal(k2, (3, 3, hidden, width)) * 0.01
        zshape = (batch, size, size, width)
    else:
        dn, ch = ("NCHW", "OIHW", "NCHW"), 1
        wa = jax.random.normal(k1, (hidden, width, 3, 3)) * 0.01
        wb = jax.random.normal(k2, (width, hidden, 3, 3)) * 0.01
        zshape = (batch, width, size, size)
    inj = jax.random.normal(k3, zshape)
    z = jax.random.normal(k4, zshape)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    def cell(z):
        y = group_norm(jax.nn.relu(conv(z, wa)), 8, ch)
        y = group_norm(inj + conv(y, wb), 8, ch)
        return group_norm(jax.nn.relu(z + y), 8, ch)

    return cell, z


def build(cell, iters):
    def before(z, g):
        _, vjp = jax.vjp(cell, z)
        return lax.fori_loop(0, iters, lambda i, u: vjp(u)[0] + g, g)

    def after(z, g):
        _, vjp = jax.vjp(cell, z)
        vjp = canonicalize_convolutions(vjp)
        return lax.fori_loop(0, iters, lambda i, u: vjp(u)[0] + g, g)

    def unrolled(z, g):
        _, vjp = jax.vjp(cell, z)
        u = g
        for _ in range(iters):
            u = vjp(u)[0] + g
        return u

    return {"before": before, "after": after, "unrolled": unrolled}


def median_time(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=["NHWC", "NCHW", "both"], default="NHWC")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    layouts = ["NHWC", "NCHW"] if a.layout == "both" else [a.layout]

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{a.iters} input-VJPs of the W2 cell, batch {a.batch}, medians of {a.reps}")
    print()
    print("| layout | variant | time (s) | / unrolled | speed-up vs before |")
    print("|---|---|---|---|---|")
    for layout in layouts:
        cell, z = make_w2(layout, a.batch)
        g = jax.random.normal(jax.random.PRNGKey(1), z.shape)
        fns = {k: jax.jit(v) for k, v in build(cell, a.iters).items()}
        times = {k: median_time(f, (z, g), a.reps) for k, f in fns.items()}
        ref = fns["unrolled"](z, g)
        err = {
            k: float(jnp.max(jnp.abs(fns[k](z, g) - ref)) / jnp.max(jnp.abs(ref)))
            for k in ("before", "after")
        }
        for k in ("before", "after", "unrolled"):
            print(
                f"| {layout} | {k} | {times[k]:.4f} | "
                f"{times[k] / times['unrolled']:.2f}x | "
                f"{times['before'] / times[k]:.1f}x |"
            )
        print(
            f"\n{layout}: max relative difference to unrolled: "
            f"before {err['before']:.1e}, after {err['after']:.1e}\n"
        )


if __name__ == "__main__":
    main()
