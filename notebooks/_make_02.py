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
and applies a linear layer. The fixed point is found by `jaxdeq.Broyden` within a budget
of 12 steps. An untrained MDEQ is not a contraction, so a 12-step solve stops short
of the fixed point; the implicit gradient (the default `ImplicitAdjoint`) assumes an
exact fixed point, so here we use a phantom gradient (Geng et al., 2021): three damped
iterations of the map from the returned state, differentiated by backpropagation —
cheap, and robust to an inexact solve."""
    ),
    new_code_cell(
        """model = jaxdeq.mdeq_image_classifier(
    jaxdeq.Broyden(rtol=1e-3, atol=1e-3),
    num_classes=10,
    image_size=16,
    in_channels=1,
    channels=(8, 16),
    num_groups=4,
    max_steps=12,
    adjoint=jaxdeq.PhantomGradient(steps=3, damping=0.5),
)
batch_size = 32
ps, st = model.init(jax.random.key(0), jnp.asarray(x_train[:batch_size]))
print("scales:", model.deq.scales)
print("parameters:", sum(leaf.size for leaf in jax.tree.leaves(ps)))"""
    ),
    new_markdown_cell(
        """## Training

The loss is cross-entropy. Besides the loss, each step reports what the solver did:
for every scale `j` the relative residual `||f(z*)_j - z*_j|| / ||z*_j||` (averaged
over the batch), and the nfe. `model.apply(ps, st, x, return_solution=True)` also
returns the DEQ's solution (`st` keeps only what persists between calls); its
`residual` is a tuple over scales, like the state.

On a CPU compilation dominates a run this short, so evaluation reuses the compiled
loss-and-gradient function (same batch shape) and discards the gradients."""
    ),
    new_code_cell(
        """optimizer = optax.adam(1e-2)
opt_state = optimizer.init(ps)


def loss_fn(ps, st, x, y):
    logits, st, sol = model.apply(ps, st, x, return_solution=True)
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
    }
    return loss, (st, stats)


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


history = {"loss": [], "accuracy": [], "residual": [], "nfe": []}
epochs = 4
for epoch in range(epochs):
    perm = rng.permutation(len(x_train))
    for i in range(0, len(x_train), batch_size):
        idx = perm[i : i + batch_size]
        (loss, (st, stats)), grads = loss_and_grad(ps, st, x_train[idx], y_train[idx])
        ps, opt_state = update(ps, opt_state, grads)
        history["loss"].append(float(loss))
        history["accuracy"].append(float(stats["accuracy"]))
        history["residual"].append(np.asarray(stats["residual"]))
        history["nfe"].append(float(stats["nfe"]))
    print(
        f"epoch {epoch + 1}: loss {np.mean(history['loss'][-8:]):.3f}, "
        f"train accuracy {np.mean(history['accuracy'][-8:]):.2f}, "
        f"residuals {np.round(np.mean(history['residual'][-8:], axis=0), 3)}, "
        f"nfe {np.mean(history['nfe'][-8:]):.1f}"
    )
print(f"test accuracy: {evaluate(ps, st, x_test, y_test):.2f}")"""
    ),
    new_markdown_cell(
        """## What the solver did

Left: the training curve. Middle: the relative residual of each scale at the state
the solver returned; right: the nfe per step. With a fixed budget the solver stops
at 12 steps whenever the tolerance is not met; the residuals show how far from the
fixed point each scale is at that point. To push the residuals down, regularize the
Jacobian: `jacobian_regularization="reverse"` on the model and
`solution.jacobian_loss` added to the loss (it works on multiscale models too)."""
    ),
    new_code_cell(
        """residual = np.stack(history["residual"])
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
axes[0].plot(history["loss"], label="loss")
axes[0].plot(history["accuracy"], label="train accuracy")
axes[0].set_xlabel("step")
axes[0].legend()
axes[0].set_title("training curve")
for j, shape in enumerate(model.deq.scales):
    axes[1].semilogy(residual[:, j], label=f"scale {j} {shape}")
axes[1].set_xlabel("step")
axes[1].set_ylabel("||f(z*) - z*|| / ||z*||")
axes[1].legend()
axes[1].set_title("per-scale relative residual")
axes[2].plot(history["nfe"])
axes[2].set_xlabel("step")
axes[2].set_ylabel("mean nfe")
axes[2].set_title("function evaluations")
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
