"""Small pytree helpers shared by the solve, the adjoints and the models."""

import math

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


def tree_sub(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.subtract, a, b)


def tree_add(a: PyTree[Array], b: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.add, a, b)


def tree_where(pred: Array, a: PyTree, b: PyTree, *, batched: bool = False) -> PyTree:
    """`where(pred, a, b)` leafwise; with `batched`, `pred` has shape `(batch,)` and is
    broadcast over each leaf's trailing axes."""

    def select(x, y):
        p = pred
        if batched:
            p = jnp.reshape(pred, pred.shape + (1,) * (jnp.ndim(x) - 1))
        return jnp.where(p, x, y)

    return jtu.tree_map(select, a, b)


def accumulation_dtype(dtype) -> jnp.dtype:
    """`dtype`, or float32 for half precision: the dtype norms and small solves run
    in (written out, since strict dtype promotion has no float64/float32 rule)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _trailing(leaf: Array) -> int:
    return math.prod(leaf.shape[1:])


def sample_sq_norm(tree: PyTree[Array], *, batched: bool) -> Array:
    """Squared 2-norm of a state, per sample: a scalar, or `(batch,)` when `batched`
    (the leading axis of every leaf is the batch). Accumulates in at least float32."""
    total = None
    for leaf in jtu.tree_leaves(tree):
        leaf = leaf.astype(accumulation_dtype(leaf.dtype))
        if batched:  # (an explicit trailing size: the batch may be empty)
            sq = jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], _trailing(leaf)), 1)
        else:
            sq = jnp.sum(jnp.square(leaf))
        total = sq if total is None else total + sq
    return total


def tree_all_finite(tree: PyTree[Array], *, batched: bool = False) -> Array:
    """Whether every element is finite: a scalar, or per sample with `batched`
    (`True` for an empty tree).

    Computed as `isfinite(sum(leaf * 0))` (a NaN or an infinity times 0 is NaN, a
    finite value times 0 is 0): the same answer as `all(isfinite(leaf))`, but when
    the tree is a trace-time constant (a zero initial state) XLA folds it at once,
    where it folds `all(isfinite(leaf))` element by element in its evaluator:
    seconds of compilation for a W2 state (32 x 49152)."""
    out = jnp.array(True)
    for leaf in jtu.tree_leaves(tree):
        zero = leaf * jnp.zeros((), leaf.dtype)
        if batched:
            ok = jnp.isfinite(jnp.sum(zero.reshape(leaf.shape[0], _trailing(leaf)), 1))
        else:
            ok = jnp.isfinite(jnp.sum(zero))
        out = out & ok
    return out


def zero_cotangent(x: PyTree) -> PyTree:
    """The zero cotangent (or tangent) of a pytree (`float0` for integer and key
    leaves)."""

    def zero(leaf):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(np.shape(leaf), dtype=jax.dtypes.float0)

    return jtu.tree_map(zero, x)
