"""Multiscale DEQs: the seed's example for several solvers, the map's semantics (each
scale's residual at the returned state, against a hand-written map), gradients against
finite differences and unrolled differentiation, transformations, the skip, skip-reg
and neural-ODE variants, post-fuse layers, Jacobian regularization and bad input."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest
from jax.nn import initializers

import jaxdeq
from helpers import central_difference_grad, max_rel_error, tree_allclose
from jaxdeq import nn

SEED_SCALES = ((4,), (3,), (2,), (1,))


def _seed_layers(gain=1.0):
    """The seed's example: 4 scales, a 4 x 4 mapping matrix, NoOpLayer diagonal.
    `gain` scales the kernels' initial standard deviation (1: flax's LeCun normal, as
    the seed); the seed's untrained map is not a contraction for every input, so the
    convergence test uses a smaller gain."""
    t = jnp.tanh
    init = initializers.variance_scaling(gain**2, "fan_in", "truncated_normal")

    def dense(a, b, **kw):
        return nn.Dense(a, b, t, kernel_init=init, **kw)

    main = (
        nn.Parallel(jnp.add, dense(4, 4, use_bias=False), dense(4, 4, use_bias=False)),
        dense(3, 3),
        dense(2, 2),
        dense(1, 1),
    )
    sizes = [s[0] for s in SEED_SCALES]
    mapping = tuple(
        tuple(nn.NoOpLayer() if i == j else dense(a, b) for j, b in enumerate(sizes))
        for i, a in enumerate(sizes)
    )
    return main, mapping


def _small_layers(sizes=(3, 2), scale=0.4, post_fuse=False):
    """A contractive multiscale map: small kernels, tanh."""

    def dense(a, b, **kw):
        return nn.Dense(a, b, kernel_init=initializers.normal(scale / np.sqrt(a)), **kw)

    a0 = sizes[0]
    main = (
        nn.Chain(
            nn.Parallel(
                jnp.add, dense(a0, a0, use_bias=False), nn.Dense(a0, a0, use_bias=False)
            ),
            nn.WrappedFunction(jnp.tanh),
        ),
    ) + tuple(dense(a, a, activation=jnp.tanh) for a in sizes[1:])
    mapping = tuple(
        tuple(nn.NoOpLayer() if i == j else dense(a, b) for j, b in enumerate(sizes))
        for i, a in enumerate(sizes)
    )
    post = (
        tuple(nn.WrappedFunction(lambda z: 0.5 * jnp.sin(z)) for _ in sizes)
        if post_fuse
        else None
    )
    return main, mapping, post, tuple((a,) for a in sizes)


def _small_model(solver, post_fuse=False, **kw):
    main, mapping, post, scales = _small_layers(post_fuse=post_fuse)
    return jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main, mapping, post, solver, scales, **kw
    )


def _reference_map(model, ps, st, z, x):
    """The map of DESIGN.md, written out by hand from the model's layers."""
    n = len(model.main_layers)
    m = [
        model.main_layers[i].apply(
            ps["main"][i], st["main"][i], (z[0], x) if i == 0 else z[i]
        )[0]
        for i in range(n)
    ]
    fused = [
        sum(
            model.mapping_layers[i][j].apply(
                ps["mapping"][i][j], st["mapping"][i][j], m[i]
            )[0]
            for i in range(n)
        )
        for j in range(n)
    ]
    if model.post_fuse_layer is not None:
        fused = [
            layer.apply(ps["post_fuse"][j], st["post_fuse"][j], fused[j])[0]
            for j, layer in enumerate(model.post_fuse_layer)
        ]
    return tuple(fused)


def _scale_residuals(model, ps, st, z, x):
    fz = _reference_map(model, ps, st, z, x)
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip(fz, z, strict=True)]


SEED_SOLVERS = {
    "newton": lambda: optx.Newton(rtol=1e-5, atol=1e-5),
    "anderson": lambda: jaxdeq.Anderson(rtol=1e-5, atol=1e-5),
    "tsit5": lambda: diffrax.Tsit5(),
}


