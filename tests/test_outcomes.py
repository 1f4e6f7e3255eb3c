"""Outcomes you can trust and state that never recompiles: `st` independent of the
batch, non-finite values, `throw`, empty and half-precision batches, diffrax
steady states, cell-evaluation counts, error messages, silently ignored options."""

import functools
import inspect

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pytest
from flax import nnx

import jaxdeq
import jaxdeq.equinox
import jaxdeq.flax
from helpers import dense_cell, tree_allclose
from jaxdeq import nn

WIDTH = 3
SUCCESS, MAX_STEPS, DIVERGED, NONFINITE = (int(code) for code in jaxdeq.RESULTS)

SOLVERS = {
    "anderson": lambda: jaxdeq.Anderson(rtol=1e-8, atol=1e-8),
    "broyden": lambda: jaxdeq.Broyden(rtol=1e-8, atol=1e-8),
    "fixed_point": lambda: optx.FixedPointIteration(rtol=1e-8, atol=1e-8),
    "newton": lambda: optx.Newton(rtol=1e-8, atol=1e-8),
    "tsit5": lambda: diffrax.Tsit5(),
}


def _model(solver="anderson", cell=None, **kwargs):
    cell = dense_cell(WIDTH) if cell is None else cell
    if solver == "tsit5":
        kwargs.setdefault("rtol", 1e-8)
        kwargs.setdefault("atol", 1e-8)
        kwargs.setdefault("max_steps", 200)
    return jaxdeq.DeepEquilibriumNetwork(cell, SOLVERS[solver](), **kwargs)


def _x(batch, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, WIDTH), dtype)


def _shapes(tree):
    return jax.tree.map(lambda leaf: (jnp.shape(leaf), jnp.result_type(leaf)), tree)


# --- st never depends on the batch --------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "anderson",
        "newton",
        "tsit5",
        pytest.param("ode", marks=pytest.mark.slow),
    ],
)
def test_train_step_compiles_once_while_st_flows_through_other_batches(kind):
    if kind == "ode":
        model = jaxdeq.DeepEquilibriumNetwork(
            dense_cell(WIDTH), diffrax.Tsit5(), problem_type="ode"
        )
    else:
        model = _model(kind)
    ps, st = model.init(jax.random.key(0), _x(4))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(ps)

    @jax.jit
    def train_step(ps, st, opt_state, x):
        def loss(ps):
            z, new_st, solution = model.apply(ps, st, x, return_solution=True)
            return jnp.mean(z**2), (new_st, solution.nfe)

        (_, (st, nfe)), grads = jax.value_and_grad(loss, has_aux=True)(ps)
        with jax.numpy_dtype_promotion("standard"):  # (optax's scalar arithmetic)
            updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(ps, updates), st, opt_state, nfe

    evaluate = jax.jit(model.apply)
    for eval_batch in (3, 1, 17):  # eval calls of other sizes, a last partial batch
        ps, st, opt_state, nfe = train_step(ps, st, opt_state, _x(4))
        assert nfe.shape == (4,)
        _, st = evaluate(ps, st, _x(eval_batch))
    assert train_step._cache_size() == 1
    assert set(st) == {"model", "key"}


