"""`init` runs every layer's initialiser in one compiled program whose random draws
and elementwise chains are shared by all layers (`jaxdeq._init_program`): the
parameters are bit-for-bit those of the plain computation, the program does not grow
with the number of layers, and `init` compiles once."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import jaxdeq
from jaxdeq import nn
from jaxdeq._init_program import init_program, program_jaxpr

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _multiscale(sizes):
    """The seed's multiscale model (4 scales: sizes (4, 3, 2, 1))."""
    t = jnp.tanh
    first = sizes[0]
    main = (
        nn.Parallel(
            jnp.add,
            nn.Dense(first, first, t, use_bias=False),
            nn.Dense(first, first, t, use_bias=False),
        ),
        *(nn.Dense(s, s, t) for s in sizes[1:]),
    )
    mapping = tuple(
        tuple(
            nn.NoOpLayer() if i == j else nn.Dense(a, b, t) for j, b in enumerate(sizes)
        )
        for i, a in enumerate(sizes)
    )
    return jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main,
        mapping,
        None,
        optx.Newton(rtol=1e-5, atol=1e-5),
        tuple((s,) for s in sizes),
    )


def _leaves(tree):
    return [
        np.asarray(jax.random.key_data(leaf))
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        else np.asarray(leaf)
        for leaf in jax.tree.leaves(tree)
    ]


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@contextlib.contextmanager
def _count_compiles():
    count = [0]

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _models(dtype):
    x_ms = jnp.ones((12, 4), dtype)
    conv = nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.WeightNorm(nn.Conv((3, 3), 4, 4, jnp.tanh, use_bias=False)),
            nn.SpectralNorm(nn.Conv((3, 3), 4, 4), n_power_iterations=2),
        ),
        nn.WrappedFunction(jnp.tanh),
    )
    x_conv = jnp.ones((2, 6, 6, 4), dtype)
    return [
        (_multiscale((4, 3)), x_ms),
        (
            jaxdeq.DeepEquilibriumNetwork(conv, optx.Newton(rtol=1e-5, atol=1e-5)),
            x_conv,
        ),
        (
            jaxdeq.SkipDeepEquilibriumNetwork(
                nn.Parallel(jnp.add, nn.Dense(4, 4, jnp.tanh), nn.Dense(4, 4)),
                nn.Dense(4, 4),
                optx.Newton(rtol=1e-5, atol=1e-5),
            ),
            x_ms,
        ),
        (_multiscale((4, 3, 2, 1)), x_ms),
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_init_values_are_those_of_the_plain_computation(dtype, index):
    model, x = _models(dtype)[index]
    key = jax.random.key(3)
    ps, st = model.init(key, x)
    if model.init_in_one_program:
        # the multiscale model's `init` before: one plain jitted program
        _assert_identical((ps, st), jax.jit(model._init_with_key)(key, x))
    else:
        _assert_identical((ps, st), model._init_with_key(key, x))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("index", [0, 3])
def test_multiscale_init_values_are_the_eager_ones(dtype, index):
    """Against the initialisers run op by op (slow: each op compiles per shape)."""
    model, x = _models(dtype)[index]
    key = jax.random.key(3)
    _assert_identical(model.init(key, x), model._init_with_key(key, x))


@pytest.mark.slow
def test_zoo_classifier_init_matches_the_plain_computation():
    model = jaxdeq.mdeq_image_classifier(
        image_size=8, channels=(4, 8), num_groups=2, head_grid=2
    )
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    key = jax.random.key(1)
    ps, st = model.init(key, x)
    stem_key, deq_key, head_key = jax.random.split(key, 3)
    _assert_identical(ps["stem"], jax.jit(model.stem.init)(stem_key, x)[0])
    _assert_identical(ps["stem"], model.stem.init(stem_key, x)[0])
    h = jax.eval_shape(model.stem.apply, ps["stem"], st["stem"], x)[0]
    h = jnp.zeros(h.shape, h.dtype)
    _assert_identical(
        (ps["deq"], st["deq"]), jax.jit(model.deq._init_with_key)(deq_key, h)
    )
    z = model.deq.apply(ps["deq"], st["deq"], h)[0]
    z = jax.tree.map(jnp.zeros_like, z)
    _assert_identical(ps["head"], model.head.init(head_key, z)[0])


def test_init_compiles_one_program():
    # (a size no other test uses: nothing of it is in the compilation caches)
    model, x = _multiscale((7, 5, 3, 2)), jnp.ones((3, 7), jnp.float32)
    with _count_compiles() as compiles:
        model.init(jax.random.key(0), x)
    assert compiles[0] == 1


def test_init_program_does_not_grow_with_the_number_of_layers():
    """One random hash per level of key derivation and one elementwise chain for
    all layers: the 4-scale model (20 layers) has the program of the 2-scale one
    (6 layers), op for op, but for the key plumbing and the output slices."""

    def counts(sizes):
        model = _multiscale(sizes)
        x = jnp.ones((2, sizes[0]), jnp.float32)
        jaxpr = program_jaxpr(model._init_with_key, jax.random.key(0), x)
        names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
        return {name: names.count(name) for name in set(names)}

    small, large = counts((4, 3)), counts((4, 3, 2, 1))
    # the draws are hashed in the program (no per-layer random primitive) ...
    for name in ("random_bits", "random_fold_in", "threefry2x32", "erf_inv"):
        assert small.get(name, 0) == large.get(name, 0), name
    # ... one truncated normal for all kernels, and one hash's rounds per level
    assert large["erf_inv"] == 1
    assert large.get("random_bits", 0) == large.get("random_fold_in", 0) == 0
    assert small["xor"] == large["xor"]
    # (the plain program has one chain per layer)
    plain = jax.make_jaxpr(_multiscale((4, 3, 2, 1))._init_with_key)(
        jax.random.key(0), jnp.ones((2, 4), jnp.float32)
    )
    assert str(plain).count("erf_inv") >= 16


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_draws_match_jax(width):
    dtype = jnp.dtype(f"uint{width}")

    def draws(key, x):
        k1, k2 = jax.random.split(key)
        k3 = jax.random.fold_in(k2, x.astype(jnp.uint32)[0])  # traced data
        keys = jax.random.split(k1, (2, 3))
        return (
            jax.random.bits(k1, (3, 5), dtype),
            jax.random.bits(k3, (7,), dtype),
            jax.random.bits(keys[1, 2], (), dtype),
            jax.random.normal(k3, (4, 2), jnp.float32),
            jax.random.uniform(jax.random.fold_in(k1, 7), (9,), jnp.float64),
            keys,
            jnp.sin(x) * 2.0,
        )

    args = (jax.random.key(5), jnp.arange(3.0))
    _assert_identical(init_program(draws, *args), jax.jit(draws)(*args))
    _assert_identical(init_program(draws, *args), draws(*args))


def test_other_random_implementations_and_effects_run_as_they_are():
    def rbg(key):
        return jax.random.normal(jax.random.fold_in(key, 1), (3,))

    key = jax.random.key(0, impl="rbg")
    _assert_identical(init_program(rbg, key), jax.jit(rbg)(key))

    def printing(key):
        jax.debug.print("drawing")
        return jax.random.normal(key, (3,))

    key = jax.random.key(0)
    _assert_identical(init_program(printing, key), jax.jit(printing)(key))


def test_trace_time_errors_still_name_the_argument():
    model = _multiscale((4, 3, 2, 1))
    with pytest.raises(ValueError, match="main_layers\\[0\\]"):
        model.init(jax.random.key(0), jnp.ones((12, 5), jnp.float32))


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_nonfinite_initial_state_still_poisons_its_sample(bad):
    """The initial-state check (`tree_all_finite`, written so that XLA need
    not fold it element by element when `z0` is a constant) still flags a sample
    whose `z0` holds a non-finite value, even where the solve itself would converge
    from it (the cell maps non-finite states to finite ones)."""
    cell = nn.Parallel(
        jnp.add,
        nn.Chain(nn.WrappedFunction(jnp.nan_to_num), nn.Dense(3, 3, jnp.tanh)),
        nn.NoOpLayer(),
    )
    model = jaxdeq.SkipDeepEquilibriumNetwork(
        cell,
        nn.WrappedFunction(lambda x: jnp.where(x > 10, bad, 0.1 * x)),
        jaxdeq.Anderson(rtol=1e-6, atol=1e-8),
    )
    x = jnp.array([[0.1, 20.0, 0.3], [0.1, 0.2, 0.3]], jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    z, _, solution = model.apply(ps, st, x, return_solution=True)
    assert solution.result.tolist() == [
        int(jaxdeq.RESULTS.nonfinite),
        int(jaxdeq.RESULTS.successful),
    ]
    assert np.all(np.isnan(z[0])) and np.all(np.isfinite(z[1]))


def test_init_runs_under_jit_vmap_and_eval_shape():
    """Inside a transformation the key is a tracer: `init` traces the initialisers
    into the enclosing program (same values under `jit`) instead of slicing its
    outputs on the host."""
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
        jaxdeq.Anderson(rtol=1e-4, atol=1e-4),
        ((4,), (2,)),
    )
    x = jnp.ones((3, 4), jnp.float32)
    key = jax.random.key(0)
    eager = model.init(key, x)
    jitted = jax.jit(model.init)(key, x)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    shapes = jax.eval_shape(model.init, key, x)
    assert jax.tree.map(lambda s: s.shape, shapes[0]) == jax.tree.map(
        jnp.shape, eager[0]
    )
    batched = jax.vmap(lambda k: model.init(k, x)[0])(jax.random.split(key, 2))
    assert jax.tree.leaves(batched)[0].shape[0] == 2
