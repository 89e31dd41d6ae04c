"""Fine-tuning: the training loop, its settings, schedules, optimizer and resumable state,
checkpoints, and distributed (torchrun) workers."""
