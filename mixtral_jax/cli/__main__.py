"""`python -m mixtral_jax.cli VERB ...`, as the `mixtral-jax` command."""

from mixtral_jax.cli import entry

entry()
