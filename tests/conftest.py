import jax
import pytest

# Gradient checks need float64; float32 tests pass explicit float32 arrays.
jax.config.update("jax_enable_x64", True)
# The rules of optimistix's and equinox's suites: no silent dtype or rank promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Test modules not yet clean under those rules (their own test code, flax.linen's
# normalization layers, which promote float32 x float64 themselves, and the
# layer/solver modules they exercise) run with JAX's defaults until they are.
NOT_YET_STRICT = {
    "test_checkpoint",
    "test_interop",
    "test_multiscale",
    "test_nn",
    "test_normalization",
    "test_solvers",
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
