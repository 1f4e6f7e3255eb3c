"""The Neumann-series phantom gradient, SHINE and the reversible solver with its
adjoint: each against its exact reference (float64), their backward statistics,
every model family, per-sample and joint solves, `jit` and `vmap`, and bad
combinations rejected when the model is built."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from jax.nn import initializers

import jaxdeq
from helpers import dense_cell, max_rel_error
from jaxdeq import nn

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
EXACT = jaxdeq.ImplicitAdjoint(rtol=1e-13, max_steps=500)
FIXED_POINT = optx.FixedPointIteration(rtol=1e-13, atol=1e-13)
BROYDEN = jaxdeq.Broyden(rtol=1e-12, atol=1e-12)


def _reversible(tol=1e-12, relaxation=0.8):
    return jaxdeq.Reversible(rtol=tol, atol=tol, relaxation=relaxation)


def _solve(model, ps, st, x):
    """`(y, solution)`: the one place these tests read a solve's solution."""
    y, _, solution = model.apply(ps, st, x, return_solution=True)
    return y, solution


def _model(adjoint, solver, *, cell=None, max_steps=300, **kw):
    return jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.7) if cell is None else cell,
        solver,
        adjoint=adjoint,
        max_steps=max_steps,
        **kw,
    )


def _loss(model, st, x=X):
    return lambda ps: jnp.sum(jnp.sin(_solve(model, ps, st, x)[0]))


def _grad(model, x=X):
    ps, st = model.init(jax.random.key(0), x)
    return jax.jit(jax.grad(_loss(model, st, x)))(ps)


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _recorder():
    calls = []
    return calls, calls.append


# Neumann series


def test_neumann_tends_to_the_implicit_gradient():
    exact = _grad(_model(EXACT, FIXED_POINT))
    long = _grad(_model(jaxdeq.NeumannGradient(300, 1.0), FIXED_POINT))
    short = _grad(_model(jaxdeq.NeumannGradient(3, 1.0), FIXED_POINT))
    assert max_rel_error(long, exact) < 1e-8
    assert max_rel_error(short, exact) > 1e-3


def test_neumann_equals_the_truncated_series():
    """Gradient w.r.t. the input, per sample, against `J_x^T λ Σ_{i<k} (B^T)^i g`
    with dense Jacobians at `z*`, `B = (1 - λ) I + λ J`; the forward-mode series
    is its transpose; the callback reports `k` products and the true residual
    `||(B^T)^k g||`."""
    steps, damping = 4, 0.7
    calls, callback = _recorder()
    cell = dense_cell(3, 0.7)
    model = _model(
        jaxdeq.NeumannGradient(steps, damping, callback), FIXED_POINT, cell=cell
    )
    ps, st = model.init(jax.random.key(0), X)
    z_star = _solve(model, ps, st, X)[0]

    def loss_x(x):
        return jnp.sum(jnp.sin(_solve(model, ps, st, x)[0]))

    grad_x = jax.jit(jax.grad(loss_x))(X)
    jax.effects_barrier()

    def f_one(z, x):
        return cell.apply(ps["model"], st["model"], (z[None], x[None]))[0][0]

    for i in range(X.shape[0]):
        jac_z = jax.jacfwd(f_one, 0)(z_star[i], X[i])
        jac_x = jax.jacfwd(f_one, 1)(z_star[i], X[i])
        b_t = (1 - damping) * np.eye(3) + damping * np.asarray(jac_z).T
        g = np.cos(np.asarray(z_star[i]))
        terms = [np.linalg.matrix_power(b_t, j) @ g for j in range(steps + 1)]
        u = damping * sum(terms[:steps])
        expected = np.asarray(jac_x).T @ u
        assert np.allclose(grad_x[i], expected, rtol=1e-12, atol=1e-14)
        stats = calls[i]
        assert int(stats.steps) == steps
        assert int(stats.result) == jaxdeq.RESULTS.successful
        assert np.isclose(stats.residual_norm, np.linalg.norm(terms[steps]), 1e-10)
    assert len(calls) == X.shape[0]  # one backward pass per sample

    # Forward mode: the same series with J, so <grad, v> == the JVP along v.
    v = jnp.cos(3.0 * X)
    jvp = jax.jit(lambda x, v: jax.jvp(loss_x, (x,), (v,))[1])(X, v)
    assert np.isclose(jvp, jnp.sum(grad_x * v), rtol=1e-12)


# SHINE


def _linear_cell(width):
    # ||W|| ~ 0.3. The estimate degrades as J grows: cosine 0.998 here, 0.990 at
    # 0.6 and 0.979 at 0.9 (width 4, Broyden memory 10).
    init = initializers.normal(0.3 / np.sqrt(width))
    return nn.Parallel(
        jnp.add,
        nn.Dense(width, width, use_bias=False, kernel_init=init),
        nn.Dense(width, width),
    )


