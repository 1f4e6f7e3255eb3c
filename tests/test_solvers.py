"""Tests of jaxdeq's Anderson and Broyden solvers.

Every array is created with an explicit dtype, and float64 tests switch x64 on
themselves, so these tests mean the same whether or not conftest enables x64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

from jaxdeq._solver import Anderson, Broyden

SOLVERS = {"anderson": Anderson, "broyden": Broyden}
F32 = jnp.float32


def _tol(dtype):
    return 1e-5 if dtype == "float32" else 1e-11


def _evaluated_iterates(solver, f, y0, args, num_steps):
    """The points at which `solver` evaluates `f` in its first `num_steps` steps,
    stepped by hand (a root finder sees `f(y) - y`, as in `optx.fixed_point`)."""
    if isinstance(solver, optx.AbstractRootFinder):
        fn = lambda y, args: (f(y, args) - y, None)
    else:
        fn = lambda y, args: (f(y, args), None)
    struct = jax.ShapeDtypeStruct(y0.shape, y0.dtype)
    step = eqx.filter_jit(solver.step)
    y = y0
    state = solver.init(fn, y, args, {}, struct, None, frozenset())
    points = []
    for _ in range(num_steps):
        points.append(y)
        y, state, _ = step(fn, y, args, {}, state, frozenset())
    return points


def _linear_problem(n, eigenvalues, seed=0, dtype=F32):
    """`f(z) = A z + b` with `A = Q diag(eigenvalues) Q^T`; returns `f, A, b, z*`."""
    key_q, key_b = jax.random.split(jax.random.key(seed))
    q, _ = jnp.linalg.qr(jax.random.normal(key_q, (n, n), dtype))
    a = (q * jnp.asarray(eigenvalues, dtype)[None, :]) @ q.T
    b = jax.random.normal(key_b, (n,), dtype)
    z_star = jnp.linalg.solve(jnp.eye(n, dtype=dtype) - a, b)
    return (lambda z, args: a @ z + b), a, b, z_star


def _relative_residual(f, z, args=None):
    fz = f(z, args)
    return jnp.linalg.norm(fz - z) / jnp.linalg.norm(fz)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SOLVERS)
def test_linear_contraction(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        eigenvalues = [0.6, -0.5, 0.3, 0.1, -0.2, 0.0]
        f, _, _, z_star = _linear_problem(6, eigenvalues, dtype=jnp.dtype(dtype))
        tol = _tol(dtype)
        solver = SOLVERS[name](rtol=tol, atol=tol)
        sol = optx.fixed_point(f, solver, jnp.zeros(6, dtype))
        assert sol.value.dtype == jnp.dtype(dtype)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, z_star, rtol=100 * tol, atol=100 * tol)


@pytest.mark.parametrize("name", SOLVERS)
def test_tanh_cell(name):
    k_w, k_x = jax.random.split(jax.random.key(1))
    w = 0.9 * jax.random.normal(k_w, (16, 16), F32) / 4
    x = jax.random.normal(k_x, (16,), F32)
    f = lambda z, x: jnp.tanh(w @ z + x)
    solver = SOLVERS[name](rtol=1e-5, atol=1e-5)
    sol = optx.fixed_point(f, solver, jnp.zeros(16, F32), x)
    assert sol.result == optx.RESULTS.successful
    assert jnp.max(jnp.abs(f(sol.value, x) - sol.value)) < 2e-5


def test_expanding_linear_map_defeats_fixed_point_iteration():
    # Eigenvalues of A of magnitude > 1 (but away from 1): z <- A z + b diverges,
    # while the fixed point of (I - A) z = b is well defined.
    with jax.enable_x64(True):
        eigenvalues = [-1.5, 2.5, 0.3, -0.5]
        f, _, _, z_star = _linear_problem(4, eigenvalues, seed=2, dtype=jnp.float64)
        y0 = jnp.zeros(4, jnp.float64)
        kw = dict(throw=False, max_steps=60)
        fpi = optx.FixedPointIteration(rtol=1e-8, atol=1e-8)
        assert optx.fixed_point(f, fpi, y0, **kw).result != optx.RESULTS.successful
        for solver in [Anderson(rtol=1e-8, atol=1e-8), Broyden(rtol=1e-8, atol=1e-8)]:
            sol = optx.fixed_point(f, solver, y0, **kw)
            assert sol.result == optx.RESULTS.successful, type(solver).__name__
            np.testing.assert_allclose(sol.value, z_star, rtol=1e-6, atol=1e-6)


def test_anderson_solves_linear_problems_in_n_plus_one_mixing_steps():
    # With memory >= n + 1, no damping and a negligible ridge, Anderson acceleration
    # on an affine map is GMRES on (I - A) z = b: exact after n + 1 evaluations, so
    # the (n + 2)-th evaluation detects convergence.
    n = 6
    with jax.enable_x64(True):
        eigenvalues = [0.9, -0.95, 0.5, -1.5, 3.0, 0.2]
        f, _, _, z_star = _linear_problem(n, eigenvalues, seed=3, dtype=jnp.float64)
        solver = Anderson(rtol=1e-9, atol=1e-9, memory=n + 1, ridge=1e-13)
        sol = optx.fixed_point(f, solver, jnp.zeros(n, jnp.float64), max_steps=n + 2)
        np.testing.assert_allclose(sol.value, z_star, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", SOLVERS)
def test_pytree_state_mixed_shapes_and_dtypes(name):
    with jax.enable_x64(True):
        eigenvalues = [0.5, -0.4, 0.3, 0.2, -0.1, 0.6, 0.0]
        f, _, _, z_star = _linear_problem(7, eigenvalues)

        def unflat(z):
            return z[:3].astype(jnp.float64), z[3:].reshape(2, 2)

        def flat(tree):
            return jnp.concatenate([tree[0].astype(jnp.float32), tree[1].ravel()])

        tree_f = lambda tree, args: unflat(f(flat(tree), args))
        y0 = (jnp.zeros(3, jnp.float64), jnp.zeros((2, 2), jnp.float32))
        sol = optx.fixed_point(tree_f, SOLVERS[name](rtol=1e-5, atol=1e-5), y0)
        assert sol.value[0].dtype == jnp.float64
        assert sol.value[1].dtype == jnp.float32
        assert sol.value[1].shape == (2, 2)
        np.testing.assert_allclose(flat(sol.value), z_star, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_matches_individual_solves(name):
    k_w, k_x = jax.random.split(jax.random.key(4))
    w = jax.random.normal(k_w, (8, 8), F32) / 3
    # Samples that converge after different numbers of steps.
    xs = 2 * jax.random.normal(k_x, (5, 8), F32)
    f = lambda z, x: jnp.tanh(w @ z + x)
    solver = SOLVERS[name](rtol=1e-5, atol=1e-5)

    def solve(x):
        sol = optx.fixed_point(f, solver, jnp.zeros(8, F32), x, throw=False)
        return sol.value, sol.stats["num_steps"], sol.result

    values, num_steps, results = jax.vmap(solve)(xs)
    assert jnp.all(results == optx.RESULTS.successful)
    assert len(set(np.asarray(num_steps).tolist())) > 1
    for i, x in enumerate(xs):
        value, steps, _ = solve(x)
        np.testing.assert_allclose(values[i], value, rtol=1e-6, atol=1e-6)
        assert num_steps[i] == steps


@pytest.mark.parametrize("name", SOLVERS)
def test_budget_exhausted_returns_lowest_residual_iterate(name):
    f, _, _, _ = _linear_problem(6, [-1.5, 2.5, 0.9, -0.95, 0.5, 0.3], seed=5)
    # atol only: the termination measure is then the max-abs residual itself.
    solver = SOLVERS[name](rtol=0.0, atol=1e-12, memory=2)
    y0 = jnp.ones(6, F32)
    residual = lambda y: jnp.max(jnp.abs(f(y, None) - y))
    residuals = [residual(y) for y in _evaluated_iterates(solver, f, y0, None, 12)]
    # A budget that ends one step after the best iterate, so that returning the last
    # iterate would fail this test.
    best_step = int(np.argmin(residuals))
    assert best_step < 11
    max_steps = best_step + 2

    sol = optx.fixed_point(f, solver, y0, throw=False, max_steps=max_steps)
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert jnp.all(jnp.isfinite(sol.value))
    np.testing.assert_allclose(residual(sol.value), residuals[best_step], rtol=1e-6)
    assert residuals[best_step] < residuals[max_steps - 1]


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_evaluation_stops_as_nonfinite(name):
    # log(z) = z has no real solution; the first step lands on log(0) = -inf.
    # Reported as optimistix's own solvers report it: nonfinite, not divergence.
    y0 = jnp.ones(3, F32)
    solver = SOLVERS[name](rtol=1e-6, atol=1e-6)
    sol = optx.fixed_point(lambda z, args: jnp.log(z), solver, y0, throw=False)
    assert sol.result == optx.RESULTS.nonfinite
    assert sol.stats["num_steps"] == 2
    np.testing.assert_array_equal(sol.value, y0)  # the best (only finite) iterate


def test_residual_growth_stops_with_divergence():
    # z^2 + 1 = z has no real solution; Broyden's secant steps blow up.
    solver = Broyden(rtol=1e-6, atol=1e-6, divergence_factor=100.0)
    f = lambda z, args: z**2 + 1
    sol = optx.fixed_point(f, solver, jnp.ones(3, F32), throw=False)
    assert sol.result == optx.RESULTS.nonlinear_divergence
    residual = jnp.max(jnp.abs(f(sol.value, None) - sol.value))
    assert residual <= sol.stats["residual_norm"] * (1 + 1e-6)
    assert sol.state.progress.residual_norm > 100 * residual


@pytest.mark.parametrize("name", SOLVERS)
def test_degenerate_histories_give_no_nan(name):
    make = SOLVERS[name]
    kw = dict(throw=False, max_steps=20)
    # z0 already the fixed point, including the 0/0 of a relative criterion.
    zeros = jnp.zeros(4, F32)
    f_zero = lambda z, args: 0.5 * z
    for solver in [
        make(rtol=1e-6, atol=1e-6),
        make(rtol=1e-4, atol=0.0, norm=optx.two_norm, termination="normwise"),
    ]:
        sol = optx.fixed_point(f_zero, solver, zeros, **kw)
        assert sol.result == optx.RESULTS.successful
        assert sol.stats["num_steps"] == 1
        np.testing.assert_array_equal(sol.value, zeros)
    # Constant f: every residual after the first is zero.
    c = jnp.array([1.0, -2.0, 3.0], F32)
    sol = optx.fixed_point(
        lambda z, args: c, make(rtol=1e-6, atol=1e-6), jnp.zeros(3, F32), **kw
    )
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, c)
    # Zero tolerances in float32: the solve runs into rounding noise (repeated,
    # cancelling residuals) until the budget runs out or the residual is exactly 0.
    w = jax.random.normal(jax.random.key(6), (8, 8), F32) / 4
    f_tanh = lambda z, args: jnp.tanh(w @ z + 1.0)
    y0 = jnp.zeros(8, F32)
    sol = optx.fixed_point(f_tanh, make(rtol=0.0, atol=0.0), y0, **kw)
    residual = jnp.max(jnp.abs(f_tanh(sol.value, None) - sol.value))
    if sol.result == optx.RESULTS.successful:
        assert residual == 0
    else:
        assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert jnp.all(jnp.isfinite(sol.value))
    assert jnp.all(jnp.isfinite(sol.state.progress.residual_norm))
    assert residual < 1e-6


@pytest.mark.parametrize("name", SOLVERS)
def test_normwise_termination_stops_at_first_small_relative_residual(name):
    k_w, k_x = jax.random.split(jax.random.key(7))
    w = jax.random.normal(k_w, (32, 32), F32) / 5
    x = jax.random.normal(k_x, (32,), F32)
    f = lambda z, x: jnp.tanh(w @ z + x)
    rtol = 1e-4
    solver = SOLVERS[name](
        rtol=rtol, atol=0.0, norm=optx.two_norm, termination="normwise"
    )
    y0 = jnp.zeros(32, F32)
    sol = optx.fixed_point(f, solver, y0, x)
    num_steps = int(sol.stats["num_steps"])
    # Anderson measures the residual against ||f(z)||, Broyden (a root finder)
    # against ||z||.
    if name == "anderson":
        relative = lambda z: jnp.linalg.norm(f(z, x) - z) / jnp.linalg.norm(f(z, x))
    else:
        relative = lambda z: jnp.linalg.norm(f(z, x) - z) / jnp.linalg.norm(z)
    assert relative(sol.value) < rtol
    points = _evaluated_iterates(solver, f, y0, x, num_steps)
    np.testing.assert_array_equal(points[-1], sol.value)
    assert all(relative(z) >= rtol for z in points[:-1])


@pytest.mark.parametrize("name", SOLVERS)
def test_one_evaluation_per_step_and_aux_from_that_evaluation(name):
    calls = []
    w = jax.random.normal(jax.random.key(8), (6, 6), F32) / 4

    def f(z, args):
        jax.debug.callback(lambda: calls.append(None))
        return jnp.tanh(w @ z + 1.0), {"evaluated_at": z}

    solver = SOLVERS[name](rtol=1e-6, atol=1e-6)
    y0 = jnp.zeros(6, F32)
    sol = optx.fixed_point(f, solver, y0, has_aux=True)
    jax.effects_barrier()
    assert len(calls) == sol.stats["num_steps"]
    np.testing.assert_array_equal(sol.aux["evaluated_at"], sol.value)
    # Each step returns the aux of the evaluation made in that step.
    fn = lambda y, args: f(y, args)
    struct = jax.ShapeDtypeStruct((6,), F32)
    aux_struct = {"evaluated_at": struct}
    state = solver.init(fn, y0, None, {}, struct, aux_struct, frozenset())
    step = eqx.filter_jit(solver.step)
    y = y0
    for _ in range(3):
        new_y, state, aux = step(fn, y, None, {}, state, frozenset())
        np.testing.assert_array_equal(aux["evaluated_at"], y)
        y = new_y


def test_broyden_root_find():
    target = jnp.array([0.5, 1.0, 2.0], F32)
    g = lambda z, args: jnp.cos(z) - z * target
    solver = Broyden(rtol=1e-6, atol=1e-6)
    y0 = jnp.zeros(3, F32)
    sol = optx.root_find(g, solver, y0)
    assert sol.result == optx.RESULTS.successful
    assert jnp.max(jnp.abs(g(sol.value, None))) < 1e-5
    via_fixed_point = optx.fixed_point(lambda z, args: z + g(z, args), solver, y0)
    np.testing.assert_allclose(via_fixed_point.value, sol.value, atol=1e-5)


@pytest.mark.parametrize("name", SOLVERS)
def test_implicit_gradient_matches_analytic(name):
    with jax.enable_x64(True):
        eigenvalues = [0.5, -0.6, 0.2, 0.1, -0.3]
        _, a, b, _ = _linear_problem(5, eigenvalues, seed=9, dtype=jnp.float64)
        weights = jnp.arange(1.0, 6.0, dtype=jnp.float64)
        solver = SOLVERS[name](rtol=1e-12, atol=1e-12)

        def loss(a, b):
            f = lambda z, args: args[0] @ z + args[1]
            sol = optx.fixed_point(
                f,
                solver,
                jnp.zeros(5, jnp.float64),
                (a, b),
                adjoint=optx.ImplicitAdjoint(),
            )
            return weights @ sol.value

        grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
        # L = w^T (I - A)^{-1} b:  dL/db = (I - A)^{-T} w,  dL/dA = (dL/db) z*^T.
        identity = jnp.eye(5, dtype=jnp.float64)
        z_star = jnp.linalg.solve(identity - a, b)
        expected_b = jnp.linalg.solve((identity - a).T, weights)
        np.testing.assert_allclose(grad_b, expected_b, rtol=1e-8)
        np.testing.assert_allclose(grad_a, jnp.outer(expected_b, z_star), rtol=1e-8)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="memory"):
        Anderson(1e-3, 1e-3, memory=0)
    with pytest.raises(ValueError, match="ridge"):
        Anderson(1e-3, 1e-3, ridge=0.0)
    with pytest.raises(ValueError, match="termination"):
        Broyden(1e-3, 1e-3, termination="relative")
    with pytest.raises(ValueError, match="same structure"):
        optx.root_find(lambda z, args: z[:2], Broyden(1e-3, 1e-3), jnp.zeros(3, F32))


def test_broyden_line_search_converges():
    f, _, _, z_star = _linear_problem(4, [-1.5, 2.5, 0.3, -0.5], seed=2)
    solver = Broyden(rtol=1e-5, atol=1e-5, line_search=True)
    sol = optx.fixed_point(f, solver, jnp.zeros(4, F32), max_steps=100)
    np.testing.assert_allclose(sol.value, z_star, rtol=1e-4, atol=1e-4)
