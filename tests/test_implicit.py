"""The implicit derivative in every AD mode, against dense implicit-function-theorem
references in float64: every model family x {optimistix, diffrax steady state} x
{per-sample, joint}; the failing inputs of the "solve path, rebuilt" issue with their
right values; loss-scale invariance, closed-over traced values, and what a user sees
when a backward solve fails (`throw`, `callback`)."""

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from jax.nn import initializers

import jaxdeq
from helpers import central_difference_grad, dense_fixed_point, max_rel_error
from jaxdeq import nn

TANH = nn.WrappedFunction(jnp.tanh)
ONE_STEP = jaxdeq.OneStepGradient()


def _dense(a, b, scale=0.4, **kw):
    return nn.Dense(a, b, kernel_init=initializers.normal(scale / np.sqrt(a)), **kw)


def _single(family, solver, **kw):
    cell = nn.Chain(
        nn.Parallel(jnp.add, _dense(3, 3, use_bias=False), _dense(3, 3)), TANH
    )
    init = {"deq": "zeros", "skip": _dense(3, 3), "skip_reg": None}[family]
    return jaxdeq.DeepEquilibriumNetwork(cell, solver, init=init, **kw)


def _multiscale(family, solver, **kw):
    main = (
        nn.Chain(
            nn.Parallel(jnp.add, _dense(3, 3, use_bias=False), _dense(3, 3)), TANH
        ),
        _dense(2, 2, activation=jnp.tanh),
    )
    mapping = (
        (nn.NoOpLayer(), _dense(3, 2)),
        (_dense(2, 3), nn.NoOpLayer()),
    )
    scales = ((3,), (2,))
    if family == "ms_deq":
        return jaxdeq.MultiScaleDeepEquilibriumNetwork(
            main, mapping, None, solver, scales, **kw
        )
    init = (_dense(3, 3), _dense(3, 2)) if family == "ms_skip" else None
    return jaxdeq.MultiScaleSkipDeepEquilibriumNetwork(
        main, mapping, None, init, solver, scales, **kw
    )


def _cell_fn(model, st):
    """The model's cell as `f(z, (ps, x))` on the batch, for the dense reference."""
    if isinstance(model, jaxdeq.DeepEquilibriumNetwork):
        return lambda z, theta: model._cell(
            theta[0]["model"], st["model"], z, theta[1]
        )[0]
    groups = ("main", "mapping", "post_fuse")

    def part(tree):
        return {g: tree[g] for g in groups if g in tree}

    return lambda z, theta: model._cell(part(theta[0]), part(st), tuple(z), theta[1])[0]


SOLVERS = {
    "anderson": (lambda: jaxdeq.Anderson(rtol=1e-13, atol=1e-13), {}),
    "tsit5": (lambda: diffrax.Tsit5(), {"rtol": 1e-12, "atol": 1e-12}),
}
FAMILIES = ("deq", "skip", "skip_reg", "ms_deq", "ms_skip", "ms_skip_reg")
X = jnp.array([[0.3, -0.8, 0.5], [-0.4, 0.9, 0.1]])
TANGENT = jnp.array([[1.0, -0.5, 0.25], [0.5, 0.75, -1.0]])


def _derivatives(z_of):
    """grad (w.r.t. ps), jvp, jacfwd, hessian and grad of grad (w.r.t. x) of the
    fixed point `z_of(ps, x)`, in one compiled function."""

    def loss(ps, x):
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jtu.tree_leaves(z_of(ps, x)))

    def grad_norm(ps, x):
        return jnp.sum(jax.grad(loss, argnums=1)(ps, x) ** 2)

    @jax.jit
    def all_of(ps, x):
        return {
            "grad": jax.grad(loss)(ps, x),
            "jvp": jax.jvp(lambda x: z_of(ps, x), (x,), (TANGENT,))[1],
            "jacfwd": jax.jacfwd(lambda x: z_of(ps, x))(x),
            "hessian": jax.hessian(loss, argnums=1)(ps, x),
            "grad_of_grad": jax.grad(grad_norm, argnums=1)(ps, x),
        }

    return all_of


_REFERENCES = {}


def _reference(family, model, ps, st):
    if family not in _REFERENCES:
        z_guess = model.apply(ps, st, X)[0]
        solve = dense_fixed_point(_cell_fn(model, st), z_guess)
        _REFERENCES[family] = _derivatives(lambda ps, x: solve((ps, x)))(ps, X)
    return _REFERENCES[family]