def test_shine_on_a_linear_cell():
    """After convergence on an affine cell, Broyden's inverse estimate gives a
    gradient close to the exact one (with no product with `J` at all);
    refinement steps make it exact."""
    x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)

    def grad(adjoint):
        return _grad(_model(adjoint, BROYDEN, cell=_linear_cell(4)), x)

    exact = grad(EXACT)
    calls, callback = _recorder()
    shine = grad(jaxdeq.ShineGradient(callback=callback))
    refined = [grad(jaxdeq.ShineGradient(k)) for k in (5, 100)]
    jax.effects_barrier()
    assert _cosine(shine, exact) > 0.99
    errors = [max_rel_error(g, exact) for g in (shine, *refined)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-10
    assert [int(s.steps) for s in calls] == [1, 1, 1]  # the residual check only

    # Forward mode applies -H where reverse mode applies -H^T: <grad, v> == JVP.
    model = _model(jaxdeq.ShineGradient(), BROYDEN, cell=_linear_cell(4))
    ps, st = model.init(jax.random.key(0), x)

    def loss_x(x):
        return jnp.sum(jnp.sin(_solve(model, ps, st, x)[0]))

    v = jnp.cos(3.0 * x)
    grad_x = jax.jit(jax.grad(loss_x))(x)
    jvp = jax.jit(lambda x, v: jax.jvp(loss_x, (x,), (v,))[1])(x, v)
    assert np.isclose(jvp, jnp.sum(grad_x * v), rtol=1e-12)


# Reversible


@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
@pytest.mark.parametrize(
    "max_steps, tol",
    [(300, 1e-12), (7, 1e-12)],
    ids=["converged", "not_converged"],
)
def test_reversible_equals_unrolled_backprop(joint, max_steps, tol):
    def grad(adjoint):
        model = _model(
            adjoint, _reversible(tol), max_steps=max_steps, joint_solve=joint
        )
        return _grad(model), model

    reversible, model = grad(jaxdeq.ReversibleAdjoint())
    unrolled, _ = grad(jaxdeq.UnrolledAdjoint())
    ps, st = model.init(jax.random.key(0), X)
    result = _solve(model, ps, st, X)[1].result
    converged = max_steps == 300
    assert bool(np.all(result == jaxdeq.RESULTS.successful)) == converged
    assert max_rel_error(reversible, unrolled) < 1e-10


def test_reversible_gradient_flows_into_the_initial_state():
    """A Skip DEQ's init layer is trained through the reconstructed trajectory."""
    init = nn.Dense(3, 3, kernel_init=initializers.normal(0.5))

    def grad(adjoint):
        model = _model(adjoint, _reversible(1e-3), max_steps=6, init=init)
        return _grad(model)

    reversible = grad(jaxdeq.ReversibleAdjoint())
    unrolled = grad(jaxdeq.UnrolledAdjoint())
    assert np.abs(_flat(reversible["init"])).max() > 1e-3
    assert max_rel_error(reversible, unrolled) < 1e-10


def _temp_bytes(adjoint, max_steps):
    model = _model(adjoint, _reversible(0.0), max_steps=max_steps)
    ps, st = model.init(jax.random.key(0), X)

    def train_step(ps):
        grads = jax.grad(_loss(model, st))(ps)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, ps, grads)

    compiled = jax.jit(train_step).lower(ps).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_reversible_memory_is_flat_in_max_steps():
    """XLA's temporary buffers of a compiled train step (the measure of
    benchmarks/bench_gradients.py): the same at 10 and 1000 steps, where backprop
    through the unrolled solver grows."""
    reversible = [_temp_bytes(jaxdeq.ReversibleAdjoint(), n) for n in (10, 1000)]
    unrolled = [_temp_bytes(jaxdeq.UnrolledAdjoint(), n) for n in (10, 100)]
    assert reversible[1] == reversible[0]
    assert unrolled[1] > 3 * unrolled[0]


def test_reversibility_over_1000_steps():
    """1000 steps forward (no tolerance can stop them), then reconstructed
    backwards: the callback reports how far the reconstructed initial state is from
    the true one. With relaxation 0.01 it is float64 round-off (amplified by the
    inverse's volume growth `(1 - β)^-2` per pair of steps, e^20 over 1000 steps at
    most, far less in practice)."""
    calls, callback = _recorder()
    model = _model(
        jaxdeq.ReversibleAdjoint(callback),
        _reversible(0.0, relaxation=0.01),
        max_steps=1000,
        init=None,  # z0 = f(0, x), not zero
    )
    ps, st = model.init(jax.random.key(0), X)
    grads = jax.jit(jax.grad(_loss(model, st)))(ps)
    jax.effects_barrier()
    assert np.all(np.asarray(_solve(model, ps, st, X)[1].nfe) == 1000)
    assert np.all(np.isfinite(_flat(grads)))
    assert len(calls) == X.shape[0]
    for stats in calls:
        assert int(stats.steps) == 1000
        assert int(stats.result) == jaxdeq.RESULTS.successful
        assert float(stats.relative_residual_norm) < 1e-11


def test_reversible_adjoint_is_reverse_mode_only():
    model = _model(jaxdeq.ReversibleAdjoint(), _reversible(1e-6), max_steps=50)
    ps, st = model.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: _solve(model, ps, st, x)[0], (X,), (X,))


# Every mode, every family


