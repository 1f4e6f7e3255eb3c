"""Writes 03_gradient_modes.ipynb (kept so the notebook's source is reviewable as
code)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        """# Gradient modes: implicit, phantom, Neumann, SHINE, reversible, Jacobian-free

Every DEQ in jaxdeq computes the same forward value, the fixed point `z*`; the
`adjoint=` argument only decides which gradient is attached to it:

* `jaxdeq.ImplicitAdjoint()` (the default): the exact gradient of `z*` by the implicit
  function theorem, solving `u = g + J_f(z*)^T u` with cell VJPs (fixed-point
  iteration, Anderson, or a lineax solver such as GMRES);
* `jaxdeq.PhantomGradient(steps, damping)` (Geng et al., 2021): backpropagation
  through `steps` damped cell applications started at `z*`; it approaches the exact
  gradient as `steps` grows, at a fixed cost;
* `jaxdeq.NeumannGradient(steps, damping)` (the Neumann-series phantom gradient of
  the same paper): the truncated series `λ Σ_{i<k} ((1-λ) I + λ J^T)^i g`, every
  product taken at `z*`; `steps - 1` VJPs;
* `jaxdeq.ShineGradient(refine_steps)` (SHINE, Ramzi et al., 2022): with a
  `jaxdeq.Broyden` forward solve, the backward solve is replaced by Broyden's own
  low-rank estimate of the inverse Jacobian: no VJP at all, or a few refinement
  steps;
* `jaxdeq.ReversibleAdjoint()` (reversible DEQs, McCallum et al., 2025): with the
  `jaxdeq.Reversible` solver, whose coupled iteration can be inverted exactly, the
  backward pass reconstructs the forward trajectory from its last state and
  backpropagates through it: the exact gradient of what the forward did, with
  memory independent of the number of steps;
* `jaxdeq.OneStepGradient()` (Jacobian-free backprop, Fung et al., 2022): one cell
  application, i.e. `(I - J)^{-1}` replaced by the identity; the cheapest, and a
  descent direction when the cell is contractive.

We measure how close the cheap gradients are to the exact one, then train the same
classifier on scikit-learn's digits (no download) under each mode and compare the
training curves. At the end, the same trained model is evaluated with different
solver budgets without recompiling."""
    ),
    nbf.v4.new_code_cell(
        """import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optimistix as optx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxdeq
from jaxdeq import nn

digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(
    x_all, digits.target.astype(np.int32), test_size=0.2, random_state=0,
    stratify=digits.target)