def test_wrappers_keep_batch_independent_state():
    model = _model("anderson")
    # Flax linen: the state collection has the same shapes after any batch.
    module = jaxdeq.flax.DEQ(model)
    variables = module.init(jax.random.key(0), _x(4))
    apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["deq_state"]))
    _, updates = apply(variables, _x(4))
    _, updates_small = apply({**variables, **updates}, _x(3))
    assert _shapes(updates_small) == _shapes(updates)
    _, updates = apply({**variables, **updates_small}, _x(4))
    assert apply._cache_size() == 2  # one per input shape
    (_, solution), _ = module.apply(
        variables, _x(3), return_solution=True, mutable=["deq_state"]
    )
    assert solution.nfe.shape == (3,)
    # NNX: the DEQState variable keeps its shapes.
    nnx_deq = jaxdeq.flax.NNXDEQ(model, _x(4), rngs=nnx.Rngs(0))
    before = _shapes(nnx_deq.st.get_value())
    _, solution = nnx_deq(_x(3), return_solution=True)
    assert _shapes(nnx_deq.st.get_value()) == before and solution.nfe.shape == (3,)
    # Equinox: Adam's state from the standard filter does not depend on the batch.
    deq = jaxdeq.equinox.DEQ(model, _x(4), key=jax.random.key(0))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(deq, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(deq, opt_state, x):
        def loss(deq):
            z, st = deq(x, return_state=True)
            return jnp.mean(z**2), st

        (_, st), grads = eqx.filter_value_and_grad(loss, has_aux=True)(deq)
        with jax.numpy_dtype_promotion("standard"):  # (optax's scalar arithmetic)
            updates, opt_state = optimizer.update(grads, opt_state)
        deq = eqx.apply_updates(deq, updates)
        return eqx.tree_at(lambda d: d.st, deq, st), opt_state

    for batch in (4, 3, 4):
        deq, opt_state = step(deq, opt_state, _x(batch))
    assert _shapes(optimizer.init(eqx.filter(deq, eqx.is_inexact_array))) == _shapes(
        opt_state
    )
    z, solution = deq(_x(2), return_solution=True)
    assert solution.result.shape == (2,)


def test_zoo_classifier_returns_its_solution():
    model = jaxdeq.mdeq_image_classifier(
        jaxdeq.Broyden(rtol=1e-3, atol=1e-3),
        image_size=4,
        in_channels=1,
        channels=(2, 4),
        num_groups=2,
        max_steps=4,
    )
    x = jnp.ones((2, 4, 4, 1), jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    logits, st, solution = model.apply(ps, st, x, max_steps=2, return_solution=True)
    assert logits.shape == (2, 10) and np.all(solution.steps <= 2)
    assert "solution" not in st["deq"]


def test_containers_return_their_deq_solutions():
    deq = _model("anderson", jacobian_regularization="forward")
    net = nn.Chain(nn.Dense(2, WIDTH), nn.BranchLayer(deq, nn.NoOpLayer()))
    x = jnp.ones((5, 2))
    ps, st = net.init(jax.random.key(0), x)
    (z, _), _, (embed, (solution, none)) = net.apply(ps, st, x, return_solution=True)
    assert embed is None and none is None and solution.nfe.shape == (5,)

    def jacobian_loss(ps):
        return net.apply(ps, st, x, return_solution=True)[2][1][0].jacobian_loss

    grads = jax.grad(jacobian_loss)(ps)
    assert np.any(grads[1][0]["model"][0][0]["kernel"] != 0)
    with pytest.raises(TypeError, match="return_solution"):
        jaxdeq.equinox.DEQ(nn.Dense(2, 2), x, key=jax.random.key(0))(
            x, return_solution=True
        )


# --- non-finite values ----------------------------------------------------------


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_nonfinite_input_gives_nonfinite_and_nan_output(solver):
    model = _model(solver)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        ps, st, x.at[0, 1].set(jnp.nan)
    )
    assert solution.result.tolist() == [NONFINITE, SUCCESS]
    assert np.all(np.isnan(z[0])) and np.all(np.isfinite(z[1]))
    z_clean, _ = model.apply(ps, st, x[1:])
    assert tree_allclose(z[1:], z_clean, rtol=1e-12, atol=1e-12)
    # forward mode: the bad sample's tangent is NaN too, the other's finite
    _, tangent = jax.jvp(
        lambda x: model.apply(ps, st, x)[0],
        (x.at[0, 1].set(jnp.nan),),
        (jnp.ones_like(x),),
    )
    assert np.all(np.isnan(tangent[0])) and np.all(np.isfinite(tangent[1]))


@pytest.mark.parametrize("solver", ["anderson", "newton", "tsit5"])
def test_nonfinite_parameter_gives_nan_loss_and_gradients(solver):
    model = _model(solver)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    ps = jax.tree.map(lambda leaf: leaf.at[(0,) * leaf.ndim].set(jnp.inf), ps)

    def loss(ps):
        z, _, solution = model.apply(ps, st, x, return_solution=True)
        return jnp.sum(z), solution.result

    (value, result), grads = jax.value_and_grad(loss, has_aux=True)(ps)
    assert np.isnan(value) and np.all(result == NONFINITE)
    assert any(np.any(np.isnan(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "newton"])
def test_cell_that_goes_nonfinite_reports_nonfinite_with_best_finite_iterate(solver):
    nan_cell = nn.WrappedFunction(lambda zx: zx[0] * jnp.nan + zx[1])
    model = _model(solver, cell=nan_cell)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == NONFINITE)
    np.testing.assert_array_equal(z, 0)  # the initial guess: the only finite iterate
    # A cell finite at first that blows up later: the best finite iterate is kept.
    blowup = nn.WrappedFunction(
        lambda zx: jnp.where(jnp.abs(zx[0]) > 2.5, jnp.nan, 0.5 * zx[0] + zx[1])
    )
    model = _model(solver, cell=blowup)
    x = jnp.full((1, WIDTH), 2.0)  # fixed point 4: the iteration crosses 2.5 first
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == NONFINITE)
    assert np.all(np.isfinite(z)) and np.all(np.abs(z) <= 2.5)


