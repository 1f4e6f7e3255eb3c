"""Writes `05_implicit_representation.ipynb` (unexecuted):
`python notebooks/_make_05.py`. With `JAXDEQ_NOTEBOOK_TINY=1` in the kernel's
environment the notebook runs at tiny settings (the test suite does this)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        """# A DEQ as an implicit neural representation

An implicit neural representation (INR) stores a signal in the weights of a network
that maps coordinates to values: here pixel positions `(y, x)` in `[-1, 1]^2` to RGB.
Huang, Bai and Kolter (2021) showed that a DEQ makes a good INR: the weight-tied
layer is solved to its fixed point, so its memory does not grow with its effective
depth.

`jaxdeq.deq_implicit_representation` builds

```
(y, x) -> Fourier features -> Dense = u -> DEQ[z* = relu(W z* + u)] -> Dense -> RGB
```

We fit it to a photograph that ships with scikit-learn (`china.jpg`, downsampled),
and compare with an explicit network of the same parameter count (the same layers
with `W` applied once, `relu(W h + u)`) trained for the same number of steps: PSNR,
and the memory of a training step (XLA's temporary buffers of the compiled step)."""
    ),
    new_code_cell(
        """import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_sample_image

import jaxdeq
from jaxdeq import nn

TINY = os.environ.get("JAXDEQ_NOTEBOOK_TINY") == "1"  # the test suite's setting
stride, width, steps = (40, 16, 10) if TINY else (8, 64, 300)

start = time.perf_counter()
photo = load_sample_image("china.jpg").astype(np.float32) / 255.0
image = photo[::stride, ::stride]
height, width_px, _ = image.shape
ys, xs = np.meshgrid(
    np.linspace(-1, 1, height), np.linspace(-1, 1, width_px), indexing="ij"
)
coords = jnp.asarray(np.stack([ys, xs], -1).reshape(-1, 2))
target = jnp.asarray(image.reshape(-1, 3))
print(f"image {height}x{width_px}, {len(coords)} pixels")"""
    ),
    new_markdown_cell(
        """## The two models

The DEQ's weight-tied `W` starts at a small scale (`cell_init_scale=0.5`: a
contraction at initialisation), and Jacobian regularization keeps it one; the
builder's default solver is Anderson acceleration with the normwise relative
stopping rule `||f(z) - z|| <= 1e-3 ||f(z)||`. The explicit network reuses the
DEQ's first, second and last layers, with a bias-free `Dense(width, width)` + ReLU in
place of the DEQ: exactly the same parameters."""
    ),
    new_code_cell(
        """deq_model = jaxdeq.deq_implicit_representation(
    width=width, jacobian_regularization="forward", max_steps=40
)
features, inject, _, readout = deq_model.layers
explicit_model = nn.Chain(
    features,
    inject,
    nn.Dense(width, width, activation=jax.nn.relu, use_bias=False),
    readout,
)


def solve_stats(model, ps, st, x):
    \"\"\"The output, state and the DEQ's per-sample solve statistics.\"\"\"
    y, st, solutions = model.apply(ps, st, x, return_solution=True)
    return y, st, solutions[2]


def count(ps):
    return sum(leaf.size for leaf in jax.tree.leaves(ps))


ps, st = deq_model.init(jax.random.key(0), coords[:2])
_, _, solution = jax.jit(solve_stats, static_argnums=0)(deq_model, ps, st, coords)
print(
    f"DEQ at init: {jnp.mean(solution.result == jaxdeq.RESULTS.successful):.1%} of "
    f"pixels converged, nfe {jnp.mean(solution.nfe):.1f}"
)
print("parameters: DEQ", count(ps), "explicit",
      count(explicit_model.init(jax.random.key(0), coords[:2])[0]))"""
    ),
    new_markdown_cell(
        """## Training

Full-batch Adam with a cosine decay, the same for both; the DEQ's loss adds
`0.1 * solution.jacobian_loss`. We record PSNR (`-10 log10 MSE`, colours in
`[0, 1]`) and, for the DEQ, the nfe and the fraction of pixels whose solve
converged."""
    ),
    new_code_cell(
        """def fit(model, is_deq):
    # (init on all pixels: the state then has the shapes of a training step's)
    ps, st = model.init(jax.random.key(0), coords)
    optimizer = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    opt_state = optimizer.init(ps)

    def loss_fn(ps, st):
        if is_deq:
            y, st, sol = solve_stats(model, ps, st, coords)
            mse = jnp.mean((y - target) ** 2)
            converged = jnp.mean(sol.result == jaxdeq.RESULTS.successful)
            return mse + 0.1 * sol.jacobian_loss, (st, mse, jnp.mean(sol.nfe), converged)
        y, st = model.apply(ps, st, coords)
        mse = jnp.mean((y - target) ** 2)
        return mse, (st, mse, jnp.nan, jnp.nan)

    @jax.jit
    def train_step(ps, st, opt_state):
        grads, (st, *stats) = jax.grad(loss_fn, has_aux=True)(ps, st)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        return optax.apply_updates(ps, updates), st, opt_state, stats

    compiled = train_step.lower(ps, st, opt_state).compile()
    memory = compiled.memory_analysis().temp_size_in_bytes
    history = {"psnr": [], "nfe": [], "converged": []}
    t0 = time.perf_counter()
    for _ in range(steps):
        ps, st, opt_state, (mse, nfe, converged) = compiled(ps, st, opt_state)
        history["psnr"].append(-10 * np.log10(float(mse)))
        history["nfe"].append(float(nfe))
        history["converged"].append(float(converged))
    seconds = time.perf_counter() - t0
    prediction = model.apply(ps, st, coords)[0]
    return history, memory, seconds, np.clip(np.asarray(prediction), 0, 1)


results = {}
for name, model in (("DEQ", deq_model), ("explicit", explicit_model)):
    results[name] = fit(model, name == "DEQ")
    history, memory, seconds, _ = results[name]
    print(
        f"{name:8s} PSNR {history['psnr'][-1]:5.2f} dB, train-step memory "
        f"{memory / 2**20:6.1f} MiB, {seconds:5.1f} s for {steps} steps"
    )
print(
    f"DEQ at the end: nfe {results['DEQ'][0]['nfe'][-1]:.1f}, "
    f"{results['DEQ'][0]['converged'][-1]:.1%} of pixels converged"
)"""
    ),
    new_markdown_cell(
        """## Results

Left to right: the target, both reconstructions, PSNR over training, and the DEQ's
nfe and fraction of pixels converged."""
    ),
    new_code_cell(
        """fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
axes[0].imshow(image)
axes[0].set_title("target")
for ax, name in zip(axes[1:3], ("DEQ", "explicit")):
    history, _, _, prediction = results[name]
    ax.imshow(prediction.reshape(image.shape))
    ax.set_title(f"{name}: {history['psnr'][-1]:.2f} dB")
for ax in axes[:3]:
    ax.axis("off")
for name in ("DEQ", "explicit"):
    axes[3].plot(results[name][0]["psnr"], label=name)
axes[3].set(xlabel="step", ylabel="PSNR (dB)", title="fit")
axes[3].legend()
axes[4].plot(results["DEQ"][0]["nfe"], label="nfe (mean)")
axes[4].set(xlabel="step", ylabel="nfe", title="DEQ solver")
twin = axes[4].twinx()
twin.plot(results["DEQ"][0]["converged"], color="C1", label="fraction converged")
twin.set_ylim(-0.02, 1.02)
twin.set_ylabel("fraction converged")
fig.tight_layout()
if not TINY:
    fig.savefig("../docs/figures/zoo_inr.png", dpi=80)
plt.show()
print(f"total time: {time.perf_counter() - start:.0f} s")"""
    ),
]


def main():
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    path = pathlib.Path(__file__).with_name("05_implicit_representation.ipynb")
    nbformat.write(notebook, path)


if __name__ == "__main__":
    main()
