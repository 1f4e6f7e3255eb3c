"""Gradient modes: every mode against the exact (implicit) gradient, under `jit`,
per-sample and joint solves and an outer `vmap`; the backward solve's own
tolerances and cap; train/eval budgets without retracing."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import jaxdeq
from helpers import dense_cell, max_rel_error

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
EXACT = jaxdeq.ImplicitAdjoint(rtol=1e-13)


def _model(adjoint, *, scale=0.7, joint=False, max_steps=300, **kw):
    return jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, scale),
        optx.FixedPointIteration(rtol=1e-13, atol=1e-13),
        adjoint=adjoint,
        max_steps=max_steps,
        joint_solve=joint,
        **kw,
    )


def _loss(model, st, x):
    return lambda ps: jnp.sum(jnp.sin(model.apply(ps, st, x)[0]))


_GRADS = {}


def _grad(adjoint, seed=0, x=X, **kw):
    """The gradient of `_loss`, cached on the default input (compiles are slow)."""
    key = (adjoint, seed, tuple(sorted(kw.items()))) if x is X else None
    if key not in _GRADS:
        model = _model(adjoint, **kw)
        ps, st = model.init(jax.random.key(seed), x)
        grad = jax.jit(jax.grad(_loss(model, st, x)))(ps)
        if key is None:
            return grad
        _GRADS[key] = grad
    return _GRADS[key]


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "linear_solver",
    [
        "gmres",
        "fixed_point",
        lx.GMRES(rtol=1e-12, atol=1e-12),
        lx.BiCGStab(rtol=1e-12, atol=1e-12),
    ],
    ids=["gmres", "fixed_point", "lineax_gmres", "bicgstab"],
)
@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
def test_implicit_matches_unrolled(linear_solver, joint):
    unrolled = _grad(jaxdeq.UnrolledAdjoint(), joint=joint)
    implicit = _grad(
        jaxdeq.ImplicitAdjoint(linear_solver, rtol=1e-13, max_steps=500), joint=joint
    )
    assert max_rel_error(implicit, unrolled) < 1e-6


def test_phantom_gradient_approaches_the_exact_gradient():
    exact = _grad(EXACT)
    phantoms = [_grad(jaxdeq.PhantomGradient(steps, 0.5)) for steps in (1, 3, 10, 60)]
    cosines = [_cosine(phantom, exact) for phantom in phantoms]
    assert all(a < b for a, b in zip(cosines, cosines[1:], strict=False)), cosines
    assert cosines[-1] > 1 - 1e-9
    assert max_rel_error(phantoms[-1], exact) < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_gradient_correlates_on_contractive_cells(seed):
    x = jax.random.normal(jax.random.key(seed), (4, 3), jnp.float64)
    exact = _grad(EXACT, seed, x, scale=0.4)
    jfb = _grad(jaxdeq.OneStepGradient(), seed, x, scale=0.4)
    assert _cosine(jfb, exact) > 0.5


def _exact_values(xs):
    model = _model(EXACT)
    ps, st = model.init(jax.random.key(0), X)
    return np.array([_loss(model, st, x)(ps) for x in xs])


MODES = {
    "implicit": EXACT,
    "fixed_point": jaxdeq.ImplicitAdjoint("fixed_point", rtol=1e-12, max_steps=200),
    "lineax_gmres": jaxdeq.ImplicitAdjoint(lx.GMRES(rtol=1e-10, atol=1e-10)),
    "phantom": jaxdeq.PhantomGradient(10, 0.8),
    "one_step": jaxdeq.OneStepGradient(),
    "unrolled": jaxdeq.UnrolledAdjoint(),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_under_jit_vmap_and_joint_solve(mode):
    """Same forward value in every mode; per-sample and joint solves give the same
    gradient; an outer `vmap` over independent batches equals a loop."""
    xs = jnp.stack([X, -0.5 * X])
    grads = {}
    for joint in (False, True):
        model = _model(MODES[mode], joint=joint)
        ps, st = model.init(jax.random.key(0), X)

        def value_and_grad(ps, x, model=model, st=st):
            return jax.value_and_grad(_loss(model, st, x))(ps)

        values, grads[joint] = jax.jit(jax.vmap(value_and_grad, (None, 0)))(ps, xs)
        for i in range(len(xs) if not joint else 0):  # joint: compared below
            value, grad = jax.jit(value_and_grad)(ps, xs[i])
            assert np.allclose(values[i], value, rtol=1e-12, atol=1e-12)
            one = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], grads[joint])
            assert max_rel_error(one, grad) < 1e-9
        # Value-preserving: every mode's loss is the exact model's.
        assert np.allclose(values, _exact_values(xs), rtol=1e-12, atol=1e-12)
        assert np.all(np.isfinite(_flat(grads[joint])))
    assert max_rel_error(grads[True], grads[False]) < 1e-8


def test_implicit_backward_has_its_own_tolerance_and_cap():
    exact = _grad(EXACT)
    capped = _grad(jaxdeq.ImplicitAdjoint("fixed_point", max_steps=1, throw=False))
    loose = _grad(jaxdeq.ImplicitAdjoint(rtol=1e-1, max_steps=500))
    tight = _grad(jaxdeq.ImplicitAdjoint(rtol=1e-10, max_steps=500))
    # One backward step is `u = g`: the one-step (Jacobian-free) gradient.
    assert max_rel_error(capped, exact) > 1e-3
    assert max_rel_error(capped, _grad(jaxdeq.OneStepGradient())) < 1e-12
    assert max_rel_error(tight, exact) < max_rel_error(loose, exact)
    assert max_rel_error(tight, exact) < 1e-8


def test_train_and_eval_budgets_do_not_retrace():
    """The pattern: build the model with the largest budget; jitted train and eval
    steps take the budget as a traced argument; each compiles once."""
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.9),
        optx.FixedPointIteration(rtol=1e-10, atol=1e-10),
        adjoint=jaxdeq.ImplicitAdjoint(max_steps=20),
        max_steps=40,
    )
    ps, st = model.init(jax.random.key(0), X)

    @jax.jit
    def train_step(ps, st, budget):
        def loss(ps):
            z, new_st, solution = model.apply(
                ps, st, X, max_steps=budget, return_solution=True
            )
            return jnp.sum(z**2), (new_st, solution.nfe)

        (_, (new_st, nfe)), grads = jax.value_and_grad(loss, has_aux=True)(ps)
        ps = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, ps, grads)
        return ps, new_st, nfe

    @jax.jit
    def eval_step(ps, st, budget):
        z, new_st, new_st_solution = model.apply(
            ps, st, X, max_steps=budget, return_solution=True
        )
        return z, new_st_solution.nfe

    for budget in (3, 5):
        ps, st, nfe = train_step(ps, st, jnp.int32(budget))
        assert int(nfe[0]) == budget
    for budget in (4, 40):
        _, nfe = eval_step(ps, st, jnp.int32(budget))
        assert int(nfe.max()) <= budget
    assert int(nfe.max()) > 5
    assert train_step._cache_size() == 1
    assert eval_step._cache_size() == 1


def test_bad_gradient_mode_configuration():
    with pytest.raises(ValueError, match="steps"):
        jaxdeq.PhantomGradient(steps=0)
    with pytest.raises(ValueError, match="damping"):
        jaxdeq.PhantomGradient(steps=2, damping=0.0)
