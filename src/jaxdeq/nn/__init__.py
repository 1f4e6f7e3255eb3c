"""The ps/st layer protocol, its layers and containers, and Flax/Equinox adapters."""

from ._adapters import (
    from_equinox as from_equinox,
    from_flax as from_flax,
    from_nnx as from_nnx,
)
from ._containers import (
    BranchLayer as BranchLayer,
    Chain as Chain,
    Parallel as Parallel,
)
from ._core import AbstractLayer as AbstractLayer
from ._dropout import VariationalDropout as VariationalDropout
from ._layers import (
    Conv as Conv,
    Dense as Dense,
    NoOpLayer as NoOpLayer,
    WrappedFunction as WrappedFunction,
)
from ._normalization import (
    SpectralNorm as SpectralNorm,
    WeightNorm as WeightNorm,
)
