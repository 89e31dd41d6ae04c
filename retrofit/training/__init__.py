"""Fine-tuning: the training loop, its schedule, checkpoints, and distributed (torchrun) workers."""
