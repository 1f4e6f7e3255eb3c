"""Warm starts, fixed-point reuse, segment loops, anytime outputs and fallback
solvers (issue 15)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import jaxdeq
from helpers import dense_cell, max_rel_error
from jaxdeq import RESULTS, nn

WIDTH = 6
BATCH = 4


def anderson():
    return jaxdeq.Anderson(rtol=1e-10, atol=1e-10)


SOLVERS = {
    "anderson": anderson,
    "broyden": lambda: jaxdeq.Broyden(rtol=1e-10, atol=1e-10),
    "fixed_point": lambda: optx.FixedPointIteration(rtol=1e-10, atol=1e-10),
    "tsit5": diffrax.Tsit5,
}


def make(solver="anderson", *, cell=None, **kwargs):
    solver = SOLVERS[solver]() if isinstance(solver, str) else solver
    kwargs.setdefault("max_steps", 60)
    extra = {}
    if isinstance(solver, diffrax.Tsit5):
        extra = {"rtol": 1e-7, "atol": 1e-7}
        kwargs["max_steps"] = 400
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH) if cell is None else cell, solver, **extra, **kwargs
    )
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
    ps, st = model.init(jax.random.key(0), x)
    return model, ps, st, x


def solve(model, ps, st, x, **kwargs):
    y, _, solution = model.apply(ps, st, x, return_solution=True, **kwargs)
    return y, solution


# --- warm start ------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "tsit5"])
def test_warm_start_from_the_fixed_point_stops_at_once(solver):
    model, ps, st, x = make(solver)
    y, cold = solve(model, ps, st, x)
    assert np.all(cold.result == RESULTS.successful)
    y_warm, warm = solve(model, ps, st, x, z0=cold.z_star)
    assert np.all(warm.result == RESULTS.successful)
    assert max_rel_error(y_warm, y) < 1e-8
    if solver == "tsit5":  # one ODE step, and the steady-state test
        assert np.all(warm.steps <= 1) and np.all(cold.steps > 3)
    else:  # one evaluation: the residual at z0 is within tolerance
        np.testing.assert_array_equal(warm.nfe, 1)
        np.testing.assert_array_equal(warm.steps, 1)


def test_warm_start_from_a_nearby_input_lowers_nfe():
    model, ps, st, x = make()
    _, previous = solve(model, ps, st, x)
    x_next = x + 0.05 * jax.random.normal(jax.random.key(7), x.shape)
    y_cold, cold = solve(model, ps, st, x_next)
    y_warm, warm = solve(model, ps, st, x_next, z0=previous.z_star)
    assert np.all(warm.result == RESULTS.successful)
    assert np.all(warm.nfe < cold.nfe), (warm.nfe, cold.nfe)
    assert max_rel_error(y_warm, y_cold) < 1e-8


def test_warm_start_does_not_recompile_when_z0_changes():
    model, ps, st, x = make()
    apply = jax.jit(lambda z0: model.apply(ps, st, x, z0=z0)[0])
    for scale in (0.0, 0.3, -1.0):
        apply(jnp.full((BATCH, WIDTH), scale)).block_until_ready()
    assert apply._cache_size() == 1


def test_implicit_gradients_do_not_depend_on_the_warm_start():
    model, ps, st, x = make()
    _, previous = solve(model, ps, st, x + 0.1)

    def loss(ps, z0):
        kwargs = {} if z0 is None else {"z0": z0}
        return jnp.sum(jnp.sin(model.apply(ps, st, x, **kwargs)[0]))

    g_cold = jax.grad(loss)(ps, None)
    g_warm, g_z0 = jax.grad(loss, argnums=(0, 1))(ps, previous.z_star)
    assert max_rel_error(g_warm, g_cold) < 1e-7
    np.testing.assert_array_equal(g_z0, 0.0)  # the fixed point does not depend on z0


def test_unrolled_gradients_flow_into_the_warm_start():
    model, ps, st, x = make(adjoint=jaxdeq.UnrolledAdjoint(), max_steps=3)
    z0 = 0.1 * jnp.ones((BATCH, WIDTH))

    def loss(z0):
        return jnp.sum(jnp.sin(model.apply(ps, st, x, z0=z0)[0]))

    g = jax.grad(loss)(z0)
    eps = 1e-6
    direction = jax.random.normal(jax.random.key(3), z0.shape)
    fd = (loss(z0 + eps * direction) - loss(z0 - eps * direction)) / (2 * eps)
    assert abs(float(jnp.vdot(g, direction)) - float(fd)) < 1e-6 * max(1, abs(fd))
    assert float(jnp.max(jnp.abs(g))) > 1e-3


def test_warm_mask_starts_the_other_samples_cold():
    model, ps, st, x = make("broyden", init=None)  # skip-reg: z0 = f(0, x)
    y_cold, cold = solve(model, ps, st, x)
    warm = jnp.array([True, False, True, False])
    y, solution = solve(model, ps, st, x, z0=cold.z_star, warm=warm)
    np.testing.assert_array_equal(solution.nfe[np.asarray(warm)], 1)
    np.testing.assert_array_equal(
        solution.nfe[~np.asarray(warm)], cold.nfe[~np.asarray(warm)]
    )
    np.testing.assert_allclose(
        y[~np.asarray(warm)], y_cold[~np.asarray(warm)], 0, 1e-12
    )


def test_multiscale_warm_start():
    model = jaxdeq.MultiScaleDeepEquilibriumNetwork(
        (
            nn.Chain(
                nn.Parallel(jnp.add, nn.Dense(4, 4, use_bias=False), nn.Dense(4, 4)),
                nn.WrappedFunction(jnp.tanh),
            ),
            nn.Dense(2, 2, activation=jnp.tanh),
        ),
        ((nn.NoOpLayer(), nn.Dense(4, 2)), (nn.Dense(2, 4), nn.NoOpLayer())),
        None,
        anderson(),
        ((4,), (2,)),
        max_steps=60,
    )
    x = jax.random.normal(jax.random.key(1), (3, 4))
    ps, st = model.init(jax.random.key(0), x)
    y, cold = solve(model, ps, st, x)
    y_warm, warm = solve(model, ps, st, x, z0=cold.z_star)
    np.testing.assert_array_equal(warm.nfe, 1)
    assert max_rel_error(y_warm, y) < 1e-8


def test_bad_warm_starts_name_the_argument():
    model, ps, st, x = make()
    with pytest.raises(ValueError, match="z0: expected a state shaped like"):
        model.apply(ps, st, x, z0=jnp.zeros((BATCH, WIDTH + 1)))
    with pytest.raises(ValueError, match="z0: expected a state shaped like"):
        model.apply(ps, st, x, z0=(jnp.zeros((BATCH, WIDTH)),))
    with pytest.raises(TypeError, match="z0: expected floating arrays"):
        model.apply(ps, st, x, z0=jnp.zeros((BATCH, WIDTH), jnp.int32))
    with pytest.raises(TypeError, match=r"warm: expected a bool array of shape \(4,\)"):
        model.apply(ps, st, x, z0=jnp.zeros((BATCH, WIDTH)), warm=jnp.ones(BATCH))
    with pytest.raises(ValueError, match="warm: a warm-start mask needs z0"):
        model.apply(ps, st, x, warm=jnp.ones(BATCH, bool))
    # A non-finite warm start is garbage in: that sample's output is NaN.
    z0 = jnp.zeros((BATCH, WIDTH)).at[2, 0].set(jnp.nan)
    y, solution = solve(model, ps, st, x, z0=z0)
    assert solution.result.tolist() == [0, 0, RESULTS.nonfinite, 0]
    y = np.asarray(y)
    assert np.all(np.isnan(y[2])) and np.all(np.isfinite(y[[0, 1, 3]]))


# --- fixed-point reuse store -------------------------------------------------------


def test_store_shapes_lookup_update_and_staleness_under_jit():
    like = (jax.ShapeDtypeStruct((2, 3), jnp.float32), jnp.zeros((2, 2, 2)))
    store = jaxdeq.FixedPointStore(like, 5, max_age=1)
    assert store.z[0].shape == (5, 3) and store.z[1].shape == (5, 2, 2)
    assert store.z[0].dtype == jnp.float32 and store.written.tolist() == [-1] * 5
    index = jnp.array([4, 1])
    z0, warm = jax.jit(lambda s: s.lookup(index, now=0))(store)
    assert warm.tolist() == [False, False] and z0[0].shape == (2, 3)
    z = (jnp.ones((2, 3)), jnp.full((2, 2, 2), 2.0).at[1, 0, 0].set(jnp.nan))
    update = jax.jit(lambda s, z, now: s.update(index, z, now=now))
    store = update(store, z, 3)
    # sample 1's state is not finite: not stored
    assert store.written.tolist() == [-1, -1, -1, -1, 3]
    z0, warm = store.lookup(index, now=4)
    assert warm.tolist() == [True, False]
    np.testing.assert_array_equal(z0[0][0], 1.0)
    assert store.lookup(index, now=5)[1].tolist() == [False, False]  # stale
    # an entry from a later `now` (a reset counter) is stale too
    assert store.lookup(index, now=2)[1].tolist() == [False, False]
    kept = store.update(
        jnp.array([0, 2]),
        jax.tree.map(jnp.ones_like, z),
        now=6,
        keep=jnp.array([False, True]),
    )
    assert kept.written.tolist() == [-1, -1, 6, -1, 3]


def test_store_rejects_bad_arguments():
    store = jaxdeq.FixedPointStore(jnp.zeros((2, 3)), 4)
    with pytest.raises(TypeError, match="like: expected a batch-first state"):
        jaxdeq.FixedPointStore(jnp.zeros((2, 3), jnp.int32), 4)
    with pytest.raises(ValueError, match="size: expected an int >= 1"):
        jaxdeq.FixedPointStore(jnp.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match="max_age: expected None or an int >= 0"):
        jaxdeq.FixedPointStore(jnp.zeros((2, 3)), 4, max_age=-1)
    with pytest.raises(TypeError, match="index: expected a 1-d integer array"):
        store.lookup(jnp.array([0.0, 1.0]), now=0)
    with pytest.raises(TypeError, match="now: expected an int"):
        store.lookup(jnp.array([0, 1]), now=1.5)
    with pytest.raises(ValueError, match="now: expected an int >= 0"):
        store.update(jnp.array([0, 1]), jnp.zeros((2, 3)), now=-3)
    with pytest.raises(Exception, match="now: expected an int >= 0"):
        lookup = jax.jit(lambda s, now: s.lookup(jnp.array([0, 1]), now=now))
        lookup(store, jnp.int32(-1))[1].block_until_ready()
    with pytest.raises(ValueError, match="z_star: expected states of shape"):
        store.update(jnp.array([0, 1]), jnp.zeros((2, 4)), now=0)
    with pytest.raises(Exception, match=r"index: expected example indices in 0..3"):
        jax.jit(lambda i: store.lookup(i, now=0))(jnp.array([0, 4]))


def test_store_lowers_nfe_over_a_second_pass_of_the_data():
    model, ps, st, _ = make(max_steps=60)
    data = jax.random.normal(jax.random.key(5), (12, WIDTH))
    store = jaxdeq.FixedPointStore(jax.ShapeDtypeStruct((BATCH, WIDTH), data.dtype), 12)

    @jax.jit
    def step(store, index, epoch):
        z0, warm = store.lookup(index, now=epoch)
        y, _, sol = model.apply(
            ps, st, data[index], z0=z0, warm=warm, return_solution=True
        )
        return store.update(index, sol.z_star, now=epoch), y, sol.nfe

    nfe, outputs = {}, {}
    for epoch in range(2):
        for start in range(0, 12, BATCH):
            index = jnp.arange(start, start + BATCH)
            store, y, n = step(store, index, epoch)
            nfe.setdefault(epoch, []).append(n)
            outputs.setdefault(epoch, []).append(y)
    cold, warm = np.concatenate(nfe[0]), np.concatenate(nfe[1])
    assert np.all(warm == 1) and cold.mean() > 5  # a fixed model: z* reused exactly
    assert max_rel_error(outputs[1], outputs[0]) < 1e-8


# --- segments -----------------------------------------------------------------------


def test_scan_segments_warm_starts_each_segment():
    # (A DEQ-practice tolerance: Anderson on this 6-d cell reaches 1e-10 in about
    # n + 1 steps from any nearby start.)
    model, ps, st, _ = make(jaxdeq.Anderson(rtol=1e-4, atol=1e-4))
    t = jnp.linspace(0.0, 0.1, 8)[:, None, None]
    frames = jnp.sin(
        2 * t + jnp.arange(BATCH * WIDTH, dtype=t.dtype).reshape(1, BATCH, WIDTH)
    )
    ys, st_out, sols = jaxdeq.scan_segments(model, ps, st, frames, return_solution=True)
    assert ys.shape == (8, BATCH, WIDTH) and sols.nfe.shape == (8, BATCH)
    cold = [solve(model, ps, st, frame) for frame in frames]
    ys_cold = jnp.stack([c[0] for c in cold])
    nfe_cold = np.stack([c[1].nfe for c in cold])
    assert max_rel_error(ys, ys_cold) < 1e-3
    np.testing.assert_array_equal(sols.nfe[0], nfe_cold[0])  # the first starts cold
    assert np.mean(np.asarray(sols.nfe[1:])) < 0.8 * np.mean(nfe_cold[1:])
    assert jax.tree.structure(st_out) == jax.tree.structure(st)


def test_scan_segments_gradients_per_segment_and_through_the_carry():
    frames = jax.random.normal(jax.random.key(2), (3, BATCH, WIDTH))
    model, ps, st, _ = make()

    def loss(ps, frames, model=model, **kwargs):
        ys, _ = jaxdeq.scan_segments(model, ps, st, frames, **kwargs)
        return jnp.sum(jnp.sin(ys[-1]))

    # Detached carry: the last segment's output depends on the last frame only.
    g = jax.grad(loss, argnums=1)(ps, frames)
    np.testing.assert_array_equal(g[:2], 0.0)
    g_ps = jax.grad(loss)(ps, frames)
    g_ref = jax.grad(lambda ps: jnp.sum(jnp.sin(model.apply(ps, st, frames[-1])[0])))(
        ps
    )
    assert max_rel_error(g_ps, g_ref) < 1e-7
    with pytest.raises(ValueError, match="carry_gradient: the model's gradient mode"):
        loss(ps, frames, carry_gradient=True)
    # Unrolled, few steps: the carried state's derivative reaches earlier frames.
    unrolled, ps_u, st, _ = make(adjoint=jaxdeq.UnrolledAdjoint(), max_steps=2)
    g = jax.grad(loss, argnums=1)(ps_u, frames, unrolled, carry_gradient=True)
    assert float(jnp.max(jnp.abs(g[0]))) > 1e-4
    with pytest.raises(ValueError, match="xs: expected segment-first inputs"):
        jaxdeq.scan_segments(model, ps, st, frames[0, 0])
    with pytest.raises(ValueError, match="xs: expected at least one segment"):
        jaxdeq.scan_segments(model, ps, st, frames[:0])


# --- anytime ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,joint",
    [
        ("anderson", False),
        ("broyden", False),
        ("anderson", True),
        ("fixed_point", False),
    ],
)
def test_anytime_states_equal_separate_solves(solver, joint):
    model, ps, st, x = make(solver, joint_solve=joint, max_steps=40)
    budgets = (1, 3, 6, 40)
    y, solution = solve(model, ps, st, x, anytime=(6, 1, 3, 40, 3))
    anytime = solution.anytime
    assert anytime.budgets == budgets
    assert anytime.z_star.shape == (4, BATCH, WIDTH) and anytime.nfe.shape == (4, BATCH)
    for j, b in enumerate(budgets):
        y_b, separate = solve(model, ps, st, x, max_steps=b)
        np.testing.assert_allclose(anytime.z_star[j], y_b, rtol=1e-12, atol=1e-12)
        for name in ("nfe", "steps", "result"):
            np.testing.assert_array_equal(
                getattr(anytime, name)[j], getattr(separate, name), err_msg=name
            )
    np.testing.assert_array_equal(anytime.z_star[-1], y)
    assert np.all(anytime.result[0] == RESULTS.max_steps_reached)


def test_anytime_with_a_traced_budget_and_bad_budgets():
    model, ps, st, x = make(max_steps=20)
    run = jax.jit(lambda b: solve(model, ps, st, x, anytime=(2, 5), max_steps=b)[1])
    solution = run(jnp.int32(5))
    y5, five = solve(model, ps, st, x, max_steps=5)
    np.testing.assert_array_equal(solution.anytime.z_star[1], y5)
    np.testing.assert_array_equal(solution.anytime.nfe[1], five.nfe)
    with pytest.raises(
        ValueError, match=r"anytime: expected a sequence of ints in 1..20"
    ):
        model.apply(ps, st, x, anytime=(0, 4))
    with pytest.raises(ValueError, match=r"<= the per-call max_steps \(4\)"):
        model.apply(ps, st, x, anytime=(2, 8), max_steps=4)
    with pytest.raises(Exception, match=r"anytime: expected budgets <= the per-call"):
        run(jnp.int32(3)).anytime.nfe.block_until_ready()
    with pytest.raises(TypeError, match="anytime: expected a sequence of ints"):
        model.apply(ps, st, x, anytime=4)
    with pytest.raises(TypeError, match="anytime: expected a sequence of ints"):
        model.apply(ps, st, x, anytime=(2.0,))
    ode, ps_o, st_o, _ = make("tsit5")
    with pytest.raises(ValueError, match="anytime: .* optimistix-style solvers"):
        ode.apply(ps_o, st_o, x, anytime=(2,))


def test_anytime_states_of_a_nonfinite_input_are_nan():
    model, ps, st, x = make()
    x = x.at[1, 0].set(jnp.inf)
    _, solution = solve(model, ps, st, x, anytime=(2, 5))
    assert np.all(np.isnan(solution.anytime.z_star[:, 1]))
    assert np.all(solution.anytime.result[:, 1] == RESULTS.nonfinite)
    assert np.all(np.isfinite(solution.anytime.z_star[:, [0, 2, 3]]))


# --- fallback -----------------------------------------------------------------------


def _linear_cell():
    """`f(z, x) = a z + x` with the slope `a = x[..., :1]` per sample: a contraction
    for `|a| < 1`, an oscillating divergence of fixed-point iteration for `a < -1`
    (the fixed point `x / (1 - a)` exists; Anderson finds it)."""
    return nn.WrappedFunction(lambda zx: zx[1][..., :1] * zx[0] + zx[1])


@pytest.mark.parametrize("joint", [False, True])
def test_fallback_solver_rescues_the_failed_sample_only(joint):
    x = jnp.array([[0.5, 1.0, -1.0], [-1.5, 0.5, 2.0], [0.2, -0.3, 0.1]])
    primary = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
    kwargs = dict(init="zeros", max_steps=40, joint_solve=joint)
    plain = jaxdeq.DeepEquilibriumNetwork(_linear_cell(), primary, **kwargs)
    rescued = jaxdeq.DeepEquilibriumNetwork(
        _linear_cell(), primary, fallback=anderson(), **kwargs
    )
    ps, st = plain.init(jax.random.key(0), x)
    y_plain, sol_plain = solve(plain, ps, st, x)
    y, sol = solve(rescued, ps, st, x)
    y, y_plain = np.asarray(y), np.asarray(y_plain)
    exact = x / (1 - x[:, :1])
    if not joint:
        assert sol_plain.result.tolist() == [0, 1, 0]  # the primary fails sample 1
        assert sol.fallback.tolist() == [False, True, False]
        np.testing.assert_array_equal(y[[0, 2]], y_plain[[0, 2]])  # bit-identical
        np.testing.assert_array_equal(
            np.asarray(sol.nfe)[[0, 2]], np.asarray(sol_plain.nfe)[[0, 2]]
        )
        assert sol.nfe[1] > 40 and sol.steps[1] == sol.nfe[1]
    else:  # one coupled problem: the whole batch falls back
        assert sol.fallback.tolist() == [True] * 3
    assert sol.result.tolist() == [0, 0, 0]
    np.testing.assert_allclose(y, exact, rtol=1e-8, atol=1e-8)
    # implicit gradients at the rescued fixed point: d z*/d x exact
    g = jax.grad(lambda x: jnp.sum(rescued.apply(ps, st, x)[0][1]))(x)
    a, b = x[1, 0], x[1]
    want = (
        jnp.zeros_like(x).at[1].set(1 / (1 - a)).at[1, 0].add(jnp.sum(b) / (1 - a) ** 2)
    )
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-8)


def test_fallback_trace_and_invalid_pairs():
    x = jnp.array([[0.5, 1.0, -1.0], [-1.5, 0.5, 2.0]])
    primary = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
    model = jaxdeq.DeepEquilibriumNetwork(
        _linear_cell(), primary, max_steps=40, trace=True, fallback=anderson()
    )
    ps, st = model.init(jax.random.key(0), x)
    _, sol = solve(model, ps, st, x)
    assert sol.trace.shape == (2, 80)
    assert np.all(np.isinf(sol.trace[0, 40:])) and np.isfinite(sol.trace[1, 40])
    with pytest.raises(TypeError, match="fallback: expected an optimistix"):
        jaxdeq.DeepEquilibriumNetwork(_linear_cell(), primary, fallback=diffrax.Tsit5())
    with pytest.raises(ValueError, match="fallback: .*solves cannot be continued"):
        jaxdeq.DeepEquilibriumNetwork(_linear_cell(), diffrax.Tsit5(), fallback=primary)
    with pytest.raises(ValueError, match="fallback: not available here: ShineGradient"):
        jaxdeq.DeepEquilibriumNetwork(
            _linear_cell(),
            jaxdeq.Broyden(rtol=1e-6, atol=1e-6),
            adjoint=jaxdeq.ShineGradient(),
            fallback=primary,
        )
    with pytest.raises(ValueError, match="fallback: not available here: sample_states"):
        jaxdeq.DeepEquilibriumNetwork(
            _linear_cell(), primary, sample_states=2, fallback=anderson()
        )
    with pytest.raises(ValueError, match="anytime: .*without a fallback"):
        model.apply(ps, st, x, anytime=(2,))
    with pytest.raises(TypeError, match="did you mean 'fallback'"):
        jaxdeq.DeepEquilibriumNetwork(_linear_cell(), primary, fallbak=anderson())


def test_framework_wrappers_take_warm_starts_and_anytime_budgets():
    import flax.linen as linen
    from flax import nnx

    import jaxdeq.equinox
    import jaxdeq.flax

    model, _, _, x = make()
    linen_deq = jaxdeq.flax.DEQ(model)
    variables = linen_deq.init(jax.random.key(0), x)
    with jax.numpy_dtype_promotion("standard"):
        nnx_deq = jaxdeq.flax.NNXDEQ(model, x, rngs=nnx.Rngs(0))
    eqx_deq = jaxdeq.equinox.DEQ(model, x, key=jax.random.key(0))
    calls = {
        "linen": lambda **kw: linen_deq.apply(
            variables, x, return_solution=True, mutable=["deq_state"], **kw
        )[0][1],
        "nnx": lambda **kw: nnx_deq(x, return_solution=True, **kw)[1],
        "equinox": lambda **kw: eqx_deq(x, return_solution=True, **kw)[1],
    }
    del linen
    for name, call in calls.items():
        cold = call()
        warm = call(z0=cold.z_star)
        np.testing.assert_array_equal(warm.nfe, 1, err_msg=name)
        anytime = call(anytime=(2, 50)).anytime
        assert anytime.budgets == (2, 50)
        np.testing.assert_array_equal(anytime.nfe[0], 2, err_msg=name)
        np.testing.assert_array_equal(anytime.nfe[1], cold.nfe, err_msg=name)
