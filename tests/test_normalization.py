"""WeightNorm and SpectralNorm (computed once per solve, not per iteration) and
VariationalDropout (one mask per solve, per sample)."""

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from jax.nn import initializers

import jaxdeq
from helpers import dense_cell
from jaxdeq import nn


def _cell(z_layer, *, dropout=None):
    """`tanh(z_layer(z) + U x)`, optionally with dropout on the state."""
    z_path = z_layer if dropout is None else nn.Chain(dropout, z_layer)
    return nn.Chain(
        nn.Parallel(jnp.add, z_path, nn.Dense(3, 3)), nn.WrappedFunction(jnp.tanh)
    )


def _small_dense(scale=0.3):
    return nn.Dense(3, 3, use_bias=False, kernel_init=initializers.normal(scale))


def _while_bodies(jaxpr):
    """The body jaxprs of every while loop in `jaxpr`, nested calls included."""
    bodies = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            bodies.append(eqn.params["body_jaxpr"].jaxpr)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            bodies.extend(_while_bodies(sub))
    return bodies


def _loop_primitives(model, x):
    ps, st = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda ps: model.apply(ps, st, x)[0])(ps).jaxpr
    bodies = _while_bodies(jaxpr)
    assert bodies
    return sorted(eqn.primitive.name for body in bodies for eqn in _all_eqns(body))


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


@pytest.mark.parametrize(
    "wrap",
    [nn.WeightNorm, lambda layer: nn.SpectralNorm(layer, n_power_iterations=3)],
    ids=["weight_norm", "spectral_norm"],
)
@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
def test_normalization_runs_once_per_solve_not_in_the_solver_loop(wrap, joint):
    """The solver loop of a normalized cell is the loop of the plain cell: the
    normalization (norms, power iteration, division) sits outside it. This fails if
    the normalization runs inside `apply` at every iteration."""
    x = jnp.ones((2, 3))

    def model(layer):
        return jaxdeq.DeepEquilibriumNetwork(
            _cell(layer),
            optx.FixedPointIteration(rtol=1e-6, atol=1e-6),
            joint_solve=joint,
        )

    plain = _loop_primitives(model(_small_dense()), x)
    normalized = _loop_primitives(model(wrap(_small_dense())), x)
    assert normalized == plain


def test_weight_norm_reparametrizes_the_kernel(getkey):
    layer = nn.WeightNorm(nn.Conv(3, 2, 4))
    x = jax.random.normal(getkey(), (2, 5, 5, 2), jnp.float64)
    ps, st = layer.init(getkey(), x)
    plain = nn.Conv(3, 2, 4)
    y_plain, _ = plain.apply(ps["layer"], {}, x)
    y, st = layer.apply(ps, st, x)
    assert np.allclose(y, y_plain)  # starts as the unwrapped layer
    ps = dict(ps, scale=2 * ps["scale"])
    prepared_ps, prepared_st = layer.prepare(ps, st)
    kernel = prepared_ps["normalized"]["kernel"]
    norms = jnp.sqrt(jnp.sum(kernel**2, axis=(0, 1, 2)))
    assert np.allclose(norms, ps["scale"])
    assert np.allclose(layer.apply(prepared_ps, prepared_st, x)[0], 2 * y)
    with pytest.raises(ValueError, match="kernel"):
        nn.WeightNorm(nn.NoOpLayer()).init(getkey(), x)