class _ConvergedThenNaN(optx.AbstractFixedPointSolver):
    """Fixed-point iteration whose proposal after the converged evaluation is NaN:
    the evaluated iterate has converged, the unevaluated proposal must not count."""

    inner: optx.FixedPointIteration
    rtol: float = 0.0
    atol: float = 0.0
    norm = staticmethod(optx.max_norm)

    def init(self, *args):
        return self.inner.init(*args)

    def step(self, fn, y, args, options, state, tags):
        new_y, state, aux = self.inner.step(fn, y, args, options, state, tags)
        done, _ = self.inner.terminate(fn, new_y, args, options, state, tags)
        return jnp.where(done, jnp.nan, new_y), state, aux

    def terminate(self, *args):
        return self.inner.terminate(*args)

    def postprocess(self, *args):
        return self.inner.postprocess(*args)


def test_converged_solve_is_not_relabelled_by_its_next_proposal():
    solver = _ConvergedThenNaN(optx.FixedPointIteration(rtol=1e-10, atol=1e-10))
    model = jaxdeq.DeepEquilibriumNetwork(dense_cell(WIDTH, 0.3), solver)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == SUCCESS)
    assert np.all(np.isfinite(z)) and np.max(solution.residual_norm) < 1e-9


@pytest.mark.parametrize("problem_type", ["steady_state", "ode"])
def test_diffrax_cell_that_goes_nonfinite_reports_nonfinite(problem_type):
    nan_cell = nn.Parallel(
        jnp.add, nn.WrappedFunction(lambda z: z * jnp.nan), nn.NoOpLayer()
    )
    model = jaxdeq.DeepEquilibriumNetwork(
        nan_cell, diffrax.Tsit5(), problem_type=problem_type, max_steps=20
    )
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == NONFINITE)  # not a spent budget
    np.testing.assert_array_equal(z, 0)


# --- throw ------------------------------------------------------------------------


def test_throw_raises_under_jit_with_the_outcome_message():
    model = _model("anderson", max_steps=2, throw=True)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    apply = jax.jit(model.apply)
    with pytest.raises(Exception, match="max_steps_reached"):
        jax.block_until_ready(apply(ps, st, x))
    with pytest.raises(Exception, match="nonfinite"):
        jax.block_until_ready(apply(ps, st, x.at[0, 0].set(jnp.nan)))

    # The check runs under jax.grad too (where the primal output is pruned).
    def loss(ps):
        return jnp.sum(model.apply(ps, st, x)[0])

    with pytest.raises(Exception, match="max_steps_reached"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(ps))
    converging = _model("anderson", max_steps=40, throw=True)
    z, _ = jax.jit(converging.apply)(ps, st, x)
    assert np.all(np.isfinite(z))
    with pytest.raises(TypeError, match="throw"):
        _model("anderson", throw="yes")


# --- edge inputs --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["anderson", "newton", "tsit5", "ode", "fixed_depth"])
def test_empty_batch_returns_empty_outputs(kind):
    if kind == "ode":
        model = jaxdeq.DeepEquilibriumNetwork(
            dense_cell(WIDTH), diffrax.Tsit5(), problem_type="ode"
        )
    elif kind == "fixed_depth":
        model = _model("anderson", fixed_depth=3)
    else:
        model = _model(kind)
    ps, st = model.init(jax.random.key(0), _x(2))
    empty = jnp.zeros((0, WIDTH))
    z, _, solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        ps, st, empty
    )
    assert z.shape == (0, WIDTH)
    assert solution.nfe.shape == solution.result.shape == (0,)
    grads = jax.grad(lambda ps: jnp.sum(model.apply(ps, st, empty)[0]))(ps)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_half_precision_with_jaxdeq_solvers(solver, dtype):
    tolerance = 1e-2
    make = {"anderson": jaxdeq.Anderson, "broyden": jaxdeq.Broyden}[solver]
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH, 0.3), make(rtol=tolerance, atol=tolerance)
    )
    x = _x(4, dtype=jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    z_ref, _ = model.apply(ps, st, x)
    half = jax.tree.map(lambda leaf: leaf.astype(dtype), (ps, x))
    z, _, solution = jax.jit(functools.partial(model.apply, return_solution=True))(
        half[0], st, half[1]
    )
    assert z.dtype == dtype and np.all(solution.result == SUCCESS)
    assert np.max(np.abs(np.asarray(z, np.float32) - z_ref)) < 0.05


# --- diffrax ------------------------------------------------------------------------


def test_diffrax_constant_step_solver_reaches_steady_state():
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH, 0.5), diffrax.Euler(), dt0=0.1, max_steps=400
    )
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == SUCCESS)
    rms = lambda a: np.sqrt(np.mean(np.asarray(a) ** 2, axis=-1))  # noqa: E731
    assert np.all(rms(solution.residual) < 1e-6 + 1e-4 * rms(z))


