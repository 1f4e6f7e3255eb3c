"""Writes `07_reuse_and_anytime.ipynb` (unexecuted): `python notebooks/_make_07.py`.
With `JAXDEQ_NOTEBOOK_TINY=1` in the kernel's environment the notebook runs at tiny
settings (the test suite does this)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        """# Spending fewer iterations: warm starts, fixed-point reuse, anytime inference

A DEQ's cost is its solver iterations. This tutorial uses four tools that cut or
control them, on scikit-learn's handwritten digits:

1. **Fixed-point reuse across training** (`jaxdeq.FixedPointStore`): each example's
   fixed point from its last visit starts its next solve.
2. **Anytime inference** (`apply(..., anytime=(1, 2, 4, ...))`): one solve returns the
   states it passes through at several budgets, so one call draws accuracy against
   test-time compute.
3. **Sequences of related inputs** (`jaxdeq.scan_segments`): each frame's solve starts
   from the previous frame's fixed point.
4. **A fallback solver** (`fallback=`): samples the primary solver fails on are
   continued by a second solver inside the same compiled solve."""
    ),
    new_code_cell(
        """import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optimistix as optx
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import jaxdeq
from jaxdeq import nn

TINY = os.environ.get("JAXDEQ_NOTEBOOK_TINY") == "1"  # the test suite's setting
width, epochs, batch_size = (16, 2, 64) if TINY else (64, 10, 64)

digits = load_digits()
images = (digits.data / 16.0).astype(np.float32)
labels = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(images))
train, test = order[:1437], order[1437:]
if TINY:
    train, test = train[:256], test[:128]
print(f"{len(train)} training and {len(test)} test images of 8x8 = 64 pixels")"""
    ),
    new_markdown_cell(
        """## The model

An input layer, a DEQ whose cell is `tanh(W z + U h + b)`, and a linear head. The
solver is Anderson acceleration with the normwise relative rule of DEQ practice,
`||f(z) - z|| <= 1e-3 ||f(z)||`, at most 30 steps."""
    ),
    new_code_cell(
        """solver = jaxdeq.Anderson(rtol=1e-3, atol=1e-6, norm=optx.two_norm,
                         termination="normwise")
embed = nn.Dense(64, width, activation=jnp.tanh)
deq = jaxdeq.DeepEquilibriumNetwork(
    nn.Parallel(jnp.add, nn.Dense(width, width, activation=jnp.tanh),
                nn.Dense(width, width)),
    solver, max_steps=30)
head = nn.Dense(width, 10)


def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jnp.zeros((batch_size, 64), jnp.float32)
    ps_e, st_e = embed.init(k1, x)
    h = jnp.zeros((batch_size, width), jnp.float32)
    ps_d, st_d = deq.init(k2, h)
    ps_h, st_h = head.init(k3, h)
    return (ps_e, ps_d, ps_h), (st_e, st_d, st_h)


def forward(ps, st, x, **solve_kwargs):
    h, _ = embed.apply(ps[0], st[0], x)
    z, st_d, solution = deq.apply(ps[1], st[1], h, return_solution=True,
                                  **solve_kwargs)
    logits, _ = head.apply(ps[2], st[2], z)
    return logits, (st[0], st_d, st[2]), solution"""
    ),
    new_markdown_cell(
        """## 1. Fixed-point reuse across training

The store holds one state per training example (`1437 x width` floats) and the epoch
at which it was written. At each step we look up the batch's entries (`warm` says
which are fresh: written within `max_age` epochs), solve from them, and write the new
fixed points back. Both the store and the update run inside the jitted train step;
the store is carried like the optimizer state. We train the same model twice from
the same initialisation, with and without reuse, and count function evaluations."""
    ),
    new_code_cell(
        """optimizer = optax.adam(3e-3)


def make_train_step(reuse):
    @jax.jit
    def train_step(ps, st, opt_state, store, index, epoch):
        x, y = jnp.asarray(images)[index], jnp.asarray(labels)[index]
        kwargs = {}
        if reuse:
            z0, warm = store.lookup(index, now=epoch)
            kwargs = {"z0": z0, "warm": warm}

        def loss(ps):
            logits, new_st, solution = forward(ps, st, x, **kwargs)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, (new_st, solution)

        (value, (st, solution)), grads = jax.value_and_grad(loss, has_aux=True)(ps)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        ps = optax.apply_updates(ps, updates)
        if reuse:
            store = store.update(index, solution.z_star, now=epoch)
        return ps, st, opt_state, store, value, solution.nfe

    return train_step


