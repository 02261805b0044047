"""worldmodel: train action-conditioned video world models, from shards to evaluated checkpoints."""

__version__ = "0.1.0"
