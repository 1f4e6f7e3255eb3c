"""Interop: Flax (linen, NNX) and Equinox cells inside jaxdeq DEQs, and jaxdeq DEQs
inside linen, NNX and Equinox models."""

import functools
import re
import textwrap

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import jaxdeq
import jaxdeq.equinox
import jaxdeq.flax
from helpers import dense_cell, tree_allclose
from jaxdeq import nn

WIDTH = 3
TIGHT = dict(rtol=1e-9, atol=1e-12)


def _solver():
    return jaxdeq.Anderson(rtol=1e-12, atol=1e-12)


def _deq(cell, **kwargs):
    return jaxdeq.DeepEquilibriumNetwork(cell, _solver(), max_steps=64, **kwargs)


def _x(batch=4, width=WIDTH, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, width), dtype)


def _key_data(tree):
    """`tree` with PRNG keys replaced by their key data, for comparisons."""

    def data(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree.map(data, tree)


def _same(a, b, **tolerances):
    return tree_allclose(_key_data(a), _key_data(b), **tolerances)


def _loss(z):
    return jnp.sum(jnp.sin(z) * jnp.arange(z.size).reshape(z.shape))


#
# DEQs inside other libraries' models: the same gradients as the functional API
#


def _functional_grads(model, ps, st, x):
    def loss(ps, x):
        return _loss(model.apply(ps, st, x)[0])

    return jax.grad(loss, argnums=(0, 1))(ps, x)


def test_linen_deq_matches_functional_api():
    model = _deq(dense_cell(WIDTH))
    x = _x()
    module = jaxdeq.flax.DEQ(model)
    variables = module.init(jax.random.key(0), x)
    ps, st = dict(variables["params"]), dict(variables["deq_state"])
    assert set(ps) == {"model"} and set(st) == {"model", "key"}

    z, updates = module.apply(variables, x, mutable=["deq_state"])
    z_ref, st_ref = model.apply(ps, st, x)
    np.testing.assert_array_equal(z, z_ref)
    assert _same(dict(updates["deq_state"]), st_ref, rtol=0, atol=0)

    def loss(params, x):
        return _loss(module.apply({**variables, "params": params}, x))

    grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    grads_ref = _functional_grads(model, ps, st, x)
    assert _same(grads, grads_ref, **TIGHT)


def test_linen_deq_inside_a_larger_model_and_jit():
    model = _deq(dense_cell(WIDTH))

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Dense(WIDTH, param_dtype=jnp.float64)(x)
            return linen.Dense(2, param_dtype=jnp.float64)(jaxdeq.flax.DEQ(model)(h))

    x = _x(width=5)
    variables = Net().init(jax.random.key(0), x)
    assert set(variables) == {"params", "deq_state"}
    apply = jax.jit(lambda v, x: Net().apply(v, x, mutable=["deq_state"]))
    y, updates = apply(variables, x)
    y_eager, updates_eager = Net().apply(variables, x, mutable=["deq_state"])
    assert _same((y, updates), (y_eager, updates_eager), **TIGHT)
    h = linen.Dense(WIDTH, param_dtype=jnp.float64).apply(
        {"params": variables["params"]["Dense_0"]}, x
    )
    z, solution = jaxdeq.flax.DEQ(model).apply(
        {
            "params": variables["params"]["DEQ_0"],
            "deq_state": variables["deq_state"]["DEQ_0"],
        },
        h,
        return_solution=True,
    )
    assert np.all(solution.result == jaxdeq.RESULTS.successful)
    assert np.all(solution.nfe > 0)
    # The model's PRNG key advances in the state collection.
    old_key = variables["deq_state"]["DEQ_0"]["key"]
    new_key = updates["deq_state"]["DEQ_0"]["key"]
    assert not np.array_equal(
        jax.random.key_data(old_key), jax.random.key_data(new_key)
    )
    # Without the collection mutable, the state is read and left as it is.
    np.testing.assert_array_equal(Net().apply(variables, x), y_eager)


def test_linen_deq_per_call_budget():
    model = _deq(dense_cell(WIDTH))
    x = _x()
    module = jaxdeq.flax.DEQ(model)
    variables = module.init(jax.random.key(0), x)
    (_, solution), _ = module.apply(
        variables, x, max_steps=2, return_solution=True, mutable=["deq_state"]
    )
    assert np.all(solution.nfe <= 2)


def test_linen_deq_needs_its_state_collection():
    module = jaxdeq.flax.DEQ(_deq(dense_cell(WIDTH)))
    variables = module.init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match="deq_state"):
        module.apply({"params": variables["params"]}, _x())


