"""Writes `02_multiscale.ipynb` (unexecuted): `python notebooks/_make_02.py`."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        """# Multiscale deep equilibrium models

A multiscale DEQ (Bai et al., 2020) keeps one state per resolution,
`z = (z_0, z_1, ...)`, and solves for the joint fixed point `z* = f(z*, x)` of

```
m_0 = main_layers[0]((z_0, x))           # the input enters scale 0 only
m_i = main_layers[i](z_i)                # i > 0
z'_j = sum_i mapping_layers[i][j](m_i)   # row i: from scale i; column j: to scale j
z'_j = post_fuse_layer[j](z'_j)
```

In jaxdeq the state is just a pytree (a tuple of arrays), so every solver, gradient
mode and option of `jaxdeq.DeepEquilibriumNetwork` works unchanged.

This notebook trains a small MDEQ-style classifier, built by
`jaxdeq.mdeq_image_classifier`, on scikit-learn's handwritten digits (8x8, upsampled
to 16x16), and watches the solver: the per-scale residuals and the number of
function evaluations (nfe) over training. It is sized to run in about a minute on a
laptop CPU."""
    ),
    new_code_cell(
        """import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxdeq

start = time.perf_counter()
digits = load_digits()
images = digits.images.astype(np.float32) / 16.0
# nearest-neighbour upsampling 8x8 -> 16x16, NHWC
images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
labels = digits.target
rng = np.random.default_rng(0)
order = rng.permutation(len(images))
train_idx, test_idx = order[:256], order[256:320]
x_train, y_train = images[train_idx], labels[train_idx]
x_test, y_test = images[test_idx], labels[test_idx]
x_train.shape, x_test.shape"""
    ),
    new_markdown_cell(
        """## The model

