"""Data-parallel DEQ solves under `jax.shard_map`.

The plain way to run a DEQ on many devices needs nothing from jaxdeq: put the batch
on a mesh with `jax.device_put(x, NamedSharding(mesh, P("batch")))`, keep the
parameters replicated and `jax.jit` the step; XLA partitions the per-sample solves
(see `docs/sharding.md`). `shard_map_apply` is the alternative for per-sample solves
in which every device runs its own loop over its own samples, with no collective
inside the loop.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, PyTree

from ._equilibrium import EquilibriumConfig
from .nn._core import AbstractLayer


def _solution_specs(solution: PyTree, axis: str) -> PyTree:
    """Per-sample solution leaves are split over `axis`; the batch-mean Jacobian
    loss is replicated."""
    return jtu.tree_map(lambda leaf: P(axis) if jnp.ndim(leaf) >= 1 else P(), solution)


def _replicate_where(specs: PyTree, tree: PyTree, axis: str) -> PyTree:
    """Average over the devices the floating leaves that leave the `shard_map`
    replicated: the Jacobian loss and any batch statistics in the cell's state differ
    between devices; for the others the mean is the value itself."""

    def mean_if_replicated(spec, leaf):
        if spec == P() and jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jax.lax.pmean(leaf, axis)
        return leaf

    return jtu.tree_map(mean_if_replicated, specs, tree)


def shard_map_apply(
    model: AbstractLayer, mesh: Mesh, axis: str = "batch"
) -> Callable[..., tuple[Array, PyTree]]:
    """`model.apply` with the batch split over the mesh axis `axis` by `jax.shard_map`:
    each device solves its own samples in its own loop, which stops when *its*
    slowest sample has converged, with no communication between devices during the
    solve. Gradients with respect to the (replicated) parameters are summed over the
    devices by the transpose of `shard_map`.

    Use it inside `jax.jit`. The results equal those of `model.apply` up to
    floating-point reassociation, with two differences: `solution.jacobian_loss` is
    the mean of the per-device estimates, and cell state that depends on the batch is
    averaged over the devices.

    **Arguments:**

    - `model`: a DEQ model with per-sample solves (`joint_solve=False`); a joint solve
        couples the whole batch and is run by `jax.jit` on sharded inputs instead.
    - `mesh`: a `jax.sharding.Mesh`; the parameters and state are replicated over all
        its axes.
    - `axis`: the mesh axis the batch is split over. The batch size must be divisible
        by its size.

    **Returns:** a function `apply(ps, st, x, *, max_steps=None,
    return_solution=False)` with the signature of `model.apply`, whose `z` and
    per-sample solution fields are sharded over `axis`.

    **Example** (on as many devices as there are; `jax.make_mesh` makes meshes with
    explicit axes by default, and jaxdeq's solvers need automatic ones):

    ```python
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> from jaxdeq import nn
    >>> cell = nn.Chain(nn.Parallel(jnp.add, nn.Dense(2, 2), nn.Dense(2, 2)),
    ...                 nn.WrappedFunction(jnp.tanh))
    >>> solver = jaxdeq.Anderson(rtol=1e-5, atol=1e-5)
    >>> model = jaxdeq.DeepEquilibriumNetwork(cell, solver)
    >>> n = len(jax.devices())
    >>> mesh = jax.make_mesh((n,), ("batch",),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> x = jnp.ones((4 * n, 2))  # z and solution.nfe come out sharded over "batch"
    >>> ps, st = model.init(jax.random.key(0), x)
    >>> apply = jax.jit(jaxdeq.shard_map_apply(model, mesh),
    ...                 static_argnames="return_solution")
    >>> z, st, solution = apply(ps, st, x, return_solution=True)
    >>> z.shape == x.shape, bool(jnp.all(solution.result == 0))
    (True, True)

    ```
    """
    if not isinstance(getattr(model, "config", None), EquilibriumConfig):
        raise TypeError(
            f"model: expected a jaxdeq DEQ model, got {type(model).__name__}"
        )
    if model.config.joint_solve:
        raise ValueError(
            "model: a joint solve (joint_solve=True) couples every sample of the "
            "batch, so it cannot be split into per-device solves; run it with "
            "jax.jit on a batch sharded with NamedSharding instead"
        )
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh {mesh.axis_names}")

    def apply(ps, st, x, *, max_steps=None, return_solution=False):
        batch = jtu.tree_leaves(x)[0].shape[0]
        if batch % mesh.shape[axis] != 0:
            raise ValueError(
                f"x: the batch size {batch} is not divisible by the size "
                f"{mesh.shape[axis]} of the mesh axis {axis!r}"
            )

        specs = jtu.tree_map(lambda _: P(), st)
        # A Python-int budget must stay static (diffrax's step cap is), so only a
        # traced budget is passed through the shard_map, replicated.
        static_budget = max_steps is None or isinstance(max_steps, int)

        def local(ps, st, x, budget):
            budget = max_steps if static_budget else budget
            z, new_st, solution = model.apply(
                ps, st, x, max_steps=budget, return_solution=True
            )
            solution = _replicate_where(_solution_specs(solution, axis), solution, axis)
            return z, _replicate_where(specs, new_st, axis), solution

        solution_specs = _solution_specs(
            jax.eval_shape(
                lambda: model.apply(
                    ps, st, x, max_steps=max_steps, return_solution=True
                )
            )[2],
            axis,
        )
        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P(axis), P()),
            out_specs=(P(axis), specs, solution_specs),
            check_vma=False,
        )
        z, new_st, solution = sharded(ps, st, x, None if static_budget else max_steps)
        return (z, new_st, solution) if return_solution else (z, new_st)

    return apply
