"""Training and evaluation machinery: metrics, optimisation, checkpoints and plots."""
