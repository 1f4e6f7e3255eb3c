"""jaxdeq: deep equilibrium models in JAX."""

from . import equinox as equinox, flax as flax, nn as nn
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    NeumannGradient as NeumannGradient,
    OneStepGradient as OneStepGradient,
    PhantomGradient as PhantomGradient,
    ReversibleAdjoint as ReversibleAdjoint,
    ShineGradient as ShineGradient,
    UnrolledAdjoint as UnrolledAdjoint,
)
from ._checkpoint import (
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._deq import (
    DeepEquilibriumNetwork as DeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork as SkipDeepEquilibriumNetwork,
)
from ._inr import deq_implicit_representation as deq_implicit_representation
from ._linear_solve import BackwardStatistics as BackwardStatistics
from ._multiscale import (
    MultiScaleDeepEquilibriumNetwork as MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE as MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork as MultiScaleSkipDeepEquilibriumNetwork,
)
from ._regularization import (
    fixed_point_correction_loss as fixed_point_correction_loss,
    jacobian_frobenius_estimate as jacobian_frobenius_estimate,
    skip_loss as skip_loss,
    spectral_radius as spectral_radius,
)
from ._reuse import FixedPointStore as FixedPointStore
from ._segments import scan_segments as scan_segments
from ._sequence import (
    causal_transformer_block as causal_transformer_block,
    deq_sequence_model as deq_sequence_model,
)
from ._sharding import shard_map_apply as shard_map_apply
from ._solution import (
    RESULTS as RESULTS,
    AnytimeSolution as AnytimeSolution,
    DeepEquilibriumSolution as DeepEquilibriumSolution,
)
from ._solver import (
    Anderson as Anderson,
    Broyden as Broyden,
    Reversible as Reversible,
)
from ._zoo import (
    MDEQImageClassifier as MDEQImageClassifier,
    mdeq_image_classifier as mdeq_image_classifier,
)

__version__ = "0.1.0"
