"""jaxdeq: deep equilibrium models in JAX."""

__version__ = "0.1.0"