def test_diffrax_steady_state_uses_the_users_controller_tolerances():
    controller = diffrax.PIDController(rtol=1e-7, atol=1e-9)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH, 0.5),
        diffrax.Dopri5(),
        stepsize_controller=controller,
        max_steps=500,
    )
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result == SUCCESS)
    rms = lambda a: np.sqrt(np.mean(np.asarray(a) ** 2, axis=-1))  # noqa: E731
    assert np.all(rms(solution.residual) < 1e-9 + 1e-7 * rms(z))


def test_failed_diffrax_solve_returns_the_lower_residual_state():
    expanding = nn.Parallel(
        jnp.add, nn.WrappedFunction(lambda z: 2.0 * z), nn.NoOpLayer()
    )
    model = jaxdeq.DeepEquilibriumNetwork(expanding, diffrax.Tsit5(), max_steps=40)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.result != SUCCESS)
    np.testing.assert_array_equal(z, 0)  # z0: its residual |x| beats the blown-up state
    assert np.all(np.isfinite(solution.residual_norm))


# --- counts -------------------------------------------------------------------------


def _counting_cell(counter):
    def count(_):
        counter.append(1)

    def f(zx):
        z, x = zx
        jax.debug.callback(count, z)
        return jnp.tanh(0.5 * z + x)

    return nn.WrappedFunction(f)


@pytest.mark.parametrize("solver", ["anderson", "newton", "tsit5"])
def test_nfe_counts_cell_evaluations_and_steps_count_steps(solver):
    counter = []
    model = _model(solver, cell=_counting_cell(counter), max_steps=60)
    x = _x(1)
    ps, st = model.init(jax.random.key(0), x)
    counter.clear()
    _, _, solution = model.apply(ps, st, x, return_solution=True)
    jax.effects_barrier()
    nfe, steps = int(solution.nfe[0]), int(solution.steps[0])
    evaluations = len(counter) - 1  # one more outside the solve: the residual
    assert solution.result[0] == SUCCESS
    if solver == "newton":
        # one evaluation per step, plus the dense Jacobian's WIDTH JVP columns
        assert evaluations == steps and nfe == steps * (1 + WIDTH)
    else:
        assert nfe == evaluations
    if solver == "anderson":
        assert nfe == steps
    if solver == "tsit5":
        assert nfe > 6 * steps  # six stages a step, plus the steady-state test


# --- errors ---------------------------------------------------------------------------


def test_misspelt_keyword_names_the_keyword_meant():
    with pytest.raises(TypeError, match="did you mean 'jacobian_regularization'"):
        _model("anderson", jacobian_regularisation="forward")
    with pytest.raises(TypeError, match="did you mean 'max_steps'"):
        _model("tsit5", max_step=3)
    with pytest.raises(TypeError, match="did you mean 'atol'"):
        jaxdeq.DeepEquilibriumNetwork(dense_cell(WIDTH), diffrax.Tsit5(), atoll=1e-3)


def test_every_model_has_compute_dtype_and_throw_keywords():
    for model in (jaxdeq.DeepEquilibriumNetwork,):
        params = inspect.signature(model).parameters
        assert {"compute_dtype", "throw"} <= set(params)
    ms = jaxdeq.MultiScaleDeepEquilibriumNetwork
    params = inspect.signature(ms).parameters
    assert {"compute_dtype", "throw"} <= set(params)