def _values(variables):
    is_variable = lambda node: isinstance(node, nnx.Variable)
    return jax.tree.map(lambda v: v.get_value(), variables, is_leaf=is_variable)


def test_nnx_deq_matches_functional_api():
    model = _deq(dense_cell(WIDTH))
    x = _x()
    module = jaxdeq.flax.NNXDEQ(model, x, rngs=nnx.Rngs(0))
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    ps, st = _values(module.ps), module.st.get_value()

    def loss(module, x):
        return _loss(module(x))

    grads = nnx.grad(loss, argnums=(0, 1))(module, x)
    grads_ps = _values(nnx.merge(graphdef, grads[0], rest).ps)
    grads_ref = _functional_grads(model, ps, st, x)
    assert _same((grads_ps, grads[1]), grads_ref, **TIGHT)

    # Every call updates the state: the advanced key.
    _, st_ref = model.apply(ps, st, x)
    assert _same(module.st.get_value(), st_ref, **TIGHT)
    st = module.st.get_value()
    z = module(x)
    z_ref, st_ref = model.apply(ps, st, x)
    np.testing.assert_array_equal(z, z_ref)
    assert _same(module.st.get_value(), st_ref, rtol=0, atol=0)


def test_nnx_deq_trains_with_nnx_optimizer():
    model = _deq(dense_cell(WIDTH))
    x = _x(width=5)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(5, WIDTH, rngs=rngs, param_dtype=jnp.float64)
            self.deq = jaxdeq.flax.NNXDEQ(model, jnp.ones((1, WIDTH)), rngs=rngs)

        def __call__(self, x):
            return self.deq(self.embed(x))

    net = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(net, optax.adam(3e-2), wrt=nnx.Param)
    assert not nnx.state(optimizer.opt_state, jaxdeq.flax.DEQState)

    @nnx.jit
    def step(net, optimizer, x):
        def loss(net):
            z = net(x)
            return jnp.mean((z - 0.5) ** 2)

        value, grads = nnx.value_and_grad(loss)(net)
        optimizer.update(net, grads)
        return value

    losses = [float(step(net, optimizer, x)) for _ in range(5)]
    assert losses[-1] < losses[0]
    z, solution = net.deq(jnp.ones((4, WIDTH)), return_solution=True)
    assert solution.z_star.shape == (4, WIDTH)


def test_equinox_deq_matches_functional_api():
    model = _deq(dense_cell(WIDTH))
    x = _x()
    deq = jaxdeq.equinox.DEQ(model, x, key=jax.random.key(0))
    ps, st = model.init(jax.random.key(0), x)
    assert _same((deq.ps, deq.st), (ps, st), rtol=0, atol=0)

    @eqx.filter_grad
    def grad_fn(deq, x):
        return _loss(deq(x))

    grads = grad_fn(deq, x)
    grads_x = jax.grad(lambda x: _loss(deq(x)))(x)
    grads_ref = _functional_grads(model, ps, st, x)
    assert _same((grads.ps, grads_x), grads_ref, **TIGHT)
    # The state is a buffer: its gradient is zero.
    for leaf in jax.tree.leaves(eqx.filter(grads.st, eqx.is_inexact_array)):
        np.testing.assert_array_equal(leaf, 0)

    z, new_st = eqx.filter_jit(lambda d, x: d(x, return_state=True))(deq, x)
    z_ref, st_ref = model.apply(ps, st, x)
    assert _same((z, new_st), (z_ref, st_ref), **TIGHT)
    deq = eqx.tree_at(lambda d: d.st, deq, new_st)
    z, st_again, solution = deq(x, return_state=True, return_solution=True)
    assert _same(solution.z_star, z, **TIGHT)


