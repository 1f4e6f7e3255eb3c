"""Rewrite convolutions into the layout XLA:CPU's fast path expects.

## Why

Reverse-mode autodiff of `lax.conv_general_dilated` emits convolutions whose
dimension numbers are *not* the plain `NHWC`/`HWIO`/`NHWC` form: the input-VJP
swaps the kernel's `I` and `O` dims (kernel spec `HWOI` for an `HWIO` forward
kernel), and the kernel-VJP uses the batch dim as a feature dim (lhs spec `CHWN`,
"kernel" spec `NHWC` read as `IHWO`). XLA:CPU only lowers a convolution to its
fast (Eigen) kernel when all three operands are in the canonical layout below.
Outside loops XLA inserts the transposes itself, but inside the body of a
`lax.while_loop`/`fori_loop`/`scan` it falls back to a naive loop nest. A DEQ's
implicit backward pass iterates `u -> vjp_z(u)` inside a `while_loop`, so it hits
exactly this.

Measured on XLA:CPU (jax 0.10.2, 2 cores; batch 8, 32x32, 48->48 channels,
3x3, 10 convs + `tanh` in a `fori_loop` vs the same 10 unrolled):

| lhs / rhs layout | loop / unrolled |
|---|---|
| `NHWC` / `HWIO` | 1.0x (fast) |
| `NHWC` / `OIHW`, `HWOI`, `IOHW`, `OHWI`, `IHWO` | 20-32x |
| `NCHW` / any kernel layout (`OIHW`, `HWIO`, ...) | 55-107x |
| `NCHW` via explicit transposes to `NHWC`/`HWIO` and back | 1.1x |
| kernel-VJP (autodiff: lhs `CHWN`, rhs `IHWO`) | 18x |
| kernel-VJP, explicit transposes to canonical | 1.1x (1.9x faster than unrolled) |

So fixing only the kernel layout is not enough for `NCHW` inputs: the whole
convolution has to be canonical.

## What "canonical" means

For a convolution with `n` spatial dims, canonical dimension numbers are

- lhs: `(batch, spatial_0, ..., spatial_{n-1}, feature)` -- `NHWC`, `NWC`, `NDHWC`;
  spec `(0, n+1, 1, ..., n)`;
- rhs: `(spatial_0, ..., spatial_{n-1}, in, out)` -- `HWIO`, `WIO`, `DHWIO`;
  spec `(n+1, n, 0, ..., n-1)`;
- out: same as lhs.

## What the rewrite does

`canonicalize_convolutions(fn)` traces `fn` to a jaxpr and evaluates it again,
equation by equation. Every `conv_general_dilated` whose dimension numbers are
not canonical is re-emitted as `lax.transpose` of its non-canonical operands, the
same `conv_general_dilated` primitive with canonical dimension numbers and all
other parameters unchanged (strides, padding, dilations, `feature_group_count`,
`batch_group_count`, precision, preferred element type), and a `lax.transpose`
of the result back to the original output layout. Feature and batch groups are
defined on the *logical* feature/batch dims, so a pure layout permutation leaves
the mathematics untouched for every kind of convolution (grouped, depthwise,
strided, dilated, transposed); only XLA's summation order may change, i.e. values
agree to float rounding. Canonical convolutions and every other equation are
re-bound unchanged.

It recurses into the jaxprs nested in `jit` (`pjit`), `closed_call`, `call`,
`checkpoint` (`remat`), `cond`, `while`, `scan`, `custom_jvp_call` and
`custom_vjp_call` and re-binds those primitives with the rewritten inner jaxprs
(custom JVP/VJP rules themselves are kept as they are). Other higher-order
primitives are left untouched.

Apply it to the function that actually runs inside the loop, i.e. *after*
differentiation: differentiating a rewritten function is correct, but autodiff
emits fresh non-canonical convolutions for the derivative. On GPUs the rewrite
is harmless (measured neutral on an H100), so it need not be CPU-only.

## Example

```python
import jax, jax.numpy as jnp
from jaxdeq._conv_canon import canonicalize_convolutions

w = jnp.ones((3, 3, 8, 8)) * 0.01
cell = lambda z: jnp.tanh(jax.lax.conv_general_dilated(
    z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

@jax.jit
def backward(z, g):
    _, vjp = jax.vjp(cell, z)
    vjp = canonicalize_convolutions(vjp)   # fast inside the loop on XLA:CPU
    return jax.lax.fori_loop(0, 10, lambda i, u: vjp(u)[0] + g, g)
```
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, jaxprs_in_params

__all__ = ["canonicalize_convolutions"]

# Higher-order primitives whose inner jaxprs are rewritten. Every one of these
# keeps its signature when an inner jaxpr is replaced by one with the same in and
# out avals, so only the jaxpr-valued params change.
_RECURSE_INTO = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "call",
        "core_call",
        "remat2",
        "checkpoint",
        "cond",
        "while",
        "scan",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)


def canonicalize_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return `fn` with every convolution re-emitted in canonical layout.

    The returned function has the same signature and computes the same values
    (up to float rounding in the convolutions' summation order), but every
    `lax.conv_general_dilated` in it -- including those inside `jit`,
    `checkpoint`, `cond`, `while_loop`, `scan`, `custom_jvp` and `custom_vjp`
    bodies -- runs with lhs/out in `N<spatial>C` layout and the kernel in
    `<spatial>IO` layout (`NHWC`/`HWIO`/`NHWC` in 2D), with explicit transposes
    around it where the original layouts differ. That is the only form XLA:CPU
    runs fast inside loop bodies; see the module docstring for measurements.

    **Arguments:**

    - `fn`: any JAX-traceable function. Its arguments may be arbitrary pytrees;
      array leaves (JAX/NumPy arrays and Python scalars) are traced, all other
      leaves are passed through as static values. It is re-traced on every call
      (cheap; meant to be called while tracing an outer `jit`).

    **Returns:**

    A function with the signature of `fn`. Its outputs are JAX arrays with the
    pytree structure of `fn`'s outputs. It can be jitted, vmapped and
    differentiated; note that its derivatives are produced by autodiff and are
    therefore not canonicalized themselves -- apply this to the already
    differentiated function (e.g. the `vjp` closure iterated by a solver).

    **Example:**

    ```python
    _, vjp = jax.vjp(cell, z)
    fast_vjp = canonicalize_convolutions(vjp)
    u = jax.lax.fori_loop(0, 30, lambda i, u: fast_vjp(u)[0] + g, g)
    ```
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        traced = [_is_array_leaf(x) for x in leaves]
        dynamic = [x for x, t in zip(leaves, traced, strict=True) if t]

        def flat_fn(*dyn: Any) -> Any:
            it = iter(dyn)
            full = [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
            a, kw = jax.tree.unflatten(treedef, full)
            return fn(*a, **kw)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dynamic)
        out = _eval_canonical(closed.jaxpr, closed.consts, dynamic, {})
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


# ---------------------------------------------------------------------------
# Convolution layouts.


def _canonical_specs(
    n: int,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Canonical (lhs, rhs, out) specs for `n` spatial dims: NHWC, HWIO, NHWC."""
    spatial = tuple(range(1, n + 1))
    lhs = (0, n + 1, *spatial)
    rhs = (n + 1, n, *range(n))
    return lhs, rhs, lhs


