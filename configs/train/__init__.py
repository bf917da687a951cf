"""``vda-jax train --config NAME`` runs ``NAME.py`` here; see ``vda_jax.train.config``."""
