"""Writes 04_interop.ipynb (kept so the notebook's source is reviewable as code)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        """# One DEQ block, from Flax and from Equinox

jaxdeq models are pure `init`/`apply` descriptions, so the same equilibrium block can
sit inside a model written with any JAX library:

* `jaxdeq.flax.DEQ(block)` is a `flax.linen` module: its parameters live in
  `"params"`, its state (the PRNG key, the cell's state) in the `"deq_state"`
  collection (`jaxdeq.flax.NNXDEQ` is the NNX counterpart);
* `jaxdeq.equinox.DEQ(block, x, key=key)` is an `eqx.Module` holding the block's
  parameters (trainable) and state; `deq(x, return_state=True)` also returns the new
  state.

Neither state depends on the batch. The solve's statistics (a
`jaxdeq.DeepEquilibriumSolution`: per-sample nfe, residuals, outcomes) come back on
request, `return_solution=True`, as one more output of the call.

Both are trained below, with optax, on scikit-learn's 8x8 digits (shipped with
scikit-learn, no download); then the Equinox model is checkpointed with orbax and
restored bit for bit."""
    ),
    nbf.v4.new_code_cell(
        """import tempfile

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxdeq
import jaxdeq.equinox
import jaxdeq.flax
from jaxdeq import nn

digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(
    x_all, digits.target.astype(np.int32), train_size=512, test_size=256,
    random_state=0, stratify=digits.target)
x_train, x_test = jnp.asarray(x_train), jnp.asarray(x_test)
x_train.shape, x_test.shape"""
    ),
    nbf.v4.new_markdown_cell(
        """## The block

The cell is `f(z, x) = tanh(W z + x)`; `W` starts small, so `f` is a contraction and
Anderson acceleration finds `z*` in a few steps. Gradients come from the implicit
function theorem (the default `ImplicitAdjoint`)."""
    ),
    nbf.v4.new_code_cell(
        """WIDTH = 32
small = jax.nn.initializers.normal(0.5 / np.sqrt(WIDTH))
block = jaxdeq.DeepEquilibriumNetwork(
    nn.Chain(
        nn.Parallel(jnp.add, nn.Dense(WIDTH, WIDTH, use_bias=False, kernel_init=small),
                    nn.NoOpLayer()),
        nn.WrappedFunction(jnp.tanh)),
    jaxdeq.Anderson(rtol=1e-4, atol=1e-5),
    max_steps=16)
STEPS = 40
optimizer = optax.adam(1e-2)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()"""
    ),
    nbf.v4.new_markdown_cell(
        """## From Flax (linen)

