"""Saving and restoring pytrees of arrays (`ps`, `st`, optimizer states) with
orbax-checkpoint."""

import os
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

_FORMAT = "jaxdeq-checkpoint-1"


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jaxdeq checkpoints need orbax-checkpoint: `pip install jaxdeq[checkpoint]`"
        ) from error
    return ocp


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _kind(leaf: Any) -> dict:
    if _is_key(leaf):
        return {"kind": "key", "impl": str(jax.random.key_impl(leaf))}
    if isinstance(leaf, jax.Array):
        return {"kind": "array"}
    if isinstance(leaf, np.ndarray | np.generic):
        return {"kind": "numpy"}
    if isinstance(leaf, bool | int | float | complex):
        return {"kind": type(leaf).__name__}
    raise TypeError(
        "tree: checkpoints hold arrays, PRNG keys and Python numbers, got a leaf of "
        f"type {type(leaf).__name__}"
    )


def _describe(leaf: Any) -> dict:
    """What a leaf is (its kind, shape and dtype), checked against `like` on load."""
    kind = _kind(leaf)
    if kind["kind"] in ("key", "array", "numpy"):
        kind["shape"] = list(np.shape(leaf))
        kind["dtype"] = str(leaf.dtype)
    return kind


def _to_array(leaf: Any) -> Any:
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array):
        return leaf
    return np.asarray(leaf)


def _leaf_name(index: int) -> str:
    return f"leaf_{index:06d}"


def _paths(tree: PyTree) -> tuple[list[str], list[Any]]:
    with_paths = jtu.tree_flatten_with_path(tree)[0]
    paths = [jtu.keystr(path) for path, _ in with_paths]
    return paths, [leaf for _, leaf in with_paths]


def save_checkpoint(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False):
    """Saves a pytree of arrays with orbax-checkpoint.

    Anything `jax.tree_util` can flatten works: `ps` and `st` of any jaxdeq model
    (including the typed PRNG key and the `DeepEquilibriumSolution` in `st`), optax
    optimizer states, `eqx.Module`s, Flax variable dicts. Arrays are stored exactly
    (same dtype, same bits); PRNG keys are stored as their key data with the name of
    their implementation. The pytree structure is not stored: pass a tree of the same
    structure to [`jaxdeq.load_checkpoint`][] (the leaf paths are stored, so a wrong
    one is reported).

    **Arguments:**

    - `path`: the checkpoint directory (made absolute; must not exist unless
      `overwrite=True`).
    - `tree`: the pytree to save; leaves are JAX or NumPy arrays, typed PRNG keys or
      Python numbers.
    - `overwrite`: replace an existing checkpoint at `path`.

    **Example:**

    ```python
    import tempfile, jax, jax.numpy as jnp, optax, jaxdeq
    from jaxdeq import nn

    model = jaxdeq.DeepEquilibriumNetwork(
        nn.Parallel(jnp.add, nn.Dense(2, 2), nn.Dense(2, 2)),
        jaxdeq.Anderson(rtol=1e-5, atol=1e-5))
    ps, st = model.init(jax.random.key(0), jnp.ones((1, 2)))
    opt_state = optax.adam(1e-3).init(ps)
    path = tempfile.mkdtemp() + "/step_0"
    jaxdeq.save_checkpoint(path, {"ps": ps, "st": st, "opt_state": opt_state})
    like = {"ps": ps, "st": st, "opt_state": opt_state}  # any values, same structure
    restored = jaxdeq.load_checkpoint(path, like)
    ```
    """
    ocp = _orbax()
    paths, leaves = _paths(tree)
    kinds = [_describe(leaf) for leaf in leaves]
    arrays = {_leaf_name(i): _to_array(leaf) for i, leaf in enumerate(leaves)}
    structure = {"format": _FORMAT, "paths": paths, "kinds": kinds}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            os.path.abspath(os.fspath(path)),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays),
                structure=ocp.args.JsonSave(structure),
            ),
            force=overwrite,
        )


def _abstract(array: Any) -> Any:
    if isinstance(array, jax.Array):
        return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)
    return np.empty(np.shape(array), np.asarray(array).dtype)


def _restore_leaf(stored: Any, like: Any, kind: dict) -> Any:
    if kind["kind"] == "key":
        return jax.random.wrap_key_data(stored, impl=jax.random.key_impl(like))
    if kind["kind"] == "array":
        return stored
    if kind["kind"] == "numpy":
        return np.asarray(stored)
    return type(like)(np.asarray(stored).item())


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Restores a pytree saved by [`jaxdeq.save_checkpoint`][].

    **Arguments:**

    - `path`: the checkpoint directory.
    - `like`: a pytree of the same structure as the one saved, e.g. a freshly
      initialised `(ps, st)` and optimizer state. Its leaves give the shapes, dtypes,
      shardings and PRNG key implementations to restore; their values are not used.

    **Returns:**

    The saved pytree, with the structure of `like`: the same bits as were saved.

    Raises `ValueError` if the saved tree has other leaf paths, shapes, dtypes or
    kinds of leaves than `like`.

    **Example:**

    ```python
    import tempfile, jax, jax.numpy as jnp, jaxdeq
    from jaxdeq import nn

    model = jaxdeq.DeepEquilibriumNetwork(
        nn.Parallel(jnp.add, nn.Dense(2, 2), nn.Dense(2, 2)),
        jaxdeq.Anderson(rtol=1e-5, atol=1e-5))
    x = jnp.ones((1, 2))
    ps, st = model.init(jax.random.key(0), x)
    path = tempfile.mkdtemp() + "/model"
    jaxdeq.save_checkpoint(path, (ps, st))
    ps, st = jaxdeq.load_checkpoint(path, model.init(jax.random.key(1), x))
    ```
    """
    ocp = _orbax()
    path = os.path.abspath(os.fspath(path))
    paths, leaves = _paths(like)
    treedef = jtu.tree_structure(like)
    kinds = [_describe(leaf) for leaf in leaves]
    abstract = {
        _leaf_name(i): _abstract(_to_array(leaf)) for i, leaf in enumerate(leaves)
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        structure = checkpointer.restore(
            path, args=ocp.args.Composite(structure=ocp.args.JsonRestore())
        )["structure"]
        if structure.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a jaxdeq checkpoint")
        if structure["paths"] != paths:
            missing = sorted(set(structure["paths"]) - set(paths))
            extra = sorted(set(paths) - set(structure["paths"]))
            raise ValueError(
                "like: its structure differs from the saved tree's (saved only: "
                f"{missing[:5]}, in `like` only: {extra[:5]})"
            )
        saved_kinds = structure["kinds"]
        for name, saved_kind, kind in zip(paths, saved_kinds, kinds, strict=True):
            if saved_kind != kind:
                raise ValueError(
                    f"like: the leaf {name} was saved as {saved_kind}, `like` has "
                    f"{kind} (a DEQ's `st` holds the solution of its last call, "
                    "shaped by that call's batch)"
                )
        stored = checkpointer.restore(
            path,
            args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)),
        )["arrays"]
    restored = []
    for i, (leaf, kind) in enumerate(zip(leaves, kinds, strict=True)):
        restored.append(_restore_leaf(stored[_leaf_name(i)], leaf, kind))
    return jtu.tree_unflatten(treedef, restored)
