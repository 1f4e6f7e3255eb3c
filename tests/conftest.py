import jax
import pytest

# Gradient checks need float64; float32 tests pass explicit float32 arrays.
jax.config.update("jax_enable_x64", True)
# The rules of optimistix's and equinox's suites: no silent dtype or rank promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Test modules not yet clean under those rules run with JAX's defaults: those whose
# dependencies are not (optax's Adam, flax.linen's normalization layers promote
# implicitly themselves) and those whose own test code is not yet converted.
NOT_YET_STRICT = {
    "test_checkpoint",  # optax's Adam (bias correction: int32 step x float)
    "test_interop",  # flax.linen / nnx / equinox modules promote implicitly
    "test_nn",  # the adapters' tests run those modules with float64 inputs
}


@pytest.fixture(autouse=True)
def _promotion_rules(request):
    if request.module.__name__ not in NOT_YET_STRICT:
        yield
        return
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