@jax.jit
def evaluate(ps, st, x, y):
    logits, _, solution = forward(ps, st, x)
    return jnp.mean(jnp.argmax(logits, -1) == y), solution.nfe


def fit(reuse):
    ps, st = init(jax.random.key(0))
    opt_state = optimizer.init(ps)
    store = jaxdeq.FixedPointStore(
        jax.ShapeDtypeStruct((batch_size, width), jnp.float32), len(images), max_age=1)
    step = make_train_step(reuse)
    rng = np.random.default_rng(1)
    nfe_per_epoch = []
    for epoch in tqdm(range(epochs), desc="reuse" if reuse else "cold"):
        nfes = []
        perm = rng.permutation(train)
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            index = jnp.asarray(perm[start:start + batch_size])
            ps, st, opt_state, store, _, nfe = step(ps, st, opt_state, store, index,
                                                   epoch)
            nfes.append(np.asarray(nfe))
        nfe_per_epoch.append(float(np.mean(nfes)))
    acc, _ = evaluate(ps, st, images[test], labels[test])
    return ps, st, nfe_per_epoch, float(acc)


results = {}
for reuse in (False, True):
    start = time.perf_counter()
    results[reuse] = fit(reuse)
    print(f"reuse={reuse}: mean nfe per epoch "
          f"{[round(n, 1) for n in results[reuse][2]]}, test accuracy "
          f"{results[reuse][3]:.3f} ({time.perf_counter() - start:.1f} s)")"""
    ),
    new_code_cell(
        """fig, ax = plt.subplots(figsize=(6, 3.5))
for reuse, style in ((False, "o-"), (True, "s-")):
    ax.plot(range(1, epochs + 1), results[reuse][2], style,
            label=("with" if reuse else "without") + " fixed-point reuse "
            f"(test acc {results[reuse][3]:.3f})")
ax.set_xlabel("epoch")
ax.set_ylabel("mean forward nfe per sample")
ax.set_ylim(bottom=0)
ax.legend()
ax.set_title("Reusing each example's last fixed point")
plt.show()"""
    ),
    new_markdown_cell(
        """The first epoch is the same (the store is empty); from the second on, each