Two scales: 16x16 with 8 channels and 8x8 with 16 channels. Each scale has an MDEQ
residual block (3x3 convs, GroupNorm; the stem's features are injected at scale 0);
going down is a strided 3x3 conv, going up a 1x1 conv and nearest upsampling; after
fusing, ReLU, a 1x1 conv and GroupNorm. The head pools every scale to a 4x4 grid
and applies a linear layer.

The builder's defaults make the map a contraction at initialisation (each block's
last conv starts small, and nothing rescales the coarse scale's small output), and
its default solver is Anderson acceleration with the normwise relative stopping rule
of DEQ practice, `||f(z) - z|| <= 1e-3 ||f(z)||` per sample. So the solve converges
from the first step, and the default implicit gradient (`ImplicitAdjoint`), which
assumes a fixed point, is exact. Jacobian regularization
(`jacobian_regularization="forward"`, its estimate added to the loss) keeps the map
contractive while it trains."""
    ),
    new_code_cell(
        """model = jaxdeq.mdeq_image_classifier(
    num_classes=10,
    image_size=16,
    in_channels=1,
    channels=(8, 16),
    num_groups=4,
    max_steps=30,
    jacobian_regularization="forward",
)
batch_size = 32
ps, st = model.init(jax.random.key(0), jnp.asarray(x_train[:batch_size]))
print("scales:", model.deq.scales)
print("parameters:", sum(leaf.size for leaf in jax.tree.leaves(ps)))


def solve_stats(ps, st, x):
    \"\"\"Logits, state and the DEQ's per-sample solve statistics.\"\"\"
    return model.apply(ps, st, x, return_solution=True)


_, _, solution = jax.jit(solve_stats)(ps, st, jnp.asarray(x_train[:batch_size]))
converged = jnp.mean(solution.result == jaxdeq.RESULTS.successful)
print(f"at init: {converged:.0%} of samples converged, nfe {jnp.mean(solution.nfe):.1f}")"""
    ),
    new_markdown_cell(
        """## Training

The loss is cross-entropy plus the Jacobian penalty. Besides the loss, each step
reports what the solver did: for every scale `j` the relative residual
`||f(z*)_j - z*_j|| / ||z*_j||` (averaged over the batch), the nfe, and the fraction
of samples whose solve converged (`solution.result == jaxdeq.RESULTS.successful`).
The solution's `residual` is a tuple over scales, like the state.

On a CPU compilation dominates a run this short, so evaluation reuses the compiled
loss-and-gradient function (same batch shape) and discards the gradients."""
    ),
    new_code_cell(
        """optimizer = optax.adam(3e-3)
opt_state = optimizer.init(ps)
jacobian_weight = 2.0


def loss_fn(ps, st, x, y):
    logits, st, sol = solve_stats(ps, st, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    per_scale = jnp.stack(
        [
            jnp.mean(
                jnp.linalg.norm(r.reshape(len(r), -1), axis=1)
                / jnp.linalg.norm(z.reshape(len(z), -1), axis=1)
            )
            for r, z in zip(sol.residual, sol.z_star)
        ]
    )
    stats = {
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
        "residual": per_scale,
        "nfe": jnp.mean(sol.nfe),
        "converged": jnp.mean(sol.result == jaxdeq.RESULTS.successful),
    }
    return loss + jacobian_weight * sol.jacobian_loss, (st, stats)


loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@jax.jit
def update(ps, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, ps)
    return optax.apply_updates(ps, updates), opt_state


def evaluate(ps, st, x, y):
    accuracy = []
    for i in range(0, len(x), batch_size):
        (_, (_, stats)), _ = loss_and_grad(ps, st, x[i : i + batch_size], y[i : i + batch_size])
        accuracy.append(float(stats["accuracy"]))
    return float(np.mean(accuracy))


history = {"loss": [], "accuracy": [], "residual": [], "nfe": [], "converged": []}
per_epoch = {"epoch": [], "converged": [], "nfe": []}
epochs = 4
for epoch in range(1, epochs + 1):
    perm = rng.permutation(len(x_train))
    for i in range(0, len(x_train), batch_size):
        idx = perm[i : i + batch_size]
        (loss, (st, stats)), grads = loss_and_grad(ps, st, x_train[idx], y_train[idx])
        ps, opt_state = update(ps, opt_state, grads)
        history["loss"].append(float(loss))
        history["accuracy"].append(float(stats["accuracy"]))
        history["residual"].append(np.asarray(stats["residual"]))
        history["nfe"].append(float(stats["nfe"]))
        history["converged"].append(float(stats["converged"]))
    steps = len(x_train) // batch_size
    per_epoch["epoch"].append(epoch)
    per_epoch["converged"].append(np.mean(history["converged"][-steps:]))
    per_epoch["nfe"].append(np.mean(history["nfe"][-steps:]))
    print(
        f"epoch {epoch}: loss {np.mean(history['loss'][-steps:]):.3f}, "
        f"train accuracy {np.mean(history['accuracy'][-steps:]):.2f}, "
        f"residuals {np.round(np.mean(history['residual'][-steps:], axis=0), 4)}, "
        f"nfe {per_epoch['nfe'][-1]:.1f}, converged {per_epoch['converged'][-1]:.0%}"
    )
print(f"test accuracy: {evaluate(ps, st, x_test, y_test):.2f}")"""
    ),
    new_markdown_cell(
        """## What the solver did

Top left: the training curve. Top right: the relative residual of each scale at the
state the solver returned, below the tolerance (dashed) when the solve converged.
Bottom: the nfe per step and the fraction of samples converged per epoch."""
    ),
    new_code_cell(
        """from matplotlib.ticker import MaxNLocator

residual = np.stack(history["residual"])
fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
axes[0, 0].plot(history["loss"], label="loss")
axes[0, 0].plot(history["accuracy"], label="train accuracy")
axes[0, 0].set_xlabel("step")
axes[0, 0].legend()
axes[0, 0].set_title("training curve")
for j, shape in enumerate(model.deq.scales):
    axes[0, 1].semilogy(residual[:, j], label=f"scale {j} {shape}")
axes[0, 1].axhline(1e-3, color="gray", linestyle="--", label="rtol")
axes[0, 1].set_xlabel("step")
axes[0, 1].set_ylabel("||f(z*) - z*|| / ||z*||")
axes[0, 1].legend()
axes[0, 1].set_title("per-scale relative residual")
axes[1, 0].plot(history["nfe"])
axes[1, 0].set_xlabel("step")
axes[1, 0].set_ylabel("mean nfe")
axes[1, 0].set_title("function evaluations")
axes[1, 1].plot(per_epoch["epoch"], per_epoch["converged"], marker="o")
axes[1, 1].set_ylim(-0.02, 1.02)
axes[1, 1].xaxis.set_major_locator(MaxNLocator(integer=True))
axes[1, 1].set_xlabel("epoch")
axes[1, 1].set_ylabel("fraction converged")
axes[1, 1].set_title("samples whose solve converged")
fig.tight_layout()
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
    path = pathlib.Path(__file__).with_name("02_multiscale.ipynb")
    nbformat.write(notebook, path)


if __name__ == "__main__":
    main()
