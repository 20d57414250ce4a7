"""Training loop, optimisation, checkpoints and logging."""