def _is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    lhs, rhs, out = (tuple(s) for s in dimension_numbers)
    return (lhs, rhs, out) == _canonical_specs(len(lhs) - 2)


def _to_canonical_perm(spec: Sequence[int], kernel: bool) -> tuple[int, ...]:
    """Permutation that moves an operand with `spec` into canonical layout.

    `spec` is `(batch|out, feature|in, *spatial)` as in `ConvDimensionNumbers`.
    Activations go to `(batch, *spatial, feature)`, kernels to
    `(*spatial, in, out)`.
    """
    first, second, *spatial = (int(s) for s in spec)
    if kernel:
        return (*spatial, second, first)
    return (first, *spatial, second)


def _transpose(x: Any, perm: tuple[int, ...]) -> Any:
    if perm == tuple(range(len(perm))):
        return x
    return lax.transpose(x, perm)


def _canonical_conv(eqn: Any, lhs: Any, rhs: Any) -> Any:
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn
    n = len(lhs_spec) - 2
    lhs_c = _transpose(lhs, _to_canonical_perm(lhs_spec, kernel=False))
    rhs_c = _transpose(rhs, _to_canonical_perm(rhs_spec, kernel=True))
    params = dict(eqn.params)
    params["dimension_numbers"] = lax.ConvDimensionNumbers(*_canonical_specs(n))
    with eqn.ctx.manager:
        out_c = eqn.primitive.bind(lhs_c, rhs_c, **params)
    # out_c has layout (batch, *spatial, feature); send it back to out_spec.
    to_canon = _to_canonical_perm(out_spec, kernel=False)
    return _transpose(out_c, tuple(int(i) for i in np.argsort(to_canon)))