@pytest.mark.parametrize("solver", sorted(SEED_SOLVERS))
def test_seed_multiscale_example(solver):
    main, mapping = _seed_layers(gain=0.5)
    model = jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main, mapping, None, SEED_SOLVERS[solver](), SEED_SCALES, max_steps=64
    )
    x = jax.random.uniform(jax.random.key(0), (12, 4), jnp.float32)
    ps, st = model.init(jax.random.key(0), x)
    z, st_new, st_new_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    assert tuple(zi.shape for zi in z) == ((12, 4), (12, 3), (12, 2), (12, 1))
    if solver != "tsit5":  # diffrax promotes a float32 state under x64 (core issue)
        assert all(zi.dtype == jnp.float32 for zi in z)
    sol = st_new_solution
    assert np.all(sol.result == jaxdeq.RESULTS.successful)
    assert isinstance(sol.z_star, tuple) and isinstance(sol.residual, tuple)
    # the residual of every scale, at the returned state, of the map written by hand
    assert max(_scale_residuals(model, ps, st, z, x)) < 1e-3
    assert all(float(jnp.max(jnp.abs(r))) < 1e-3 for r in sol.residual)
    assert set(ps) == {"main", "mapping"} and len(ps["mapping"]) == 4
    assert all(len(row) == 4 for row in ps["mapping"])


def _loss_fn(model, st, x, c):
    def loss(ps, x):
        z, _ = model.apply(ps, st, x)
        return sum(jnp.sum(ci * jnp.sin(zi)) for ci, zi in zip(c, z, strict=True))

    return loss


def _targets(key, model, batch):
    keys = jax.random.split(key, len(model.scales))
    return tuple(
        jax.random.normal(k, (batch, *s))
        for k, s in zip(keys, model.scales, strict=True)
    )


@pytest.mark.parametrize("variant", ["zeros", "skip_reg"])
def test_implicit_gradient_matches_finite_differences(variant, getkey):
    x = jax.random.normal(getkey(), (2, 3))
    model = _small_model(
        optx.Newton(rtol=1e-13, atol=1e-13),
        init="zeros" if variant == "zeros" else None,
        adjoint=jaxdeq.ImplicitAdjoint(atol=1e-14, max_steps=500),
    )
    c = _targets(getkey(), model, 2)
    ps, st = model.init(getkey(), x)
    loss = jax.jit(_loss_fn(model, st, x, c))
    g_ps, g_x = jax.grad(loss, argnums=(0, 1))(ps, x)
    fd_ps = central_difference_grad(lambda p: float(loss(p, x)), ps)
    fd_x = central_difference_grad(lambda xx: float(loss(ps, xx)), x)
    assert max_rel_error(g_ps, fd_ps) <= 1e-5
    assert max_rel_error(g_x, fd_x) <= 1e-5


def test_implicit_gradient_matches_unrolled(getkey):
    x = jax.random.normal(getkey(), (2, 3))
    solver = optx.FixedPointIteration(rtol=1e-13, atol=1e-13)
    implicit = _small_model(
        solver, max_steps=200, adjoint=jaxdeq.ImplicitAdjoint(atol=1e-14, max_steps=500)
    )
    unrolled = _small_model(solver, max_steps=200, adjoint=jaxdeq.UnrolledAdjoint())
    c = _targets(getkey(), implicit, 2)
    ps, st = implicit.init(getkey(), x)
    g_imp = jax.jit(jax.grad(_loss_fn(implicit, st, x, c), argnums=(0, 1)))(ps, x)
    g_unr = jax.jit(jax.grad(_loss_fn(unrolled, st, x, c), argnums=(0, 1)))(ps, x)
    assert max_rel_error(g_imp, g_unr) <= 1e-8


