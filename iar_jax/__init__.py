"""iar-jax: IAR and IAR2 in JAX/Flax."""

__version__ = "0.1.0"