@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_ad_mode_matches_dense_implicit_reference(family, solver, joint):
    make, options = SOLVERS[solver]
    build = _single if family in ("deq", "skip", "skip_reg") else _multiscale
    model = build(family, make(), joint_solve=joint, max_steps=2000, **options)
    ps, st = model.init(jax.random.key(0), X)
    got = _derivatives(lambda ps, x: model.apply(ps, st, x)[0])(ps, X)
    want = _reference(family, model, ps, st)
    for name in want:
        error = max_rel_error(got[name], want[name])
        assert error <= 1e-8, (name, error)


# The failing inputs of the issue, with their right values.


def _linear_model(kernel, solver, **kw):
    d = kernel.shape[0]
    cell = nn.Parallel(jnp.add, nn.Dense(d, d, use_bias=False), nn.NoOpLayer())
    model = jaxdeq.DeepEquilibriumNetwork(cell, solver, **kw)
    ps, st = model.init(jax.random.key(0), jnp.zeros((1, d)))
    # nn.Dense computes z @ kernel, so the kernel is W^T for f(z, x) = W z + x.
    return model, {"model": ({"kernel": kernel.T}, {})}, st


W_ISSUE = jnp.array([[0.2, -0.3, 0.1], [0.0, 0.1, 0.4], [-0.2, 0.3, -0.1]])
X_ISSUE = jnp.array([0.5, -1.0, 2.0])


@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
def test_linear_cell_jacobian_and_hessian(joint):
    """`dz*/dx = (I - W)^{-1}`; Hessian of `sum(sin z*)` = `A^T diag(-sin z*) A`."""
    model, ps, st = _linear_model(
        W_ISSUE, optx.Newton(rtol=1e-13, atol=1e-13), joint_solve=joint
    )

    def z_of(x):
        return model.apply(ps, st, x[None])[0][0]

    a = np.linalg.inv(np.eye(3) - np.asarray(W_ISSUE))
    z_star = a @ np.asarray(X_ISSUE)
    hessian = a.T @ np.diag(-np.sin(z_star)) @ a
    loss = lambda x: jnp.sum(jnp.sin(z_of(x)))
    # The default backward tolerance is eps^(2/3) = 3.7e-11 relative in float64.
    assert max_rel_error(jax.jacfwd(z_of)(X_ISSUE), a) < 1e-9
    assert max_rel_error(jax.jacrev(z_of)(X_ISSUE), a) < 1e-9
    assert max_rel_error(jax.hessian(loss)(X_ISSUE), hessian) < 1e-9
    # vmap of forward- and reverse-mode Jacobians: one per input, each (I - W)^-1.
    xs = jnp.stack([X_ISSUE, -2 * X_ISSUE])
    for jacobian in (jax.jacfwd, jax.jacrev):
        batched = jax.vmap(jacobian(z_of))(xs)
        assert max_rel_error(batched, np.stack([a, a])) < 1e-9


def test_non_contractive_cell_is_exact_or_raises():
    """`f(z, x) = 3 z + x`: `z* = -x / 2`, `dz*/dx = -I / 2`. Fixed-point iteration of
    the VJP diverges (spectral radius 3); GMRES is exact, and fixed-point iteration
    raises instead of returning a wrong gradient."""
    x = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    exact = -0.5 * jnp.cos(-x / 2)

    def gradient(adjoint):
        model, ps, st = _linear_model(
            3 * jnp.eye(3), optx.Newton(rtol=1e-12, atol=1e-12), adjoint=adjoint
        )
        z, st = model.apply(ps, st, x)
        assert np.allclose(z, -x / 2, rtol=1e-14, atol=1e-14)
        return jax.grad(lambda x: jnp.sum(jnp.sin(model.apply(ps, st, x)[0])))(x)

    assert max_rel_error(gradient(jaxdeq.ImplicitAdjoint()), exact) < 1e-12
    with pytest.raises(Exception, match="diverged"):
        gradient(jaxdeq.ImplicitAdjoint("fixed_point", throw=True))


