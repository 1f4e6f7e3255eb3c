"""Writes `06_sequence_model.ipynb` (unexecuted): `python notebooks/_make_06.py`.
With `JAXDEQ_NOTEBOOK_TINY=1` in the kernel's environment the notebook runs at tiny
settings (the test suite does this)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        """# A DEQ sequence model: character-level language modelling

The first DEQs (Bai, Kolter and Koltun, 2019) were sequence models: one
weight-tied transformer block, solved to its fixed point, with one state per token.
`jaxdeq.deq_sequence_model` builds a small one,

```
tokens -> one-hot -> Dense + positions = u
       -> DEQ[z* = LN(h + MLP(h)), h = LN(u + CausalAttention(z*))] -> Dense -> logits
```

and we train it to predict the next character of the English text that ships with
Python (`pydoc_data.topics`, the help topics of the `help()` utility), against an
explicit model of the same width with two untied blocks. We report validation bits
per character and the DEQ's function evaluations per token (every evaluation of the
block updates every token's state once)."""
    ),
    new_code_cell(
        """import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from pydoc_data.topics import topics

import jaxdeq
from jaxdeq import nn

TINY = os.environ.get("JAXDEQ_NOTEBOOK_TINY") == "1"  # the test suite's setting
if TINY:
    width, heads, context, batch_size, steps, eval_every = 16, 2, 16, 4, 6, 3
else:
    width, heads, context, batch_size, steps, eval_every = 64, 4, 64, 32, 400, 100

start = time.perf_counter()
text = "".join(topics[key] for key in sorted(topics))
alphabet = sorted(set(text))
ids = np.array([alphabet.index(c) for c in text], dtype=np.int32)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
print(f"{len(text):,} characters, alphabet of {len(alphabet)}; "
      f"{len(train_ids):,} train / {len(val_ids):,} validation")

rng = np.random.default_rng(0)


def batch(source, size):
    starts = rng.integers(0, len(source) - context - 1, size)
    window = np.stack([source[s : s + context + 1] for s in starts])
    return window[:, :-1], window[:, 1:]


val_batches = [batch(val_ids, batch_size) for _ in range(2 if TINY else 20)]"""
    ),
    new_markdown_cell(
        """## The models

The state enters the DEQ's block only through the attention, whose output
projection (like the MLP's) starts at a tenth of its usual size, so the block is a
contraction at initialisation; the builder's default solver is Anderson acceleration
with the normwise rule `||f(z) - z|| <= 1e-3 ||f(z)||`. Jacobian regularization keeps
it contractive during training. The explicit model applies two untied copies of the
same block from `z = 0`."""
    ),
    new_code_cell(
        """vocab = len(alphabet)
deq_model = jaxdeq.deq_sequence_model(
    vocab, width=width, num_heads=heads, jacobian_regularization="forward",
    max_steps=30,
)
embed, project, positions, _, readout = deq_model.layers


class TwoBlocks(nn.AbstractLayer):
    \"\"\"Two untied blocks, each applied once: z1 = f1(0, u), z2 = f2(z1, u).\"\"\"

    first: nn.AbstractLayer
    second: nn.AbstractLayer

    def init(self, key, u):
        k1, k2 = jax.random.split(key)
        (p1, s1), (p2, s2) = (
            self.first.init(k1, (u, u)),
            self.second.init(k2, (u, u)),
        )
        return (p1, p2), (s1, s2)

    def apply(self, ps, st, u):
        z, _ = self.first.apply(ps[0], st[0], (jnp.zeros_like(u), u))
        z, _ = self.second.apply(ps[1], st[1], (z, u))
        return z, st


explicit_model = nn.Chain(
    embed, project, positions,
    TwoBlocks(jaxdeq.causal_transformer_block(width, heads),
              jaxdeq.causal_transformer_block(width, heads)),
    readout,
)


def solve_stats(model, ps, st, x):
    \"\"\"Logits, state and the DEQ's per-sample solve statistics.\"\"\"
    logits, st, solutions = model.apply(ps, st, x, return_solution=True)
    return logits, st, solutions[3]


def count(ps):
    return sum(leaf.size for leaf in jax.tree.leaves(ps))


x0, _ = batch(train_ids, batch_size)
ps, st = deq_model.init(jax.random.key(0), x0)
_, _, solution = jax.jit(solve_stats, static_argnums=0)(deq_model, ps, st, x0)
print(
    f"DEQ at init: {jnp.mean(solution.result == jaxdeq.RESULTS.successful):.0%} of "
    f"sequences converged, nfe per token {jnp.mean(solution.nfe):.1f}"
)
print("parameters: DEQ", count(ps), "explicit",
      count(explicit_model.init(jax.random.key(0), x0)[0]))"""
    ),
    new_markdown_cell(
        """## Training

Adam with warm-up and cosine decay, the same for both, `steps` batches of
`batch_size` random windows of `context` characters; the DEQ's loss adds
`0.5 * solution.jacobian_loss`. Every `eval_every` steps: validation bits per
character (cross-entropy / ln 2) on fixed held-out windows."""
    ),
    new_code_cell(
        """def train(model, is_deq):
    ps, st = model.init(jax.random.key(0), x0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(ps)

    def forward(ps, st, x, y):
        if is_deq:
            logits, st, sol = solve_stats(model, ps, st, x)
            extras = (
                sol.jacobian_loss,
                jnp.mean(sol.nfe),
                jnp.mean(sol.result == jaxdeq.RESULTS.successful),
            )
        else:
            logits, st = model.apply(ps, st, x)
            extras = (0.0, jnp.nan, jnp.nan)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce, st, extras

    def loss_fn(ps, st, x, y):
        ce, st, (jacobian_loss, nfe, converged) = forward(ps, st, x, y)
        return ce + 0.5 * jacobian_loss, (st, ce, nfe, converged)

    @jax.jit
    def train_step(ps, st, opt_state, x, y):
        grads, (st, *stats) = jax.grad(loss_fn, has_aux=True)(ps, st, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        return optax.apply_updates(ps, updates), st, opt_state, stats

    @jax.jit
    def evaluate(ps, st, x, y):
        ce, _, (_, nfe, converged) = forward(ps, st, x, y)
        return ce, nfe, converged

    history = {"step": [], "val_bpc": [], "val_nfe": [], "val_converged": [],
               "train_bpc": []}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batch(train_ids, batch_size)
        ps, st, opt_state, (ce, nfe, converged) = train_step(ps, st, opt_state, x, y)
        history["train_bpc"].append(float(ce) / np.log(2))
        if step % eval_every == 0 or step == steps:
            stats = np.array([[float(v) for v in evaluate(ps, st, vx, vy)]
                              for vx, vy in val_batches])
            history["step"].append(step)
            history["val_bpc"].append(stats[:, 0].mean() / np.log(2))
            history["val_nfe"].append(stats[:, 1].mean())
            history["val_converged"].append(stats[:, 2].mean())
    history["seconds"] = time.perf_counter() - t0
    return history


results = {name: train(model, name == "DEQ")
           for name, model in (("DEQ", deq_model), ("explicit 2-layer", explicit_model))}
for name, h in results.items():
    line = f"{name:16s} validation {h['val_bpc'][-1]:.3f} bits/char, {h['seconds']:.0f} s"
    if name == "DEQ":
        line += (f", nfe per token {h['val_nfe'][-1]:.1f}, "
                 f"{h['val_converged'][-1]:.0%} of sequences converged")
    print(line)"""
    ),
    new_markdown_cell(
        """## Results

Left: validation bits per character over training. Right: the DEQ's function
evaluations per token and the fraction of sequences whose solve converged, on the
validation windows."""
    ),
    new_code_cell(
        """fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name, h in results.items():
    ax1.plot(h["step"], h["val_bpc"], marker="o", label=name)
ax1.set(xlabel="step", ylabel="bits / character", title="validation")
ax1.legend()
h = results["DEQ"]
ax2.plot(h["step"], h["val_nfe"], marker="o", label="nfe per token")
ax2.set(xlabel="step", ylabel="nfe per token", title="DEQ solver")
twin = ax2.twinx()
twin.plot(h["step"], h["val_converged"], marker="s", color="C1")
twin.set_ylim(-0.02, 1.02)
twin.set_ylabel("fraction converged")
fig.tight_layout()
if not TINY:
    fig.savefig("../docs/figures/zoo_sequence.png", dpi=80)
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
    path = pathlib.Path(__file__).with_name("06_sequence_model.ipynb")
    nbformat.write(notebook, path)


if __name__ == "__main__":
    main()