# ---------------------------------------------------------------------------
# Jaxpr interpreter.


def _eval_canonical(
    jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], memo: dict
) -> list[Any]:
    """Evaluate `jaxpr` like `jax.core.eval_jaxpr`, canonicalizing convolutions."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "conv_general_dilated" and not _is_canonical(
            eqn.params["dimension_numbers"]
        ):
            outvals = [_canonical_conv(eqn, *invals)]
        else:
            params = eqn.params
            if name in _RECURSE_INTO:
                params = _rewrite_params(params, memo)
            bind_params = eqn.primitive.get_bind_params(params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **bind_params)
            outvals = list(ans) if eqn.primitive.multiple_results else [ans]
        for v, x in zip(eqn.outvars, outvals, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _rewrite_params(params: dict, memo: dict) -> dict:
    """Rewrite every (closed) jaxpr found in a primitive's params."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, ClosedJaxpr):
            return _rewrite_closed(value, memo)
        if isinstance(value, Jaxpr):
            return _rewrite_open(value, memo)
        if isinstance(value, tuple) and any(
            isinstance(v, (ClosedJaxpr, Jaxpr)) for v in value
        ):
            new = [rewrite(v) for v in value]
            # Keep namedtuples (e.g. custom_linear_solve's jaxprs) intact.
            return type(value)(*new) if hasattr(value, "_fields") else tuple(new)
        return value

    return {k: rewrite(v) for k, v in params.items()}


# Rewritten sub-jaxprs, keyed weakly on the original, so that e.g. a `jax.jit`
# function used in many places maps to a single rewritten jaxpr (and a single
# lowering), also across re-traces.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rewrite_closed(cj: ClosedJaxpr, memo: dict) -> ClosedJaxpr:
    try:
        hit = _CACHE.get(cj)
    except TypeError:  # not weak-referenceable / hashable
        hit = memo.get(id(cj))
    if hit is not None:
        return hit
    new = _retrace(cj, memo)
    try:
        _CACHE[cj] = new
    except TypeError:
        memo[id(cj)] = new
    return new


def _rewrite_open(jaxpr: Jaxpr, memo: dict) -> Jaxpr:
    if jaxpr.constvars:  # open jaxprs in params are const-free; be safe anyway
        return jaxpr
    new = _rewrite_closed(ClosedJaxpr(jaxpr, []), memo)
    # An open jaxpr param cannot carry consts: fall back to the original then.
    return new.jaxpr if not new.consts else jaxpr


def _retrace(cj: ClosedJaxpr, memo: dict) -> ClosedJaxpr:
    if not _contains_conv(cj.jaxpr):
        return cj
    specs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in cj.in_avals
    ]
    new = jax.make_jaxpr(lambda *xs: _eval_canonical(cj.jaxpr, cj.consts, xs, memo))(
        *specs
    )
    # The rewrite must not change the jaxpr's type; if it somehow did (or it
    # captured a tracer from an enclosing trace), keep the original.
    if (
        _sig(new.in_avals) != _sig(cj.in_avals)
        or _sig(new.out_avals) != _sig(cj.out_avals)
        or any(isinstance(c, jax.core.Tracer) for c in new.consts)
    ):
        return cj
    return new


def _sig(avals: Sequence[Any]) -> list[tuple]:
    return [
        (tuple(a.shape), a.dtype, getattr(a, "weak_type", False))
        if hasattr(a, "shape")
        else a
        for a in avals
    ]


def _contains_conv(jaxpr: Jaxpr) -> bool:
    """Whether `jaxpr` (or a jaxpr nested in it) has a non-canonical conv."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            if not _is_canonical(eqn.params["dimension_numbers"]):
                return True
        elif eqn.primitive.name in _RECURSE_INTO:
            for sub in jaxprs_in_params(eqn.params):
                if _contains_conv(sub):
                    return True
    return False