example starts near its answer. Accuracy is the same: the tolerance decides the
answer, the start only how long it takes. `max_age=1` discards entries more than one
epoch old (with long epochs or fast-moving parameters, stale fixed points can be
worse starts than the model's own)."""
    ),
    new_markdown_cell(
        """## 2. Anytime inference: accuracy against test-time compute from one call

`anytime=(1, 2, 4, 8, 16, 30)` returns, in `solution.anytime`, what the solve returns
at each budget: the same values as separate calls with `max_steps=b` (the solver's
iterates don't depend on its budget), from one solve. We apply the head to each."""
    ),
    new_code_cell(
        """ps, st = results[False][0], results[False][1]
budgets = (1, 2, 3, 4, 6, 8, 12, 16, 30)


@jax.jit
def anytime_accuracy(ps, st, x, y):
    _, _, solution = forward(ps, st, x, anytime=budgets)
    logits = jax.vmap(lambda z: head.apply(ps[2], st[2], z)[0])(
        solution.anytime.z_star)
    return (jnp.mean(jnp.argmax(logits, -1) == y, axis=-1),
            jnp.mean(solution.anytime.nfe, axis=-1))


acc, nfe = anytime_accuracy(ps, st, images[test], labels[test])
# check one budget against a separate solve
_, _, separate = forward(ps, st, images[test], max_steps=4)
one = forward(ps, st, images[test], anytime=budgets)[2].anytime
assert np.array_equal(one.nfe[budgets.index(4)], separate.nfe)
for b, a, n in zip(budgets, acc, nfe):
    print(f"budget {b:2d}: mean nfe {float(n):5.2f}, test accuracy {float(a):.3f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.asarray(nfe), np.asarray(acc), "o-")
for b, a, n in zip(budgets, acc, nfe):
    ax.annotate(str(b), (float(n), float(a)), textcoords="offset points",
                xytext=(4, -10), fontsize=8)
ax.set_xlabel("mean nfe per sample (budget annotated)")
ax.set_ylabel("test accuracy")
ax.set_title("Accuracy against test-time compute, from one anytime solve")
plt.show()"""
    ),
    new_markdown_cell(
        """## 3. A sequence of related inputs: warm vs cold

A "video" morphs each test digit into another over 12 frames,
`x_t = (1 - t) a + t b`. `jaxdeq.scan_segments` solves the frames in one `lax.scan`,
each from the previous frame's fixed point; we compare with solving each frame
from scratch."""
    ),
    new_code_cell(
        """frames_n = 12
a, b = images[test[:64]], images[test[64:128]]
t = np.linspace(0, 1, frames_n, dtype=np.float32)[:, None, None]
video = (1 - t) * a[None] + t * b[None]          # (frames, batch, 64)
h_video = jax.vmap(lambda x: embed.apply(ps[0], st[0], x)[0])(video)

_, _, warm = jaxdeq.scan_segments(deq, ps[1], st[1], h_video, return_solution=True)
cold = jax.vmap(lambda h: deq.apply(ps[1], st[1], h, return_solution=True)[2].nfe)(
    h_video)
warm_nfe = np.asarray(warm.nfe).mean(1)
cold_nfe = np.asarray(cold).mean(1)
print("cold:", cold_nfe.round(1), "\\nwarm:", warm_nfe.round(1))
print(f"total: warm {warm_nfe.sum():.0f} vs cold {cold_nfe.sum():.0f} evaluations "
      "per sample")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(range(frames_n), cold_nfe, "o-", label="each frame from scratch")
ax.plot(range(frames_n), warm_nfe, "s-", label="warm start from the previous frame")
ax.set_xlabel("frame")
ax.set_ylabel("mean nfe per sample")
ax.set_ylim(bottom=0)
ax.legend()
plt.show()"""
    ),
    new_markdown_cell(
        """## 4. A fallback solver

Plain fixed-point iteration is cheap per step but stalls where the cell is barely
contractive. With `fallback=jaxdeq.Anderson(...)`, each sample whose primary solve
fails is continued by Anderson from its best iterate, inside the same compiled
solve; `solution.fallback` says which. Samples that succeeded are bit-identical to a
solve without fallback."""
    ),
    new_code_cell(
        """primary = optx.FixedPointIteration(rtol=1e-3, atol=1e-6, norm=optx.two_norm)
plain = jaxdeq.DeepEquilibriumNetwork(deq.model, primary, max_steps=20)
rescued = jaxdeq.DeepEquilibriumNetwork(deq.model, primary, max_steps=20,
                                        fallback=solver)
h = embed.apply(ps[0], st[0], images[test])[0]
z_plain, _, sol_plain = plain.apply(ps[1], st[1], h, return_solution=True)
z_rescued, _, sol = rescued.apply(ps[1], st[1], h, return_solution=True)
ok = ~np.asarray(sol.fallback)
assert np.array_equal(np.asarray(z_plain)[ok], np.asarray(z_rescued)[ok])
for name, s in (("fixed-point iteration", sol_plain), ("with Anderson fallback", sol)):
    print(f"{name:24s}: converged {float(np.mean(s.result == 0)):.3f}, "
          f"mean nfe {float(np.mean(s.nfe)):.1f}")
print(f"{int(np.sum(sol.fallback))} of {len(h)} samples fell back")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist([np.asarray(sol_plain.relative_residual_norm),
         np.asarray(sol.relative_residual_norm)], bins=np.logspace(-6, 0, 25),
        label=["fixed-point iteration", "with Anderson fallback"])
ax.axvline(1e-3, color="k", ls="--", lw=1)
ax.set_xscale("log")
ax.set_xlabel("relative residual ||f(z) - z|| / ||f(z)||")
ax.set_ylabel("samples")
ax.legend()
plt.show()"""
    ),
]


def main():
    nb = new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = pathlib.Path(__file__).with_name("07_reuse_and_anytime.ipynb")
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
