"""Tests for `jaxdeq._conv_canon.canonicalize_convolutions`."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr

from jaxdeq._conv_canon import canonicalize_convolutions

F32 = dict(rtol=1e-6, atol=1e-6)
F64 = dict(rtol=1e-12, atol=1e-12)
# A rewritten conv may sum in another order; through a dozen chained convs and
# nonlinearities that float32 rounding grows to a few 1e-6.
F32_DEEP = dict(rtol=1e-5, atol=1e-5)

# --------------------------------------------------------------------------
# Helpers.


def _canonical(dn):
    lhs, rhs, out = (tuple(s) for s in dn)
    n = len(lhs) - 2
    sp = tuple(range(1, n + 1))
    return lhs == (0, n + 1, *sp) and rhs == (n + 1, n, *range(n)) and out == lhs


def _sub_jaxprs(params):
    for v in params.values():
        items = v if isinstance(v, tuple) else (v,)
        for x in items:
            if isinstance(x, ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, Jaxpr):
                yield x


def conv_counts(jaxpr):
    """(#convs, #non-canonical convs) in a jaxpr, recursively."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = bad = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            total += 1
            bad += not _canonical(eqn.params["dimension_numbers"])
        for sub in _sub_jaxprs(eqn.params):
            t, b = conv_counts(sub)
            total, bad = total + t, bad + b
    return total, bad


def assert_tree_close(a, b, tol):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def check_rewrite(fn, *args, tol=F32, expect_rewrite=True, reverse=True):
    """Values, jaxpr counts and derivatives of `fn` vs its rewrite (one compile).

    Derivatives are gradients (`reverse=True`) or JVPs (for `while_loop`s).
    """
    new = canonicalize_convolutions(fn)
    total0, bad0 = conv_counts(jax.make_jaxpr(fn)(*args))
    total1, bad1 = conv_counts(jax.make_jaxpr(new)(*args))
    assert bad1 == 0
    assert total1 == total0
    if expect_rewrite:
        assert bad0 > 0

    def loss(f):
        return lambda *a: sum(
            jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(f(*a)) if x.dtype.kind == "f"
        )

    argnums = tuple(range(len(args)))

    def deriv(f, a):
        if reverse:
            return jax.grad(loss(f), argnums)(*a)
        return jax.jvp(f, a, jax.tree.map(jnp.cos, a))

    @jax.jit
    def both(*a):
        # Values, and derivatives of the rewritten function vs the original ones.
        return (fn(*a), deriv(fn, a)), (new(*a), deriv(new, a))

    ref, out = both(*args)
    assert_tree_close(out, ref, tol)
    return new


# --------------------------------------------------------------------------
# Raw lax.conv_general_dilated cells.

_LAYOUTS = {
    1: [("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW")],
    2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")],
    3: [("NDHWC", "DHWIO", "NDHWC"), ("NCDHW", "OIDHW", "NCDHW")],
}

# name -> (stride, rhs_dilation, lhs_dilation, feature_group_count, cin, cout)
_VARIANTS = {
    "plain": (1, 1, 1, 1, 4, 6),
    "strided_dilated": (2, 2, 1, 1, 4, 6),
    "grouped": (1, 1, 1, 2, 4, 6),
    "depthwise_strided": (2, 1, 1, 4, 4, 8),
    "transposed": (1, 1, 2, 1, 4, 6),
}


def _shape(spec, sizes):
    return tuple(sizes[c] for c in spec)


def _make_conv_case(n, layout, variant, dtype, key):
    stride, rdil, ldil, groups, cin, cout = _VARIANTS[variant]
    lhs, rhs, _ = layout
    sz = dict(N=2, C=cin, D=5, H=6, W=7)
    ksz = dict(O=cout, I=cin // groups, D=2, H=3, W=3)
    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, _shape(lhs, sz), dtype)
    w = jax.random.normal(k2, _shape(rhs, ksz), dtype) * 0.3

    def cell(z, w):
        y = lax.conv_general_dilated(
            z,
            w,
            window_strides=(stride,) * n,
            padding="SAME" if ldil == 1 else [(1, 2)] * n,
            lhs_dilation=(ldil,) * n,
            rhs_dilation=(rdil,) * n,
            dimension_numbers=layout,
            feature_group_count=groups,
        )
        return jnp.tanh(y)

    return cell, z, w


_CASES = [
    (n, lay, var)
    for n in (1, 2, 3)
    for lay in _LAYOUTS[n]
    for var in (_VARIANTS if n == 2 else ["plain", "grouped", "depthwise_strided"])
]


def _case_params():
    """Every case; the default run keeps the 2D ones and one plain case per other
    rank, the rest run under `make test-slow` (each is a separate XLA compile)."""
    for n, lay, var in _CASES:
        fast = n == 2 or var == "plain"
        yield pytest.param(
            n,
            lay,
            var,
            id=f"{n}d-{'_'.join(lay)}-{var}",
            marks=() if fast else (pytest.mark.slow,),
        )


@pytest.mark.parametrize("n,layout,variant", list(_case_params()))
def test_lax_conv_vjps(n, layout, variant, getkey):
    cell, z, w = _make_conv_case(n, layout, variant, jnp.float32, getkey())
    y, vjp = jax.vjp(cell, z, w)
    g = jax.random.normal(getkey(), y.shape, y.dtype)
    # The VJP holds the non-canonical convs (input- and kernel-VJP).
    check_rewrite(vjp, g)
    # The forward pass: canonical only for NHWC/HWIO, rewritten otherwise.
    check_rewrite(cell, z, w, expect_rewrite=not _canonical_layout(layout))


def _canonical_layout(layout):
    lhs, rhs, out = layout
    return lhs[0] == "N" and lhs[-1] == "C" and rhs[-2:] == "IO" and out == lhs


@pytest.mark.slow
@pytest.mark.parametrize("layout", [_LAYOUTS[2][0], _LAYOUTS[2][1]])
@pytest.mark.parametrize("variant", ["strided_dilated", "grouped"])
def test_lax_conv_vjps_float64(layout, variant, getkey):
    cell, z, w = _make_conv_case(2, layout, variant, jnp.float64, getkey())
    y, vjp = jax.vjp(cell, z, w)
    g = jax.random.normal(getkey(), y.shape, y.dtype)
    check_rewrite(vjp, g, tol=F64)


def test_batch_group_count(getkey):
    # The kernel-VJP of a grouped conv uses batch_group_count; test it directly.
    z = jax.random.normal(getkey(), (4, 3, 6, 6), jnp.float32)

    # Build a batch-grouped conv in NCHW: batch 4 split in 2 groups.
    def bgc(z, w):
        return lax.conv_general_dilated(
            z,
            jnp.concatenate([w, w], axis=0),  # O = 6, divisible by 2 groups
            (1, 1),
            "VALID",
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            batch_group_count=2,
        )

    w3 = jax.random.normal(getkey(), (3, 3, 3, 3), jnp.float32)
    check_rewrite(bgc, z, w3)


# --------------------------------------------------------------------------
# flax.linen cells, and cells with nested jaxprs.


class _FlaxCell(fnn.Module):
    features: int = 8

    @fnn.compact
    def __call__(self, z, x):
        y = fnn.Conv(self.features, (3, 3), use_bias=False)(z)
        y = fnn.GroupNorm(num_groups=4, use_bias=False, use_scale=False)(jax.nn.relu(y))
        y = fnn.Conv(z.shape[-1], (3, 3), strides=1, use_bias=False)(y)
        y = fnn.Conv(z.shape[-1], (3, 3), feature_group_count=z.shape[-1])(y)
        return jax.nn.relu(z + y + x)


def test_flax_cell(getkey):
    z = jax.random.normal(getkey(), (2, 8, 8, 4), jnp.float32)
    x = jax.random.normal(getkey(), (2, 8, 8, 4), jnp.float32)
    cell = _FlaxCell()
    params = cell.init(getkey(), z, x)
    y, vjp = jax.vjp(lambda p, z: cell.apply(p, z, x), params, z)
    check_rewrite(vjp, y)
    # Only the input-VJP, as in a DEQ's backward pass, iterated in a loop.
    _, vjp_z = jax.vjp(lambda z: cell.apply(params, z, x), z)
    fast = canonicalize_convolutions(vjp_z)

    @jax.jit
    def loops(g):
        body = lambda f: lambda i, u: 0.5 * f(u)[0] + g
        return lax.fori_loop(0, 3, body(fast), g), lax.fori_loop(0, 3, body(vjp_z), g)

    out, ref = loops(y)
    np.testing.assert_allclose(out, ref, **F32)


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


_softplus.defjvp(lambda p, t: (_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


@jax.custom_vjp
def _scaled(x, s):
    return x * s


_scaled.defvjp(lambda x, s: (x * s, (x, s)), lambda r, g: (g * r[1], jnp.sum(g * r[0])))


def _nested_cell(w1, w2, use_while=False):
    dn = ("NCHW", "OIHW", "NCHW")

    @jax.jit
    def conv1(z):
        return lax.conv_general_dilated(z, w1, (1, 1), "SAME", dimension_numbers=dn)

    def block(z):
        return jax.nn.gelu(
            lax.conv_general_dilated(z, w2, (1, 1), "SAME", dimension_numbers=dn)
        )

    def cell(z):
        y = jax.nn.relu(conv1(z))
        y = jax.checkpoint(block)(y)
        y = _softplus(y)
        y = lax.cond(jnp.sum(y) > 0, block, lambda y: -block(y), y)
        if use_while:  # not reverse-differentiable
            y = lax.while_loop(
                lambda c: c[0] < 2, lambda c: (c[0] + 1, block(c[1]) * 0.5), (0, y)
            )[1]
        y, _ = lax.scan(lambda c, _: (block(c), None), y, None, length=2)
        # custom_vjp functions cannot be forward-differentiated: skip with while.
        return y * 1.5 if use_while else _scaled(y, 1.5)

    return cell


@pytest.mark.parametrize(
    "dtype,tol",
    [(jnp.float32, F32_DEEP), pytest.param(jnp.float64, F64, marks=pytest.mark.slow)],
)
def test_nested_jaxprs(dtype, tol, getkey):
    w1 = jax.random.normal(getkey(), (4, 4, 3, 3), dtype) * 0.3
    w2 = jax.random.normal(getkey(), (4, 4, 3, 3), dtype) * 0.3
    z = jax.random.normal(getkey(), (2, 4, 6, 6), dtype)
    cell = _nested_cell(w1, w2)
    # Forward: NCHW convs sit inside jit, checkpoint, cond, while, scan.
    check_rewrite(cell, z, tol=tol)
    y, vjp = jax.vjp(cell, z)
    check_rewrite(vjp, y, tol=tol)
    cell = _nested_cell(w1, w2, use_while=True)
    check_rewrite(cell, z, tol=tol, reverse=False)
    # The rewritten jaxpr still has every higher-order primitive.
    names = set()

    def walk(j):
        for e in j.eqns:
            names.add(e.primitive.name)
            for sub in _sub_jaxprs(e.params):
                walk(sub)

    walk(jax.make_jaxpr(canonicalize_convolutions(cell))(z).jaxpr)
    for name in ["jit", "remat2", "custom_jvp_call", "cond", "while", "scan"]:
        assert name in names, name
    walk(jax.make_jaxpr(canonicalize_convolutions(_nested_cell(w1, w2)))(z).jaxpr)
    assert "custom_vjp_call" in names


def test_closed_over_tracers_under_jit(getkey):
    # Called while tracing an outer jit: residuals are outer tracers.
    w = jax.random.normal(getkey(), (3, 3, 4, 4), jnp.float32) * 0.3
    z = jax.random.normal(getkey(), (2, 6, 6, 4), jnp.float32)
    cell = lambda z, w: jnp.tanh(
        lax.conv_general_dilated(
            z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )

    def solve(fast, use_while=True):
        @jax.jit
        def f(z, w, g):
            _, vjp = jax.vjp(lambda z: cell(z, w), z)
            if fast:
                vjp = canonicalize_convolutions(vjp)
            if not use_while:  # a scan: reverse-differentiable
                return lax.fori_loop(0, 4, lambda i, u: vjp(u)[0] + g, g)
            return lax.while_loop(
                lambda c: c[0] < 4, lambda c: (c[0] + 1, vjp(c[1])[0] + g), (0, g)
            )[1]

        return f

    np.testing.assert_allclose(solve(True)(z, w, z), solve(False)(z, w, z), **F32)
    n, bad = conv_counts(jax.make_jaxpr(solve(True))(z, w, z))
    assert n > 0 and bad == 0
    # Differentiating through the loop of rewritten VJPs also matches.
    # (float64: float32 rounding of these O(30) weight gradients is ~1e-5.)
    z64, w64 = z.astype(jnp.float64), w.astype(jnp.float64)
    gr = lambda fast: jax.grad(lambda w: jnp.sum(solve(fast, False)(z64, w, z64)))
    np.testing.assert_allclose(gr(True)(w64), gr(False)(w64), **F64)
    # vmap of the rewritten function.
    _, vjp = jax.vjp(lambda z: cell(z, w), z)
    zs = jnp.stack([z, 2 * z])
    np.testing.assert_allclose(
        jax.vmap(canonicalize_convolutions(vjp))(zs)[0],
        jax.vmap(vjp)(zs)[0],
        **F32,
    )


def test_no_convs_and_pytrees(getkey):
    def fn(tree, scale, name):
        assert name == "static"
        a, b = tree["a"], tree["b"]
        return {"out": jnp.sin(a) @ b * scale, "aux": (a.sum(), None)}

    tree = {
        "a": jax.random.normal(getkey(), (3, 4), jnp.float32),
        "b": jax.random.normal(getkey(), (4, 2), jnp.float32),
    }
    new = canonicalize_convolutions(fn)
    assert_tree_close(new(tree, 2.0, name="static"), fn(tree, 2.0, "static"), F64)
    j0 = jax.make_jaxpr(lambda t: fn(t, 2.0, "static"))(tree)
    j1 = jax.make_jaxpr(lambda t: new(t, 2.0, name="static"))(tree)
    assert [e.primitive for e in j0.eqns] == [e.primitive for e in j1.eqns]
    assert j0.out_avals == j1.out_avals
    assert new.__name__ == fn.__name__
