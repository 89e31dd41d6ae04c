"""The jobs the CLI runs: open a model as a subject, swap, calibrate, fine-tune, score, and report."""