def test_spectral_norm_bounds_the_kernel_and_updates_once_per_forward(getkey):
    layer = nn.SpectralNorm(_small_dense(1.0), n_power_iterations=1)
    x = jax.random.normal(getkey(), (2, 3), jnp.float64)
    ps, st = layer.init(getkey(), x)
    kernel = ps["layer"]["kernel"]
    sigma = np.linalg.norm(kernel, ord=2)
    # A DEQ forward pass runs exactly one power-iteration step on the stored vector.
    model = jaxdeq.DeepEquilibriumNetwork(
        _cell(layer), optx.FixedPointIteration(rtol=1e-8, atol=1e-8), max_steps=100
    )
    model_ps, model_st = model.init(getkey(), x)
    u0 = model_st["model"][0][0]["u"]
    w = model_ps["model"][0][0]["layer"]["kernel"]
    v = w @ u0 / jnp.linalg.norm(w @ u0)
    u1 = w.T @ v / jnp.linalg.norm(w.T @ v)
    _, model_st = jax.jit(model.apply)(model_ps, model_st, x)
    assert np.allclose(model_st["model"][0][0]["u"], u1)
    # Repeated forward passes converge to the largest singular value.
    for _ in range(30):
        _, st = layer.prepare(ps, st)
    prepared_ps, _ = layer.prepare(ps, st)
    normalized = prepared_ps["normalized"]["kernel"]
    assert np.allclose(normalized * sigma, kernel, rtol=1e-8)
    # In inference mode the stored vector is used as is.
    frozen = eqx.nn.inference_mode(layer)
    _, st_frozen = frozen.apply(ps, st, x)
    assert np.array_equal(st_frozen["u"], st["u"])


def _dropout_model(rate=0.5, joint=False):
    return jaxdeq.DeepEquilibriumNetwork(
        _cell(_small_dense(0.3), dropout=nn.VariationalDropout(rate)),
        optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
        max_steps=200,
        joint_solve=joint,
    )


@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
def test_dropout_mask_is_fixed_within_a_solve_and_new_across_solves(joint):
    x = jnp.ones((3, 3), jnp.float64)  # identical samples
    model = _dropout_model(joint=joint)
    ps, st = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply, static_argnames="return_solution")
    z1, st1, st1_solution = apply(ps, st, x, return_solution=True)
    sol = st1_solution
    # A mask redrawn between iterations would keep the iteration from converging.
    assert np.all(sol.result == jaxdeq.RESULTS.successful)
    assert float(sol.residual_norm.max()) < 1e-10
    # Independent masks per sample: identical inputs, different fixed points.
    assert not np.allclose(z1[0], z1[1]) or not np.allclose(z1[1], z1[2])
    # Same state, same mask; the returned state draws a new mask.
    assert np.array_equal(apply(ps, st, x)[0], z1)
    z2, _ = apply(ps, st1, x)
    assert not np.allclose(z2, z1)
    # Gradients flow through the masked cell.
    grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)
    assert np.all(np.isfinite(jax.tree.leaves(grads)[0]))


def test_dropout_is_off_in_inference_mode():
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    model = _dropout_model()
    ps, st = model.init(jax.random.key(0), x)
    eval_model = eqx.nn.inference_mode(model)
    no_dropout = jaxdeq.DeepEquilibriumNetwork(
        _cell(_small_dense(0.3), dropout=nn.NoOpLayer()),
        optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
        max_steps=200,
    )
    z_eval, _ = eval_model.apply(ps, st, x)
    z_plain, _ = no_dropout.apply(ps, st, x)
    assert np.allclose(z_eval, z_plain)


def test_dropout_layer_on_its_own(getkey):
    x = jnp.ones((4, 6, 6, 8))
    layer = nn.VariationalDropout(0.25, broadcast_axes=(1, 2))
    ps, st = layer.init(getkey(), x)
    y1, st = layer.apply(ps, st, x)
    y2, _ = layer.apply(ps, st, x)
    assert set(np.unique(np.asarray(y1))) <= {0.0, 1 / 0.75}
    assert np.all(y1 == y1[:, :1, :1, :])  # one value per sample and channel
    assert not np.array_equal(y1, y2)  # a fresh mask per call
    with pytest.raises(ValueError, match="rate"):
        nn.VariationalDropout(1.0)
    with pytest.raises(ValueError, match="batch"):
        nn.VariationalDropout(0.1, broadcast_axes=(0,))


def test_containers_prepare_their_children(getkey):
    chain = nn.Chain(nn.WeightNorm(nn.Dense(3, 3)), dense_cell(3).layers[1])
    x = jnp.ones((2, 3))
    ps, st = chain.init(getkey(), x)
    prepared_ps, prepared_st = chain.prepare(ps, st)
    assert set(prepared_ps[0]) == {"normalized"}
    assert jax.tree.structure(prepared_st) == jax.tree.structure(st)
    assert np.allclose(
        chain.apply(prepared_ps, prepared_st, x)[0], chain.apply(ps, st, x)[0]
    )