def test_equinox_deq_jacobian_loss_carries_gradients():
    model = _deq(dense_cell(WIDTH), jacobian_regularization="reverse")
    x = _x()
    deq = jaxdeq.equinox.DEQ(model, x, key=jax.random.key(0))

    def loss(deq):
        _, solution = deq(x, return_solution=True)
        return solution.jacobian_loss

    def loss_ref(ps):
        return model.apply(ps, deq.st, x, return_solution=True)[2].jacobian_loss

    grads = eqx.filter_grad(loss)(deq)
    assert _same(grads.ps, jax.grad(loss_ref)(deq.ps), **TIGHT)
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads.ps))


@pytest.mark.parametrize(
    "make",
    [
        lambda: jaxdeq.flax.DEQ(nnx.Linear(2, 2, rngs=nnx.Rngs(0))).init(
            jax.random.key(0), _x()
        ),
        lambda: jaxdeq.flax.DEQ(_deq(dense_cell(WIDTH)), state_collection="params"),
        lambda: jaxdeq.flax.NNXDEQ(_deq(dense_cell(WIDTH)), _x(), rngs=0),
        lambda: jaxdeq.flax.NNXDEQ(linen.Dense(2), _x(), rngs=nnx.Rngs(0)),
        lambda: jaxdeq.equinox.DEQ(eqx.nn.Identity(), _x(), key=jax.random.key(0)),
        lambda: jaxdeq.flax.DEQ(nn.from_equinox(eqx.nn.Identity())).init(
            jax.random.key(0), _x()
        ),
    ],
)
def test_wrappers_reject_bad_configuration(make):
    with pytest.raises((TypeError, ValueError), match="model|rngs|state_collection"):
        make()


#
# Cells from other libraries inside a DEQ: the same gradients as jaxdeq's own layers
#


def _weights(seed=3):
    kw, ku, kb = jax.random.split(jax.random.key(seed), 3)
    w = 0.3 / np.sqrt(WIDTH) * jax.random.normal(kw, (WIDTH, WIDTH), jnp.float64)
    u = jax.random.normal(ku, (WIDTH, WIDTH), jnp.float64) / np.sqrt(WIDTH)
    b = 0.1 * jax.random.normal(kb, (WIDTH,), jnp.float64)
    return w, u, b


class _LinenCell(linen.Module):
    """`tanh(z W + x U + b)` on the tuple `(z, x)`."""

    @linen.compact
    def __call__(self, zx):
        z, x = zx
        dense = lambda name, bias: linen.Dense(
            WIDTH, use_bias=bias, name=name, param_dtype=jnp.float64
        )
        return jnp.tanh(dense("w", False)(z) + dense("u", True)(x))


class _NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs)
        self.u = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, zx):
        z, x = zx
        return jnp.tanh(self.w(z) + self.u(x))


class _EquinoxCell(eqx.Module):
    w: eqx.nn.Linear
    u: eqx.nn.Linear

    def __init__(self, key):
        kw, ku = jax.random.split(key)
        self.w = eqx.nn.Linear(WIDTH, WIDTH, use_bias=False, key=kw)
        self.u = eqx.nn.Linear(WIDTH, WIDTH, key=ku)

    def __call__(self, zx):
        z, x = zx
        return jnp.tanh(self.w(z) + self.u(x))


def _cells():
    """(name, cell, ps_from(w, u, b)) for the same cell written four ways."""
    native = dense_cell(WIDTH)

    def native_ps(w, u, b):
        return (({"kernel": w}, {"kernel": u, "bias": b}), {})

    def linen_ps(w, u, b):
        return {"w": {"kernel": w}, "u": {"kernel": u, "bias": b}}

    nnx_cell = _NNXCell(nnx.Rngs(0))

    def nnx_ps(w, u, b):
        return {"w": {"kernel": w}, "u": {"kernel": u, "bias": b}}

    eqx_cell = _EquinoxCell(jax.random.key(0))
    eqx_layer = nn.from_equinox(eqx_cell)
    eqx_template = eqx_layer.init(jax.random.key(0), None)[0]

    def eqx_ps(w, u, b):
        return eqx.tree_at(
            lambda c: (c.w.weight, c.u.weight, c.u.bias), eqx_template, (w.T, u.T, b)
        )

    return [
        ("native", native, native_ps),
        ("from_flax", nn.from_flax(_LinenCell()), linen_ps),
        ("from_nnx", nn.from_nnx(nnx_cell), nnx_ps),
        ("from_equinox", eqx_layer, eqx_ps),
    ]


