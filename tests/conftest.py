import jax
import pytest

# Gradient checks need float64; float32 tests pass explicit float32 arrays.
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(1234), 1000))
    return lambda: next(keys)