def _tanh_problem():
    """float64 `tanh(W z + U x + b)`, Dense initialisers scaled by 0.6, 6 features,
    batch 5, solved by Newton to 1e-12."""
    d = 6
    cell = nn.Chain(
        nn.Parallel(jnp.add, nn.Dense(d, d, use_bias=False), nn.Dense(d, d)), TANH
    )

    def model_with(adjoint):
        return jaxdeq.DeepEquilibriumNetwork(
            cell, optx.Newton(rtol=1e-12, atol=1e-12), adjoint=adjoint
        )

    x = jax.random.normal(jax.random.key(1), (5, d))
    ps, st = model_with(None).init(jax.random.key(0), x)
    ps = jtu.tree_map(lambda p: 0.6 * p, ps)
    return model_with, ps, st, x


def _stacked(reports):
    """The callback's per-sample reports as one `BackwardStatistics` of arrays."""
    return jtu.tree_map(lambda *leaves: np.stack(leaves), *reports)


def _loss_fn(model, st, x, scale=1.0):
    return lambda ps: scale * jnp.sum(jnp.sin(model.apply(ps, st, x)[0]))


def test_default_backward_is_accurate_against_finite_differences():
    model_with, ps, st, x = _tanh_problem()
    model = model_with(None)
    reference = central_difference_grad(jax.jit(_loss_fn(model, st, x)), ps)
    got = jax.grad(_loss_fn(model, st, x))(ps)
    assert max_rel_error(got, reference) < 1e-8


def test_lineax_solver_outcome_is_checked():
    """A lineax solver's failure (BiCGStab's breakdown in the issue) is never
    dropped: with `throw=True` the gradient is exact or the call raises; with
    `throw=False` the callback reports each solve's result."""
    model_with, ps, st, x = _tanh_problem()
    exact = jax.grad(_loss_fn(model_with(None), st, x))(ps)
    solver = lx.BiCGStab(rtol=1e-6, atol=1e-7)
    try:
        loud = jaxdeq.ImplicitAdjoint(solver, throw=True)
        got = jax.grad(_loss_fn(model_with(loud), st, x))(ps)
    except Exception as error:  # raised by jax as a runtime error
        assert "jaxdeq.ImplicitAdjoint" in str(error)
    else:
        assert max_rel_error(got, exact) < 1e-4
    reports = []
    adjoint = jaxdeq.ImplicitAdjoint(solver, callback=reports.append)
    jax.grad(_loss_fn(model_with(adjoint), st, x))(ps)
    assert len(reports) == 5  # one solve per sample
    result = np.array([stats.result for stats in reports])
    relative = np.array([stats.relative_residual_norm for stats in reports])
    assert np.all(relative[result == jaxdeq.RESULTS.successful] < 1e-5)


def test_lineax_solver_keeps_its_own_tolerance():
    """A lineax solver stops on its own tolerances and is judged by its own
    result, not by jaxdeq's default `rtol`."""
    model_with, ps, st, x = _tanh_problem()
    reports = []
    solver = lx.GMRES(rtol=1e-3, atol=1e-3, restart=2)
    adjoint = jaxdeq.ImplicitAdjoint(solver, throw=True, callback=reports.append)
    jax.grad(_loss_fn(model_with(adjoint), st, x))(ps)
    assert all(int(r.result) == jaxdeq.RESULTS.successful for r in reports)


def test_loss_scale_does_not_change_backward_accuracy():
    model_with, ps, st, x = _tanh_problem()
    reports = {1.0: [], 1e-6: [], 1e-300: []}
    grads = {}
    for scale, sink in reports.items():
        model = model_with(jaxdeq.ImplicitAdjoint(callback=sink.append))
        grads[scale] = jax.grad(_loss_fn(model, st, x, scale))(ps)
    for scale in (1e-6, 1e-300):  # 1e-300: its squared norm underflows
        unscaled = jtu.tree_map(lambda g, s=scale: g / s, grads[scale])
        assert max_rel_error(unscaled, grads[1.0]) < 1e-9
    small, large = (_stacked(reports[scale]) for scale in (1e-6, 1.0))
    assert np.array_equal(small.steps, large.steps)
    assert np.all(small.relative_residual_norm < 1e-10)
    assert np.all(large.relative_residual_norm < 1e-10)
    assert np.all(large.result == jaxdeq.RESULTS.successful)


