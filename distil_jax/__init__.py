"""distil_jax: distil a masked language model (BERT) into a small, fast student (DistilBERT)."""

__version__ = "0.1.0"
