"""The ps/st layer protocol shared by every layer, container and DEQ model."""

import abc
from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import PRNGKeyArray, PyTree


class AbstractLayer(eqx.Module):
    """A layer in the Lux ps/st style.

    A layer is an immutable description holding configuration only; its parameters
    `ps` and its state `st` are pytrees that live outside it:

    ```python
    ps, st = layer.init(key, x)     # x: a sample input, used for shapes and dtypes
    y, st = layer.apply(ps, st, x)  # pure
    ```

    Layers without parameters or state return `{}` for them. `apply` returns `st`
    with the same structure, shapes and dtypes it was given, so a jitted training
    step compiles once and `lax.scan` can carry it.
    """

    @abc.abstractmethod
    def init(self, key: PRNGKeyArray, x: Any) -> tuple[PyTree, PyTree]:
        """Create `(ps, st)` for inputs shaped like `x`."""

    @abc.abstractmethod
    def apply(self, ps: PyTree, st: PyTree, x: Any) -> tuple[Any, PyTree]:
        """Apply the layer: returns `(y, st)`."""

    def prepare(self, ps: PyTree, st: PyTree) -> tuple[PyTree, PyTree]:
        """Work that depends on `ps`/`st` only, done once per forward pass.

        A DEQ model applies its cell at every solver iteration; it calls `prepare`
        once before solving and hands the result to every `apply`. Layers whose
        `apply` would redo input-independent work (a weight or spectral
        normalization) return it precomputed here; `apply` must accept both the
        prepared and the original `(ps, st)` and give the same result. `st` keeps
        its structure, shapes and dtypes. The default is the identity; containers
        prepare their children.
        """
        return ps, st

    # Whether `apply` takes `return_solution=True` and then returns
    # `(y, st, solution)`: DEQ models (their `DeepEquilibriumSolution`) and the
    # containers (one entry per child, `None` for a child without solutions).
    returns_solution: ClassVar[bool] = False


def check_return_solution(return_solution: Any) -> None:
    if not isinstance(return_solution, bool):
        raise TypeError(f"return_solution: expected a bool, got {return_solution!r}")


def apply_with_solution(
    layer: AbstractLayer, ps: PyTree, st: PyTree, x: Any, **kwargs
) -> tuple[Any, PyTree, Any]:
    """`(y, st, solution)` of any layer: its solution(s) when it has some, `None`
    otherwise."""
    if layer.returns_solution:
        return layer.apply(ps, st, x, return_solution=True, **kwargs)
    return (*layer.apply(ps, st, x, **kwargs), None)