`jaxdeq.flax.DEQ(block)` is used like any linen layer in a `@compact` method. Apply
with `mutable=["deq_state"]` to get the block's new state (the advanced PRNG key);
`return_solution=True` makes the block return `(z, solution)`."""
    ),
    nbf.v4.new_code_cell(
        """class FlaxClassifier(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.Dense(WIDTH)(x)
        z, solution = jaxdeq.flax.DEQ(block)(h, return_solution=True)
        return linen.Dense(10)(z), solution


variables = FlaxClassifier().init(jax.random.key(0), x_train)
params, deq_state = variables["params"], variables["deq_state"]
opt_state = optimizer.init(params)


@jax.jit
def flax_step(params, deq_state, opt_state, x, y):
    def loss_fn(params):
        (logits, _), updates = FlaxClassifier().apply(
            {"params": params, "deq_state": deq_state}, x, mutable=["deq_state"])
        return cross_entropy(logits, y), updates["deq_state"]

    (loss, deq_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), deq_state, opt_state, loss


flax_losses = []
for _ in range(STEPS):
    params, deq_state, opt_state, loss = flax_step(
        params, deq_state, opt_state, x_train, y_train)
    flax_losses.append(float(loss))

logits, solution = FlaxClassifier().apply(
    {"params": params, "deq_state": deq_state}, x_test)
flax_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
print(f"loss {flax_losses[0]:.3f} -> {flax_losses[-1]:.3f}, test accuracy "
      f"{flax_accuracy:.3f}, mean Anderson steps {float(solution.nfe.mean()):.1f}")"""
    ),
    nbf.v4.new_markdown_cell(
        """## From Equinox

`jaxdeq.equinox.DEQ` holds the block's `ps` (trained by `eqx.filter_value_and_grad`)
and `st` (read through `stop_gradient`: a buffer). The model returns the new state
and the solution alongside its logits (`return_state=True, return_solution=True`),
and the training step stores the state with `eqx.tree_at`, as with `eqx.nn.State`. jaxdeq models are batch-first, so the per-sample Equinox layers are
`vmap`ped around the block."""
    ),
    nbf.v4.new_code_cell(
        """class EquinoxClassifier(eqx.Module):
    embed: eqx.nn.Linear
    deq: jaxdeq.equinox.DEQ
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(64, WIDTH, key=k1)
        self.deq = jaxdeq.equinox.DEQ(block, jnp.ones((1, WIDTH)), key=k2)
        self.head = eqx.nn.Linear(WIDTH, 10, key=k3)

    def __call__(self, x):
        z, st, solution = self.deq(
            jax.vmap(self.embed)(x), return_state=True, return_solution=True)
        return jax.vmap(self.head)(z), st, solution


net = EquinoxClassifier(jax.random.key(0))
eqx_opt_state = optimizer.init(eqx.filter(net, eqx.is_inexact_array))


@eqx.filter_jit
def equinox_step(net, opt_state, x, y):
    @eqx.filter_value_and_grad(has_aux=True)
    def loss_fn(net):
        logits, st, _ = net(x)
        return cross_entropy(logits, y), st

    (loss, st), grads = loss_fn(net)
    updates, opt_state = optimizer.update(grads, opt_state)
    net = eqx.apply_updates(net, updates)
    return eqx.tree_at(lambda n: n.deq.st, net, st), opt_state, loss


equinox_losses = []
for _ in range(STEPS):
    net, eqx_opt_state, loss = equinox_step(net, eqx_opt_state, x_train, y_train)
    equinox_losses.append(float(loss))

logits, _, solution = eqx.filter_jit(net)(x_test)
equinox_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
print(f"loss {equinox_losses[0]:.3f} -> {equinox_losses[-1]:.3f}, test accuracy "
      f"{equinox_accuracy:.3f}, mean Anderson steps "
      f"{float(solution.nfe.mean()):.1f}")"""
    ),
    nbf.v4.new_code_cell(
        """fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(flax_losses, label=f"Flax (test acc {flax_accuracy:.2f})")
ax.plot(equinox_losses, label=f"Equinox (test acc {equinox_accuracy:.2f})")
ax.set(xlabel="adam step", ylabel="training cross-entropy",
       title="the same DEQ block in two frameworks")
ax.legend()
fig.tight_layout()
assert flax_losses[-1] < flax_losses[0] and equinox_losses[-1] < equinox_losses[0]"""
    ),
    nbf.v4.new_markdown_cell(
        """## Checkpoints

`jaxdeq.save_checkpoint` writes any pytree of arrays with orbax-checkpoint (typed PRNG
keys in `st` and optax states included); `jaxdeq.load_checkpoint` restores it into
the structure of a template, here a freshly built model. The template must match in
shapes too; `st` holds nothing shaped by the batch, so a model that was never called
is a valid template."""
    ),
    nbf.v4.new_code_cell(
        """path = tempfile.mkdtemp() + "/equinox_classifier"
jaxdeq.save_checkpoint(path, {"model": net, "opt_state": eqx_opt_state})
fresh = EquinoxClassifier(jax.random.key(1))
template = {"model": fresh,
            "opt_state": optimizer.init(eqx.filter(fresh, eqx.is_inexact_array))}
restored = jaxdeq.load_checkpoint(path, template)
same = np.array_equal(eqx.filter_jit(net)(x_test)[0],
                      eqx.filter_jit(restored["model"])(x_test)[0])
print("bit-identical logits after restore:", same)
assert same"""
    ),
    nbf.v4.new_markdown_cell(
        """Cells can come from other libraries too: `nn.from_flax(linen_module)`,
`nn.from_nnx(nnx_module)` and `nn.from_equinox(eqx_module)` turn modules into jaxdeq
layers (parameters as `ps`, mutable collections such as `batch_stats` as `st`). A
cell with BatchNorm in training mode couples the samples of a batch: give its DEQ
`joint_solve=True`. See `docs/interop.md` for what works with what."""
    ),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
}
nbf.write(nb, "notebooks/04_interop.ipynb")