def test_jit_equals_eager_and_vmap_equals_batch(getkey):
    x = jax.random.normal(getkey(), (3, 3), jnp.float32)
    model = _small_model(jaxdeq.Anderson(rtol=1e-6, atol=1e-6))
    ps, st = model.init(getkey(), x)
    z_eager, st_eager, st_eager_solution = model.apply(ps, st, x, return_solution=True)
    apply = jax.jit(model.apply, static_argnames="return_solution")
    z_jit, st_jit, st_jit_solution = apply(ps, st, x, return_solution=True)
    assert tree_allclose(z_eager, z_jit, rtol=1e-5, atol=1e-5)
    assert np.array_equal(st_eager_solution.nfe, st_jit_solution.nfe)
    z_vmap = jax.vmap(
        lambda xi: jtu.tree_map(lambda a: a[0], model.apply(ps, st, xi[None])[0])
    )(x)
    assert tree_allclose(z_vmap, z_jit, rtol=1e-5, atol=1e-5)
    # st keeps its structure, shapes and dtypes: a jitted step compiles once
    same = jtu.tree_map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), st, st_jit
    )
    assert jtu.tree_structure(st) == jtu.tree_structure(st_jit)
    assert all(jtu.tree_leaves(same))
    apply(ps, st_jit, x, return_solution=True)
    assert apply._cache_size() == 1


def test_post_fuse_layer_is_applied(getkey):
    x = jax.random.normal(getkey(), (2, 3))
    model = _small_model(optx.Newton(rtol=1e-10, atol=1e-10), post_fuse=True)
    ps, st = model.init(getkey(), x)
    assert set(ps) == {"main", "mapping", "post_fuse"} and len(ps["post_fuse"]) == 2
    z, st_new = model.apply(ps, st, x)
    assert max(_scale_residuals(model, ps, st, z, x)) < 1e-8
    # the post-fuse sin bounds every scale by 0.5
    assert all(float(jnp.max(jnp.abs(zi))) <= 0.5 for zi in z)


def test_skip_variant_trains_the_init_layers(getkey):
    main, mapping, _, scales = _small_layers()
    model = jaxdeq.MultiScaleSkipDeepEquilibriumNetwork(
        main,
        mapping,
        None,
        (nn.Dense(3, 3), nn.Dense(3, 2)),
        optx.Newton(rtol=1e-10, atol=1e-10),
        scales,
    )
    x = jax.random.normal(getkey(), (2, 3))
    ps, st = model.init(getkey(), x)
    assert len(ps["init"]) == 2
    z, st_new, st_new_solution = model.apply(ps, st, x, return_solution=True)
    u0 = st_new_solution.u0
    assert tree_allclose(
        u0,
        tuple(
            nn.Dense(3, s[0]).apply(p, {}, x)[0]
            for p, s in zip(ps["init"], scales, strict=True)
        ),
        rtol=1e-12,
        atol=1e-12,
    )
    assert max(_scale_residuals(model, ps, st, z, x)) < 1e-8

    def skip_loss(ps):
        sol = model.apply(ps, st, x, return_solution=True)[2]
        return sum(
            jnp.mean(jnp.abs(a - b)) for a, b in zip(sol.z_star, sol.u0, strict=True)
        )

    g = jax.grad(skip_loss)(ps)
    assert all(np.any(leaf != 0) for leaf in jtu.tree_leaves(g["init"]))


def test_skip_reg_starts_from_one_application_of_the_map(getkey):
    main, mapping, _, scales = _small_layers()
    model = jaxdeq.MultiScaleSkipDeepEquilibriumNetwork(
        main, mapping, None, None, optx.Newton(rtol=1e-10, atol=1e-10), scales
    )
    x = jax.random.normal(getkey(), (2, 3))
    ps, st = model.init(getkey(), x)
    assert "init" not in ps
    z, st_new, st_new_solution = model.apply(ps, st, x, return_solution=True)
    zeros = tuple(jnp.zeros((2, *s)) for s in scales)
    assert tree_allclose(
        st_new_solution.u0, _reference_map(model, ps, st, zeros, x), 1e-12, 1e-12
    )
    assert max(_scale_residuals(model, ps, st, z, x)) < 1e-8