def _cell_grads(cell, ps_from, x):
    model = _deq(cell)
    _, st = model.init(jax.random.key(0), x)

    def loss(weights, x):
        z, _ = model.apply({"model": ps_from(*weights)}, st, x)
        return _loss(z)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(_weights(), x)


@pytest.mark.parametrize("name", ["from_flax", "from_nnx", "from_equinox"])
def test_foreign_cell_in_deq_matches_native_cell(name):
    x = _x()
    cells = {cell_name: (cell, ps_from) for cell_name, cell, ps_from in _cells()}
    grads = _cell_grads(*cells[name], x)
    grads_ref = _cell_grads(*cells["native"], x)
    assert _same(grads, grads_ref, **TIGHT)


#
# BatchNorm cells: joint solve
#


class _BatchNormCell(linen.Module):
    """`tanh(BatchNorm(z W + x U))`: couples the samples of a batch."""

    train: bool

    @linen.compact
    def __call__(self, zx):
        z, x = zx
        small = linen.initializers.normal(0.3 / np.sqrt(WIDTH))
        f64 = dict(param_dtype=jnp.float64)
        h = linen.Dense(WIDTH, use_bias=False, kernel_init=small, **f64)(z)
        h = h + linen.Dense(WIDTH, **f64)(x)
        norm = linen.BatchNorm(use_running_average=not self.train, **f64)
        return jnp.tanh(norm(h))


def test_batch_norm_cell_joint_solve_updates_batch_stats():
    x = _x(batch=8)
    cell = nn.from_flax(_BatchNormCell(train=True))
    model = _deq(cell, joint_solve=True)
    ps, st = model.init(jax.random.key(0), x)
    z, new_st, new_st_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    solution = new_st_solution
    assert np.all(solution.result == jaxdeq.RESULTS.successful)
    assert np.max(solution.residual_norm) < 1e-9
    # The batch statistics are those of one training-mode call at the fixed point.
    _, expected = _BatchNormCell(train=True).apply(
        {"params": ps["model"], **st["model"]}, (z, x), mutable=["batch_stats"]
    )
    # (linen keeps batch statistics in float32, whatever the input.)
    assert _same(new_st["model"], expected, rtol=1e-6, atol=1e-7)
    assert not _same(new_st["model"], st["model"])

    # Gradients agree with unrolled differentiation of the same joint solve.
    unrolled = _deq(cell, joint_solve=True, adjoint=jaxdeq.UnrolledAdjoint())

    def loss(model, ps):
        return _loss(model.apply(ps, st, x)[0])

    grads = jax.jit(jax.grad(lambda ps: loss(model, ps)))(ps)
    grads_ref = jax.jit(jax.grad(lambda ps: loss(unrolled, ps)))(ps)
    assert _same(grads, grads_ref, rtol=1e-6, atol=1e-9)


