"""Training: Lightning modules, strategies, checkpoints and callbacks around the models."""
