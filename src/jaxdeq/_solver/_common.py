"""Pieces shared by jaxdeq's solvers: the termination measure and best-iterate
tracking. (Pytree helpers shared by the whole package are in `jaxdeq._misc`.)"""

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree, Scalar

from .._misc import tree_where

Y = TypeVar("Y")
Aux = TypeVar("Aux")

Termination = Literal["elementwise", "normwise"]
TERMINATIONS = ("elementwise", "normwise")


def safe_ratio(numerator: ArrayLike, denominator: ArrayLike) -> Array:
    """`numerator / denominator` for nonnegative arguments, with `0 / 0 = 0` and
    `x / 0 = inf` for `x > 0`. Neither the value nor its gradient is ever NaN unless
    `numerator` is.
    """
    positive = denominator > 0
    safe_denominator = jnp.where(positive, denominator, 1)
    ratio = jnp.where(positive, numerator / safe_denominator, jnp.inf)
    return jnp.where(numerator == 0, 0, ratio)


def scaled_residual_size(
    norm: Callable[[PyTree], Scalar],
    termination: Termination,
    atol: float,
    rtol: float,
    residual: PyTree[Array],
    reference: PyTree[Array],
) -> Scalar:
    """The size of `residual` relative to the tolerance; the solve has converged once
    this is `< 1`.

    - `"elementwise"`: `norm(|residual| / (atol + rtol * |reference|))`, optimistix's
        convention.
    - `"normwise"`: `norm(residual) / (atol + rtol * norm(reference))`.
    """
    if termination == "elementwise":
        ratio = jtu.tree_map(
            lambda r, x: safe_ratio(jnp.abs(r), atol + rtol * jnp.abs(x)),
            residual,
            reference,
        )
        return norm(ratio)
    return safe_ratio(norm(residual), atol + rtol * norm(reference))


def ravel(tree: PyTree[Array]) -> tuple[Array, Callable[[Array], PyTree[Array]]]:
    """`jax.flatten_util.ravel_pytree`, with leaves of mixed floating dtypes cast
    explicitly to the widest (which `ravel_pytree` leaves to implicit promotion, an
    error under strict dtype promotion); `unravel` casts each leaf back."""
    leaves, treedef = jtu.tree_flatten(tree)
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    if not leaves or all(d == dtypes[0] for d in dtypes):
        return jax.flatten_util.ravel_pytree(tree)
    dtype = max(dtypes, key=lambda d: jnp.dtype(d).itemsize)
    flat, unravel_same = jax.flatten_util.ravel_pytree(
        jtu.tree_unflatten(treedef, [leaf.astype(dtype) for leaf in leaves])
    )

    def unravel(flat: Array) -> PyTree[Array]:
        same = jtu.tree_leaves(unravel_same(flat))
        return jtu.tree_unflatten(
            treedef, [leaf.astype(d) for leaf, d in zip(same, dtypes, strict=True)]
        )

    return flat, unravel


def check_tolerance(solver: str, name: str, value: Any) -> None:
    """A tolerance is a real number >= 0 (or an array, e.g. traced)."""
    if isinstance(value, (bool, str)) or not isinstance(
        value, (int, float, jax.Array, np.ndarray, np.floating)
    ):
        raise TypeError(
            f"{solver}({name}=...): expected a real number >= 0, got {value!r}"
        )
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{solver}({name}=...): expected >= 0, got {value!r}")


def check_common_options(
    solver: str, rtol: Any, atol: Any, termination: str, divergence_factor: float
) -> None:
    check_tolerance(solver, "rtol", rtol)
    check_tolerance(solver, "atol", atol)
    check_tolerance(solver, "divergence_factor", divergence_factor)
    if termination not in TERMINATIONS:
        raise ValueError(
            f"{solver}(termination=...): expected one of {TERMINATIONS}, got "
            f"{termination!r}"
        )
    if isinstance(divergence_factor, (int, float)) and not divergence_factor > 1:
        raise ValueError(
            f"{solver}(divergence_factor=...): expected > 1, got {divergence_factor}"
        )


class Progress(eqx.Module, Generic[Y, Aux]):
    """Residual sizes seen so far, and the best evaluated iterate with its `aux`.

    "Best" means the lowest `error` (the termination measure), ties broken by the
    lowest `residual_norm` (this matters when `atol = rtol = 0`, where every nonzero
    residual has `error = inf`).
    """

    num_steps: Int[Array, ""]
    error: Scalar
    residual_norm: Scalar
    best_y: Y
    best_aux: Aux
    best_error: Scalar
    best_residual_norm: Scalar

    @classmethod
    def start(
        cls,
        y: Y,
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        dtype: Any,
    ) -> "Progress[Y, Aux]":
        inf = jnp.array(jnp.inf, dtype)
        return cls(
            num_steps=jnp.array(0),
            error=inf,
            residual_norm=inf,
            best_y=y,
            best_aux=jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct),
            best_error=inf,
            best_residual_norm=inf,
        )

    def record(
        self, y: Y, aux: Aux, error: Scalar, residual_norm: Scalar
    ) -> "Progress[Y, Aux]":
        """Record the evaluation of `fn` at `y`. NaN sizes are never an improvement."""
        error = jnp.asarray(error, self.error.dtype)
        residual_norm = jnp.asarray(residual_norm, self.residual_norm.dtype)
        improved = (error < self.best_error) | (
            (error == self.best_error) & (residual_norm < self.best_residual_norm)
        )
        return Progress(
            num_steps=self.num_steps + 1,
            error=error,
            residual_norm=residual_norm,
            best_y=tree_where(improved, y, self.best_y),
            best_aux=tree_where(improved, aux, self.best_aux),
            best_error=jnp.where(improved, error, self.best_error),
            best_residual_norm=jnp.where(
                improved, residual_norm, self.best_residual_norm
            ),
        )

    def terminate(
        self, divergence_factor: float
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        """Stop once the latest evaluation has converged (`error < 1`), is non-finite
        (`optx.RESULTS.nonfinite`, as optimistix's own solvers report it), or is
        larger than `divergence_factor` times the best one
        (`optx.RESULTS.nonlinear_divergence`)."""
        converged = self.error < 1
        started = (self.num_steps > 0) & jnp.invert(converged)
        nonfinite = started & jnp.invert(jnp.isfinite(self.residual_norm))
        diverged = started & (
            self.residual_norm > divergence_factor * self.best_residual_norm
        )
        result = optx.RESULTS.where(
            diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
        )
        result = optx.RESULTS.where(nonfinite, optx.RESULTS.nonfinite, result)
        return converged | diverged | nonfinite, result