x_train.shape, x_test.shape"""
    ),
    nbf.v4.new_markdown_cell(
        """The classifier: an input layer, a DEQ whose cell is `tanh(W z + x)` (with `W`
small enough at initialization for the cell to be contractive), and a linear head.
The DEQ solves per sample with Anderson acceleration to a relative residual of
`1e-4`, at most 30 steps; SHINE needs Broyden's method as the forward solver and the
reversible adjoint the reversible solver (same tolerance and cap; it counts one
cell evaluation per half-step of the paper's coupled iteration)."""
    ),
    nbf.v4.new_code_cell(
        """WIDTH = 64
MAX_STEPS = 30
small = jax.nn.initializers.normal(0.6 / np.sqrt(WIDTH))


SOLVERS = {
    "anderson": jaxdeq.Anderson(rtol=1e-4, atol=0.0, norm=optx.two_norm,
                                termination="normwise"),
    "broyden": jaxdeq.Broyden(rtol=1e-4, atol=0.0, norm=optx.two_norm,
                              termination="normwise"),
    "reversible": jaxdeq.Reversible(rtol=1e-4, atol=0.0, relaxation=0.8,
                                    norm=optx.two_norm, termination="normwise"),
}


def classifier(adjoint, solver="anderson"):
    cell = nn.Chain(
        nn.Parallel(jnp.add, nn.Dense(WIDTH, WIDTH, use_bias=False, kernel_init=small),
                    nn.NoOpLayer()),
        nn.WrappedFunction(jnp.tanh))
    solver = SOLVERS[solver]
    deq = jaxdeq.DeepEquilibriumNetwork(cell, solver, adjoint=adjoint,
                                        max_steps=MAX_STEPS)
    return nn.Chain(nn.Dense(64, WIDTH, activation=jnp.tanh), deq, nn.Dense(WIDTH, 10))


# name -> (gradient mode, forward solver)
MODES = {
    "implicit": (jaxdeq.ImplicitAdjoint(), "anderson"),
    "phantom (5 steps)": (jaxdeq.PhantomGradient(steps=5, damping=0.8), "anderson"),
    "Neumann (5 terms)": (jaxdeq.NeumannGradient(steps=5, damping=0.8), "anderson"),
    "SHINE (Broyden)": (jaxdeq.ShineGradient(), "broyden"),
    "reversible": (jaxdeq.ReversibleAdjoint(), "reversible"),
    "one-step (JFB)": (jaxdeq.OneStepGradient(), "anderson"),
}


def forward(model, ps, st, x, max_steps=None):
    \"\"\"The chain applied layer by layer, so that the DEQ gets a per-call budget.\"\"\"
    embed, deq, head = model.layers
    h, _ = embed.apply(ps[0], st[0], x)
    z, deq_st = deq.apply(ps[1], st[1], h, max_steps=max_steps)
    logits, _ = head.apply(ps[2], st[2], z)
    return logits, (st[0], deq_st, st[2])


def loss_fn(model, ps, st, x, y):
    logits, st = forward(model, ps, st, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), st"""
    ),
    nbf.v4.new_markdown_cell(
        """## How close are the cheap gradients?

At initialization, on one batch: the cosine similarity of each mode's gradient with
the exact one (here an implicit gradient with tight tolerances), for phantom
gradients of growing length too. (The reversible mode's gradient is exact for the
iteration it ran, which stops at the forward tolerance, so its cosine with the
gradient at the exact fixed point is close to 1 but not equal.)"""
    ),
    nbf.v4.new_code_cell(
        """x0, y0 = jnp.asarray(x_train[:128]), jnp.asarray(y_train[:128])


def gradient(adjoint, solver="anderson"):
    model = classifier(adjoint, solver)
    ps, st = model.init(jax.random.key(0), x0)
    grads, _ = jax.jit(jax.grad(lambda ps: loss_fn(model, ps, st, x0, y0), has_aux=True))(ps)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])


exact = gradient(jaxdeq.ImplicitAdjoint(atol=1e-8, max_steps=200))


def cosine(g):
    return float(g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact)))


similarity = {name: round(cosine(gradient(*mode)), 5) for name, mode in MODES.items()}
phantom_steps = [1, 3, 10]
phantom_similarity = [round(cosine(gradient(jaxdeq.PhantomGradient(k, 0.8))), 5)
                      for k in phantom_steps]
similarity, dict(zip(phantom_steps, phantom_similarity))"""
    ),
    nbf.v4.new_markdown_cell(
        """## Training curves

The same initialization, data order and optimizer (Adam, `2e-3`, batches of 64) for
every mode; only the gradient differs."""
    ),
    nbf.v4.new_code_cell(
        """def train(adjoint, solver="anderson", epochs=5, batch=64, seed=0):
    model = classifier(adjoint, solver)
    ps, st = model.init(jax.random.key(seed), x0)
    opt = optax.adam(2e-3)
    opt_state = opt.init(ps)

    @jax.jit
    def step(ps, st, opt_state, x, y):
        (loss, st), grads = jax.value_and_grad(
            lambda ps: loss_fn(model, ps, st, x, y), has_aux=True)(ps)
        updates, opt_state = opt.update(grads, opt_state, ps)
        return optax.apply_updates(ps, updates), st, opt_state, loss

    @jax.jit
    def accuracy(ps, st, x, y):
        logits, _ = forward(model, ps, st, x)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(seed)
    history = {"loss": [], "test_acc": [], "seconds": []}
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        start = time.perf_counter()
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            ps, st, opt_state, loss = step(ps, st, opt_state, x_train[idx], y_train[idx])
            history["loss"].append(float(loss))
        history["seconds"].append(time.perf_counter() - start)
        history["test_acc"].append(float(accuracy(ps, st, x_test, y_test)))
    return model, ps, st, history


results = {name: train(*mode) for name, mode in MODES.items()}
{
    name: {"test accuracy": history["test_acc"][-1],
           "seconds after the first epoch": round(sum(history["seconds"][1:]), 2)}
    for name, (_, _, _, history) in results.items()
}"""
    ),
    nbf.v4.new_code_cell(
        """def smooth(values, width=10):
    return np.convolve(values, np.ones(width) / width, mode="valid")


fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for name, (_, _, _, history) in results.items():
    axes[0].plot(smooth(history["loss"]), label=name)
    axes[1].plot(range(1, len(history["test_acc"]) + 1), history["test_acc"],
                 marker="o", label=name)
    axes[2].plot(range(2, len(history["seconds"]) + 1), history["seconds"][1:],
                 marker="o", label=name)
axes[0].set(xlabel="step", ylabel="training loss (smoothed)", yscale="log")
axes[1].set(xlabel="epoch", ylabel="test accuracy")
axes[2].set(xlabel="epoch", ylabel="seconds per epoch (after compile)")
for ax in axes:
    ax.legend()
fig.tight_layout()"""
    ),
    nbf.v4.new_markdown_cell(
        """The Anderson-based modes share the forward solve, so they differ in the
backward pass only: JFB does one cell VJP, the Neumann series four, the phantom
gradient five, the implicit gradient as many as its backward solve needs; SHINE
does none (its forward is Broyden's), and the reversible mode one evaluation and
one VJP per forward step. On a contractive cell like this one the cheap gradients
point close to the exact one (first table: the phantom gradient closes in on it as
its number of steps grows, and the Neumann series, with every product at `z*`,
gives the same gradient here since the solve has converged), and most training
curves stay close. SHINE is only as good as Broyden's secant information along the
gradient's direction: its cosine is the lowest but JFB's, and its curve lags here;
`ShineGradient(refine_steps=k)` closes the gap at `k` VJPs. How well the cheap
gradients track the exact one during training depends on the cell staying
contractive (see `jaxdeq.spectral_radius` and Jacobian regularization). The
timings come from a shared CPU and a tiny model: read them as orders of magnitude,
and see `benchmarks/RESULTS.md` for measured costs.

## Evaluation with a different step budget, without recompiling

`apply(..., max_steps=n)` takes a traced integer, so one jitted evaluation function
serves every budget up to the model's `max_steps` (build the model with the largest
budget you will need; pass the training budget to the jitted train step the same
way)."""
    ),
    nbf.v4.new_code_cell(
        """model, ps, st, _ = results["implicit"]


@jax.jit
def evaluate(ps, st, x, y, budget):
    logits, _ = forward(model, ps, st, x, max_steps=budget)
    return jnp.mean(jnp.argmax(logits, -1) == y)


budget_accuracy = {
    budget: float(evaluate(ps, st, jnp.asarray(x_test), y_test, jnp.int32(budget)))
    for budget in (2, 5, 10, 30)
}
budget_accuracy, evaluate._cache_size()"""
    ),
]

nb = nbf.v4.new_notebook()
nb["cells"] = cells
nb["metadata"]["kernelspec"] = {
    "display_name": "Python 3",
    "language": "python",
    "name": "python3",
}
nbf.write(nb, "notebooks/03_gradient_modes.ipynb")