def _multiscale(adjoint, solver, **kw):
    def dense(a, b):
        return nn.Dense(a, b, kernel_init=initializers.normal(0.4 / np.sqrt(a)))

    main = (
        nn.Chain(
            nn.Parallel(jnp.add, dense(3, 3), nn.Dense(3, 3, use_bias=False)),
            nn.WrappedFunction(jnp.tanh),
        ),
        nn.Chain(dense(2, 2), nn.WrappedFunction(jnp.tanh)),
    )
    mapping = ((nn.NoOpLayer(), dense(3, 2)), (dense(2, 3), nn.NoOpLayer()))
    return jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main, mapping, None, solver, ((3,), (2,)), adjoint=adjoint, max_steps=300, **kw
    )


FAMILIES = {
    "deq": lambda adjoint, solver, **kw: _model(adjoint, solver, **kw),
    "skip": lambda adjoint, solver, **kw: _model(
        adjoint, solver, init=nn.Dense(3, 3), **kw
    ),
    "multiscale": _multiscale,
}
MODES = {
    "neumann": (jaxdeq.NeumannGradient(60, 0.9), FIXED_POINT),
    "shine": (jaxdeq.ShineGradient(30), BROYDEN),
    "reversible": (jaxdeq.ReversibleAdjoint(), _reversible()),
}


def _sum_sin(y):
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(y))


FAST = {("neumann", "deq"), ("neumann", "skip"), ("reversible", "deq")}


@pytest.mark.parametrize(
    "mode, family",
    [
        pytest.param(
            mode, family, marks=() if (mode, family) in FAST else pytest.mark.slow
        )
        for mode in sorted(MODES)
        for family in sorted(FAMILIES)
    ],
)
def test_every_family_joint_jit_vmap(mode, family):
    """The mode's value is its solver's (the implicit mode's over the same
    solver); its gradient is close to the exact one, per-sample and joint alike;
    an outer `vmap` over batches equals a loop."""
    adjoint, solver = MODES[mode]
    xs = jnp.stack([X, -0.5 * X])

    def value_and_grad(model):
        ps, st = model.init(jax.random.key(0), X)

        def fn(ps, x):
            return jax.value_and_grad(lambda ps: _sum_sin(_solve(model, ps, st, x)[0]))(
                ps
            )

        return ps, jax.jit(jax.vmap(fn, (None, 0))), jax.jit(fn)

    ps, exact_fn, _ = value_and_grad(FAMILIES[family](EXACT, solver))
    exact_values, exact_grads = exact_fn(ps, xs)
    grads = {}
    for joint in (False, True):
        model = FAMILIES[family](adjoint, solver, joint_solve=joint)
        ps, batched_fn, fn = value_and_grad(model)
        values, grads[joint] = batched_fn(ps, xs)
        assert np.allclose(values, exact_values, rtol=1e-10, atol=1e-10)
        assert _cosine(grads[joint], exact_grads) > 1 - 1e-6
        value, grad = fn(ps, xs[1])
        assert np.isclose(value, values[1], rtol=1e-12)
        one = jax.tree_util.tree_map(lambda leaf: leaf[1], grads[joint])
        assert max_rel_error(one, grad) < 1e-9


# Bad combinations


@pytest.mark.parametrize(
    "adjoint, solver",
    [
        (jaxdeq.ShineGradient(), jaxdeq.Anderson(rtol=1e-6, atol=1e-6)),
        (jaxdeq.ShineGradient(), _reversible()),
        (jaxdeq.ShineGradient(), diffrax.Tsit5()),
        (jaxdeq.ReversibleAdjoint(), BROYDEN),
        (jaxdeq.ReversibleAdjoint(), FIXED_POINT),
        (jaxdeq.ReversibleAdjoint(), diffrax.Tsit5()),
    ],
    ids=[
        "shine_anderson",
        "shine_reversible",
        "shine_diffrax",
        "reversible_broyden",
        "reversible_fixed_point",
        "reversible_diffrax",
    ],
)
@pytest.mark.parametrize("family", ["deq", "multiscale"])
def test_bad_combinations_raise_at_construction(adjoint, solver, family):
    with pytest.raises(ValueError, match="^adjoint: .*solver is"):
        FAMILIES[family](adjoint, solver)


def test_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        jaxdeq.NeumannGradient(steps=0)
    with pytest.raises(ValueError, match="damping"):
        jaxdeq.NeumannGradient(steps=3, damping=1.5)
    with pytest.raises(TypeError, match="steps"):
        jaxdeq.NeumannGradient(steps=2.0)
    with pytest.raises(ValueError, match="refine_steps"):
        jaxdeq.ShineGradient(refine_steps=-1)
    with pytest.raises(TypeError, match="callback"):
        jaxdeq.ReversibleAdjoint(callback=3)
    with pytest.raises(ValueError, match="relaxation"):
        jaxdeq.Reversible(rtol=1e-6, atol=1e-6, relaxation=1.0)
    with pytest.raises(ValueError, match="relaxation"):
        jaxdeq.Reversible(rtol=1e-6, atol=1e-6, relaxation=2.0)
