import jax
import pytest

# Gradient checks need float64; float32 tests pass explicit float32 arrays.
jax.config.update("jax_enable_x64", True)
# The rules of optimistix's and equinox's suites: no silent dtype or rank promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
