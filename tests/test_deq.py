"""DeepEquilibriumNetwork / SkipDeepEquilibriumNetwork: the seed's examples and test
matrix, gradients against finite differences and unrolled differentiation,
transformations, Jacobian regularization, fixed depth and bad input."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import jaxdeq
from helpers import (
    central_difference_grad,
    conv_cell,
    dense_cell,
    max_rel_error,
    tree_allclose,
)
from jaxdeq import nn


def test_seed_first_example():
    model = jaxdeq.DeepEquilibriumNetwork(
        nn.Parallel(
            jnp.add, nn.Dense(2, 2, use_bias=False), nn.Dense(2, 2, use_bias=False)
        ),
        diffrax.Tsit5(),
    )
    x = jnp.ones((1, 2), jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    y, st, st_solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        ps, st, x
    )
    assert y.shape == (1, 2)
    assert y.dtype == jnp.float32  # diffrax promotes to float64 under x64; we don't
    sol = st_solution
    assert isinstance(sol, jaxdeq.DeepEquilibriumSolution)
    assert sol.nfe.shape == (1,) and int(sol.nfe[0]) > 0


SOLVERS = {
    "newton": lambda: optx.Newton(rtol=1e-6, atol=1e-6),
    "fixed_point": lambda: optx.FixedPointIteration(rtol=1e-6, atol=1e-6),
    "tsit5": lambda: diffrax.Tsit5(),
}


def _variant(name, cell, solver, **kw):
    if name == "deq":
        return jaxdeq.DeepEquilibriumNetwork(cell, solver, **kw)
    if name == "skip":
        init = nn.WrappedFunction(lambda x: 0.5 * x)
        return jaxdeq.SkipDeepEquilibriumNetwork(cell, init, solver, **kw)
    return jaxdeq.SkipDeepEquilibriumNetwork(cell, None, solver, **kw)


def _seed_matrix():
    """The full solver x regularization x variant x cell matrix; a covering subset
    (every solver with every regularization, variants and cells cycling) runs by
    default, the rest under `make test-slow`."""
    jacs = [None, "forward", "reverse", "finite_difference"]
    variants = ["deq", "skip", "skip_reg"]
    cells = ["dense", "conv"]
    for i, solver in enumerate(sorted(SOLVERS)):
        for j, jac in enumerate(jacs):
            for k, variant in enumerate(variants):
                for c, cell in enumerate(cells):
                    fast = k == (i + j) % 3 and c == (i + j) % 2
                    marks = () if fast else (pytest.mark.slow,)
                    yield pytest.param(solver, jac, variant, cell, marks=marks)


@pytest.mark.parametrize("solver,jac,variant,cell_kind", list(_seed_matrix()))
def test_seed_matrix(solver, jac, variant, cell_kind):
    if cell_kind == "dense":
        cell, x = dense_cell(3), jnp.linspace(-1, 1, 6).reshape(2, 3)
    else:
        cell, x = conv_cell(2), jnp.linspace(-1, 1, 2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
    x = x.astype(jnp.float32)
    model = _variant(
        variant, cell, SOLVERS[solver](), jacobian_regularization=jac, max_steps=64
    )
    ps, st = model.init(jax.random.key(0), x)

    @jax.jit
    def loss(ps):
        z, st_new, st_new_solution = model.apply(ps, st, x, return_solution=True)
        sol = st_new_solution
        return jnp.mean(z**2) + sol.jacobian_loss + jnp.mean(jnp.abs(z - sol.u0)), sol

    (value, sol), grads = jax.value_and_grad(loss, has_aux=True)(ps)
    assert np.isfinite(value)
    assert np.all(sol.result == jaxdeq.RESULTS.successful)
    assert np.all(np.asarray(sol.relative_residual_norm) < 1e-3)
    if jac is None:
        assert sol.jacobian_loss == 0
    else:
        assert sol.jacobian_loss > 0
    leaves = jtu.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)


def _loss_fn(model, st, x, c):
    def loss(ps, x):
        z, _ = model.apply(ps, st, x)
        return jnp.sum(c * jnp.sin(z))

    return loss


@pytest.mark.parametrize("variant", ["deq", "skip_reg"])
def test_implicit_gradient_matches_finite_differences(variant, getkey):
    x = jax.random.normal(getkey(), (2, 3))
    c = jax.random.normal(getkey(), (2, 3))
    model = _variant(
        variant,
        dense_cell(3, scale=0.9),
        optx.Newton(rtol=1e-13, atol=1e-13),
        adjoint=jaxdeq.ImplicitAdjoint(atol=1e-14, max_steps=500),
    )
    ps, st = model.init(getkey(), x)
    loss = jax.jit(_loss_fn(model, st, x, c))
    g_ps, g_x = jax.grad(loss, argnums=(0, 1))(ps, x)
    fd_ps = central_difference_grad(lambda p: float(loss(p, x)), ps)
    fd_x = central_difference_grad(lambda xx: float(loss(ps, xx)), x)
    assert max_rel_error(g_ps, fd_ps) <= 1e-5
    assert max_rel_error(g_x, fd_x) <= 1e-5


@pytest.mark.parametrize(
    "solver",
    [optx.FixedPointIteration(rtol=1e-13, atol=1e-13), optx.Newton(1e-13, 1e-13)],
)
def test_implicit_gradient_matches_unrolled(solver, getkey):
    x = jax.random.normal(getkey(), (3, 4))
    c = jax.random.normal(getkey(), (3, 4))
    kw = dict(max_steps=200)
    implicit = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(4, 0.7),
        solver,
        adjoint=jaxdeq.ImplicitAdjoint(atol=1e-14, max_steps=500),
        **kw,
    )
    unrolled = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(4, 0.7), solver, adjoint=jaxdeq.UnrolledAdjoint(), **kw
    )
    ps, st = implicit.init(getkey(), x)
    g_imp = jax.grad(_loss_fn(implicit, st, x, c), argnums=(0, 1))(ps, x)
    g_unr = jax.grad(_loss_fn(unrolled, st, x, c), argnums=(0, 1))(ps, x)
    assert max_rel_error(g_imp, g_unr) <= 1e-8


def test_joint_solve_matches_per_sample(getkey):
    x = jax.random.normal(getkey(), (3, 4))
    c = jax.random.normal(getkey(), (3, 4))
    solver = optx.FixedPointIteration(rtol=1e-12, atol=1e-12)
    kw = dict(max_steps=200, adjoint=jaxdeq.ImplicitAdjoint(atol=1e-13, max_steps=300))
    per_sample = jaxdeq.DeepEquilibriumNetwork(dense_cell(4, 0.7), solver, **kw)
    joint = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(4, 0.7), solver, joint_solve=True, **kw
    )
    ps, st = per_sample.init(getkey(), x)
    z1, st1 = per_sample.apply(ps, st, x)
    z2, st2, st2_solution = joint.apply(ps, st, x, return_solution=True)
    assert tree_allclose(z1, z2, rtol=1e-10, atol=1e-10)
    # joint: one problem, so every sample reports the same step count
    assert len(set(np.asarray(st2_solution.nfe).tolist())) == 1
    g1 = jax.grad(_loss_fn(per_sample, st, x, c))(ps, x)
    g2 = jax.grad(_loss_fn(joint, st, x, c))(ps, x)
    assert max_rel_error(g1, g2) <= 1e-9


def test_jit_equals_eager_and_vmap_equals_batch(getkey):
    x = jax.random.normal(getkey(), (4, 3), jnp.float32)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3), optx.FixedPointIteration(rtol=1e-5, atol=1e-5)
    )
    ps, st = model.init(getkey(), x)
    z_eager, st_eager, st_eager_solution = model.apply(ps, st, x, return_solution=True)
    z_jit, st_jit, st_jit_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    assert tree_allclose(z_eager, z_jit, rtol=1e-6, atol=1e-6)
    assert np.array_equal(st_eager_solution.nfe, st_jit_solution.nfe)
    z_vmap = jax.vmap(lambda xi: model.apply(ps, st, xi[None])[0][0])(x)
    assert tree_allclose(z_vmap, z_jit, rtol=1e-6, atol=1e-6)
    # st keeps its structure, shapes and dtypes, so a jitted step compiles once
    # (weak types included: a weak-typed leaf would retrace a jitted train step)
    assert jax.eval_shape(lambda: st) == jax.eval_shape(lambda: st_jit)


def test_easy_and_hard_samples_report_different_nfe():
    # zero input: f(0, 0) = 0 is already the fixed point; a large input is not.
    x = jnp.array([[0.0, 0.0, 0.0], [2.0, -3.0, 1.0]], jnp.float32)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.9), optx.FixedPointIteration(rtol=1e-6, atol=1e-6)
    )
    ps, st = model.init(jax.random.key(0), x)
    _, st, st_solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        ps, st, x
    )
    nfe = np.asarray(st_solution.nfe)
    assert nfe[0] < nfe[1]
    assert np.all(st_solution.result == jaxdeq.RESULTS.successful)


def test_per_call_budget_does_not_recompile():
    x = jnp.array([[2.0, -3.0, 1.0]], jnp.float32)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.9), optx.FixedPointIteration(rtol=1e-7, atol=1e-7), max_steps=50
    )
    ps, st = model.init(jax.random.key(0), x)
    apply = jax.jit(
        lambda ps, st, x, n: model.apply(ps, st, x, max_steps=n, return_solution=True)
    )
    _, st3, st3_solution = apply(ps, st, x, jnp.array(3))
    _, st40, st40_solution = apply(ps, st, x, jnp.array(40))
    assert int(st3_solution.nfe[0]) == 3
    assert st3_solution.result[0] == jaxdeq.RESULTS.max_steps_reached
    assert 3 < int(st40_solution.nfe[0]) <= 40
    assert apply._cache_size() == 1
    with pytest.raises(ValueError, match="max_steps"):
        model.apply(ps, st, x, max_steps=51)


@pytest.mark.parametrize("mode", ["forward", "reverse", "finite_difference"])
def test_jacobian_regularization_is_unbiased(mode, getkey):
    d = 5
    w = jax.random.normal(getkey(), (d, d)) * 0.2
    cell = nn.Parallel(
        jnp.add,
        nn.Dense(d, d, use_bias=False, kernel_init=lambda *_: w),
        nn.Dense(d, d, use_bias=False),
    )
    model = jaxdeq.DeepEquilibriumNetwork(
        cell, optx.Newton(rtol=1e-10, atol=1e-10), jacobian_regularization=mode
    )
    x = jax.random.normal(getkey(), (2, d))
    ps, st = model.init(getkey(), x)
    exact = float(jnp.sum(w**2) / d)  # ||J||_F^2 / numel, the same for every sample
    n = 4000
    keys = jax.random.split(getkey(), n)
    estimates = jax.jit(
        jax.vmap(
            lambda k: (
                model.apply(ps, dict(st, key=k), x, return_solution=True)[
                    2
                ].jacobian_loss
            )
        )
    )(keys)
    # Var(||Jv||^2) = 2 ||J^T J||_F^2 per probe and sample; 2 samples per estimate
    sigma = float(jnp.sqrt(2 * jnp.sum((w.T @ w) ** 2) / 2) / d)
    assert abs(float(jnp.mean(estimates)) - exact) < 5 * sigma / np.sqrt(n)
    # a fresh probe at every call: st's key advances
    _, st1, st1_solution = model.apply(ps, st, x, return_solution=True)
    _, st2, st2_solution = model.apply(ps, st1, x, return_solution=True)
    assert st1_solution.jacobian_loss != st2_solution.jacobian_loss


def test_fixed_depth_applies_the_cell_depth_times(getkey):
    x = jax.random.normal(getkey(), (2, 3))
    cell = dense_cell(3)
    model = jaxdeq.DeepEquilibriumNetwork(cell, optx.Newton(1e-6, 1e-6), fixed_depth=4)
    ps, st = model.init(getkey(), x)
    z, st_new, st_new_solution = model.apply(ps, st, x, return_solution=True)
    z_hand = jnp.zeros_like(x)
    for _ in range(4):
        z_hand, _ = cell.apply(ps["model"], st["model"], (z_hand, x))
    assert tree_allclose(z, z_hand, rtol=1e-12, atol=1e-12)
    assert np.all(st_new_solution.nfe == 4)
    g = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, x)[0]))(ps)
    g_hand = jax.grad(
        lambda ps: jnp.sum(
            jax.lax.fori_loop(
                0,
                4,
                lambda _, z: cell.apply(ps["model"], st["model"], (z, x))[0],
                x * 0,
            )
        )
    )(ps)
    assert tree_allclose(g, g_hand, rtol=1e-12, atol=1e-12)


def test_skip_loss_trains_the_init_layer(getkey):
    x = jax.random.normal(getkey(), (2, 3))
    model = jaxdeq.SkipDeepEquilibriumNetwork(
        dense_cell(3), nn.Dense(3, 3), optx.Newton(1e-8, 1e-8)
    )
    ps, st = model.init(getkey(), x)

    def skip_loss(ps):
        sol = model.apply(ps, st, x, return_solution=True)[2]
        return jnp.mean(jnp.abs(sol.z_star - sol.u0))

    g = jax.grad(skip_loss)(ps)
    assert all(np.any(leaf != 0) for leaf in jtu.tree_leaves(g["init"]))


def test_neural_ode_problem_type(getkey):
    x = jax.random.normal(getkey(), (2, 3))
    cell = dense_cell(3)
    model = jaxdeq.DeepEquilibriumNetwork(
        cell, diffrax.Tsit5(), problem_type="ode", rtol=1e-8, atol=1e-8
    )
    ps, st = model.init(getkey(), x)
    z, st_new, st_new_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    term = diffrax.ODETerm(
        lambda t, z, _: cell.apply(ps["model"], st["model"], (z, x))[0] - z
    )
    ref = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        1.0,
        0.01,
        jnp.zeros_like(x),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
    ).ys[-1]
    assert tree_allclose(z, ref, rtol=1e-6, atol=1e-6)
    assert np.all(st_new_solution.result == jaxdeq.RESULTS.successful)
    g = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(ps, st, x)[0])))(x)
    assert np.all(np.isfinite(g))


def test_budget_exhausted_returns_best_finite_iterate():
    x = jnp.array([[2.0, -3.0, 1.0]], jnp.float32)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.95),
        optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
        max_steps=3,
        trace=True,
    )
    ps, st = model.init(jax.random.key(0), x)
    z, st, st_solution = model.apply(ps, st, x, return_solution=True)
    sol = st_solution
    assert sol.result[0] == jaxdeq.RESULTS.max_steps_reached
    assert jaxdeq.RESULTS.message(sol.result[0]).startswith("the step budget ran out")
    assert np.all(np.isfinite(z))
    # the lowest-residual iterate seen is the one returned
    trace = np.asarray(sol.trace[0])
    assert np.isclose(float(sol.residual_norm[0]), trace.min(), rtol=1e-5)


def test_divergent_solve_reports_nonfinite_and_stays_finite():
    # f(z, x) = 3 z + x: fixed-point iteration blows up to inf in float32.
    cell = nn.Parallel(jnp.add, nn.WrappedFunction(lambda z: 3 * z), nn.NoOpLayer())
    model = jaxdeq.DeepEquilibriumNetwork(
        cell, optx.FixedPointIteration(rtol=1e-6, atol=1e-6), max_steps=200
    )
    x = jnp.ones((2, 3), jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    z, st, st_solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        ps, st, x
    )
    assert np.all(st_solution.result == jaxdeq.RESULTS.nonfinite)
    assert np.all(np.isfinite(z))


class TestBadInput:
    cell = dense_cell(2)

    def test_unknown_strings(self):
        with pytest.raises(ValueError, match="init"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), init="ones"
            )
        with pytest.raises(ValueError, match="jacobian_regularization"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), jacobian_regularization="exact"
            )
        with pytest.raises(ValueError, match="problem_type"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, diffrax.Tsit5(), problem_type="bvp"
            )
        with pytest.raises(ValueError, match="linear_solver"):
            jaxdeq.ImplicitAdjoint(linear_solver="cg")

    def test_wrong_solver_types(self):
        with pytest.raises(TypeError, match="solver.*'anderson'"):
            jaxdeq.DeepEquilibriumNetwork(self.cell, "anderson")
        with pytest.raises(TypeError, match="solver.*class Newton"):
            jaxdeq.DeepEquilibriumNetwork(self.cell, optx.Newton)
        with pytest.raises(TypeError, match="model"):
            jaxdeq.DeepEquilibriumNetwork(lambda z: z, optx.Newton(1e-5, 1e-5))
        with pytest.raises(TypeError, match="adjoint"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), adjoint="implicit"
            )
        with pytest.raises(ValueError, match="problem_type"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), problem_type="ode"
            )

    def test_unknown_and_misplaced_options(self):
        with pytest.raises(TypeError, match="foo"):
            jaxdeq.DeepEquilibriumNetwork(self.cell, diffrax.Tsit5(), foo=1)
        with pytest.raises(TypeError, match="rtol"):
            jaxdeq.DeepEquilibriumNetwork(self.cell, optx.Newton(1e-5, 1e-5), rtol=1e-3)
        with pytest.raises(ValueError, match="max_steps"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), max_steps=0
            )
        with pytest.raises(ValueError, match="fixed_depth"):
            jaxdeq.DeepEquilibriumNetwork(
                self.cell, optx.Newton(1e-5, 1e-5), fixed_depth=-1
            )

    def test_shapes_the_model_cannot_take(self):
        model = jaxdeq.DeepEquilibriumNetwork(self.cell, optx.Newton(1e-5, 1e-5))
        ps, st = model.init(jax.random.key(0), jnp.ones((1, 2)))
        with pytest.raises(ValueError, match="x"):
            model.apply(ps, st, jnp.ones((1, 5)))
        with pytest.raises(ValueError, match="x"):
            model.apply(ps, st, jnp.ones(()))
        widening = jaxdeq.DeepEquilibriumNetwork(
            nn.Parallel(jnp.add, nn.Dense(2, 3), nn.Dense(2, 3)),
            optx.Newton(1e-5, 1e-5),
        )
        with pytest.raises(ValueError, match="model.*init"):
            widening.init(jax.random.key(0), jnp.ones((1, 2)))

    def test_traced_budget_with_diffrax_is_a_clear_error(self):
        model = jaxdeq.DeepEquilibriumNetwork(self.cell, diffrax.Tsit5())
        x = jnp.ones((1, 2))
        ps, st = model.init(jax.random.key(0), x)
        with pytest.raises(TypeError, match="max_steps"):
            jax.jit(lambda n: model.apply(ps, st, x, max_steps=n))(jnp.array(3))
        _, st, solution = model.apply(ps, st, x, max_steps=5, return_solution=True)
        assert int(solution.steps[0]) <= 5 < int(solution.nfe[0])


def _while_loop_convs(jaxpr):
    """Dimension numbers of every convolution inside a `while` loop body."""
    found = []

    def walk(jaxpr, in_loop):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated" and in_loop:
                found.append(eqn.params["dimension_numbers"])
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner, in_loop or eqn.primitive.name == "while")

    walk(jaxpr.jaxpr, False)
    return found


def test_conv_backward_is_canonical_and_exact(getkey):
    """The implicit backward pass re-emits the cell's conv VJPs in the canonical
    NHWC/HWIO layout (XLA:CPU's fast path inside loops) without changing gradients."""
    x = jax.random.normal(getkey(), (2, 4, 4, 2))
    c = jax.random.normal(getkey(), (2, 4, 4, 2))
    solver = optx.FixedPointIteration(rtol=1e-13, atol=1e-13)
    implicit = jaxdeq.DeepEquilibriumNetwork(
        conv_cell(2, 0.7),
        solver,
        max_steps=200,
        adjoint=jaxdeq.ImplicitAdjoint(atol=1e-14, max_steps=500),
    )
    unrolled = jaxdeq.DeepEquilibriumNetwork(
        conv_cell(2, 0.7), solver, max_steps=200, adjoint=jaxdeq.UnrolledAdjoint()
    )
    ps, st = implicit.init(getkey(), x)
    loss = _loss_fn(implicit, st, x, c)
    g_imp = jax.grad(loss, argnums=(0, 1))(ps, x)
    g_unr = jax.grad(_loss_fn(unrolled, st, x, c), argnums=(0, 1))(ps, x)
    assert max_rel_error(g_imp, g_unr) <= 1e-8
    loop_convs = _while_loop_convs(jax.make_jaxpr(jax.grad(loss))(ps, x))
    assert loop_convs, "expected convolutions inside the backward loop"
    canonical = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    assert all(
        (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == canonical for dn in loop_convs
    )


def test_mixed_precision_bf16_cell_float32_solver(getkey):
    x = jax.random.normal(getkey(), (3, 8), jnp.float32)
    solver = jaxdeq.Anderson(1e-3, 1e-5)
    full = jaxdeq.DeepEquilibriumNetwork(dense_cell(8), solver)
    mixed = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(8), solver, compute_dtype=jnp.bfloat16
    )
    ps, st = full.init(getkey(), x)
    z_full, _ = full.apply(ps, st, x)
    z_mixed, st_mixed, st_mixed_solution = jax.jit(
        functools.partial(mixed.apply, return_solution=True)
    )(ps, st, x)
    sol = st_mixed_solution
    # the solver's state and residuals stay float32; the cell ran in bfloat16
    assert z_mixed.dtype == jnp.float32 and sol.residual.dtype == jnp.float32
    assert jax.eval_shape(lambda: st) == jax.eval_shape(lambda: st_mixed)
    assert np.allclose(z_mixed, z_full, atol=3e-2)
    jaxpr = jax.make_jaxpr(mixed.apply)(ps, st, x)
    assert "bf16" in str(jaxpr)
    g = jax.grad(lambda ps: jnp.sum(mixed.apply(ps, st, x)[0]))(ps)
    assert all(np.all(np.isfinite(leaf)) for leaf in jtu.tree_leaves(g))
    with pytest.raises(TypeError, match="compute_dtype"):
        jaxdeq.DeepEquilibriumNetwork(dense_cell(8), solver, compute_dtype=jnp.int8)
