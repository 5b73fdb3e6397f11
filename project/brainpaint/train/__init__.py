"""Training: the trainer, checkpoints, EMA, budget, distributed runs, log, preview, export."""