def test_solver_and_option_values_are_checked():
    with pytest.raises(TypeError, match="rtol"):
        jaxdeq.Anderson(rtol="1e-4", atol=1e-6)
    with pytest.raises(ValueError, match="atol"):
        jaxdeq.Broyden(rtol=1e-4, atol=-1.0)
    with pytest.raises(TypeError, match="'foo'"):
        _model("anderson", options={"foo": 1})
    with pytest.raises(TypeError, match="did you mean 'lower'"):
        _model("newton", options={"lowr": 1.0})
    with pytest.raises(TypeError, match="memory"):
        jaxdeq.Broyden(rtol=1e-4, atol=1e-4, memory=1.5)
    with pytest.raises(TypeError, match="ridge"):
        jaxdeq.Anderson(rtol=1e-4, atol=1e-4, ridge="x")
    with pytest.raises(TypeError, match="jacobian_regularization"):
        _model("anderson", jacobian_regularization=True)
    with pytest.raises(TypeError, match="compute_dtype"):
        _model("anderson", compute_dtype=3)
    with pytest.raises(TypeError, match="rtol"):
        _model("tsit5", rtol="1e-3")
    # TypeError for a wrong type, ValueError for a wrong value of the right type.
    with pytest.raises(TypeError, match="max_steps"):
        _model("anderson", max_steps=1.5)
    with pytest.raises(ValueError, match="max_steps"):
        _model("anderson", max_steps=0)
    assert _model("anderson", max_steps=np.int64(5)).max_steps == 5
    model = _model("anderson")
    ps, st = model.init(jax.random.key(0), _x(2))
    with pytest.raises(TypeError, match="max_steps"):
        model.apply(ps, st, _x(2), max_steps="3")
    with pytest.raises(ValueError, match="st: .*'key'"):
        model.apply(ps, {"model": st["model"]}, _x(2))
    # An unbatched x names what is wrong (x is batch-first), not a reshaped sample.
    with pytest.raises(ValueError, match=r"x: .*batch-first.*x\[None\]"):
        model.apply(ps, st, jnp.ones((WIDTH,)))


@pytest.mark.parametrize("budget", [0, -2, 41])
def test_traced_budget_out_of_range_raises_at_run_time(budget):
    model = _model("anderson", max_steps=40)
    x = _x(2)
    ps, st = model.init(jax.random.key(0), x)
    apply = jax.jit(lambda n: model.apply(ps, st, x, max_steps=n)[0])
    with pytest.raises(Exception, match="max_steps: expected 1 <= max_steps <= 40"):
        jax.block_until_ready(apply(jnp.int32(budget)))
    assert np.all(np.isfinite(apply(jnp.int32(40))))


# --- options that would be silently ignored -------------------------------------------


@pytest.mark.parametrize("multiscale", [False, True])
def test_fixed_depth_unrolls_the_neural_ode_too(multiscale):
    x = _x(2)
    if multiscale:
        main = (dense_cell(WIDTH),)
        model = jaxdeq.MultiScaleNeuralODE(
            main,
            ((nn.NoOpLayer(),),),
            None,
            diffrax.Tsit5(),
            ((WIDTH,),),
            fixed_depth=10,
        )
    else:
        model = jaxdeq.DeepEquilibriumNetwork(
            dense_cell(WIDTH), diffrax.Tsit5(), problem_type="ode", fixed_depth=10
        )
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert np.all(solution.nfe == 10) and np.all(solution.steps == 10)
    cell_ps = ps["main"][0] if multiscale else ps["model"]
    cell_st = st["main"][0] if multiscale else st["model"]
    z_hand = jnp.zeros_like(x)
    for _ in range(10):
        z_hand, _ = dense_cell(WIDTH).apply(cell_ps, cell_st, (z_hand, x))
    z = z[0] if multiscale else z
    assert tree_allclose(z, z_hand, rtol=1e-12, atol=1e-12)


def test_option_pairs_that_would_do_nothing_are_errors():
    with pytest.raises(ValueError, match="adjoint"):
        jaxdeq.DeepEquilibriumNetwork(
            dense_cell(WIDTH),
            diffrax.Tsit5(),
            problem_type="ode",
            adjoint=jaxdeq.PhantomGradient(),
        )
    with pytest.raises(ValueError, match="trace"):
        _model("anderson", fixed_depth=3, trace=True)
    model = _model("anderson", fixed_depth=3)
    ps, st = model.init(jax.random.key(0), _x(2))
    with pytest.raises(ValueError, match="max_steps"):
        model.apply(ps, st, _x(2), max_steps=2)
    with pytest.raises(TypeError, match="return_solution"):
        model.apply(ps, st, _x(2), return_solution="yes")