def test_closed_over_traced_scalar_gets_its_gradient():
    """A cell `tanh(a * (W z + x))` whose `a` is captured by a WrappedFunction."""
    x = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    kernel = jnp.array([[0.3, -0.2], [0.1, 0.25]])

    def z_of(a, adjoint=None):
        cell = nn.Chain(
            nn.Parallel(jnp.add, nn.Dense(2, 2, use_bias=False), nn.NoOpLayer()),
            nn.WrappedFunction(lambda h: jnp.tanh(a * h)),
        )
        model = jaxdeq.DeepEquilibriumNetwork(
            cell, optx.Newton(rtol=1e-13, atol=1e-13), adjoint=adjoint
        )
        _, st = model.init(jax.random.key(0), x)
        return model.apply({"model": (({"kernel": kernel}, {}), {})}, st, x)[0]

    loss = lambda a: jnp.sum(jnp.sin(z_of(a)))
    eps = 1e-6
    reference = (loss(1.2 + eps) - loss(1.2 - eps)) / (2 * eps)
    assert abs(jax.grad(loss)(1.2) - reference) < 1e-8 * abs(reference)
    unrolled = jax.grad(lambda a: jnp.sum(jnp.sin(z_of(a, jaxdeq.UnrolledAdjoint()))))
    assert abs(unrolled(1.2) - reference) < 1e-8 * abs(reference)
    # The cheap modes too: the forward solve gets no derivative of `a`, in forward
    # or reverse mode; phantom steps carry it (60 undamped steps: near exact).
    for adjoint, tol in ((jaxdeq.PhantomGradient(60, 1.0), 1e-8), (ONE_STEP, 1)):
        cheap = lambda a, adjoint=adjoint: jnp.sum(jnp.sin(z_of(a, adjoint)))
        reverse = jax.grad(cheap)(1.2)
        forward = jax.jvp(cheap, (1.2,), (1.0,))[1]
        assert abs(reverse - forward) < 1e-12 * abs(reverse)
        assert abs(reverse - reference) < tol * abs(reference)


def test_backward_failure_raises_or_is_reported():
    """`throw=True` raises, under jit, on a backward solve that cannot finish; with
    `throw=False` the statistics say that it did not."""
    model_with, ps, st, x = _tanh_problem()
    failing = jaxdeq.ImplicitAdjoint(max_steps=1, throw=True)
    with pytest.raises(Exception, match="within max_steps"):
        jax.jit(jax.grad(_loss_fn(model_with(failing), st, x)))(ps)
    reports = []
    quiet = jaxdeq.ImplicitAdjoint(max_steps=1, callback=reports.append)
    grad = jax.jit(jax.grad(_loss_fn(model_with(quiet), st, x)))(ps)
    assert np.all(np.isfinite(jax.flatten_util.ravel_pytree(grad)[0]))
    stats = _stacked(reports)
    assert stats.result.shape == (5,)
    assert np.all(stats.result == jaxdeq.RESULTS.max_steps_reached)
    assert np.all(stats.steps == 1)  # max_steps: one product
    assert np.all(stats.relative_residual_norm > 1e-6)


def test_bad_implicit_adjoint_configuration():
    with pytest.raises(ValueError, match="linear_solver: expected 'auto'"):
        jaxdeq.ImplicitAdjoint("anderson")
    with pytest.raises(TypeError, match="linear_solver"):
        jaxdeq.ImplicitAdjoint(optx.Newton(rtol=1e-3, atol=1e-3))
    with pytest.raises(ValueError, match="max_steps"):
        jaxdeq.ImplicitAdjoint(max_steps=0)
    with pytest.raises(ValueError, match="restart"):
        jaxdeq.ImplicitAdjoint(restart=0)
    with pytest.raises(ValueError, match="rtol"):
        jaxdeq.ImplicitAdjoint(rtol=-1.0)
    with pytest.raises(TypeError, match="atol"):
        jaxdeq.ImplicitAdjoint(atol="1e-6")
    with pytest.raises(TypeError, match="callback"):
        jaxdeq.ImplicitAdjoint(callback=3)
    with pytest.raises(ValueError, match="rtol"):
        jaxdeq.ImplicitAdjoint(rtol=1.0)  # would accept u = 0
    with pytest.raises(ValueError, match="atol"):
        jaxdeq.ImplicitAdjoint(atol=float("inf"))
    with pytest.raises(TypeError, match="steps"):
        jaxdeq.PhantomGradient(steps=True)
    with pytest.raises(TypeError, match="damping"):
        jaxdeq.PhantomGradient(damping="0.5")
    jaxdeq.ImplicitAdjoint(rtol=np.float32(1e-6), max_steps=np.int64(5))