def test_batch_norm_cell_inside_linen_deq_updates_batch_stats():
    x = _x(batch=8)
    module = jaxdeq.flax.DEQ(
        _deq(nn.from_flax(_BatchNormCell(train=True)), joint_solve=True)
    )
    variables = module.init(jax.random.key(0), x)
    _, updates = module.apply(variables, x, mutable=["deq_state"])
    old = variables["deq_state"]["model"]["batch_stats"]
    new = updates["deq_state"]["model"]["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert not _same(old, new)


def test_batch_norm_cell_eval_mode_is_per_sample():
    """With running averages (eval mode) the cell no longer couples samples, so the
    per-sample solve is right and agrees with the joint one."""
    x = _x(batch=8)
    train = _deq(nn.from_flax(_BatchNormCell(train=True)), joint_solve=True)
    ps, st = train.init(jax.random.key(0), x)
    _, st = train.apply(ps, st, x)
    cell = nn.from_flax(_BatchNormCell(train=False))
    z_joint, st_joint = _deq(cell, joint_solve=True).apply(ps, st, x)
    z_sample, st_sample = _deq(cell).apply(ps, st, x)
    assert _same(z_joint, z_sample, rtol=1e-9, atol=1e-10)
    assert _same(st_joint["model"], st["model"], rtol=0, atol=0)
    assert _same(st_sample["model"], st["model"], rtol=0, atol=0)


#
# Training on digits: a Flax CNN and an Equinox model, each with a DEQ block
#


def _digits(n=64):
    digits = load_digits()
    images = (digits.images[:n] / 16.0).astype(np.float32)[..., None]  # NHWC
    return jnp.asarray(images), jnp.asarray(digits.target[:n].astype(np.int32))


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_flax_cnn_with_deq_block_trains_on_digits():
    images, labels = _digits()
    channels = 4
    block = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(
            nn.Parallel(
                jnp.add,
                nn.Conv(
                    3,
                    channels,
                    channels,
                    use_bias=False,
                    kernel_init=jax.nn.initializers.normal(0.1),
                ),
                nn.NoOpLayer(),
            ),
            nn.WrappedFunction(jnp.tanh),
        ),
        jaxdeq.Anderson(rtol=1e-4, atol=1e-4),
        max_steps=12,
    )

    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Conv(channels, (3, 3))(x)
            z = jaxdeq.flax.DEQ(block)(h)
            return linen.Dense(10)(z.reshape(z.shape[0], -1))

    variables = CNN().init(jax.random.key(0), images)
    params, state = variables["params"], {"deq_state": variables["deq_state"]}
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, state, opt_state):
        def loss(params):
            logits, state_ = CNN().apply(
                {"params": params, **state}, images, mutable=["deq_state"]
            )
            return _cross_entropy(logits, labels), state_

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, value

    losses = []
    for _ in range(8):
        params, state, opt_state, value = step(params, state, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0], losses


class _EquinoxNet(eqx.Module):
    embed: eqx.nn.Linear
    deq: jaxdeq.equinox.DEQ
    head: eqx.nn.Linear

    def __init__(self, block, width, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(64, width, key=k1, dtype=jnp.float32)
        self.deq = jaxdeq.equinox.DEQ(block, jnp.ones((1, width), jnp.float32), key=k2)
        self.head = eqx.nn.Linear(width, 10, key=k3, dtype=jnp.float32)

    def __call__(self, x):
        z, st = self.deq(jax.vmap(self.embed)(x), return_state=True)
        return jax.vmap(self.head)(z), st


def test_equinox_model_with_deq_block_trains_on_digits():
    images, labels = _digits()
    x = images.reshape(images.shape[0], -1)
    width = 16
    block = jaxdeq.DeepEquilibriumNetwork(
        nn.Chain(
            nn.Parallel(
                jnp.add,
                nn.Dense(
                    width,
                    width,
                    use_bias=False,
                    kernel_init=jax.nn.initializers.normal(0.3 / np.sqrt(width)),
                ),
                nn.NoOpLayer(),
            ),
            nn.WrappedFunction(jnp.tanh),
        ),
        jaxdeq.Anderson(rtol=1e-4, atol=1e-4),
        max_steps=12,
    )
    net = _EquinoxNet(block, width, jax.random.key(0))
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(eqx.filter(net, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(net, opt_state):
        @eqx.filter_value_and_grad(has_aux=True)
        def loss(net):
            logits, st = net(x)
            return _cross_entropy(logits, labels), st

        (value, st), grads = loss(net)
        updates, opt_state = optimizer.update(grads, opt_state)
        net = eqx.apply_updates(net, updates)
        return eqx.tree_at(lambda n: n.deq.st, net, st), opt_state, value

    losses = []
    for _ in range(8):
        net, opt_state, value = step(net, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0], losses
    assert set(net.deq.st) == {"model", "key"}  # nothing batch-shaped


@pytest.mark.parametrize(
    "obj",
    [
        jaxdeq.flax.DEQ,
        jaxdeq.flax.NNXDEQ,
        jaxdeq.equinox.DEQ,
        jaxdeq.save_checkpoint,
        jaxdeq.load_checkpoint,
    ],
    ids=lambda obj: f"{obj.__module__}.{obj.__name__}",
)
def test_docstring_example_runs(obj):
    examples = re.findall(r"```python\n(.*?)```", obj.__doc__, re.DOTALL)
    assert examples
    for example in examples:
        exec(textwrap.dedent(example), {})