def test_multiscale_neural_ode(getkey):
    main, mapping, _, scales = _small_layers()
    model = jaxdeq.MultiScaleNeuralODE(
        main, mapping, None, diffrax.Tsit5(), scales, rtol=1e-8, atol=1e-8
    )
    x = jax.random.normal(getkey(), (2, 3))
    ps, st = model.init(getkey(), x)
    z, st_new, st_new_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    term = diffrax.ODETerm(
        lambda t, z, _: jtu.tree_map(
            jnp.subtract, _reference_map(model, ps, st, z, x), z
        )
    )
    ref = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        1.0,
        0.01,
        tuple(jnp.zeros((2, *s)) for s in scales),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
    ).ys
    assert tree_allclose(z, jtu.tree_map(lambda a: a[-1], ref), rtol=1e-6, atol=1e-6)
    assert np.all(st_new_solution.result == jaxdeq.RESULTS.successful)
    g = jax.grad(lambda x: sum(jnp.sum(zi) for zi in model.apply(ps, st, x)[0]))(x)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("mode", ["forward", "reverse", "finite_difference"])
def test_jacobian_regularization(mode, getkey):
    x = jax.random.normal(getkey(), (2, 3))
    model = _small_model(
        optx.Newton(rtol=1e-10, atol=1e-10), jacobian_regularization=mode
    )
    ps, st = model.init(getkey(), x)

    def loss(ps):
        z, st_new, st_new_solution = model.apply(ps, st, x, return_solution=True)
        return st_new_solution.jacobian_loss, (z, st_new_solution)

    (value, (z, sol)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(ps)
    # the same Hutchinson estimate, over all scales, of the hand-written map
    _, probe_key = jax.random.split(st["key"])
    expected = jaxdeq.jacobian_frobenius_estimate(
        lambda z: _reference_map(model, ps, st, z, x), z, probe_key, mode
    )
    assert value > 0
    assert np.isclose(float(value), float(expected), rtol=1e-5)
    assert np.isclose(float(sol.jacobian_loss), float(value))
    leaves = jtu.tree_leaves(g)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.any(leaf != 0) for leaf in leaves)


class TestBadInput:
    main, mapping, _, scales = _small_layers()
    solver = optx.Newton(rtol=1e-5, atol=1e-5)

    def _model(self, **overrides):
        args = dict(
            main_layers=self.main,
            mapping_layers=self.mapping,
            post_fuse_layer=None,
            solver=self.solver,
            scales=self.scales,
        )
        args.update(overrides)
        return jaxdeq.MultiScaleDeepEquilibriumNetwork(**args)

    def test_mapping_matrix_not_square(self):
        with pytest.raises(ValueError, match=r"mapping_layers: .*N = 2"):
            self._model(mapping_layers=self.mapping[:1])
        with pytest.raises(ValueError, match=r"mapping_layers\[1\]: .*row of 2"):
            self._model(mapping_layers=(self.mapping[0], self.mapping[1][:1]))
        with pytest.raises(TypeError, match=r"mapping_layers\[1\]\[0\]"):
            self._model(mapping_layers=(self.mapping[0], (jnp.tanh, nn.NoOpLayer())))

    def test_scales_do_not_match_main_layers(self):
        with pytest.raises(ValueError, match=r"scales: .*one shape per main layer"):
            self._model(scales=((3,),))
        with pytest.raises(ValueError, match=r"scales\[1\]: .*positive ints"):
            self._model(scales=((3,), 2))
        with pytest.raises(ValueError, match=r"scales\[0\]: .*positive ints"):
            self._model(scales=((0,), (2,)))
        with pytest.raises(ValueError, match=r"post_fuse_layer: .*one layer per scale"):
            self._model(post_fuse_layer=(nn.NoOpLayer(),))
        with pytest.raises(ValueError, match=r"init: .*one layer per scale"):
            self._model(init=(nn.NoOpLayer(),))

    def test_mapping_output_does_not_fit_its_scale(self):
        bad = tuple(
            tuple(
                nn.Dense(3, 3) if (i, j) == (0, 1) else layer
                for j, layer in enumerate(row)
            )
            for i, row in enumerate(self.mapping)
        )
        x = jnp.ones((2, 3))
        with pytest.raises(ValueError, match=r"mapping_layers\[0\]\[1\]: .*\(2, 2\)"):
            self._model(mapping_layers=bad).init(jax.random.key(0), x)
        # ... and at apply's trace time, with parameters made for another model
        model = self._model()
        ps, st = model.init(jax.random.key(0), x)
        wrong = eqx.tree_at(
            lambda m: m.mapping_layers[1][0],
            model,
            nn.WrappedFunction(lambda m: jnp.tile(m, (1, 3))),
        )
        with pytest.raises(ValueError, match=r"mapping_layers\[1\]\[0\]"):
            jax.jit(wrong.apply)(ps, st, x)

    def test_scale_the_main_layer_cannot_take(self):
        with pytest.raises(ValueError, match=r"main_layers\[1\]: .*scales\[1\]"):
            self._model(scales=((3,), (5,))).init(jax.random.key(0), jnp.ones((2, 3)))

    def test_init_layer_output_does_not_fit(self):
        model = self._model(init=(nn.Dense(3, 3), nn.Dense(3, 4)))
        with pytest.raises(ValueError, match=r"init\[1\]: .*\(2, 2\)"):
            model.init(jax.random.key(0), jnp.ones((2, 3)))

    def test_neural_ode_fixes_problem_type(self):
        with pytest.raises(TypeError, match="problem_type"):
            jaxdeq.MultiScaleNeuralODE(
                self.main,
                self.mapping,
                None,
                diffrax.Tsit5(),
                self.scales,
                problem_type="steady_state",
            )
        with pytest.raises(TypeError, match="foo"):
            self._model(foo=1)


