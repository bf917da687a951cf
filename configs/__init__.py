"""Training configs (``vda-jax train --config NAME``), installed as ``vda_jax.configs``."""
