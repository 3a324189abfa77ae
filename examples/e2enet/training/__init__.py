"""Training: the run configuration, the loop, loss, batches, checkpoints, the run folder and DDP processes."""
