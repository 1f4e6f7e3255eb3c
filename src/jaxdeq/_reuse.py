"""Fixed-point reuse: each example's last fixed point warm-starts its next solve."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree

from ._misc import tree_all_finite


def _check_now(now) -> Array:
    """`now` as an int32 scalar: an int >= 0 (checked at run time when traced)."""
    if isinstance(now, bool) or not (
        isinstance(now, numbers.Integral)
        or (
            isinstance(now, jax.Array | jax.ShapeDtypeStruct)
            and now.shape == ()
            and jnp.issubdtype(now.dtype, jnp.integer)
        )
    ):
        raise TypeError(
            f"now: expected an int or a scalar integer array (a step or epoch "
            f"counter), got {now!r}"
        )
    if isinstance(now, numbers.Integral):
        if now < 0:
            raise ValueError(f"now: expected an int >= 0, got {now}")
        return jnp.asarray(now, jnp.int32)
    now = jnp.asarray(now, jnp.int32)
    return eqx.error_if(now, now < 0, "now: expected an int >= 0")


class FixedPointStore(eqx.Module):
    """Each example's last fixed point, kept to warm-start its next solve: the
    fixed-point reuse of implicit-model training (Bai et al., 2019, "Deep
    Equilibrium Models", and later DEQ training recipes reuse an example's
    previous fixed point as its next initial state), as a jit-friendly pytree the
    user carries like an optimizer state (and can checkpoint).

    Parameters change slowly during training, so the fixed point an example
    reached at its last visit is a close initial state for the next one: fewer
    iterations for the same answer (the solver's tolerance decides the answer, not
    the start). Entries older than `max_age` (in the units of `now`, an int
    `>= 0`: epochs or steps), or written at a later `now` than the lookup's (a
    counter that was reset), are stale and not used.

    **Arguments:**

    - `like`: the state of one batch, a pytree of arrays `(batch, ...)` (e.g.
        `solution.z_star`) or of `jax.ShapeDtypeStruct`s: sets the per-example
        shapes and dtypes.
    - `size`: the number of examples (indices run over `0..size-1`).
    - `max_age`: `None` (entries never go stale) or an int `>= 0`: an entry written
        at `now = t` is used while `now - t <= max_age`.

    **Memory:** `size` states, e.g. 1797 digits x 128 float32 = 0.9 MB.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Parallel(jnp.add, nn.Dense(4, 4, activation=jnp.tanh), nn.Dense(4, 4))
    >>> solver = jaxdeq.Anderson(rtol=1e-5, atol=1e-6)
    >>> model = jaxdeq.DeepEquilibriumNetwork(cell, solver)
    >>> data = jax.random.normal(jax.random.key(1), (10, 4))
    >>> ps, st = model.init(jax.random.key(0), data[:2])
    >>> store = jaxdeq.FixedPointStore(jax.ShapeDtypeStruct((2, 4), jnp.float32), 10)
    >>> index = jnp.array([3, 7])
    >>> for epoch in range(2):
    ...     z0, warm = store.lookup(index, now=epoch)
    ...     y, st, sol = model.apply(ps, st, data[index], z0=z0, warm=warm,
    ...                              return_solution=True)
    ...     store = store.update(index, sol.z_star, now=epoch)
    ...     print(warm.tolist(), sol.nfe.tolist())
    [False, False] [9, 9]
    [True, True] [1, 1]

    ```
    """

    z: PyTree[Array]
    written: Int[Array, " size"]
    max_age: int | None = eqx.field(static=True)

    def __init__(self, like: PyTree, size: int, *, max_age: int | None = None):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"size: expected an int >= 1, got {size!r}")
        if size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        if max_age is not None:
            if isinstance(max_age, bool) or not isinstance(max_age, numbers.Integral):
                raise TypeError(
                    f"max_age: expected None or an int >= 0, got {max_age!r}"
                )
            if max_age < 0:
                raise ValueError(
                    f"max_age: expected None or an int >= 0, got {max_age!r}"
                )
        structs = jax.eval_shape(lambda: like)
        leaves = jtu.tree_leaves(structs)
        if not leaves or any(
            len(s.shape) < 1 or not jnp.issubdtype(s.dtype, jnp.floating)
            for s in leaves
        ):
            raise TypeError(
                "like: expected a batch-first state, a pytree of floating arrays "
                f"(batch, ...) such as solution.z_star, got {structs}"
            )
        self.z = jtu.tree_map(
            lambda s: jnp.zeros((int(size), *s.shape[1:]), s.dtype), structs
        )
        self.written = jnp.full((int(size),), -1, jnp.int32)
        self.max_age = None if max_age is None else int(max_age)

    @property
    def size(self) -> int:
        return self.written.shape[0]

    def _check_index(self, index) -> Int[Array, " batch"]:
        index = jnp.asarray(index)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise TypeError(
                "index: expected a 1-d integer array of example indices, got "
                f"{index.dtype}{list(index.shape)}"
            )
        # JAX clamps out-of-range gathers and drops such scatters: say so instead.
        return eqx.error_if(
            index,
            jnp.any((index < 0) | (index >= self.size)),
            f"index: expected example indices in 0..{self.size - 1} (the store's size)",
        )

    def lookup(
        self, index: Int[Array, " batch"], *, now: int | Int[Array, ""]
    ) -> tuple[PyTree[Array], Bool[Array, " batch"]]:
        """`(z0, warm)` for the examples `index`: their stored fixed points and
        whether each is fresh (written, and at most `max_age` old at `now`); pass
        both to `model.apply(..., z0=z0, warm=warm)`, which starts the other
        samples from the model's own initial state. Raises (at run time, under
        `jit` too) for an index outside `0..size-1`."""
        index = self._check_index(index)
        now = _check_now(now)
        written = self.written[index]
        # (an entry written "after" now, e.g. by a counter that was reset, is stale)
        warm = (written >= 0) & (written <= now)
        if self.max_age is not None:
            warm = warm & (now - written <= self.max_age)
        return jtu.tree_map(lambda leaf: leaf[index], self.z), warm

    def update(
        self,
        index: Int[Array, " batch"],
        z_star: PyTree[Array],
        *,
        now: int | Int[Array, ""],
        keep: Bool[Array, " batch"] | None = None,
    ) -> "FixedPointStore":
        """The store with `z_star` (no gradient) written for the examples `index`,
        stamped `now`: for the samples where `keep` holds (default: every sample
        whose state is finite; e.g. `keep=solution.result == RESULTS.successful`
        to keep converged ones only). Samples not kept leave their entry as it
        was. An index repeated in one batch stores one of its samples (which one
        is unspecified, as for any JAX scatter)."""
        index = self._check_index(index)
        now = _check_now(now)
        z_star = jax.lax.stop_gradient(z_star)
        batch = index.shape[0]
        want = [(batch, *buf.shape[1:]) for buf in jtu.tree_leaves(self.z)]
        got = [jnp.shape(leaf) for leaf in jtu.tree_leaves(z_star)]
        if jtu.tree_structure(z_star) != jtu.tree_structure(self.z) or got != want:
            raise ValueError(
                f"z_star: expected states of shape (batch, ...) = {want} (one per "
                f"index), got {jtu.tree_map(jnp.shape, z_star)}"
            )
        ok = tree_all_finite(z_star, batched=True)
        if keep is not None:
            keep = jnp.asarray(keep)
            if keep.shape != index.shape or keep.dtype != jnp.bool_:
                raise TypeError(
                    f"keep: expected a bool array of shape {index.shape}, got "
                    f"{keep.dtype}{list(keep.shape)}"
                )
            ok = ok & keep
        # Samples not kept write to an index past the end, which the scatter drops.
        target = jnp.where(ok, index, self.size)
        z = jtu.tree_map(
            lambda buf, leaf: buf.at[target].set(leaf.astype(buf.dtype), mode="drop"),
            self.z,
            z_star,
        )
        written = self.written.at[target].set(now, mode="drop")
        return eqx.tree_at(lambda s: (s.z, s.written), self, (z, written))