def test_mdeq_image_classifier(getkey):
    model = jaxdeq.mdeq_image_classifier(
        jaxdeq.Broyden(rtol=1e-3, atol=1e-3),
        num_classes=3,
        image_size=(4, 8),
        in_channels=1,
        channels=(2, 4),
        num_groups=2,
        max_steps=6,
    )
    x = jax.random.normal(getkey(), (2, 4, 8, 1), jnp.float32)
    ps, st = model.init(getkey(), x)
    assert set(ps) == {"stem", "deq", "head"} and len(ps["deq"]["mapping"]) == 2

    @jax.jit
    def loss(ps):
        logits, st_new, sol = model.apply(ps, st, x, return_solution=True)
        return jnp.mean(logits**2), (logits, st_new, sol)

    (value, (logits, st_new, sol)), g = jax.value_and_grad(loss, has_aux=True)(ps)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert [z.shape for z in sol.z_star] == [(2, 4, 8, 2), (2, 2, 4, 4)]
    assert np.all(sol.nfe <= 6) and np.all(np.isfinite(sol.residual_norm))
    assert jtu.tree_structure(st_new) == jtu.tree_structure(st)
    leaves = jtu.tree_leaves(g["deq"])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.any(leaf != 0) for leaf in leaves)
    with pytest.raises(ValueError, match="image_size"):
        jaxdeq.mdeq_image_classifier(optx.Newton(1e-3, 1e-3), image_size=6)
    with pytest.raises(ValueError, match=r"channels\[1\]"):
        jaxdeq.mdeq_image_classifier(optx.Newton(1e-3, 1e-3), channels=(4, 6))


_PREPARE_CALLS = []


class _CountingPrepare(nn.AbstractLayer):
    """Delegates to `layer`, counting the (trace-time) calls of `prepare`."""

    layer: nn.AbstractLayer

    def init(self, key, x):
        return self.layer.init(key, x)

    def prepare(self, ps, st):
        _PREPARE_CALLS.append(None)
        return self.layer.prepare(ps, st)

    def apply(self, ps, st, x):
        return self.layer.apply(ps, st, x)


def test_layers_are_prepared_once_per_forward_pass(getkey):
    main, mapping, _, scales = _small_layers()
    mapping = (
        (mapping[0][0], _CountingPrepare(nn.WeightNorm(mapping[0][1]))),
        mapping[1],
    )
    model = jaxdeq.MultiScaleDeepEquilibriumNetwork(
        main, mapping, None, optx.Newton(rtol=1e-10, atol=1e-10), scales
    )
    x = jax.random.normal(getkey(), (2, 3))
    ps, st = model.init(getkey(), x)
    _PREPARE_CALLS.clear()
    z, _ = jax.jit(model.apply)(ps, st, x)
    assert len(_PREPARE_CALLS) == 1
    # the prepared (normalized) kernel gives the map of the unprepared layers
    assert max(_scale_residuals(model, ps, st, z, x)) < 1e-8
